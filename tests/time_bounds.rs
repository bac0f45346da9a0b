//! One deadline per request (`limits.request_timeout`, 25 s by default,
//! below Prometheus' 30 s `remote_timeout`): body read, upstream attempts
//! and their backoff all fit inside it. An upstream `Retry-After` is
//! honoured by rwgate's own retries when it fits, and passed back capped
//! when it does not. On paused time: the waits are rwgate's timers, and
//! the elapsed times below are tokio's clock, not the wall's.

mod common;

use std::time::Duration;

use common::*;
use tokio::time::Instant;

const DEADLINE: Duration = Duration::from_secs(25);

/// Prometheus' attempt timeout; every answer must come before it.
const SENDER_TIMEOUT: Duration = Duration::from_secs(30);

fn up() -> Vec<u8> {
    write_body(vec![series("up", &[("job", "deadline")], 1.0, now_ms())])
}

/// The defaults a deployment has: 10 s per attempt, two retries.
fn defaults(upstream: &FakeUpstream) -> rwgate::config::Config {
    let mut cfg = test_config(&upstream.url());
    let d = rwgate::config::UpstreamConfig::default();
    cfg.upstream.timeout = d.timeout;
    cfg.upstream.max_retries = d.max_retries;
    cfg.upstream.retry_backoff = d.retry_backoff;
    cfg.upstream.retry_max_backoff = d.retry_max_backoff;
    cfg
}

/// A hanging upstream: three 10 s attempts and their backoff took 30.3 s,
/// past the sender's own timeout. Now the third attempt is cut at 25 s.
#[tokio::test(start_paused = true)]
async fn a_hanging_upstream_is_answered_within_the_request_deadline() {
    let upstream = FakeUpstream::start(Vec::new()).await;
    upstream.set_delay(Duration::from_secs(3600));
    let gw = Gateway::start(defaults(&upstream)).await;
    let started = Instant::now();
    let resp = rw_post(&client(), &gw.write_url(), Some(TENANT_A), up())
        .send()
        .await;
    let took = started.elapsed();
    let resp = resp.unwrap_or_else(|e| panic!("no answer after {took:?}: {e}"));
    let (status, _) = status_body(resp).await;
    assert_eq!(status, 504, "answered after {took:?}");
    assert!(
        took <= DEADLINE + Duration::from_millis(50),
        "answered after {took:?}"
    );
    assert_eq!(upstream.count(), 3, "the three attempts all started");
}

/// A body that takes 20 s to arrive leaves 5 s for the upstream: the
/// answer still comes at the deadline (it came after 20 s + 30.3 s).
#[tokio::test(start_paused = true)]
async fn body_time_counts_against_the_same_deadline() {
    let upstream = FakeUpstream::start(Vec::new()).await;
    upstream.set_delay(Duration::from_secs(3600));
    let gw = Gateway::start(defaults(&upstream)).await;
    let body = up();
    let started = Instant::now();
    let mut post = SlowPost::start(gw.addr, "/api/v1/write", TENANT_A, &body, body.len() / 2).await;
    tokio::time::sleep(Duration::from_secs(20)).await;
    post.finish_body().await;
    let (status, text) = post.answer().await;
    let took = started.elapsed();
    assert_eq!(
        (status, text.as_str()),
        (
            504,
            "the request did not finish within 25s (limits.request_timeout); retry later\n"
        ),
        "answered after {took:?}"
    );
    assert!(
        took <= DEADLINE + Duration::from_millis(50),
        "answered after {took:?}"
    );
    assert!(took < SENDER_TIMEOUT);
}

/// "Retry-After: 7" is waited for before the retry (it was retried after
/// the 100 ms backoff, then again after 230 ms).
#[tokio::test(start_paused = true)]
async fn the_upstream_retry_after_is_honoured_within_the_deadline() {
    let upstream = FakeUpstream::start(vec![
        Reply::status(503, "busy").header("retry-after", "7"),
        Reply::status(204, ""),
    ])
    .await;
    let gw = Gateway::start(defaults(&upstream)).await;
    let resp = rw_post(&client(), &gw.write_url(), Some(TENANT_A), up())
        .send()
        .await
        .expect("an answer");
    assert_eq!(status_body(resp).await, (204, String::new()));
    let seen = upstream.seen();
    assert_eq!(seen.len(), 2);
    let gap = seen[1].at - seen[0].at;
    assert!(
        gap >= Duration::from_secs(7) && gap < Duration::from_secs(8),
        "retried after {gap:?}"
    );
}

/// A pause longer than the deadline leaves is not waited for: the sender
/// is answered at once and told when to come back, capped by
/// `upstream.max_retry_after` (30 s).
#[tokio::test(start_paused = true)]
async fn a_retry_after_beyond_the_deadline_is_passed_back_capped() {
    let upstream = FakeUpstream::start(vec![
        Reply::status(503, "down for maintenance").header("retry-after", "600"),
        Reply::status(429, "slow down").header("retry-after", "3600"),
    ])
    .await;
    let gw = Gateway::start(defaults(&upstream)).await;
    for want in [503, 429] {
        let started = Instant::now();
        let resp = rw_post(&client(), &gw.write_url(), Some(TENANT_A), up())
            .send()
            .await
            .expect("an answer");
        let retry_after = retry_after(&resp);
        assert_eq!(status_body(resp).await.0, want);
        assert_eq!(retry_after.as_deref(), Some("30"), "{want}");
        assert!(started.elapsed() < Duration::from_secs(1), "{want}");
    }
    assert_eq!(upstream.count(), 2, "no retry that could not end in time");
}
