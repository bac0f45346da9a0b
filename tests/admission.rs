//! Admission: one tenant cannot hold every concurrency permit (its share is
//! `limits.tenant_max_concurrent_share`, body reading included), and a
//! request cancelled by its sender gives back everything it held, the
//! `rwgate_requests_in_flight` gauge included. Each test runs in its own
//! process (nextest), so the gauges are this test's alone.

mod common;

use std::time::Duration;

use common::*;

fn up(job: &str) -> Vec<u8> {
    write_body(vec![series("up", &[("job", job)], 1.0, now_ms())])
}

async fn in_flight(gw: &Gateway) -> f64 {
    metric_value(&gw.metrics().await, "rwgate_requests_in_flight")
}

/// Four slow bodies from one tenant, with four permits, turned every other
/// tenant away with 503. Now the tenant holds two, its other two are
/// refused, and another tenant still gets in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_bodies_of_one_tenant_leave_room_for_the_others() {
    let prom = Prometheus::start().await;
    let mut cfg = test_config(&prom.write_url());
    cfg.limits.max_concurrent_requests = 4;
    let gw = Gateway::start(cfg).await;

    let body = up("slow");
    let mut slow = Vec::new();
    // One at a time: each is admitted or refused before the next starts,
    // so the first two are the ones that hold a permit.
    for n in 1..=4 {
        slow.push(SlowPost::start(gw.addr, "/api/v1/write", TENANT_A, &body, body.len() / 2).await);
        wait_for(
            "the slow request to be admitted or refused",
            Duration::from_secs(10),
            || async {
                let m = gw.metrics().await;
                let held = metric_value(&m, "rwgate_requests_in_flight");
                let refused = metric_value(
                    &m,
                    "rwgate_requests_rejected_total{reason=\"tenant_overloaded\"}",
                );
                (held + refused == f64::from(n)).then_some(())
            },
        )
        .await;
    }

    let other = rw_post(&client(), &gw.write_url(), Some(TENANT_B), up("other"));
    assert_eq!(
        send_status_body(other).await,
        (204, String::new()),
        "another tenant gets in"
    );
    assert_eq!(in_flight(&gw).await, 2.0, "tenant A holds its share");

    // A's first two finish normally; the other two were refused at once.
    let mut answers = Vec::new();
    for (i, post) in slow.iter_mut().enumerate() {
        if i < 2 {
            post.finish_body().await;
        }
        answers.push(post.answer().await);
    }
    let refusal = "overloaded: this account has its share of the requests in flight \
                   (limits.tenant_max_concurrent_share); retry later\n";
    assert_eq!(
        answers,
        [
            (204, String::new()),
            (204, String::new()),
            (503, refusal.to_string()),
            (503, refusal.to_string()),
        ]
    );
    gw.stop().await;
}

/// A sender that hangs up while its request waits on the upstream: hyper
/// drops the handler, and the in-flight gauge and the tenant's permit go
/// with it (the gauge stayed up, and the permit was the semaphore's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_request_releases_the_gauge_and_its_permit() {
    let (upstream, gw) =
        gateway_to_fake_upstream(|cfg| cfg.limits.max_concurrent_requests = 2).await;
    upstream.set_delay(Duration::from_secs(60));

    let body = up("gone");
    let post = SlowPost::start(gw.addr, "/api/v1/write", TENANT_A, &body, body.len()).await;
    wait_for(
        "the request to reach the upstream",
        Duration::from_secs(10),
        || async { (upstream.count() == 1).then_some(()) },
    )
    .await;
    assert_eq!(in_flight(&gw).await, 1.0);
    drop(post);
    wait_for(
        "the in-flight gauge to drop back to 0",
        Duration::from_secs(10),
        || async { (in_flight(&gw).await == 0.0).then_some(()) },
    )
    .await;

    // Its permit is back: the tenant's one place (a share of 0.5 of two) is
    // free again.
    upstream.set_delay(Duration::ZERO);
    let back = rw_post(&client(), &gw.write_url(), Some(TENANT_A), up("back"));
    assert_eq!(send_status_body(back).await, (204, String::new()));
}
