//! Every status rwgate answers, each with its one-line body, against a real
//! Prometheus receiver (and a scripted fake upstream only where Prometheus
//! cannot be made to answer 409, 429 or 5xx on demand).

mod common;

use std::time::Duration;

use common::*;
use rwgate::config::{Config, Size};

const WRITE: &str = "/api/v1/write";

fn limited(upstream: &str) -> Config {
    let mut cfg = test_config(upstream);
    cfg.limits.max_body_bytes = Size(4096);
    cfg.limits.max_decoded_bytes = Size(65536);
    cfg.limits.max_series_per_request = 5;
    cfg.limits.max_labels_per_series = 6;
    cfg.limits.max_label_name_bytes = 32;
    cfg.limits.max_label_value_bytes = 64;
    cfg
}

/// Sends `req` and asserts the status and the exact body.
async fn expect(req: reqwest::RequestBuilder, status: u16, body: &str) {
    let resp = req.send().await.expect("send request");
    assert_eq!(status_body(resp).await, (status, body.to_string()));
}

fn up() -> Vec<u8> {
    write_body(vec![series("up", &[("job", "codes")], 1.0, now_ms())])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_errors_each_have_their_status_and_reason() {
    let prom = Prometheus::start().await;
    let gw = Gateway::start(limited(&prom.write_url())).await;
    let http = client();
    let url = gw.url(WRITE);

    // Tenant header.
    expect(
        rw_post(&http, &url, None, up()),
        400,
        "missing Cloud-Account-Id header\n",
    )
    .await;
    expect(
        rw_post(&http, &url, Some("   "), up()),
        400,
        "missing Cloud-Account-Id header\n",
    )
    .await;
    expect(
        rw_post(&http, &url, Some("not-a-uuid"), up()),
        400,
        "Cloud-Account-Id must be a UUID\n",
    )
    .await;

    // Routing.
    expect(
        http.get(gw.url("/nope")),
        404,
        "not found: remote_write goes to POST /storage/api/v2/write, /api/v1/write or /api/v1/receive\n",
    )
    .await;
    expect(
        http.post(gw.url("/api/v1/query")).header("Cloud-Account-Id", TENANT_A),
        404,
        "not found: remote_write goes to POST /storage/api/v2/write, /api/v1/write or /api/v1/receive\n",
    )
    .await;
    // 405 names the allowed methods in the body and in `Allow` (RFC 9110
    // requires the header).
    let not_allowed = |req: reqwest::RequestBuilder, allow: &'static str| async move {
        let resp = req.send().await.expect("send request");
        let header = resp
            .headers()
            .get("allow")
            .map(|v| v.to_str().unwrap().to_string());
        assert_eq!(header.as_deref(), Some(allow));
        assert_eq!(
            status_body(resp).await,
            (405, format!("method not allowed: use {allow}\n"))
        );
    };
    for path in rwgate::server::WRITE_PATHS {
        for method in [
            reqwest::Method::GET,
            reqwest::Method::PUT,
            reqwest::Method::DELETE,
        ] {
            not_allowed(
                http.request(method, gw.url(path))
                    .header("Cloud-Account-Id", TENANT_A),
                "POST",
            )
            .await;
        }
    }
    for path in ["/metrics", "/-/healthy", "/-/ready"] {
        not_allowed(http.post(gw.url(path)), "GET, HEAD").await;
        not_allowed(http.delete(gw.url(path)), "GET, HEAD").await;
    }

    // Size limits: the compressed body, announced by Content-Length ...
    let noise: Vec<u8> = (0..5000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    expect(
        rw_post(&http, &url, Some(TENANT_A), noise.clone()),
        413,
        "request body too large: more than 4KiB (limits.max_body_bytes)\n",
    )
    .await;
    // ... and streamed without one (chunked), cut off while reading.
    let mut chunked = format!(
        "POST {WRITE} HTTP/1.1\r\nHost: x\r\nCloud-Account-Id: {TENANT_A}\r\nContent-Encoding: snappy\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    for chunk in noise.chunks(1000) {
        chunked.extend(format!("{:x}\r\n", chunk.len()).as_bytes());
        chunked.extend(chunk);
        chunked.extend(b"\r\n");
    }
    chunked.extend(b"0\r\n\r\n");
    let answer = raw_http(gw.addr, &chunked).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        answer
            .ends_with("\r\n\r\nrequest body too large: more than 4KiB (limits.max_body_bytes)\n"),
        "{answer}"
    );

    // A decompression bomb: 6 bytes declaring 4 GiB - 1 of output. Refused
    // from the snappy length header alone, as more than its bytes can
    // expand to (the pipeline unit test proves no buffer is allocated).
    expect(
        rw_post(
            &http,
            &url,
            Some(TENANT_A),
            vec![0xff, 0xff, 0xff, 0xff, 0x0f, 0x00],
        ),
        400,
        "invalid snappy block: it declares 4294967295 bytes, more than its 6 bytes can expand to (0)\n",
    )
    .await;
    // A body that does expand past the limit, just over it.
    let just_over = snap::raw::Encoder::new()
        .compress_vec(&vec![0u8; 65537])
        .expect("compress");
    expect(
        rw_post(&http, &url, Some(TENANT_A), just_over),
        413,
        "decompressed body too large: 65537 bytes declared, more than 64KiB (limits.max_decoded_bytes)\n",
    )
    .await;

    // Encoding and type.
    // (Built by hand: `rw_post` already sets these headers.)
    let with = |name: &str, value: &str| {
        let other = if name == "Content-Type" {
            ("Content-Encoding", "snappy")
        } else {
            ("Content-Type", "application/x-protobuf")
        };
        http.post(&url)
            .header("Cloud-Account-Id", TENANT_A)
            .header(other.0, other.1)
            .header(name, value)
            .body(up())
    };
    expect(
        with("Content-Encoding", "gzip"),
        415,
        "unsupported Content-Encoding \"gzip\": send snappy\n",
    )
    .await;
    expect(
        with(
            "Content-Type",
            "application/x-protobuf;proto=io.prometheus.write.v3.Request",
        ),
        415,
        "unsupported Content-Type \"application/x-protobuf;proto=io.prometheus.write.v3.Request\": send application/x-protobuf (Remote-Write 1.0) or application/x-protobuf;proto=io.prometheus.write.v2.Request (2.0)\n",
    )
    .await;
    expect(
        with("Content-Type", "application/json"),
        415,
        "unsupported Content-Type \"application/json\": send application/x-protobuf (Remote-Write 1.0) or application/x-protobuf;proto=io.prometheus.write.v2.Request (2.0)\n",
    )
    .await;
    // Parameter names are case-insensitive: an upper-case `PROTO` naming
    // another message is not Remote-Write 1.0 ...
    expect(
        with(
            "Content-Type",
            "application/x-protobuf; PROTO=io.prometheus.write.v3.Request",
        ),
        415,
        "unsupported Content-Type \"application/x-protobuf; PROTO=io.prometheus.write.v3.Request\": send application/x-protobuf (Remote-Write 1.0) or application/x-protobuf;proto=io.prometheus.write.v2.Request (2.0)\n",
    )
    .await;
    // ... and two `proto`s are ambiguous.
    expect(
        with(
            "Content-Type",
            "application/x-protobuf;proto=prometheus.WriteRequest;proto=io.prometheus.write.v2.Request",
        ),
        415,
        "unsupported Content-Type \"application/x-protobuf;proto=prometheus.WriteRequest;proto=io.prometheus.write.v2.Request\": send application/x-protobuf (Remote-Write 1.0) or application/x-protobuf;proto=io.prometheus.write.v2.Request (2.0)\n",
    )
    .await;

    // Bad snappy, bad protobuf.
    expect(
        rw_post(&http, &url, Some(TENANT_A), b"\x05hello".to_vec()),
        400,
        "invalid snappy block: snappy: corrupt input (expected literal read of length 27; remaining src: 4; remaining dst: 5)\n",
    )
    .await;
    let not_proto = snap::raw::Encoder::new()
        .compress_vec(b"\x0a\x09abc")
        .expect("compress");
    expect(
        rw_post(&http, &url, Some(TENANT_A), not_proto),
        400,
        "invalid remote-write body: protobuf: length past end of message at byte 2\n",
    )
    .await;

    // Shape limits, each named: too many series refuses the request, a
    // per-series limit the series that breaks it (the rest would be written).
    let ts = now_ms();
    let six: Vec<_> = (0..6)
        .map(|i| series("up", &[("i", &i.to_string())], 1.0, ts))
        .collect();
    expect(
        rw_post(&http, &url, Some(TENANT_A), write_body(six)),
        400,
        "invalid remote-write body: too many series: more than 5 in one request\n",
    )
    .await;
    let seven_labels = series(
        "up",
        &[
            ("a", "1"),
            ("b", "1"),
            ("c", "1"),
            ("d", "1"),
            ("e", "1"),
            ("f", "1"),
        ],
        1.0,
        ts,
    );
    expect(
        rw_post(&http, &url, Some(TENANT_A), write_body(vec![seven_labels])),
        400,
        "1 of 1 series refused: series 0 (counting from 0) has 7 labels, the limit is 6\n",
    )
    .await;
    let long_name = "n".repeat(33);
    expect(
        rw_post(
            &http,
            &url,
            Some(TENANT_A),
            write_body(vec![series("up", &[(&long_name, "v")], 1.0, ts)]),
        ),
        400,
        "1 of 1 series refused: series 0 (counting from 0) has a label name of 33 bytes, the limit is 32\n",
    )
    .await;
    let long_value = "v".repeat(65);
    expect(
        rw_post(
            &http,
            &url,
            Some(TENANT_A),
            write_body(vec![series("up", &[("job", &long_value)], 1.0, ts)]),
        ),
        400,
        "1 of 1 series refused: series 0 (counting from 0) has a value of 65 bytes for label \"job\", the limit is 64\n",
    )
    .await;

    // None of that reached the receiver; a good request does.
    assert!(prom.all_series().await.is_empty());
    expect(rw_post(&http, &url, Some(TENANT_A), up()), 204, "").await;
    assert_eq!(prom.all_series().await.len(), 1);

    // Remote-Write 1.0 however RFC 9110 lets the sender spell it.
    for ct in [
        "Application/X-Protobuf; Proto=\"prometheus.WriteRequest\"",
        "application/x-protobuf ; charset=utf-8 ; proto = prometheus.WriteRequest",
        "application/x-protobuf;proto=\"prometheus.\\WriteRequest\"",
    ] {
        expect(with("Content-Type", ct), 204, "").await;
    }

    // A missing Content-Type and Content-Encoding is Remote-Write 1.0 by default.
    expect(
        http.post(&url)
            .header("Cloud-Account-Id", TENANT_A)
            .body(up()),
        204,
        "",
    )
    .await;
    gw.stop().await;
}

/// Prometheus refuses an out-of-order sample with 400; rwgate passes the 400
/// and Prometheus' reason back instead of retrying a batch that can never
/// succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_400_is_passed_back_with_its_reason() {
    let prom = Prometheus::start().await;
    let gw = Gateway::start(test_config(&prom.write_url())).await;
    let http = client();
    let url = gw.url(WRITE);
    let ts = now_ms();
    let at = |t: i64| write_body(vec![series("up", &[("job", "ooo")], 1.0, t)]);
    expect(rw_post(&http, &url, Some(TENANT_A), at(ts)), 204, "").await;
    expect(
        rw_post(&http, &url, Some(TENANT_A), at(ts - 60_000)),
        400,
        "upstream rejected the write: out of order sample\n",
    )
    .await;
    // The series is still there once, with the first value.
    assert_eq!(prom.query("up{job=\"ooo\"}").await.len(), 1);
    gw.stop().await;
}

/// Upstream answers Prometheus cannot be made to give on demand, scripted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_409_429_and_5xx_are_mapped_and_retried() {
    let http = client();
    let body = || write_body(vec![series("up", &[("job", "fake")], 1.0, now_ms())]);

    // 409: passed back with the upstream's first line, not retried.
    let up = FakeUpstream::start(vec![Reply::status(
        409,
        "\nconflict: out of order samples\nsecond line\n",
    )])
    .await;
    let gw = Gateway::start(test_config(&up.url())).await;
    expect(
        rw_post(&http, &gw.url(WRITE), Some(TENANT_A), body()),
        409,
        "upstream rejected the write: conflict: out of order samples\n",
    )
    .await;
    assert_eq!(up.count(), 1);
    gw.stop().await;

    // 500, 502, then success: retried within the request, 204 to the sender.
    let up = FakeUpstream::start(vec![
        Reply::status(500, "boom"),
        Reply::status(502, "bad gateway"),
    ])
    .await;
    let gw = Gateway::start(test_config(&up.url())).await;
    expect(
        rw_post(&http, &gw.url(WRITE), Some(TENANT_A), body()),
        204,
        "",
    )
    .await;
    assert_eq!(up.count(), 3);
    gw.stop().await;

    // 5xx every time: after 1 + max_retries attempts, 503 (Prometheus retries).
    let up = FakeUpstream::start(vec![Reply::status(503, "down"); 10]).await;
    let gw = Gateway::start(test_config(&up.url())).await;
    expect(
        rw_post(&http, &gw.url(WRITE), Some(TENANT_A), body()),
        503,
        "upstream unavailable; retry later\n",
    )
    .await;
    assert_eq!(up.count(), 3);
    gw.stop().await;

    // 429 every time: 429 with Retry-After to the sender.
    let up = FakeUpstream::start(vec![
        Reply::status(429, "slow down")
            .header("Retry-After", "7");
        10
    ])
    .await;
    let gw = Gateway::start(test_config(&up.url())).await;
    let resp = rw_post(&http, &gw.url(WRITE), Some(TENANT_A), body())
        .send()
        .await
        .expect("POST");
    let retry_after = retry_after(&resp);
    assert_eq!(
        status_body(resp).await,
        (429, "upstream is rate limiting; retry later\n".to_string())
    );
    assert_eq!(retry_after.as_deref(), Some("7"));
    assert_eq!(up.count(), 3);

    // What the upstream received: the tenant header and a valid snappy
    // protobuf with the tenant labels enforced.
    let seen = &up.seen()[0];
    assert_eq!(seen.uri.path(), "/api/v1/receive");
    assert_eq!(seen.headers["cloud-account-id"], TENANT_A);
    assert_eq!(seen.headers["content-encoding"], "snappy");
    assert_eq!(seen.headers["content-type"], "application/x-protobuf");
    let fwd = decode_body(&seen.body);
    assert_eq!(fwd.timeseries.len(), 1);
    assert_eq!(
        labels_of(&fwd.timeseries[0]),
        labels(&[
            ("__name__", "up"),
            ("job", "fake"),
            ("cloud_account_id", TENANT_A),
            ("tenant_id", TENANT_A),
        ])
    );
    gw.stop().await;
}

/// A request whose series are all dropped is acknowledged without calling
/// the upstream at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_left_after_filtering_is_204_without_upstream_call() {
    let up = FakeUpstream::start(vec![Reply::status(500, "must not be called")]).await;
    let gw = Gateway::start(test_config(&up.url())).await;
    let body = write_body(vec![series("go_goroutines", &[], 1.0, now_ms())]);
    expect(
        rw_post(&client(), &gw.url(WRITE), Some(TENANT_A), body),
        204,
        "",
    )
    .await;
    // Metadata only (Prometheus sends it on its own): nothing carries a tenant.
    let metadata_only = rwgate::prompb::WriteRequest {
        timeseries: Vec::new(),
        metadata: vec![rwgate::prompb::MetricMetadata {
            metric_family_name: "up".into(),
            help: "target is up".into(),
            ..Default::default()
        }],
    };
    let body = snap::raw::Encoder::new()
        .compress_vec(&prost::Message::encode_to_vec(&metadata_only))
        .expect("compress");
    expect(
        rw_post(&client(), &gw.url(WRITE), Some(TENANT_A), body),
        204,
        "",
    )
    .await;
    // A series without a name is refused (and so not forwarded either).
    let mut nameless = series("up", &[("job", "x")], 1.0, now_ms());
    nameless.labels.remove(0);
    expect(
        rw_post(
            &client(),
            &gw.url(WRITE),
            Some(TENANT_A),
            write_body(vec![nameless]),
        ),
        400,
        "1 of 1 series refused: series 0 (counting from 0) has no __name__ label\n",
    )
    .await;
    // An empty body is not a snappy block (that would be one 0 byte), as
    // Prometheus' own receiver also says.
    expect(
        rw_post(&client(), &gw.url(WRITE), Some(TENANT_A), Vec::new()),
        400,
        "invalid snappy block: snappy: corrupt input (empty)\n",
    )
    .await;
    expect(
        rw_post(&client(), &gw.url(WRITE), Some(TENANT_A), vec![0]),
        204,
        "",
    )
    .await;
    assert_eq!(up.count(), 0);
    gw.stop().await;
}

/// The upstream is down: 503, so the sender keeps the data and retries; once
/// the receiver is up, the retried request lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_is_503_and_a_retry_lands_once_it_is_back() {
    let port = free_port();
    let gw = Gateway::start(test_config(&format!(
        "http://127.0.0.1:{port}/api/v1/write"
    )))
    .await;
    let http = client();
    let ts = now_ms();
    let body = write_body(vec![series("up", &[("job", "comeback")], 1.0, ts)]);
    expect(
        rw_post(&http, &gw.url(WRITE), Some(TENANT_A), body.clone()),
        503,
        "upstream unavailable; retry later\n",
    )
    .await;

    let prom = Prometheus::start_on(port).await;
    // The sender's retry loop, as Prometheus does it.
    wait_for(
        "a retried write to succeed",
        Duration::from_secs(15),
        || async {
            let resp = rw_post(&http, &gw.url(WRITE), Some(TENANT_A), body.clone())
                .send()
                .await
                .expect("POST");
            (resp.status() == 204).then_some(())
        },
    )
    .await;
    let got = prom.query("up{job=\"comeback\"}").await;
    assert_eq!(
        got,
        [(
            labels(&[
                ("__name__", "up"),
                ("job", "comeback"),
                ("cloud_account_id", TENANT_A),
                ("tenant_id", TENANT_A),
            ]),
            1.0
        )]
    );
    gw.stop().await;
}

/// Slow senders: a body that stops arriving gets 503 (retryable: Prometheus
/// drops a batch answered 408) after `body_read_timeout`; headers that stop arriving get the connection closed
/// after `header_read_timeout`. Neither holds a slot forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_and_bodies_time_out() {
    let up = FakeUpstream::start(Vec::new()).await;
    let mut cfg = test_config(&up.url());
    cfg.limits.body_read_timeout = Duration::from_millis(300);
    cfg.limits.header_read_timeout = Duration::from_millis(300);
    let gw = Gateway::start(cfg).await;

    let started = std::time::Instant::now();
    let partial_body = format!(
        "POST {WRITE} HTTP/1.1\r\nHost: x\r\nCloud-Account-Id: {TENANT_A}\r\nContent-Length: 100\r\nConnection: close\r\n\r\n0123456789"
    );
    let answer = raw_http(gw.addr, partial_body.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(
        answer.ends_with("\r\n\r\ntimed out reading the request body; retry\n"),
        "{answer}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    let started = std::time::Instant::now();
    let partial_headers = format!("POST {WRITE} HTTP/1.1\r\nHost: x\r\nCloud-Acc");
    let answer = raw_http(gw.addr, partial_headers.as_bytes()).await;
    // Half a request head gets no answer at all: the connection is closed
    // once the header timeout has passed, not before.
    assert_eq!(answer, "", "half a request head is not answered");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(5),
        "closed after {waited:?}"
    );
    assert_eq!(up.count(), 0);
    gw.stop().await;
}

/// Beyond `max_concurrent_requests`, writes are shed with 503 (retryable)
/// instead of queueing without bound; the admitted one completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_concurrency_limit_is_503() {
    let (up, gw) = gateway_to_fake_upstream(|cfg| cfg.limits.max_concurrent_requests = 1).await;
    up.set_delay(Duration::from_secs(1));
    let url = gw.url(WRITE);
    let first = tokio::spawn(send_status_body(rw_post(
        &client(),
        &url,
        Some(TENANT_A),
        up_body(),
    )));
    wait_for(
        "the first request to reach the upstream",
        Duration::from_secs(10),
        || async { (up.count() == 1).then_some(()) },
    )
    .await;
    expect(
        rw_post(&client(), &url, Some(TENANT_B), up_body()),
        503,
        "overloaded: too many requests in flight; retry later\n",
    )
    .await;
    assert_eq!(
        first.await.expect("first request task"),
        (204, String::new())
    );
    // The slot is free again.
    up.set_delay(Duration::ZERO);
    expect(rw_post(&client(), &url, Some(TENANT_B), up_body()), 204, "").await;
    gw.stop().await;
}

fn up_body() -> Vec<u8> {
    write_body(vec![series("up", &[("job", "x")], 1.0, now_ms())])
}

/// What goes upstream: the configured tenant header and tenant labels with
/// the account id normalised to lower case; not the sender's credentials
/// (diproxy forwarded every header, `Authorization` included).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_gets_the_tenant_header_and_labels_but_not_the_credentials() {
    let up = FakeUpstream::start(Vec::new()).await;
    let mut cfg = test_config(&up.url());
    cfg.upstream.tenant_header = "THANOS-TENANT".to_string();
    cfg.tenancy.labels = vec!["tenant".to_string()];
    let gw = Gateway::start(cfg).await;
    let body = write_body(vec![series(
        "up",
        &[
            ("tenant", "someone-else"),
            ("cloud_account_id", "kept-as-sent"),
        ],
        1.0,
        now_ms(),
    )]);
    expect(
        rw_post(
            &client(),
            &gw.url(WRITE),
            Some(&TENANT_A.to_uppercase()),
            body,
        )
        .basic_auth("user", Some("secret"))
        .header("X-Custom", "1"),
        204,
        "",
    )
    .await;
    let seen = &up.seen()[0];
    assert_eq!(seen.headers["thanos-tenant"], TENANT_A);
    assert!(
        seen.headers.get("cloud-account-id").is_none(),
        "{:?}",
        seen.headers
    );
    assert!(
        seen.headers.get("authorization").is_none(),
        "{:?}",
        seen.headers
    );
    assert!(seen.headers.get("x-custom").is_none(), "{:?}", seen.headers);
    assert_eq!(seen.headers["x-prometheus-remote-write-version"], "0.1.0");
    let fwd = decode_body(&seen.body);
    assert_eq!(
        fwd.timeseries.iter().map(labels_of).collect::<Vec<_>>(),
        [labels(&[
            ("__name__", "up"),
            ("cloud_account_id", "kept-as-sent"),
            ("tenant", TENANT_A),
        ])]
    );
    // Labels go out sorted by name, as remote-write receivers require.
    let names: Vec<&str> = fwd.timeseries[0]
        .labels
        .iter()
        .map(|l| l.name.as_str())
        .collect();
    assert_eq!(names, ["__name__", "cloud_account_id", "tenant"]);
    gw.stop().await;
}
