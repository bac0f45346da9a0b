//! Graceful shutdown of the real binary: SIGTERM while a request is in
//! flight stops accepting at once, lets the request finish, and exits 0.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// How long the fake upstream holds the in-flight request: long enough to
/// observe the closed listener while it is still being served.
const SLOW: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_requests_refuses_new_ones_and_exits_0() {
    let upstream = FakeUpstream::start(Vec::new()).await;
    upstream.set_delay(SLOW);
    let mut gw = RwgateProcess::start(&[
        "--auth",
        "none",
        "--upstream-url",
        &upstream.url(),
        "--shutdown-grace",
        "10s",
    ])
    .await;

    let url = gw.url("/storage/api/v2/write");
    let in_flight = tokio::spawn(async move {
        let body = write_body(vec![series("up", &[("job", "slow")], 1.0, now_ms())]);
        let resp = rw_post(&client(), &url, Some(TENANT_A), body)
            .send()
            .await
            .expect("in-flight request gets an answer");
        status_body(resp).await
    });
    wait_for(
        "the slow request to reach the upstream",
        Duration::from_secs(10),
        || async { (upstream.count() == 1).then_some(()) },
    )
    .await;

    let signalled = Instant::now();
    gw.child.signal("TERM");
    let addr = gw.addr();
    wait_for(
        "the listener to close after SIGTERM",
        Duration::from_secs(5),
        || async {
            tokio::net::TcpStream::connect(addr)
                .await
                .is_err()
                .then_some(())
        },
    )
    .await;
    assert!(
        gw.child.try_wait().is_none() && !in_flight.is_finished(),
        "new connections are refused while the in-flight request is still served"
    );

    let answer = tokio::time::timeout(Duration::from_secs(10), in_flight)
        .await
        .expect("in-flight request answered within 10s")
        .expect("request task");
    assert_eq!(answer, (204, String::new()));
    let status = gw.child.wait_exit(Duration::from_secs(10)).await;
    assert!(
        status.success(),
        "exit status {status}; log:\n{}",
        gw.child.log_tail()
    );
    assert!(
        signalled.elapsed() < SLOW + Duration::from_secs(5),
        "exited {:?} after SIGTERM",
        signalled.elapsed()
    );
    let log = gw.child.log();
    assert!(log.contains("SIGTERM received"), "{log}");
    assert_eq!(upstream.count(), 1);
}

/// The grace period bounds shutdown: a request still running when it ends
/// does not keep the process alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grace_period_bounds_shutdown() {
    let upstream = FakeUpstream::start(Vec::new()).await;
    upstream.set_delay(Duration::from_secs(30));
    let mut gw = RwgateProcess::start(&[
        "--auth",
        "none",
        "--upstream-url",
        &upstream.url(),
        "--upstream-timeout",
        "60s",
        "--shutdown-grace",
        "500ms",
    ])
    .await;
    let _stuck = upstream
        .hold_a_write(gw.url("/api/v1/write"), Duration::from_secs(10))
        .await;
    let signalled = Instant::now();
    gw.child.signal("TERM");
    let status = gw.child.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "exit status {status}");
    assert!(
        signalled.elapsed() < Duration::from_secs(5),
        "took {:?}",
        signalled.elapsed()
    );
}

/// SIGINT (Ctrl-C) on an idle gateway exits 0 promptly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_on_idle_exits_0() {
    let mut gw = RwgateProcess::start(&[
        "--auth",
        "none",
        "--upstream-url",
        "http://127.0.0.1:9/api/v1/write",
    ])
    .await;
    gw.child.signal("INT");
    let status = gw.child.wait_exit(Duration::from_secs(5)).await;
    assert!(status.success(), "exit status {status}");
    assert!(gw.child.log().contains("SIGINT received"));
}
