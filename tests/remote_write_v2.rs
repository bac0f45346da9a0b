//! Remote-Write 2.0 senders (Prometheus 3) through rwgate: requests built
//! with prost from the official proto (`rwgate::prompb_v2`) and, where they
//! must be malformed, by hand; the real Prometheus 2.42 receiver takes the
//! converted 1.0, and the recording stand-in (`FakeUpstream`) shows the
//! headers and bodies an upstream gets, 1.0 or 2.0.

mod common;

use std::collections::BTreeSet;

use common::v2::{self, Builder};
use common::*;
use rwgate::config::RemoteWriteVersion;
use rwgate::prompb_v2 as pb;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

/// One tenant's 2.0 request: `up`, a `kube_pod_info` spoofing `other`'s
/// tenant labels (unsorted), a native histogram, a counter with an
/// exemplar, and `go_goroutines`, which the default allowlist drops.
fn tenant_request(other: &str, ts: i64) -> pb::Request {
    let mut b = Builder::new();
    b.series(&[("__name__", "up"), ("job", "rt")], &[(ts, 1.0)]);
    b.series(
        &[
            ("tenant_id", other),
            ("pod", "p1"),
            ("__name__", "kube_pod_info"),
            ("cloud_account_id", other),
        ],
        &[(ts, 2.0)],
    );
    b.series(
        &[("__name__", "node_rpc_duration_seconds"), ("job", "rt")],
        &[],
    )
    .histograms = vec![v2::histogram(ts, 5, 12.5)];
    let ex = v2::exemplar(&mut b, TRACE, 0.75, ts);
    b.series(
        &[("__name__", "node_requests_total"), ("job", "rt")],
        &[(ts, 9.0)],
    )
    .exemplars = vec![ex];
    b.series(&[("__name__", "go_goroutines")], &[(ts, 3.0)]);
    b.request()
}

/// Two tenants write 2.0, each spoofing the other's tenant labels; tenant B
/// has a narrower allowlist. The real receiver holds exactly the allowed
/// series, stamped with the writer's own account, with the histogram and
/// the exemplar; each answer's Written headers count what was forwarded
/// plus what the allowlist dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tenants_write_2_0_into_a_1_0_receiver() {
    let prom = Prometheus::start_with_features(&["native-histograms", "exemplar-storage"]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = test_config(&prom.write_url());
    static_auth(
        &mut cfg,
        dir.path(),
        &[
            (TENANT_A, &basic_credentials("alice", "a"), None),
            (TENANT_B, &basic_credentials("bob", "b"), Some("node_.*|up")),
        ],
    );
    let gw = Gateway::start(cfg).await;
    let http = client();
    let ts = now_ms();

    for (tenant, other, user, pass, want) in [
        // A: 4 samples (go_goroutines dropped on purpose counts), 1
        // histogram, 1 exemplar.
        (TENANT_A, TENANT_B, "alice", "a", (4, 1, 1)),
        // B: kube_pod_info is dropped by B's allowlist: counted all the same.
        (TENANT_B, TENANT_A, "bob", "b", (4, 1, 1)),
    ] {
        let resp = v2::post(
            &http,
            &gw.write_url(),
            tenant,
            v2::body(&tenant_request(other, ts)),
        )
        .basic_auth(user, Some(pass))
        .send()
        .await
        .expect("POST 2.0");
        let written = v2::written(resp.headers());
        assert_eq!(status_body(resp).await, (204, String::new()), "{tenant}");
        assert_eq!(written, want, "{tenant}");
    }

    let mut expected = BTreeSet::new();
    for t in [TENANT_A, TENANT_B] {
        let tenant = [("cloud_account_id", t), ("tenant_id", t)];
        let with = |pairs: &[(&str, &str)]| {
            let mut all = pairs.to_vec();
            all.extend_from_slice(&tenant);
            labels(&all)
        };
        expected.insert(with(&[("__name__", "up"), ("job", "rt")]));
        expected.insert(with(&[
            ("__name__", "node_rpc_duration_seconds"),
            ("job", "rt"),
        ]));
        expected.insert(with(&[("__name__", "node_requests_total"), ("job", "rt")]));
        if t == TENANT_A {
            expected.insert(with(&[("__name__", "kube_pod_info"), ("pod", "p1")]));
        }
    }
    assert_eq!(
        prom.all_series().await,
        expected,
        "receiver log:\n{}",
        prom.log_tail()
    );

    // The values, the native histogram and the exemplar arrived whole.
    let pods = prom.query("kube_pod_info").await;
    assert_eq!(pods.len(), 1, "{pods:?}");
    assert_eq!(pods[0].1, 2.0);
    let counts = prom
        .query("histogram_count(node_rpc_duration_seconds)")
        .await;
    assert_eq!(counts.len(), 2, "{counts:?}");
    assert!(counts.iter().all(|(_, v)| *v == 5.0), "{counts:?}");
    let sums = prom.query("histogram_sum(node_rpc_duration_seconds)").await;
    assert!(sums.iter().all(|(_, v)| *v == 12.5), "{sums:?}");
    let start = ((ts - 60_000) / 1000).to_string();
    let end = ((ts + 60_000) / 1000).to_string();
    let ex = prom
        .api(
            "/api/v1/query_exemplars",
            &[
                ("query", "node_requests_total"),
                ("start", &start),
                ("end", &end),
            ],
        )
        .await;
    let ex = ex.as_array().expect("exemplar series");
    assert_eq!(ex.len(), 2, "{ex:?}");
    for e in ex {
        let one = &e["exemplars"][0];
        assert_eq!(one["labels"]["trace_id"], TRACE, "{e}");
        assert_eq!(one["value"], "0.75", "{e}");
    }
    gw.stop().await;
}

/// What a 1.0 upstream is sent for a 2.0 request, byte for byte: the
/// reference conversion (`Request::to_v1`) of the kept series, with the
/// 1.0 headers. The request carries what a 2.0 sender may: unsorted
/// labels, a tenant label spoofed through a second copy of its symbol,
/// histograms with start timestamps, exemplars, metadata for several
/// families, and rc.3's created timestamp in TimeSeries field 6.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversion_to_1_0_as_the_upstream_receives_it() {
    let up = FakeUpstream::start(vec![]).await;
    let gw = Gateway::start(test_config(&up.url())).await;
    let http = client();

    let mut b = Builder::new();
    let help = b.sym("Time spent.");
    let unit = b.sym("seconds");
    let meta = |kind, help, unit| {
        Some(pb::Metadata {
            r#type: kind,
            help_ref: help,
            unit_ref: unit,
        })
    };
    for le in ["0.5", "+Inf"] {
        b.series(
            &[("le", le), ("__name__", "node_op_seconds_bucket")],
            &[(1000, 3.0)],
        )
        .metadata = meta(3, help, unit);
    }
    b.series(&[("__name__", "node_op_seconds_count")], &[(1000, 3.0)])
        .metadata = meta(3, help, unit);
    let mut h = pb::Histogram {
        start_timestamp: 400,
        ..v2::histogram(1000, 4, 2.0)
    };
    h.custom_values = vec![0.25, 1.0];
    let ex = v2::exemplar(&mut b, "t-1", 0.3, 990);
    let s = b.series(&[("__name__", "node_native_seconds"), ("job", "j")], &[]);
    s.histograms = vec![h];
    s.exemplars = vec![ex];
    s.metadata = meta(3, help, unit);
    b.series(&[("__name__", "up"), ("job", "j")], &[(1000, 1.0)])
        .metadata = meta(2, 0, 0);
    b.series(&[("__name__", "go_goroutines")], &[(1000, 7.0)])
        .metadata = meta(2, 0, 0);
    let mut req = b.request();
    // The spoof: a second "tenant_id" symbol.
    req.symbols.push("tenant_id".into());
    req.symbols.push("someone-else".into());
    let n = req.symbols.len() as u32;
    req.timeseries[4].labels_refs.extend([n - 2, n - 1]);

    // rc.3: TimeSeries field 6, by hand, after each series' fields.
    let mut raw = Vec::new();
    for s in &req.symbols {
        raw.push(0x22);
        rwgate::wire::put_varint(&mut raw, s.len() as u64);
        raw.extend_from_slice(s.as_bytes());
    }
    for ts in &req.timeseries {
        let mut series = prost::Message::encode_to_vec(ts);
        series.extend_from_slice(&[0x30, 0xe8, 0x07]); // created_timestamp = 1000
        raw.push(0x2a);
        rwgate::wire::put_varint(&mut raw, series.len() as u64);
        raw.extend_from_slice(&series);
    }

    let (answer, written) = v2::send(&http, &gw.write_url(), TENANT_A, v2::snappy(&raw)).await;
    assert_eq!(answer, (204, String::new()));
    // 5 float samples (go_goroutines' dropped on purpose), 1 histogram, 1 exemplar.
    assert_eq!(written, (5, 1, 1));

    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    let h = &seen[0].headers;
    assert_eq!(h["content-type"], "application/x-protobuf");
    assert_eq!(h["content-encoding"], "snappy");
    assert_eq!(h["x-prometheus-remote-write-version"], "0.1.0");
    assert_eq!(h["cloud-account-id"], TENANT_A);

    let mut kept = req.clone();
    kept.timeseries.pop(); // go_goroutines
    let want = kept.to_v1(&[("cloud_account_id", TENANT_A), ("tenant_id", TENANT_A)]);
    let got = v2::decode_v1(&seen[0].body);
    assert_eq!(got, want);
    let raw_body = snap::raw::Decoder::new()
        .decompress_vec(&seen[0].body)
        .expect("snappy");
    assert_eq!(
        raw_body,
        prost::Message::encode_to_vec(&want),
        "byte for byte"
    );
    // The metadata, one entry per family.
    let families: Vec<(&str, i32)> = got
        .metadata
        .iter()
        .map(|m| (m.metric_family_name.as_str(), m.r#type))
        .collect();
    assert_eq!(
        families,
        [
            ("node_native_seconds", 3),
            ("node_op_seconds", 3),
            ("up", 2)
        ]
    );
    assert_eq!(got.timeseries[3].histograms[0].custom_values, [0.25, 1.0]);
    gw.stop().await;
}

/// `upstream.protocol = "2.0"`: a 2.0 request goes on as 2.0 (its symbol
/// table as sent, tenant labels set, every other field as it came), the
/// upstream's own Written counts are passed on, and an upstream answering
/// 2xx without them (a 1.0 receiver that decoded nothing) is a 503. 1.0
/// requests still go as 1.0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_protocol_2_0_forwards_2_0() {
    let up = FakeUpstream::start(vec![
        Reply::status(204, "")
            .header("X-Prometheus-Remote-Write-Samples-Written", "1")
            .header("X-Prometheus-Remote-Write-Histograms-Written", "1")
            .header("X-Prometheus-Remote-Write-Exemplars-Written", "0"),
        // A 1.0 receiver: 2xx and no headers, to every attempt.
        Reply::status(204, ""),
        Reply::status(204, ""),
        Reply::status(204, ""),
    ])
    .await;
    let mut cfg = test_config(&up.url());
    cfg.upstream.protocol = RemoteWriteVersion::V2;
    let gw = Gateway::start(cfg).await;
    let http = client();

    let mut b = Builder::new();
    b.series(
        &[("job", "j"), ("__name__", "up"), ("tenant_id", "x")],
        &[(5, 1.0)],
    );
    let s = b.series(&[("__name__", "node_lat")], &[]);
    s.histograms = vec![v2::histogram(5, 3, 1.0)];
    s.metadata = Some(pb::Metadata {
        r#type: 3,
        help_ref: 0,
        unit_ref: 0,
    });
    b.series(&[("__name__", "go_goroutines")], &[(5, 2.0), (6, 2.0)]);
    let req = b.request();

    let (answer, written) = v2::send(&http, &gw.write_url(), TENANT_A, v2::body(&req)).await;
    assert_eq!(answer, (204, String::new()));
    // The upstream's 1 sample + 1 histogram, and the 2 samples dropped.
    assert_eq!(written, (3, 1, 0));
    let seen = up.seen();
    assert_eq!(
        seen[0].headers["content-type"],
        "application/x-protobuf;proto=io.prometheus.write.v2.Request"
    );
    assert_eq!(
        seen[0].headers["x-prometheus-remote-write-version"],
        "2.0.0"
    );
    let got = v2::decode_v2(&seen[0].body);
    assert_eq!(got.symbols[..req.symbols.len()], req.symbols[..]);
    assert_eq!(got.timeseries.len(), 2);
    assert_eq!(
        got.labels_of(0).expect("refs in range"),
        [
            ("__name__", "up"),
            ("cloud_account_id", TENANT_A),
            ("job", "j"),
            ("tenant_id", TENANT_A)
        ]
    );
    for (g, w) in got.timeseries.iter().zip(&req.timeseries) {
        assert_eq!(
            (&g.samples, &g.histograms, &g.metadata),
            (&w.samples, &w.histograms, &w.metadata)
        );
    }

    // No Written headers on a 2xx: not a 2.0 receiver.
    let (answer, written) = v2::send(&http, &gw.write_url(), TENANT_A, v2::body(&req)).await;
    assert_eq!(answer.0, 503);
    assert_eq!(written, (2, 0, 0), "only what the allowlist dropped");

    // 1.0 stays 1.0.
    let resp = rw_post(
        &http,
        &gw.write_url(),
        Some(TENANT_A),
        write_body(vec![series("up", &[], 1.0, 5)]),
    )
    .send()
    .await
    .expect("POST 1.0");
    assert!(resp
        .headers()
        .get("x-prometheus-remote-write-samples-written")
        .is_none());
    assert_eq!(status_body(resp).await, (204, String::new()));
    let last = up.seen().pop().expect("a request");
    assert_eq!(last.headers["content-type"], "application/x-protobuf");
    assert_eq!(decode_body(&last.body).timeseries.len(), 1);
    gw.stop().await;
}

/// The symbols `__name__`, `up`, `job`, `a`, `job` (twice: the same name
/// through two symbols) after the empty string.
const SYMBOLS: [&str; 6] = ["", "__name__", "up", "job", "a", "job"];

fn series_refs(refs: &[u32]) -> pb::TimeSeries {
    pb::TimeSeries {
        labels_refs: refs.to_vec(),
        samples: vec![pb::Sample {
            value: 1.0,
            timestamp: 10,
            start_timestamp: 0,
        }],
        ..Default::default()
    }
}

/// Invalid series are refused alone (a partial write): the rest is
/// forwarded, the answer is 400 with how many were refused and the first
/// reason, Written counts what was written, and the refused are counted by
/// reason. A request that is invalid as a whole writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_series_are_a_partial_write() {
    let up = FakeUpstream::start(vec![]).await;
    let gw = Gateway::start(test_config(&up.url())).await;
    let http = client();

    let req = pb::Request {
        symbols: SYMBOLS.iter().map(|s| s.to_string()).collect(),
        timeseries: vec![
            series_refs(&[1, 2, 3]),          // odd labels_refs
            series_refs(&[1, 2, 3, 4]),       // valid: up{job="a"}
            series_refs(&[1, 2, 3, 9]),       // past the symbol table
            series_refs(&[1, 2, 3, 4, 5, 4]), // job twice
            series_refs(&[3, 4]),             // no __name__
        ],
    };
    // And one by hand: up, whose sample's value is a varint.
    let mut raw = prost::Message::encode_to_vec(&req);
    raw.extend_from_slice(&[
        0x2a, 0x0a, 0x0a, 0x02, 1, 2, 0x12, 0x04, 0x08, 0x01, 0x10, 0x01,
    ]);
    let (answer, written) = v2::send(&http, &gw.write_url(), TENANT_A, v2::snappy(&raw)).await;
    assert_eq!(
        answer,
        (
            400,
            "5 of 6 series refused, the others were accepted: series 0 (counting from 0) is invalid: labels_refs has an odd number of entries\n"
                .to_string()
        )
    );
    assert_eq!(written, (1, 0, 0));
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    let fwd = v2::decode_v1(&seen[0].body);
    assert_eq!(fwd.timeseries.len(), 1);
    assert_eq!(
        labels(
            &fwd.timeseries[0]
                .labels
                .iter()
                .map(|l| (l.name.as_str(), l.value.as_str()))
                .collect::<Vec<_>>()
        ),
        labels(&[
            ("__name__", "up"),
            ("job", "a"),
            ("cloud_account_id", TENANT_A),
            ("tenant_id", TENANT_A)
        ])
    );
    assert_series_refused(
        &gw.metrics().await,
        &[
            ("odd_labels_refs", 1.0),
            ("symbol_out_of_range", 1.0),
            ("duplicate_label_name", 1.0),
            ("missing_metric_name", 1.0),
            ("malformed_series", 1.0),
        ],
    );

    // Only invalid series: nothing to forward, still a 400.
    let only_bad = pb::Request {
        symbols: SYMBOLS.iter().map(|s| s.to_string()).collect(),
        timeseries: vec![series_refs(&[1])],
    };
    let (answer, written) = v2::send(&http, &gw.write_url(), TENANT_A, v2::body(&only_bad)).await;
    assert_eq!(written, (0, 0, 0));
    assert_eq!(answer.0, 400);
    assert_eq!(up.count(), 1, "nothing forwarded");

    // Invalid as a whole: a symbol table that does not start with "".
    let whole = pb::Request {
        symbols: vec!["x".into(), "__name__".into(), "up".into()],
        timeseries: vec![series_refs(&[1, 2])],
    };
    let (answer, written) = v2::send(&http, &gw.write_url(), TENANT_A, v2::body(&whole)).await;
    assert_eq!(written, (0, 0, 0));
    assert_eq!(
        answer,
        (
            400,
            "invalid remote-write body: protobuf: symbols must start with the empty string at byte 2\n"
                .to_string()
        )
    );
    assert_eq!(up.count(), 1, "nothing forwarded");
    gw.stop().await;
}

/// The per-series shape limits (label count, name and value length) refuse
/// the series alone in 2.0, as in 1.0: the same series sent in each protocol
/// get the same 400 line, the valid rest is forwarded, and the refused are
/// counted under the same reasons.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shape_limits_refuse_the_series_alone_as_in_1_0() {
    let up = FakeUpstream::start(vec![]).await;
    let mut cfg = test_config(&up.url());
    cfg.limits.max_labels_per_series = 4;
    cfg.limits.max_label_name_bytes = 16;
    cfg.limits.max_label_value_bytes = 16;
    let gw = Gateway::start(cfg).await;
    let http = client();
    let series = |labels: &[(&str, &str)]| rwgate::prompb::TimeSeries {
        labels: labels
            .iter()
            .map(|(n, v)| rwgate::prompb::Label {
                name: n.to_string(),
                value: v.to_string(),
            })
            .collect(),
        samples: vec![rwgate::prompb::Sample {
            value: 1.0,
            timestamp: 10,
        }],
        ..Default::default()
    };
    let req = rwgate::prompb::WriteRequest {
        timeseries: vec![
            series(&[("__name__", "up"), ("job", "a")]),
            series(&[("__name__", "up"), ("job", "a-value-of-17-byt")]),
            series(&[("__name__", "up"), ("a_name_of_17_byte", "v")]),
            series(&[
                ("__name__", "up"),
                ("a", "1"),
                ("b", "2"),
                ("c", "3"),
                ("d", "4"),
            ]),
            series(&[("__name__", "node_load1"), ("job", "b")]),
        ],
        metadata: vec![],
    };
    let want = (
        400,
        "3 of 5 series refused, the others were accepted: series 1 (counting from 0) \
         has a value of 17 bytes for label \"job\", the limit is 16\n"
            .to_string(),
    );
    let v1 = rw_post(
        &http,
        &gw.write_url(),
        Some(TENANT_A),
        write_body(req.timeseries.clone()),
    )
    .send()
    .await
    .expect("POST 1.0");
    assert_eq!(status_body(v1).await, want, "1.0");
    let resp = v2::post(
        &http,
        &gw.write_url(),
        TENANT_A,
        v2::body(&pb::Request::from_v1(&req)),
    )
    .send()
    .await
    .expect("POST 2.0");
    assert_eq!(v2::written(resp.headers()), (2, 0, 0));
    assert_eq!(status_body(resp).await, want, "2.0");

    let seen = up.seen();
    assert_eq!(seen.len(), 2, "both requests forwarded their valid rest");
    // The same two series reach the upstream from either protocol.
    let v1_fwd: Vec<LabelSet> = decode_body(&seen[0].body)
        .timeseries
        .iter()
        .map(labels_of)
        .collect();
    let v2_fwd: Vec<LabelSet> = v2::decode_v1(&seen[1].body)
        .timeseries
        .iter()
        .map(|ts| {
            ts.labels
                .iter()
                .map(|l| (l.name.clone(), l.value.clone()))
                .collect()
        })
        .collect();
    let tenant = [("cloud_account_id", TENANT_A), ("tenant_id", TENANT_A)];
    let kept = |name: &str, job: &str| {
        let mut l = vec![("__name__", name), ("job", job)];
        l.extend(tenant);
        labels(&l)
    };
    let want_fwd = vec![kept("up", "a"), kept("node_load1", "b")];
    assert_eq!(v1_fwd, want_fwd, "1.0");
    assert_eq!(v2_fwd, want_fwd, "2.0");
    // One refusal of each kind per protocol, under 1.0's reason names.
    let m = gw.metrics().await;
    for reason in [
        "label_value_too_long",
        "label_name_too_long",
        "too_many_labels",
    ] {
        let line = format!("rwgate_series_refused_total{{reason=\"{reason}\"}}");
        assert_eq!(metric_value(&m, &line), 2.0, "{line}\n{m}");
    }
    gw.stop().await;
}

/// Content negotiation for 2.0: any encoding but snappy, or a `proto` other
/// than the two messages, is 415; and the Written headers follow the
/// upstream's refusal (409: nothing forwarded was written).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negotiation_and_upstream_refusals() {
    let up = FakeUpstream::start(vec![Reply::status(409, "out of order sample")]).await;
    let gw = Gateway::start(test_config(&up.url())).await;
    let http = client();
    let mut b = Builder::new();
    b.series(&[("__name__", "up")], &[(1, 1.0)]);
    b.series(&[("__name__", "go_goroutines")], &[(1, 1.0)]);
    let body = v2::body(&b.request());

    let send = |content_type: &str, encoding: &str| {
        http.post(gw.write_url())
            .header("Content-Type", content_type)
            .header("Content-Encoding", encoding)
            .header("Cloud-Account-Id", TENANT_A)
            .body(body.clone())
            .send()
    };
    let v2_type = "application/x-protobuf;proto=io.prometheus.write.v2.Request";
    let resp = send(v2_type, "zstd").await.expect("POST");
    assert_eq!(
        status_body(resp).await,
        (
            415,
            "unsupported Content-Encoding \"zstd\": send snappy\n".to_string()
        )
    );
    let resp = send(
        "application/x-protobuf;proto=io.prometheus.write.v3.Request",
        "snappy",
    )
    .await
    .expect("POST");
    assert_eq!(resp.status(), 415);
    assert_eq!(up.count(), 0);

    let resp = v2::post(&http, &gw.write_url(), TENANT_A, body)
        .send()
        .await
        .expect("POST");
    let written = v2::written(resp.headers());
    assert_eq!(
        status_body(resp).await,
        (
            409,
            "upstream rejected the write: out of order sample\n".to_string()
        )
    );
    assert_eq!(written, (1, 0, 0), "go_goroutines, dropped on purpose");
    gw.stop().await;
}

/// A 2.0 request is known from its headers, so every answer to it carries
/// the Written headers, refusals before any work included (no tenant,
/// bad credentials: nothing written); a 1.0 answer carries none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_before_any_work_say_nothing_was_written() {
    let up = FakeUpstream::start(vec![]).await;
    let (gw, _tenants) = gateway_for_tenant_a(test_config(&up.url()), "alice", "a").await;
    let http = client();
    let mut b = Builder::new();
    b.series(&[("__name__", "up")], &[(1, 1.0)]);
    let body = v2::body(&b.request());

    // No Cloud-Account-Id at all.
    let resp = http
        .post(gw.write_url())
        .header(
            "Content-Type",
            "application/x-protobuf;proto=io.prometheus.write.v2.Request",
        )
        .header("Content-Encoding", "snappy")
        .body(body.clone())
        .send()
        .await
        .expect("POST 2.0");
    assert_eq!(v2::written(resp.headers()), (0, 0, 0));
    assert_eq!(resp.status(), 400);
    // Wrong credentials.
    let resp = v2::post(&http, &gw.write_url(), TENANT_A, body.clone())
        .basic_auth("alice", Some("wrong"))
        .send()
        .await
        .expect("POST 2.0");
    assert_eq!(v2::written(resp.headers()), (0, 0, 0));
    assert_eq!(resp.status(), 401);
    // The same refusal to a 1.0 sender says nothing of the kind.
    let resp = http
        .post(gw.write_url())
        .header("Content-Type", "application/x-protobuf")
        .header("Content-Encoding", "snappy")
        .header("Cloud-Account-Id", TENANT_A)
        .basic_auth("alice", Some("wrong"))
        .body(body)
        .send()
        .await
        .expect("POST 1.0");
    assert_eq!(resp.status(), 401);
    assert!(
        !resp
            .headers()
            .contains_key("X-Prometheus-Remote-Write-Samples-Written"),
        "{:?}",
        resp.headers()
    );
    assert_eq!(up.count(), 0);
    gw.stop().await;
}
