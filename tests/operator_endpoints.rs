//! The operator endpoints: `/-/healthy`, `/-/ready` and `/metrics`, whose
//! counters must move with the traffic. One test in this file on purpose: the
//! metrics recorder is process-wide, so counter deltas are exact only when no
//! other test shares the process (`cargo test` runs a file's tests in one
//! process; nextest gives each test its own).

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_ready_and_metrics_reflect_traffic() {
    let prom = Prometheus::start().await;
    let gw = Gateway::start(test_config(&prom.write_url())).await;
    let http = client();

    for (path, body) in [("/-/healthy", "OK\n"), ("/-/ready", "ready\n")] {
        let resp = http.get(gw.url(path)).send().await.expect("GET");
        assert_eq!(status_body(resp).await, (200, body.to_string()), "{path}");
        let resp = http.head(gw.url(path)).send().await.expect("HEAD");
        assert_eq!(resp.status(), 200, "HEAD {path}");
    }

    let before = gw.metrics().await;
    let ts = now_ms();
    let body = write_body(vec![
        series("up", &[("job", "m")], 1.0, ts),
        series("kube_node_info", &[("node", "n1")], 1.0, ts),
        series("go_goroutines", &[], 10.0, ts),
        series("go_threads", &[], 8.0, ts),
        series("process_cpu_seconds_total", &[], 2.0, ts),
    ]);
    let resp = rw_post(&http, &gw.url("/api/v1/receive"), Some(TENANT_A), body)
        .send()
        .await
        .expect("POST");
    assert_eq!(resp.status(), 204);
    let resp = rw_post(&http, &gw.url("/api/v1/receive"), None, Vec::new())
        .send()
        .await
        .expect("POST");
    assert_eq!(resp.status(), 400);

    let after = gw.metrics().await;
    let delta = |series: &str| metric_value(&after, series) - metric_value(&before, series);
    assert_eq!(
        delta("rwgate_samples_received_total"),
        5.0,
        "received:\n{after}"
    );
    assert_eq!(delta("rwgate_samples_forwarded_total"), 2.0, "{after}");
    assert_eq!(
        delta("rwgate_samples_dropped_total{reason=\"allowlist\"}"),
        3.0,
        "{after}"
    );
    assert_eq!(
        delta("rwgate_series_dropped_total{reason=\"allowlist\"}"),
        3.0,
        "{after}"
    );
    assert_eq!(
        delta("rwgate_requests_total{route=\"receive\",status=\"204\"}"),
        1.0,
        "{after}"
    );
    assert_eq!(
        delta("rwgate_requests_total{route=\"receive\",status=\"400\"}"),
        1.0,
        "{after}"
    );
    assert_eq!(
        delta("rwgate_requests_rejected_total{reason=\"missing_tenant\"}"),
        1.0,
        "{after}"
    );
    assert_eq!(
        delta("rwgate_upstream_responses_total{status=\"2xx\"}"),
        1.0,
        "{after}"
    );
    // Histograms and the in-flight gauge are exported with their help text.
    for needle in [
        "# TYPE rwgate_upstream_request_duration_seconds histogram",
        "# TYPE rwgate_request_duration_seconds histogram",
        "rwgate_request_duration_seconds_bucket{route=\"receive\",le=\"0.005\"}",
        "# TYPE rwgate_requests_in_flight gauge",
    ] {
        assert!(after.contains(needle), "missing {needle:?} in:\n{after}");
    }
    assert_eq!(metric_value(&after, "rwgate_requests_in_flight"), 0.0);

    // After shutdown the port is closed.
    let addr = gw.addr;
    gw.stop().await;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "listener closed after shutdown"
    );
}
