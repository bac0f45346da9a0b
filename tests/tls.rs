//! TLS termination: HTTPS with ALPN, HTTP/2 and HTTP/1.1, into a real
//! receiver. The certificate is generated at test time.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_h2_and_http1_round_trips() {
    let prom = Prometheus::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
        .expect("generate a self-signed certificate");
    let cert_pem = ck.cert.pem();
    let cert = dir.path().join("tls.crt");
    let key = dir.path().join("tls.key");
    std::fs::write(&cert, &cert_pem).expect("write cert");
    std::fs::write(&key, ck.signing_key.serialize_pem()).expect("write key");

    let mut cfg = test_config(&prom.write_url());
    cfg.tls.cert = Some(cert);
    cfg.tls.key = Some(key);
    let gw = Gateway::start(cfg).await;

    let root = reqwest::Certificate::from_pem(cert_pem.as_bytes()).expect("parse cert");
    let base = || {
        reqwest::Client::builder()
            .no_proxy()
            .add_root_certificate(root.clone())
            .resolve("localhost", gw.addr)
    };
    let url = format!("https://localhost:{}/storage/api/v2/write", gw.addr.port());
    let ts = now_ms();
    for (client, want, job) in [
        (base().build(), reqwest::Version::HTTP_2, "tls-h2"),
        (
            base().http1_only().build(),
            reqwest::Version::HTTP_11,
            "tls-h1",
        ),
    ] {
        let client = client.expect("build TLS client");
        let body = write_body(vec![series("up", &[("job", job)], 1.0, ts)]);
        let resp = rw_post(&client, &url, Some(TENANT_A), body)
            .send()
            .await
            .expect("POST over HTTPS");
        assert_eq!(resp.version(), want, "{job}");
        assert_eq!(status_body(resp).await, (204, String::new()), "{job}");
        // An error answer travels over TLS the same way.
        let resp = rw_post(&client, &url, None, Vec::new())
            .send()
            .await
            .expect("POST over HTTPS");
        assert_eq!(
            status_body(resp).await,
            (400, "missing Cloud-Account-Id header\n".to_string())
        );
    }

    let jobs: std::collections::BTreeSet<String> = prom
        .series("up")
        .await
        .into_iter()
        .map(|l| {
            assert_eq!(l["cloud_account_id"], TENANT_A);
            l["job"].clone()
        })
        .collect();
    assert_eq!(jobs, ["tls-h1".to_string(), "tls-h2".to_string()].into());

    // Plain HTTP on the TLS port is not served.
    let plain = client()
        .get(format!("http://{}/-/healthy", gw.addr))
        .send()
        .await;
    assert!(plain.is_err() || !plain.expect("answer").status().is_success());
    gw.stop().await;
}

/// Without TLS (an ingress terminates it), both HTTP/1.1 and cleartext
/// HTTP/2 (prior knowledge, as gRPC-style ingresses speak to backends) work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_serves_http1_and_h2c() {
    let up = FakeUpstream::start(Vec::new()).await;
    let gw = Gateway::start(test_config(&up.url())).await;
    for (builder, want) in [
        (reqwest::Client::builder(), reqwest::Version::HTTP_11),
        (
            reqwest::Client::builder().http2_prior_knowledge(),
            reqwest::Version::HTTP_2,
        ),
    ] {
        let http = builder.no_proxy().build().expect("client");
        let body = write_body(vec![series("up", &[], 1.0, now_ms())]);
        let resp = rw_post(&http, &gw.url("/api/v1/write"), Some(TENANT_A), body)
            .send()
            .await
            .expect("POST");
        assert_eq!(resp.version(), want);
        assert_eq!(status_body(resp).await, (204, String::new()));
    }
    assert_eq!(up.count(), 2);
    gw.stop().await;
}
