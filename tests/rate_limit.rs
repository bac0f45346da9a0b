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

/// rwgate in front of `prom` with a limit of 1 sample/s and a burst of 20.
async fn limited_gateway(prom: &Prometheus) -> Gateway {
    let mut cfg = test_config(&prom.write_url());
    cfg.limits.tenant_samples_per_sec = 1;
    cfg.limits.tenant_burst_samples = 20;
    Gateway::start(cfg).await
}

/// A write of `n` series for `tenant`.
async fn post(gw: &Gateway, tenant: &str, n: usize) -> reqwest::Response {
    rw_post(&client(), &gw.write_url(), Some(tenant), batch(n))
        .send()
        .await
        .expect("send")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_over_its_rate_gets_429_with_retry_after() {
    let prom = Prometheus::start().await;
    let gw = limited_gateway(&prom).await;

    let first = post(&gw, A, 15).await;
    assert_eq!(status_body(first).await, (204, String::new()));

    let second = post(&gw, A, 15).await;
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

    let other = post(&gw, B, 15).await;
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

/// A request with more samples than the bucket holds can never pass: it
/// got 429 forever (the sender retried it without end). Now 413 names the
/// setting, and the tenant's bucket is untouched by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_larger_than_the_burst_is_413_naming_the_setting() {
    let prom = Prometheus::start().await;
    let gw = limited_gateway(&prom).await;

    let too_big = post(&gw, A, 21).await;
    assert!(too_big.headers().get("retry-after").is_none());
    assert_eq!(
        status_body(too_big).await,
        (
            413,
            "rate limit: this request has 21 samples, more than this account may send at once \
             (limits.tenant_burst_samples = 20); send smaller batches (queue_config.max_samples_per_send)\n"
                .to_string()
        )
    );
    let fits = post(&gw, A, 20).await;
    assert_eq!(status_body(fits).await, (204, String::new()));
    gw.stop().await;
}
