//! What hyper refuses by itself, before a request reaches routing (a head
//! that does not parse, too many headers, a URI too long, a head not received
//! in time), is answered as hyper does and counted in
//! `rwgate_connections_rejected_total` by reason. Raw TCP clients, since
//! HTTP libraries refuse to send such requests. One test in this file: the
//! metrics recorder is process-wide, and the counts below are exact.

mod common;

use std::time::Duration;

use common::*;

/// Waits until `rwgate_connections_rejected_total{reason}` reaches `want`
/// and returns the text of `/metrics`.
async fn rejected(gw: &Gateway, reason: &str, want: f64) -> String {
    let series = format!("rwgate_connections_rejected_total{{reason=\"{reason}\"}}");
    wait_for(
        &format!("{series} = {want}"),
        Duration::from_secs(10),
        || async {
            let text = gw.metrics().await;
            (metric_value(&text, &series) >= want).then_some(text)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hyper_rejections_are_counted_by_reason() {
    let (_up, gw) =
        gateway_to_fake_upstream(|cfg| cfg.limits.header_read_timeout = Duration::from_millis(500))
            .await;
    let count = |text: &str, reason: &str| {
        metric_value(
            text,
            &format!("rwgate_connections_rejected_total{{reason=\"{reason}\"}}"),
        )
    };

    // 431: more headers than hyper takes (100).
    let mut many = "GET /-/healthy HTTP/1.1\r\nHost: x\r\n".to_string();
    for i in 0..120 {
        many.push_str(&format!("X-Header-{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let answer = raw_http(gw.addr, many.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
    rejected(&gw, "headers_too_large", 1.0).await;

    // 414: a URI of 70 000 bytes.
    let long = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(70_000));
    let answer = raw_http(gw.addr, long.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 414 "), "{answer}");
    rejected(&gw, "uri_too_long", 1.0).await;

    // 400: a header name with a space, and a request line that is not HTTP.
    for bad in [
        &b"POST /api/v1/write HTTP/1.1\r\nHost: x\r\nBad Name: v\r\n\r\n"[..],
        b"GET / FTP/1.0\r\n\r\n",
    ] {
        let answer = raw_http(gw.addr, bad).await;
        assert!(
            answer.starts_with("HTTP/1.1 400 "),
            "{:?}: {answer}",
            String::from_utf8_lossy(bad)
        );
    }
    let text = rejected(&gw, "malformed", 2.0).await;
    assert_eq!(count(&text, "malformed"), 2.0, "{text}");
    assert_eq!(count(&text, "headers_too_large"), 1.0, "{text}");
    assert_eq!(count(&text, "uri_too_long"), 1.0, "{text}");
    assert_eq!(count(&text, "header_timeout"), 0.0, "{text}");

    // A keep-alive connection closed after a complete exchange because it
    // stayed idle is no rejection ...
    let answer = raw_http(gw.addr, b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    // ... a head that never completes is (the server closes without an
    // answer) ...
    let answer = raw_http(gw.addr, b"POST /api/v1/write HTTP/1.1\r\nHost: x\r\n").await;
    assert_eq!(answer, "");
    let text = rejected(&gw, "header_timeout", 1.0).await;
    assert_eq!(count(&text, "header_timeout"), 1.0, "{text}");
    // ... and so is a connection that sends nothing at all.
    assert_eq!(raw_http(gw.addr, b"").await, "");
    let text = rejected(&gw, "header_timeout", 2.0).await;
    assert_eq!(count(&text, "header_timeout"), 2.0, "{text}");
    // Requests that reached routing are counted where they always were.
    assert_eq!(
        metric_value(
            &text,
            "rwgate_requests_total{route=\"healthy\",status=\"200\"}"
        ),
        1.0,
        "{text}"
    );
    gw.stop().await;
}
