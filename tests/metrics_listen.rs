//! `metrics_listen`: the operator endpoints on a port of their own. When set,
//! `/metrics` leaves the ingest port (the health endpoints stay on both);
//! unset, nothing changes (tests/operator_endpoints.rs). `rwgate rollup`,
//! which serves no traffic, serves its metrics and health there.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_to_their_own_port() {
    let prom = Prometheus::start().await;
    let gw = Gateway::start_with_metrics_listener(test_config(&prom.write_url())).await;
    let ops = gw.metrics_addr.expect("a metrics port");
    let http = client();
    let get = |url: String| {
        let http = http.clone();
        async move { status_body(http.get(url).send().await.expect("GET")).await }
    };

    // The ingest port: remote write and health, no /metrics.
    let body = write_body(vec![series("up", &[("job", "ml")], 1.0, now_ms())]);
    let resp = rw_post(&http, &gw.write_url(), Some(TENANT_A), body)
        .send()
        .await
        .expect("POST");
    assert_eq!(resp.status(), 204);
    assert_eq!(
        get(gw.url("/metrics")).await,
        (
            404,
            "not found: /metrics is served on the metrics_listen port\n".to_string()
        )
    );
    assert_eq!(get(gw.url("/-/healthy")).await, (200, "OK\n".to_string()));
    assert_eq!(get(gw.url("/-/ready")).await, (200, "ready\n".to_string()));

    // The metrics port: the three operator endpoints and nothing else.
    let (status, text) = get(format!("http://{ops}/metrics")).await;
    assert_eq!(status, 200);
    assert_eq!(
        metric_value(
            &text,
            "rwgate_requests_total{route=\"write\",status=\"204\"}"
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric_value(
            &text,
            "rwgate_requests_total{route=\"other\",status=\"404\"}"
        ),
        1.0,
        "the ingest port's /metrics answer is counted: {text}"
    );
    assert_eq!(
        get(format!("http://{ops}/-/healthy")).await,
        (200, "OK\n".to_string())
    );
    assert_eq!(
        get(format!("http://{ops}/-/ready")).await,
        (200, "ready\n".to_string())
    );
    let resp = rw_post(
        &http,
        &format!("http://{ops}/api/v1/write"),
        Some(TENANT_A),
        write_body(vec![series("up", &[("job", "wrong-port")], 1.0, now_ms())]),
    )
    .send()
    .await
    .expect("POST to the metrics port");
    assert_eq!(
        status_body(resp).await,
        (
            404,
            "not found: this port serves GET /metrics, /-/healthy and /-/ready\n".to_string()
        )
    );
    let resp = http
        .post(format!("http://{ops}/metrics"))
        .send()
        .await
        .expect("POST");
    assert_eq!(resp.headers()["allow"], "GET, HEAD");
    assert_eq!(resp.status(), 405);
    let jobs: Vec<String> = prom
        .series("up")
        .await
        .into_iter()
        .map(|l| l["job"].clone())
        .collect();
    assert_eq!(jobs, ["ml"]);

    // Shutdown closes both ports.
    let ingest = gw.addr;
    gw.stop().await;
    for addr in [ingest, ops] {
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "{addr} closed after shutdown"
        );
    }
}

/// The flag, through the binary: `rwgate serve --metrics-listen`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_flag_moves_metrics() {
    let up = FakeUpstream::start(Vec::new()).await;
    let (rw, listen) = RwgateProcess::serve_with_metrics_listen(&up.url(), &[]).await;
    let http = client();
    let resp = http.get(rw.url("/metrics")).send().await.expect("GET");
    assert_eq!(resp.status(), 200);
    assert!(resp
        .text()
        .await
        .expect("text")
        .contains("# TYPE rwgate_requests_total counter"));
    for (path, status) in [("/metrics", 404), ("/-/ready", 200)] {
        let resp = http
            .get(format!("http://{listen}{path}"))
            .send()
            .await
            .expect("GET");
        assert_eq!(resp.status(), status, "{listen}{path}");
    }
}

/// `rwgate rollup` serves nothing else, so without this its loop could not
/// be watched: its passes show on `/metrics`, against a real ClickHouse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollup_role_serves_its_metrics() {
    let ch = common::clickhouse::ClickHouseServer::start();
    let rw = RwgateProcess::start_with_metrics_listen(
        "rollup",
        &[
            "--clickhouse-url",
            &ch.url(),
            "--rollup-interval",
            "200ms",
            // Nothing to register with here (see `rollup_needs_a_rest_api_to_register_with`).
            "--set",
            "resources.enabled=false",
        ],
    )
    .await;
    let http = client();
    let ok = "rwgate_rollup_passes_total{result=\"ok\"}";
    let text = wait_for(
        "a successful rollup pass",
        Duration::from_secs(30),
        || async {
            let text = get_text(&rw.url("/metrics")).await?;
            (metric_value(&text, ok) >= 1.0).then_some(text)
        },
    )
    .await;
    assert!(
        text.contains("# TYPE rwgate_rollup_lag_seconds gauge"),
        "{text}"
    );
    let resp = http.get(rw.url("/-/healthy")).send().await.expect("GET");
    assert_eq!(resp.status(), 200);
    let mut child = rw.child;
    child.signal("TERM");
    assert!(child.wait_exit(Duration::from_secs(15)).await.success());
}
