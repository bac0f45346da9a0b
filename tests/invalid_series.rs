//! Label sets the spec forbids, and series whose parts do not decode: they
//! are refused on their own, the rest of the request reaches a real
//! Prometheus, and the sender is told 400 with one line (the Remote-Write
//! 2.0 partial-write rule) so that it does not retry forever.

mod common;

use common::*;
use prost::Message;
use rwgate::prompb;

const TENANT: &str = "5b7c9f1e-0d2a-4e8b-9c3f-1a2b3c4d5e6f";

/// A request body of prost series followed by hand-written `TimeSeries`
/// messages (bytes no prost type would produce).
fn body_with_raw(valid: Vec<prompb::TimeSeries>, raw: &[Vec<u8>]) -> Vec<u8> {
    let mut buf = prompb::WriteRequest {
        timeseries: valid,
        metadata: vec![],
    }
    .encode_to_vec();
    for series in raw {
        buf.push(0x0a);
        prost::encoding::encode_varint(series.len() as u64, &mut buf);
        buf.extend_from_slice(series);
    }
    snap::raw::Encoder::new()
        .compress_vec(&buf)
        .expect("snappy compress")
}

/// A series with a valid name and a sample whose value is a varint.
fn bad_sample_series() -> Vec<u8> {
    let mut s = prompb::TimeSeries {
        labels: vec![prompb::Label {
            name: "__name__".into(),
            value: "up".into(),
        }],
        ..Default::default()
    }
    .encode_to_vec();
    s.extend_from_slice(&[0x12, 0x02, 0x08, 0x01]);
    s
}

/// POSTs `body` as [`TENANT`]: the status and the body of the answer.
async fn post(gw: &Gateway, body: Vec<u8>) -> (u16, String) {
    status_body(
        rw_post(&client(), &gw.write_url(), Some(TENANT), body)
            .send()
            .await
            .expect("post"),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_series_are_refused_and_the_rest_is_stored() {
    let prom = Prometheus::start().await;
    let gw = Gateway::start(test_config(&prom.write_url())).await;
    let ts = now_ms();

    let mut dup = series("up", &[("job", "a"), ("job", "b")], 9.0, ts);
    dup.labels.swap(0, 2);
    let mut no_name = series("up", &[("job", "nameless")], 9.0, ts);
    no_name.labels.remove(0);
    // __name__ twice: the first is allowed, the second is not (and the
    // other way round). Whichever a reader takes, the series is refused.
    let mut two_names = series("up", &[("job", "twice")], 9.0, ts);
    two_names.labels.push(prompb::Label {
        name: "__name__".into(),
        value: "go_goroutines".into(),
    });
    let mut two_names_rev = two_names.clone();
    two_names_rev.labels.swap(0, 2);
    let empty_name = series("", &[("job", "empty")], 9.0, ts);
    let empty_label = series("up", &[("", "v")], 9.0, ts);
    let body = body_with_raw(
        vec![
            series("up", &[("job", "kept")], 1.0, ts),
            dup,
            no_name,
            two_names,
            two_names_rev,
            empty_name,
            empty_label,
            series("kube_pod_info", &[("pod", "p")], 2.0, ts),
        ],
        &[bad_sample_series()],
    );
    let (status, text) = post(&gw, body).await;
    assert_eq!(status, 400, "{text}");
    assert_eq!(
        text,
        "7 of 9 series refused, the others were accepted: \
         series 1 (counting from 0) has the label name \"job\" more than once\n"
    );

    // Exactly the two valid series were stored, with the tenant labels.
    let stored = prom.all_series().await;
    let want = [
        labels(&[
            ("__name__", "up"),
            ("job", "kept"),
            ("cloud_account_id", TENANT),
            ("tenant_id", TENANT),
        ]),
        labels(&[
            ("__name__", "kube_pod_info"),
            ("pod", "p"),
            ("cloud_account_id", TENANT),
            ("tenant_id", TENANT),
        ]),
    ];
    assert_eq!(stored, want.into_iter().collect());

    // Counted by reason.
    assert_series_refused(
        &gw.metrics().await,
        &[
            ("duplicate_label_name", 3.0),
            ("missing_metric_name", 1.0),
            ("empty_metric_name", 1.0),
            ("empty_label_name", 1.0),
            ("malformed_sample", 1.0),
        ],
    );

    // A request whose series are all valid still answers 204.
    let ok = write_body(vec![series("up", &[("job", "later")], 1.0, ts)]);
    let (status, text) = post(&gw, ok).await;
    assert_eq!((status, text.as_str()), (204, ""));
    gw.stop().await;
}

/// When the forward of the valid rest fails, the answer is the upstream's
/// (503 here, retryable), not the 400 of the refused series.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_forward_wins_over_refused_series() {
    let upstream = FakeUpstream::start(vec![Reply::status(503, "down")]).await;
    let mut cfg = test_config(&upstream.url());
    cfg.upstream.max_retries = 0;
    let gw = Gateway::start(cfg).await;
    let ts = now_ms();
    let mut dup = series("up", &[("job", "a"), ("job", "b")], 9.0, ts);
    dup.labels.swap(0, 1);
    let body = write_body(vec![series("up", &[], 1.0, ts), dup]);
    let resp = rw_post(&client(), &gw.write_url(), Some(TENANT), body)
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status(), 503);
    // What was forwarded is the valid series alone.
    let seen = upstream.seen();
    assert_eq!(seen.len(), 1);
    let fwd = decode_body(&seen[0].body);
    assert_eq!(fwd.timeseries.len(), 1);
    gw.stop().await;
}

/// The snappy length header is checked against what the compressed bytes
/// can expand to before anything is allocated: 5 bytes declaring 64 MiB
/// are refused with 400 (and nothing is decompressed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snappy_length_the_body_cannot_expand_to_is_refused() {
    let prom = Prometheus::start().await;
    let gw = Gateway::start(test_config(&prom.write_url())).await;
    let mut bomb = Vec::new();
    prost::encoding::encode_varint(64 << 20, &mut bomb);
    bomb.push(0x00);
    let (status, text) = post(&gw, bomb).await;
    assert_eq!(status, 400);
    assert_eq!(
        text,
        "invalid snappy block: it declares 67108864 bytes, more than its 5 bytes can expand to (0)\n"
    );
    gw.stop().await;
}
