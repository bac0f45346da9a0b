//! The fuzz inputs: seed bodies (the load generator's, hand-made ones with
//! every kind of series content, captured real bodies), requests generated
//! by proptest and encoded by prost, then mutated at the field level
//! ([`tree`]), at the byte level (flips, sets, inserts, cuts, copies,
//! truncation) before and after snappy; and random bytes.

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use prost::Message;

use super::tree::{self, Edit};
use crate::loadgen::{self, Profile};
use crate::wire::ShapeLimits;
use crate::{prompb, prompb_v2};

/// Which protocol a body is decoded as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// One case: a body as sent, the protocol it goes to, the limits.
#[derive(Debug, Clone)]
pub struct Input {
    pub version: Version,
    pub body: Vec<u8>,
    pub limits: ShapeLimits,
    pub max_decoded: u64,
}

/// Decompressed bodies to start from, by protocol.
#[derive(Debug, Clone, Default)]
pub struct Seeds {
    pub v1: Vec<Vec<u8>>,
    pub v2: Vec<Vec<u8>>,
}

/// The committed captured bodies (`scripts/capture-corpus.sh --fixtures`).
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fuzz")
}

/// The seeds: generated requests (1.0 and the same as 2.0), the hand-made
/// ones, and the snappy bodies (`*.snappy`, 1.0) in `dirs`.
pub fn seeds(dirs: &[PathBuf]) -> Seeds {
    let mut s = Seeds::default();
    for (seed, series, labels, samples) in [(1, 6, 6, 1), (2, 30, 10, 2), (3, 3, 14, 3)] {
        let p = Profile {
            series,
            labels,
            samples,
            ..Profile::default()
        };
        let req = loadgen::write_request(&p, "spoofed", seed);
        s.v1.push(req.encode_to_vec());
        s.v2.push(prompb_v2::Request::from_v1(&req).encode_to_vec());
    }
    s.v1.push(handmade_v1());
    s.v2.push(handmade_v2().encode_to_vec());
    for body in corpus(dirs) {
        if let Ok(raw) = snap::raw::Decoder::new().decompress_vec(&body) {
            if let Ok(req) = prompb::WriteRequest::decode(raw.as_slice()) {
                s.v2.push(prompb_v2::Request::from_v1(&req).encode_to_vec());
            }
            s.v1.push(raw);
        }
    }
    s
}

/// The snappy bodies in `dirs`, sorted by path.
pub fn corpus(dirs: &[PathBuf]) -> Vec<Vec<u8>> {
    let mut paths: Vec<PathBuf> = dirs
        .iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "snappy"))
        .collect();
    paths.sort();
    paths.iter().filter_map(|p| std::fs::read(p).ok()).collect()
}

fn label(name: &str, value: &str) -> prompb::Label {
    prompb::Label {
        name: name.into(),
        value: value.into(),
    }
}

/// A 1.0 request with what generated ones lack: exemplars, histograms,
/// metadata, unsorted labels, a spoofed tenant label, a teed series.
fn handmade_v1() -> Vec<u8> {
    let mut hist = Vec::new();
    prompb_v2::Histogram {
        sum: 2.5,
        schema: 3,
        positive_spans: vec![prompb_v2::BucketSpan {
            offset: -1,
            length: 2,
        }],
        positive_deltas: vec![1, -1],
        timestamp: 1_700_000_000_000,
        ..Default::default()
    }
    .encode(&mut hist)
    .expect("a Vec grows");
    let mut series = tree::parse(
        &prompb::TimeSeries {
            labels: vec![label("__name__", "http_request_duration_seconds")],
            ..Default::default()
        }
        .encode_to_vec(),
    )
    .expect("a series parses");
    series.push(tree::Field {
        number: 4,
        wire_type: None,
        value: tree::Value::Bytes(hist),
    });
    let mut with_histogram = Vec::new();
    tree::write(&series, &mut with_histogram);
    let req = prompb::WriteRequest {
        timeseries: vec![
            prompb::TimeSeries {
                labels: vec![
                    label("pod", "p-1"),
                    label("__name__", "cloudtuner_kubecost_pod_cpu_cost"),
                    label("namespace", "ns"),
                    label("tenant_id", "someone-else"),
                    label("cluster", "c"),
                ],
                samples: vec![
                    prompb::Sample {
                        value: 0.25,
                        timestamp: 1_700_000_000_000,
                    },
                    prompb::Sample {
                        value: f64::NAN,
                        timestamp: -1,
                    },
                ],
                exemplars: vec![prompb::Exemplar {
                    labels: vec![label("trace_id", "abc")],
                    value: 1.0,
                    timestamp: 7,
                }],
                histograms: vec![],
            },
            prompb::TimeSeries {
                labels: vec![label("__name__", "up"), label("job", "x\u{e9}")],
                samples: vec![prompb::Sample {
                    value: 1.0,
                    timestamp: 1,
                }],
                ..Default::default()
            },
        ],
        metadata: vec![prompb::MetricMetadata {
            r#type: 3,
            metric_family_name: "http_request_duration_seconds".into(),
            help: "h".into(),
            unit: "seconds".into(),
        }],
    };
    // The 1.0 reference types drop histograms: that series goes in as bytes.
    let mut raw = req.encode_to_vec();
    prost::encoding::encode_key(1, prost::encoding::WireType::LengthDelimited, &mut raw);
    prost::encoding::encode_varint(with_histogram.len() as u64, &mut raw);
    raw.extend_from_slice(&with_histogram);
    raw
}

/// A 2.0 request with histograms (with a start timestamp), metadata,
/// exemplars, sample start timestamps and rc.3's created timestamp.
fn handmade_v2() -> prompb_v2::Request {
    let mut sym = prompb_v2::Symbols::new();
    let hist_labels = sym.refs(&[
        ("__name__", "http_request_duration_seconds"),
        ("job", "api"),
    ]);
    let cost_labels = sym.refs(&[
        ("namespace", "ns"),
        ("__name__", "cloudtuner_kubecost_namespace_total_cost"),
        ("cloud_account_id", "spoofed"),
    ]);
    let trace = sym.refs(&[("trace_id", "abc")]);
    let (help, unit) = (sym.intern("Latency."), sym.intern("seconds"));
    prompb_v2::Request {
        timeseries: vec![
            prompb_v2::TimeSeries {
                labels_refs: hist_labels,
                histograms: vec![prompb_v2::Histogram::example(
                    1_700_000_000_000,
                    1_600_000_000_000,
                )],
                metadata: Some(prompb_v2::Metadata {
                    r#type: 3,
                    help_ref: help,
                    unit_ref: unit,
                }),
                ..Default::default()
            },
            prompb_v2::TimeSeries {
                labels_refs: cost_labels,
                samples: vec![prompb_v2::Sample {
                    value: 4.5,
                    timestamp: 1_700_000_000_000,
                    start_timestamp: 1_690_000_000_000,
                }],
                exemplars: vec![prompb_v2::Exemplar {
                    labels_refs: trace,
                    value: 1.0,
                    timestamp: 7,
                }],
                metadata: Some(prompb_v2::Metadata {
                    r#type: 2,
                    help_ref: help,
                    unit_ref: 0,
                }),
                ..Default::default()
            },
        ],
        symbols: sym.into_table(),
    }
}

/// Label names and values that hit the rules: the metric name, the
/// tenant labels, the tee's columns, the empty string, non-ASCII, long.
fn names() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "__name__",
        "__name__",
        "job",
        "a",
        "cluster",
        "namespace",
        "pod",
        "cloud_account_id",
        "tenant_id",
        "",
        "z\u{e9}",
    ])
    .prop_map(String::from)
}

fn values() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "",
            "up",
            "go_goroutines",
            "kube_pod_info",
            "cloudtuner_kubecost_pod_cpu_cost",
            "cloudtuner_kubecost_namespace_total_cost",
            "\u{1f600}",
        ])
        .prop_map(String::from),
        (1..300usize).prop_map(|n| "v".repeat(n)),
    ]
}

fn samples() -> impl Strategy<Value = Vec<(f64, i64)>> {
    prop::collection::vec((any::<f64>(), any::<i64>()), 0..4)
}

/// A 1.0 request built from those pieces, encoded by prost.
fn generated_v1() -> impl Strategy<Value = Vec<u8>> {
    let series = (
        prop::collection::vec((names(), values()), 0..7),
        samples(),
        prop::collection::vec(prop::collection::vec((names(), values()), 0..3), 0..2),
    )
        .prop_map(|(labels, samples, exemplars)| prompb::TimeSeries {
            labels: labels.iter().map(|(n, v)| label(n, v)).collect(),
            samples: samples
                .iter()
                .map(|&(value, timestamp)| prompb::Sample { value, timestamp })
                .collect(),
            exemplars: exemplars
                .iter()
                .map(|l| prompb::Exemplar {
                    labels: l.iter().map(|(n, v)| label(n, v)).collect(),
                    value: 1.0,
                    timestamp: 2,
                })
                .collect(),
            histograms: vec![],
        });
    (
        prop::collection::vec(series, 0..6),
        prop::collection::vec(any::<i32>(), 0..2),
    )
        .prop_map(|(timeseries, metadata)| {
            prompb::WriteRequest {
                timeseries,
                metadata: metadata
                    .into_iter()
                    .map(|t| prompb::MetricMetadata {
                        r#type: t % 8,
                        metric_family_name: "up".into(),
                        help: String::new(),
                        unit: String::new(),
                    })
                    .collect(),
            }
            .encode_to_vec()
        })
}

fn histogram() -> impl Strategy<Value = prompb_v2::Histogram> {
    (
        any::<u64>(),
        any::<f64>(),
        -4..8i32,
        prop::collection::vec((-3..3i32, 0..3u32), 0..3),
        prop::collection::vec(any::<i64>(), 0..3),
        prop::collection::vec(any::<f64>(), 0..3),
        any::<i64>(),
        any::<bool>(),
    )
        .prop_map(|(count, sum, schema, spans, deltas, counts, ts, float)| {
            prompb_v2::Histogram {
                count: Some(if float {
                    prompb_v2::histogram::Count::CountFloat(count as f64)
                } else {
                    prompb_v2::histogram::Count::CountInt(count)
                }),
                sum,
                schema,
                positive_spans: spans
                    .into_iter()
                    .map(|(offset, length)| prompb_v2::BucketSpan { offset, length })
                    .collect(),
                positive_deltas: if float { vec![] } else { deltas },
                positive_counts: if float { counts } else { vec![] },
                timestamp: ts,
                start_timestamp: if float { ts } else { 0 },
                ..Default::default()
            }
        })
}

/// A 2.0 request: a symbol table (that usually starts with the empty
/// string) and series whose references may run past it.
fn generated_v2() -> impl Strategy<Value = Vec<u8>> {
    let table = (
        any::<bool>(),
        prop::collection::vec(prop_oneof![names(), values()], 0..10),
    )
        .prop_map(|(empty_first, rest)| {
            let mut t = vec![String::new()];
            t.extend(rest);
            if !empty_first && t.len() > 1 && t[1].is_empty() {
                t.remove(0);
            }
            t
        });
    let series = (
        prop::collection::vec(0..14u32, 0..12),
        prop::collection::vec((any::<f64>(), any::<i64>(), any::<i64>()), 0..3),
        prop::collection::vec(histogram(), 0..2),
        prop::collection::vec(prop::collection::vec(0..14u32, 0..4), 0..2),
        prop::option::of((0..8i32, 0..14u32, 0..14u32)),
    )
        .prop_map(
            |(refs, samples, histograms, exemplars, metadata)| prompb_v2::TimeSeries {
                labels_refs: refs,
                samples: samples
                    .into_iter()
                    .map(|(value, timestamp, start)| prompb_v2::Sample {
                        value,
                        timestamp,
                        start_timestamp: start % 2,
                    })
                    .collect(),
                histograms,
                exemplars: exemplars
                    .into_iter()
                    .map(|labels_refs| prompb_v2::Exemplar {
                        labels_refs,
                        value: 0.5,
                        timestamp: 3,
                    })
                    .collect(),
                metadata: metadata.map(|(t, h, u)| prompb_v2::Metadata {
                    r#type: t,
                    help_ref: h,
                    unit_ref: u,
                }),
            },
        );
    (table, prop::collection::vec(series, 0..5)).prop_map(|(symbols, timeseries)| {
        prompb_v2::Request {
            symbols,
            timeseries,
        }
        .encode_to_vec()
    })
}

fn tree_edit() -> impl Strategy<Value = Edit> {
    let at = any::<usize>();
    prop_oneof![
        (at, any::<usize>()).prop_map(|(at, pick)| Edit::SetVarint { at, pick }),
        (at, 1..12u8).prop_map(|(at, extra)| Edit::Overlong { at, extra }),
        (at, any::<usize>()).prop_map(|(at, pick)| Edit::Renumber { at, pick }),
        (at, 0..8u8).prop_map(|(at, wire_type)| Edit::Retype { at, wire_type }),
        at.prop_map(|at| Edit::Repeat { at }),
        at.prop_map(|at| Edit::Drop { at }),
        at.prop_map(|at| Edit::SwapNext { at }),
        (
            at,
            prop::sample::select(vec![1u32, 2, 3, 4, 5, 6, 7, 15, 16, 17, 18, 99]),
            0..5u8,
            prop::sample::select(vec![1u32, 2, 3, 95, 96, 97, 98, 99, 100, 101]),
        )
            .prop_map(|(at, number, kind, depth)| Edit::Insert {
                at,
                number,
                kind,
                depth
            }),
        (
            at,
            any::<usize>(),
            prop::sample::select(vec![0xffu8, 0xc3, 0x80, 0xed])
        )
            .prop_map(|(at, pos, byte)| Edit::BadUtf8 { at, pos, byte }),
        at.prop_map(|at| Edit::Empty { at }),
        (at, any::<usize>()).prop_map(|(at, from)| Edit::Graft { at, from }),
    ]
}

/// A byte-level mutation.
#[derive(Debug, Clone)]
enum Bytes {
    Flip(usize, u8),
    Set(usize, u8),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    Copy(usize, usize, usize),
    Truncate(usize),
}

fn bytes_edit() -> impl Strategy<Value = Bytes> {
    let at = any::<usize>();
    prop_oneof![
        (at, 0..8u8).prop_map(|(a, b)| Bytes::Flip(a, b)),
        (at, any::<u8>()).prop_map(|(a, b)| Bytes::Set(a, b)),
        (at, prop::collection::vec(any::<u8>(), 1..8)).prop_map(|(a, b)| Bytes::Insert(a, b)),
        (at, 1..16usize).prop_map(|(a, n)| Bytes::Delete(a, n)),
        (at, 1..32usize, any::<usize>()).prop_map(|(a, n, to)| Bytes::Copy(a, n, to)),
        at.prop_map(Bytes::Truncate),
    ]
}

fn apply_bytes(buf: &mut Vec<u8>, edits: &[Bytes]) {
    for e in edits {
        let len = buf.len();
        let at = |a: usize| if len == 0 { 0 } else { a % len };
        match e {
            Bytes::Flip(a, bit) if len > 0 => buf[at(*a)] ^= 1 << bit,
            Bytes::Set(a, b) if len > 0 => buf[at(*a)] = *b,
            Bytes::Insert(a, b) => {
                let a = at(*a);
                buf.splice(a..a, b.iter().copied());
            }
            Bytes::Delete(a, n) if len > 0 => {
                let a = at(*a);
                buf.drain(a..(a + n).min(len));
            }
            Bytes::Copy(a, n, to) if len > 0 => {
                let a = at(*a);
                let piece = buf[a..(a + n).min(len)].to_vec();
                let to = at(*to);
                buf.splice(to..to, piece);
            }
            Bytes::Truncate(a) => buf.truncate(at(*a)),
            _ => {}
        }
    }
}

fn compress(raw: &[u8]) -> Vec<u8> {
    snap::raw::Encoder::new()
        .compress_vec(raw)
        .expect("snappy compresses anything below 4 GiB")
}

/// A body mutated from `base`: field-level edits, then byte-level ones,
/// then snappy and byte-level edits of the compressed body (each of the
/// three often none).
fn mutated(base: impl Strategy<Value = Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    (
        base,
        prop::collection::vec(tree_edit(), 0..5),
        prop_oneof![3 => Just(vec![]), 1 => prop::collection::vec(bytes_edit(), 1..4)],
        prop_oneof![6 => Just(vec![]), 1 => prop::collection::vec(bytes_edit(), 1..3)],
    )
        .prop_map(|(mut raw, edits, raw_edits, snappy_edits)| {
            if !edits.is_empty() {
                if let Some(mut t) = tree::parse(&raw) {
                    for e in &edits {
                        tree::apply(&mut t, e);
                    }
                    raw.clear();
                    tree::write(&t, &mut raw);
                }
            }
            apply_bytes(&mut raw, &raw_edits);
            let mut body = compress(&raw);
            apply_bytes(&mut body, &snappy_edits);
            body
        })
}

fn limits() -> impl Strategy<Value = ShapeLimits> {
    prop_oneof![
        3 => Just(ShapeLimits::UNLIMITED),
        1 => (1..40usize, 1..12usize, 1..40usize, 1..80usize).prop_map(|(s, l, n, v)| ShapeLimits {
            max_series: s,
            max_labels_per_series: l,
            max_label_name_bytes: n,
            max_label_value_bytes: v,
        }),
    ]
}

/// Every case: mostly a seed or a generated request mutated, for its own
/// protocol (sometimes for the other one), else random bytes compressed or
/// random "snappy".
pub fn inputs(seeds: Seeds) -> impl Strategy<Value = Input> {
    let v1_seed = prop::sample::select(seeds.v1);
    let v2_seed = prop::sample::select(seeds.v2);
    let v1_body = prop_oneof![3 => v1_seed, 2 => generated_v1()];
    let v2_body = prop_oneof![3 => v2_seed, 2 => generated_v2()];
    let random = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256).prop_map(|raw| compress(&raw)),
        prop::collection::vec(any::<u8>(), 0..64),
    ];
    let version = prop_oneof![Just(Version::V1), Just(Version::V2)];
    let body = prop_oneof![
        8 => (Just(Version::V1), mutated(v1_body.clone())),
        8 => (Just(Version::V2), mutated(v2_body.clone())),
        1 => (Just(Version::V2), mutated(v1_body)),
        1 => (Just(Version::V1), mutated(v2_body)),
        2 => (version, random),
    ];
    let max_decoded = prop_oneof![9 => Just(1u64 << 20), 1 => 0..2048u64];
    (body, limits(), max_decoded).prop_map(|((version, body), limits, max_decoded)| Input {
        version,
        body,
        limits,
        max_decoded,
    })
}
