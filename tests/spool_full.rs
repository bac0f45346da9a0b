//! A spool that cannot take a request's cost samples (ClickHouse down long
//! enough to fill it) is answered 503 before anything is forwarded: the
//! sender retries that batch, and each retry was forwarded again while the
//! answer stayed 503.

mod common;

use common::clickhouse::*;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_is_answered_before_forwarding() {
    let upstream = FakeUpstream::start(Vec::new()).await;
    let spool = tempfile::tempdir().expect("temp dir");
    let mut cfg = tee_config_clickhouse_down(&upstream.url(), spool.path().into());
    cfg.spool.max_bytes = rwgate::config::Size(16 << 10);
    cfg.spool.segment_bytes = rwgate::config::Size(16 << 10);
    let gw = Gateway::start(cfg).await;
    let http = client();
    let batch = |i: usize| {
        write_body(
            (0..20)
                .map(|n| {
                    let ns = format!("ns-{i}-{n}");
                    series(
                        NS_METRIC,
                        &[("namespace", &ns), ("cluster", "c")],
                        1.0,
                        now_ms(),
                    )
                })
                .collect(),
        )
    };

    let mut acknowledged = 0;
    let mut full = None;
    for i in 0..200 {
        let resp = rw_post(&http, &gw.write_url(), Some(TENANT_A), batch(i))
            .send()
            .await
            .expect("an answer");
        match status_body(resp).await {
            (204, _) => acknowledged += 1,
            answer => {
                full = Some(answer);
                break;
            }
        }
    }
    assert_eq!(
        full,
        Some((
            503,
            "could not store cost samples durably: spool is full; retry later\n".to_string()
        )),
        "the spool filled after {acknowledged} requests"
    );
    assert!(acknowledged > 0);
    // The sender retries the refused batch: still not forwarded.
    for _ in 0..3 {
        let resp = rw_post(&http, &gw.write_url(), Some(TENANT_A), batch(999))
            .send()
            .await
            .expect("an answer");
        assert_eq!(status_body(resp).await.0, 503);
    }
    assert_eq!(
        upstream.count(),
        acknowledged,
        "only acknowledged requests were forwarded"
    );
    gw.stop().await;
}
