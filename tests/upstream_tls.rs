//! An https upstream with a private CA and mutual TLS: a real Prometheus
//! serving TLS with `client_auth_type: RequireAndVerifyClientCert` (as a
//! Thanos receive behind `--remote-write.server-tls-client-ca`), the CA and
//! certificates generated at test time; and how a failing upstream is
//! logged (a refused port, a plain-HTTP server behind https://).

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

/// A write the upstream cannot take is one log line naming the upstream
/// (its URL without the password, as the start-up line shows it too) and
/// why in words: no `client error (Connect)` wrapper, no OS error number,
/// no rustls enum names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_upstream_is_one_log_line_naming_it() {
    let plain = FakeUpstream::start(Vec::new()).await;
    let refused = format!("http://127.0.0.1:{}/api/v1/receive", free_port());
    let not_tls = plain.url().replacen("http://", "https://", 1);
    for (url, cause) in [
        (refused, "connection refused"),
        (
            not_tls,
            "the server did not speak TLS (is it plain HTTP? then use http://)",
        ),
    ] {
        let with_password = url.replacen("://", "://bob:s3cret@", 1);
        let masked = url.replacen("://", "://***@", 1);
        let rw = RwgateProcess::start(&[
            "--auth",
            "none",
            "--upstream-url",
            &with_password,
            "--set",
            "upstream.max_retries=0",
        ])
        .await;
        let body = write_body(vec![series("up", &[("job", "down")], 1.0, now_ms())]);
        let req = rw_post(&client(), &rw.url("/api/v1/write"), Some(TENANT_A), body);
        assert_eq!(send_status_body(req).await.0, 503, "{url}");
        let log = wait_for("the refusal's log line", START_TIMEOUT, || {
            let log = rw.child.log();
            async move {
                log.contains("reason=\"upstream_unavailable\"")
                    .then_some(log)
            }
        })
        .await;
        assert!(log.contains(&format!(" upstream={masked} ")), "{log}");
        let lines: Vec<&str> = log.lines().filter(|l| l.contains(TENANT_A)).collect();
        assert_eq!(lines.len(), 1, "{log}");
        let want = format!("detail=\"cannot reach the upstream at {masked}: {cause}\"");
        assert!(lines[0].contains(&want), "{want}\n{}", lines[0]);
        assert!(!log.contains("s3cret"), "{log}");
    }
}
