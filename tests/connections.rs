//! Connection-level limits: a client that connects and says nothing is
//! dropped, the number of open connections is bounded, and an upstream that
//! is misconfigured (404) is a 503 for the sender, not a 4xx that would make
//! Prometheus drop the batch.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_closed_after_the_header_timeout() {
    let (_up, gw) =
        gateway_to_fake_upstream(|cfg| cfg.limits.header_read_timeout = Duration::from_millis(300))
            .await;
    let addr = gw.addr;
    let took = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let started = Instant::now();
        let mut buf = [0u8; 16];
        // EOF (0) once rwgate gives up on the silent client.
        let n = s.read(&mut buf).expect("read until closed");
        assert_eq!(n, 0, "expected the server to close the connection");
        started.elapsed()
    })
    .await
    .expect("join");
    assert!(took < Duration::from_secs(5), "closed only after {took:?}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_connections_are_bounded() {
    let up = FakeUpstream::start(Vec::new()).await;
    let mut cfg = test_config(&up.url());
    cfg.limits.max_connections = 1;
    cfg.limits.header_read_timeout = Duration::from_secs(30);
    let gw = Gateway::start(cfg).await;
    let addr = gw.addr;
    tokio::task::spawn_blocking(move || {
        let get = b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n\r\n";
        let mut first = TcpStream::connect(addr).expect("connect 1");
        first.write_all(get).expect("write 1");
        let mut buf = [0u8; 256];
        assert!(first.read(&mut buf).expect("read 1") > 0, "first is served");

        // The second connection is accepted by the kernel but not served
        // while the first stays open.
        let mut second = TcpStream::connect(addr).expect("connect 2");
        second.write_all(get).expect("write 2");
        second
            .set_read_timeout(Some(Duration::from_millis(500)))
            .expect("timeout");
        let err = second.read(&mut buf).expect_err("second must wait");
        assert!(
            matches!(
                err.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "{err}"
        );
        // Closing the first lets the second through.
        drop(first);
        second
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let n = second.read(&mut buf).expect("read 2");
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    })
    .await
    .expect("join");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misconfigured_upstream_is_503_without_retries() {
    let up = FakeUpstream::start(vec![Reply::status(404, "404 page not found")]).await;
    let gw = Gateway::start(test_config(&up.url())).await;
    let resp = rw_post(
        &client(),
        &gw.url("/api/v1/write"),
        Some(TENANT_A),
        write_body(vec![series("up", &[], 1.0, now_ms())]),
    )
    .send()
    .await
    .expect("send");
    assert_eq!(
        status_body(resp).await,
        (503, "upstream unavailable; retry later\n".to_string())
    );
    assert_eq!(up.count(), 1, "a 404 is not retried");
    gw.stop().await;
}
