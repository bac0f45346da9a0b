//! The per-tenant samples/s limit: 429 with Retry-After for the tenant over
//! its budget, while other tenants keep writing.

mod common;

use common::*;

const A: &str = "0b7f5a10-1111-4c2e-9a41-7d2f0e6b8c11";
const B: &str = "0b7f5a10-2222-4c2e-9a41-7d2f0e6b8c11";

fn batch(n: usize) -> Vec<u8> {
    let ts = now_ms();
    write_body(
        (0..n)
            .map(|i| series("up", &[("instance", &format!("i{i}"))], 1.0, ts))
            .collect(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_over_its_rate_gets_429_with_retry_after() {
    let prom = Prometheus::start().await;
    let mut cfg = test_config(&prom.write_url());
    cfg.limits.tenant_samples_per_sec = 1;
    cfg.limits.tenant_burst_samples = 20;
    let gw = Gateway::start(cfg).await;
    let http = client();
    let url = gw.url("/api/v1/write");

    let first = rw_post(&http, &url, Some(A), batch(15))
        .send()
        .await
        .expect("send");
    assert_eq!(status_body(first).await, (204, String::new()));

    let second = rw_post(&http, &url, Some(A), batch(15))
        .send()
        .await
        .expect("send");
    let retry_after: u64 = second
        .headers()
        .get("retry-after")
        .expect("Retry-After on 429")
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    // 10 samples short at 1 sample/s.
    assert!((9..=10).contains(&retry_after), "Retry-After {retry_after}");
    assert_eq!(
        status_body(second).await,
        (
            429,
            "rate limit: this account sends more samples per second than allowed; retry later\n"
                .to_string()
        )
    );

    let other = rw_post(&http, &url, Some(B), batch(15))
        .send()
        .await
        .expect("send");
    assert_eq!(
        status_body(other).await.0,
        204,
        "tenant B has its own bucket"
    );

    // Only the accepted batches reached the receiver: 15 series each for A and B.
    let got = prom.series("up").await;
    let count = |t: &str| {
        got.iter()
            .filter(|s| s.get("tenant_id").map(String::as_str) == Some(t))
            .count()
    };
    assert_eq!((count(A), count(B)), (15, 15));
    gw.stop().await;
}
