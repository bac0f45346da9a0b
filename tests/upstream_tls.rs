//! An https upstream with a private CA and mutual TLS: a real Prometheus
//! serving TLS with `client_auth_type: RequireAndVerifyClientCert` (as a
//! Thanos receive behind `--remote-write.server-tls-client-ca`), the CA and
//! certificates generated at test time.

mod common;

use common::*;

/// rwgate towards `prom` with the given upstream TLS settings.
fn config(prom: &Prometheus, ca: bool, client_cert: bool, pki: &TestPki) -> rwgate::config::Config {
    let mut cfg = test_config(&prom.write_url());
    if ca {
        cfg.upstream.tls.ca = Some(pki.ca.clone());
    }
    if client_cert {
        cfg.upstream.tls.cert = Some(pki.client_cert.clone());
        cfg.upstream.tls.key = Some(pki.client_key.clone());
    }
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_reach_an_upstream_that_requires_a_client_certificate() {
    let pki = TestPki::new();
    let prom = Prometheus::start_mtls(&pki).await;
    assert!(prom.write_url().starts_with("https://127.0.0.1:"));
    let ts = now_ms();

    // Both: the write lands.
    let gw = Gateway::start(config(&prom, true, true, &pki)).await;
    let body = write_body(vec![series("up", &[("job", "mtls")], 1.0, ts)]);
    let req = rw_post(&client(), &gw.url("/api/v1/write"), Some(TENANT_A), body);
    assert_eq!(send_status_body(req).await, (204, String::new()));
    gw.stop().await;
    let got = prom.wait_series("up{job=\"mtls\"}", START_TIMEOUT).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(
        got.first().expect("one series")["cloud_account_id"],
        TENANT_A
    );

    // The CA without the client certificate: the receiver refuses the
    // handshake; public roots without the CA: rwgate refuses the receiver's
    // certificate. Either way the sender is told to retry (503) and nothing
    // is written.
    for (ca, client_cert, job) in [(true, false, "no-client-cert"), (false, true, "no-ca")] {
        let gw = Gateway::start(config(&prom, ca, client_cert, &pki)).await;
        let body = write_body(vec![series("up", &[("job", job)], 1.0, ts)]);
        let req = rw_post(&client(), &gw.url("/api/v1/write"), Some(TENANT_A), body);
        assert_eq!(
            send_status_body(req).await,
            (503, "upstream unavailable; retry later\n".to_string()),
            "{job}"
        );
        gw.stop().await;
        assert!(
            prom.series(&format!("up{{job=\"{job}\"}}"))
                .await
                .is_empty(),
            "{job} was written"
        );
    }
}
