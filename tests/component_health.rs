//! A background component that dies makes rwgate unhealthy, visibly: here
//! the spool, poisoned by real I/O failures. Its next segment is a symlink
//! to /dev/full, so the group commit after the rotation fails (ENOSPC) and
//! so does cutting the partial write off (ftruncate on a device: EINVAL).
//! Then `/-/ready` and `/-/healthy` answer 503 naming the spool and what to
//! do, on the ingest port and on `metrics_listen`, the gauge reads 0, and
//! writes with cost samples are refused before they are forwarded (without
//! them, they go through).

mod common;

use std::path::Path;

use common::clickhouse::*;
use common::*;

/// The segment the spool rotates to first (it starts a fresh spool at 1).
const NEXT_SEGMENT: &str = "00000000000000000002.seg";

const WHY: &str =
    "the spool failed: a group commit failed (No space left on device (os error 28)) \
     and its partial write could not be cut off (Invalid argument (os error 22)); \
     writes with cost samples are answered 503; restart rwgate";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poisoned_spool_fails_the_probes_and_refuses_cost_samples() {
    let upstream = FakeUpstream::start(Vec::new()).await;
    // ClickHouse down, as at a start-up that never reaches it: the gateway
    // is ready all the same (the drain waits for it), as before.
    let spool = tempfile::tempdir().expect("temp dir");
    let mut cfg = tee_config_clickhouse_down(&upstream.url(), spool.path().into());
    cfg.spool.segment_bytes = rwgate::config::Size(4096);
    let gw = Gateway::start_with_metrics_listener(cfg).await;
    let probes = |path: &str| {
        let metrics = gw.metrics_addr.expect("a metrics_listen port");
        [gw.url(path), format!("http://{metrics}{path}")]
    };
    for url in probes("/-/ready") {
        assert_eq!(get(&url).await, (200, "ready\n".to_string()));
    }
    assert_eq!(up(&gw, "spool").await, Some(1.0));
    assert_eq!(up(&gw, "tee_writer").await, Some(1.0));
    assert_eq!(up(&gw, "rollup").await, None, "the rollup is not run here");

    // Opened after the start: recovery would otherwise skip past it.
    std::os::unix::fs::symlink("/dev/full", spool.path().join(NEXT_SEGMENT))
        .expect("symlink the next segment to /dev/full");
    let cost = |i: usize| {
        let ns = format!("ns-{i}");
        let s = series(NS_METRIC, &[("namespace", &ns)], 1.0, now_ms());
        write_body(vec![s])
    };
    let mut acknowledged = 0;
    let failed = loop {
        assert!(acknowledged < 1000, "the spool never rotated");
        match write(&gw, cost(acknowledged)).await {
            (204, _) => acknowledged += 1,
            answer => break answer,
        }
    };
    assert_eq!(
        failed,
        (
            503,
            "could not store cost samples durably: spool write failed: No space left on device (os error 28); retry later\n"
                .to_string()
        ),
        "after {acknowledged} acknowledged writes"
    );
    assert!(acknowledged > 0);

    for url in probes("/-/ready") {
        assert_eq!(
            get(&url).await,
            (503, format!("not ready: {WHY}\n")),
            "{url}"
        );
    }
    for url in probes("/-/healthy") {
        assert_eq!(
            get(&url).await,
            (503, format!("unhealthy: {WHY}\n")),
            "{url}"
        );
    }
    assert_eq!(up(&gw, "spool").await, Some(0.0));
    assert_eq!(up(&gw, "tee_writer").await, Some(1.0));

    // Cost samples are refused before forwarding; other series still pass.
    let forwarded = upstream.count();
    assert_eq!(
        write(&gw, cost(9999)).await,
        (
            503,
            "could not store cost samples durably: the spool failed and takes nothing until rwgate restarts (see /-/ready); retry later\n"
                .to_string()
        )
    );
    assert_eq!(upstream.count(), forwarded, "refused before forwarding");
    let other = write_body(vec![series("up", &[("job", "a")], 1.0, now_ms())]);
    assert_eq!(write(&gw, other).await.0, 204);
    assert_eq!(upstream.count(), forwarded + 1);
    assert_segment_is_a_link(spool.path());
    gw.stop().await;
}

async fn get(url: &str) -> (u16, String) {
    status_body(client().get(url).send().await.expect("an answer")).await
}

/// A remote-write of `body` for tenant A: its status and body.
async fn write(gw: &Gateway, body: Vec<u8>) -> (u16, String) {
    let req = rw_post(&client(), &gw.write_url(), Some(TENANT_A), body);
    status_body(req.send().await.expect("an answer")).await
}

/// `rwgate_component_up{component=...}`, if exported.
async fn up(gw: &Gateway, component: &str) -> Option<f64> {
    let series = format!("rwgate_component_up{{component=\"{component}\"}}");
    let text = gw.metrics().await;
    text.lines()
        .any(|l| l.starts_with(&series))
        .then(|| metric_value(&text, &series))
}

/// The failure was the device's, not a file the spool could have written.
fn assert_segment_is_a_link(dir: &Path) {
    let meta = std::fs::symlink_metadata(dir.join(NEXT_SEGMENT)).expect("the segment");
    assert!(meta.file_type().is_symlink());
}
