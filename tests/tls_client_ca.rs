//! `tls.client_ca`: with it set, only clients presenting a certificate
//! signed by that CA are served; every other handshake is refused and
//! counted. Real TLS clients: rustls (reqwest, and a bare tokio-rustls
//! connection) and curl (OpenSSL). Certificates are made at test time. One
//! test in this file: the metrics recorder is process-wide and the count of
//! refused handshakes below is exact.

mod common;

use std::path::Path;

use common::*;

const REFUSED: &str = "rwgate_connections_rejected_total{reason=\"tls_handshake\"}";

/// reqwest (rustls) reaching `localhost` at `addr`, trusting `ca`,
/// presenting `identity` (cert, key) if any.
fn reqwest_client(
    addr: std::net::SocketAddr,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> reqwest::Client {
    let read = |p: &Path| std::fs::read(p).expect("read a PEM file");
    let mut b = reqwest::Client::builder()
        .no_proxy()
        .resolve("localhost", addr)
        .add_root_certificate(reqwest::Certificate::from_pem(&read(ca)).expect("CA"));
    if let Some((cert, key)) = identity {
        let mut pem = read(cert);
        pem.extend(read(key));
        b = b.identity(reqwest::Identity::from_pem(&pem).expect("identity"));
    }
    b.build().expect("build a TLS client")
}

/// `curl` arguments posting `body_file` as Remote-Write 1.0 to `url`.
fn curl_post(url: &str, body_file: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    for h in [
        format!("Cloud-Account-Id: {TENANT_A}"),
        "Content-Encoding: snappy".into(),
        "Content-Type: application/x-protobuf".into(),
        "X-Prometheus-Remote-Write-Version: 0.1.0".into(),
    ] {
        args.extend(["-H".into(), h]);
    }
    args.extend([
        "--data-binary".into(),
        format!("@{}", body_file.display()),
        "-o".into(),
        "/dev/null".into(),
        "-w".into(),
        "%{http_code} %{http_version}".into(),
        url.into(),
    ]);
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_clients_with_a_certificate_from_client_ca_are_served() {
    let prom = Prometheus::start().await;
    let pki = TestPki::new();
    // A client certificate from another CA, and a client that trusts our
    // server: the server must refuse it, not the client.
    let stranger = TestPki::new();
    let mut cfg = test_config(&prom.write_url());
    cfg.tls.cert = Some(pki.server_cert.clone());
    cfg.tls.key = Some(pki.server_key.clone());
    cfg.tls.client_ca = Some(pki.ca.clone());
    // Probes and scrapes go to the plain metrics port: they present no
    // client certificate.
    let gw = Gateway::start_with_metrics_listener(cfg).await;
    let port = gw.addr.port();
    let url = format!("https://localhost:{port}/api/v1/write");
    let before = metric_value(&gw.metrics().await, REFUSED);
    let own = Some((pki.client_cert.as_path(), pki.client_key.as_path()));
    let foreign = Some((
        stranger.client_cert.as_path(),
        stranger.client_key.as_path(),
    ));
    let ts = now_ms();
    let body = |job: &str| write_body(vec![series("up", &[("job", job)], 1.0, ts)]);

    // reqwest (rustls): served with our client certificate, over h2 ...
    let resp = rw_post(
        &reqwest_client(gw.addr, &pki.ca, own),
        &url,
        Some(TENANT_A),
        body("reqwest"),
    )
    .send()
    .await
    .expect("POST with a client certificate");
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(status_body(resp).await, (204, String::new()));
    // ... refused without one, or with another CA's.
    for (identity, what) in [(None, "no certificate"), (foreign, "another CA's")] {
        let client = reqwest_client(gw.addr, &pki.ca, identity);
        let sent = rw_post(&client, &url, Some(TENANT_A), body("refused"))
            .send()
            .await;
        assert!(sent.is_err(), "{what}: {sent:?}");
    }

    // A bare rustls connection, the same three ways (HTTP/1.1).
    let get = "GET /-/ready HTTP/1.1\r\nHost: localhost\r\n\r\n";
    let mut ok = tls_connect(gw.addr, &pki.ca, own)
        .await
        .expect("handshake with a client certificate");
    assert_eq!(
        tls_exchange(&mut ok, get).await.expect("answer"),
        (200, "ready\n".to_string())
    );
    for (identity, what) in [(None, "no certificate"), (foreign, "another CA's")] {
        let answer = match tls_connect(gw.addr, &pki.ca, identity).await {
            Ok(mut s) => tls_exchange(&mut s, get).await,
            Err(e) => Err(e),
        };
        assert!(answer.is_err(), "{what}: {answer:?}");
    }

    // curl (OpenSSL): HTTP/1.1 and h2 with the certificate, refused without.
    let dir = tempfile::tempdir().expect("tempdir");
    let body_file = dir.path().join("body");
    std::fs::write(&body_file, body("curl")).expect("write body");
    let resolve = format!("localhost:{port}:127.0.0.1");
    let ca = pki.ca.display().to_string();
    let (cert, key) = (
        pki.client_cert.display().to_string(),
        pki.client_key.display().to_string(),
    );
    for (version, want) in [("--http1.1", "204 1.1"), ("--http2", "204 2")] {
        let args = [
            "--resolve",
            &resolve,
            "--cacert",
            &ca,
            "--cert",
            &cert,
            "--key",
            &key,
            version,
        ];
        let (code, out, err) = curl(curl_post(&url, &body_file, &args)).await;
        assert_eq!((code, out.as_str()), (0, want), "curl {version}: {err}");
    }
    let (sc, sk) = (
        stranger.client_cert.display().to_string(),
        stranger.client_key.display().to_string(),
    );
    for extra in [vec![], vec!["--cert", &sc, "--key", &sk]] {
        let mut args = vec!["--resolve", &resolve, "--cacert", &ca];
        args.extend(extra.iter());
        let (code, out, err) = curl(curl_post(&url, &body_file, &args)).await;
        assert_ne!(code, 0, "curl {extra:?} was served: {out} {err}");
        assert!(!out.starts_with('2'), "curl {extra:?}: {out}");
    }

    // Every refused handshake is counted: two from reqwest, two bare, two
    // from curl.
    let refused = wait_for(
        "six refused handshakes",
        std::time::Duration::from_secs(10),
        || async {
            let n = metric_value(&gw.metrics().await, REFUSED) - before;
            (n >= 6.0).then_some(n)
        },
    )
    .await;
    assert_eq!(refused, 6.0);

    // What was served reached the receiver; what was refused did not.
    let jobs: std::collections::BTreeSet<String> = prom
        .series("up")
        .await
        .into_iter()
        .map(|l| l["job"].clone())
        .collect();
    assert_eq!(jobs, ["curl".to_string(), "reqwest".to_string()].into());
    gw.stop().await;
}
