//! The CPU cost of one remote-write request, stage by stage, against the floor
//! no implementation can skip (snappy-decompress the request, snappy-compress
//! what is forwarded).
//!
//! Payloads come from `rwgate::loadgen` (the same generator `rwgate-loadgen`
//! uses for the k6 load tests): 1,000 series x 10 labels, one sample each,
//! kubecost / cAdvisor / kube-state-metrics names of which the default
//! allowlist keeps two thirds. Throughput is reported in samples received.
//!
//! The `tee` group is the ClickHouse tee's share: the same request with
//! the tee on (its `cloudtuner_kubecost_*` tenth written to a spool record),
//! and the writer's side of that record (decode, cut into row parts).
//!
//! Remote-Write 2.0 runs on the same series (`loadgen::snappy_request_v2`
//! of the same seed): `stages/decode_v2` beside `stages/decode`,
//! `stages/tenancy_encode_v2` (to 1.0) beside `stages/tenancy_encode`, and
//! `pipeline/process_v2` (to a 1.0 upstream) and `pipeline/process_v2_to_v2`
//! (to a 2.0 upstream) beside `pipeline/process`.
//!
//! Run: `cargo bench --bench pipeline` (add `-- floor` etc. to pick groups).

use std::future::Future;
use std::hint::black_box;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use criterion::measurement::Measurement;
use criterion::{
    criterion_group, criterion_main, BatchSize, BenchmarkGroup, Criterion, Throughput,
};
use prost::Message;
use rwgate::auth::Authenticator;
use rwgate::config::{RemoteWriteVersion, DEFAULT_ALLOWLIST};
use rwgate::cost::batch::Parts;
use rwgate::cost::record::{decode_record, Accepted};
use rwgate::filter::Allowlist;
use rwgate::loadgen::{self, Profile};
use rwgate::pipeline::{self, Params, Scratch};
use rwgate::prompb;
use rwgate::wire::{self, Decoded, Injected, ShapeLimits};
use rwgate::wire_v2::{self, DecodedV2};

/// A waker for futures that never wait (`Waker::noop` needs Rust 1.85).
struct NoopWaker;
impl Wake for NoopWaker {
    fn wake(self: Arc<Self>) {}
}

const TENANT_LABELS: [&str; 2] = ["cloud_account_id", "tenant_id"];

struct Fixture {
    tenant: String,
    compressed: Vec<u8>,
    raw: Vec<u8>,
    /// The same series as Remote-Write 2.0.
    compressed_v2: Vec<u8>,
    raw_v2: Vec<u8>,
    samples: u64,
    allow: Allowlist,
    labels: Vec<String>,
}

fn fixture() -> Fixture {
    let p = Profile::default();
    let tenant = loadgen::tenant_id(0);
    let compressed = loadgen::snappy_request(&p, &tenant, 42);
    let raw = snap::raw::Decoder::new()
        .decompress_vec(&compressed)
        .expect("generated payload decompresses");
    let compressed_v2 = loadgen::snappy_request_v2(&p, &tenant, 42);
    let raw_v2 = snap::raw::Decoder::new()
        .decompress_vec(&compressed_v2)
        .expect("generated payload decompresses");
    Fixture {
        tenant,
        compressed,
        raw,
        compressed_v2,
        raw_v2,
        samples: (p.series * p.samples) as u64,
        allow: Allowlist::new(DEFAULT_ALLOWLIST).expect("default allowlist compiles"),
        labels: TENANT_LABELS.iter().map(|s| s.to_string()).collect(),
    }
}

fn params<'a>(f: &'a Fixture) -> Params<'a> {
    Params {
        account: &f.tenant,
        tenant_labels: &f.labels,
        allowlist: &f.allow,
        limits: ShapeLimits {
            max_series: 100_000,
            max_labels_per_series: 64,
            max_label_name_bytes: 1024,
            max_label_value_bytes: 4096,
        },
        max_decoded_bytes: 64 << 20,
        tee: None,
    }
}

/// Snappy-decompress the request and snappy-compress the same bytes: the work
/// no implementation of the gateway can skip.
fn floor<M: Measurement>(c: &mut Criterion<M>) {
    let f = fixture();
    let mut g = c.benchmark_group("floor");
    g.throughput(Throughput::Elements(f.samples));
    let mut de = vec![0u8; f.raw.len()];
    let mut co = vec![0u8; snap::raw::max_compress_len(f.raw.len())];
    g.bench_function("snappy_decompress", |b| {
        b.iter(|| {
            snap::raw::Decoder::new()
                .decompress(black_box(&f.compressed), &mut de)
                .expect("valid")
        })
    });
    g.bench_function("snappy_compress", |b| {
        b.iter(|| {
            snap::raw::Encoder::new()
                .compress(black_box(&f.raw), &mut co)
                .expect("fits")
        })
    });
    g.bench_function("snappy_roundtrip", |b| {
        b.iter(|| {
            let n = snap::raw::Decoder::new()
                .decompress(black_box(&f.compressed), &mut de)
                .expect("valid");
            snap::raw::Encoder::new()
                .compress(&de[..n], &mut co)
                .expect("fits")
        })
    });
    g.finish();
}

/// The stages of `pipeline::process`, each on its own.
fn stages<M: Measurement>(c: &mut Criterion<M>) {
    let f = fixture();
    let limits = params(&f).limits;
    let mut g = c.benchmark_group("stages");
    g.throughput(Throughput::Elements(f.samples));

    let mut d = Decoded::default();
    g.bench_function("decode", |b| {
        b.iter(|| wire::decode(black_box(&f.raw), &limits, &mut d).expect("valid"))
    });
    let mut d2 = DecodedV2::default();
    g.bench_function("decode_v2", |b| {
        b.iter(|| wire_v2::decode(black_box(&f.raw_v2), &limits, &mut d2).expect("valid"))
    });

    wire::decode(&f.raw, &limits, &mut d).expect("valid");
    g.bench_function("filter", |b| {
        b.iter(|| {
            d.series
                .iter()
                .filter(|s| f.allow.keeps(Some(s.name.get(&f.raw))))
                .count()
        })
    });

    let kept: Vec<_> = d
        .series
        .iter()
        .filter(|s| f.allow.keeps(Some(s.name.get(&f.raw))))
        .copied()
        .collect();
    let p = params(&f);
    tenancy_encode(&mut g, "tenancy_encode", &p, &kept, |out, s, inject| {
        wire::encode_series(out, &f.raw, &d, s, inject)
    });

    wire_v2::decode(&f.raw_v2, &limits, &mut d2).expect("valid");
    let kept_v2: Vec<_> = d2
        .series
        .iter()
        .filter(|s| f.allow.keeps(d2.name(&f.raw_v2, s)))
        .copied()
        .collect();
    assert_eq!(kept_v2.len(), kept.len(), "the same series are kept");
    tenancy_encode(
        &mut g,
        "tenancy_encode_v2",
        &p,
        &kept_v2,
        |out, s, inject| wire_v2::encode_series_v1(out, &f.raw_v2, &d2, s, inject),
    );
    g.finish();
}

/// `name`: the `kept` series encoded by `encode` into one reused buffer,
/// with the tenant labels set per request into one reused `Injected`, as the
/// pipeline does.
fn tenancy_encode<M: Measurement, S>(
    g: &mut BenchmarkGroup<'_, M>,
    name: &str,
    p: &Params<'_>,
    kept: &[S],
    mut encode: impl FnMut(&mut Vec<u8>, &S, &Injected),
) {
    let mut out = Vec::new();
    let mut inject = Injected::default();
    g.bench_function(name, |b| {
        b.iter(|| {
            out.clear();
            pipeline::set_tenant(&mut inject, p);
            for s in kept {
                encode(&mut out, s, &inject);
            }
            out.len()
        })
    });
}

/// The whole request: snappy, decode, filter, tenancy, encode, snappy; with
/// and without the auth cache hit in front.
fn whole<M: Measurement>(c: &mut Criterion<M>) {
    let f = fixture();
    let p = params(&f);
    let mut g = c.benchmark_group("pipeline");
    g.throughput(Throughput::Elements(f.samples));

    let mut scratch = Scratch::default();
    g.bench_function("process", |b| {
        b.iter(|| {
            pipeline::process(black_box(&f.compressed), &p, &mut scratch)
                .expect("valid")
                .body
                .len()
        })
    });
    for (name, upstream) in [
        ("process_v2", RemoteWriteVersion::V1),
        ("process_v2_to_v2", RemoteWriteVersion::V2),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                pipeline::process_v2(black_box(&f.compressed_v2), &p, upstream, &mut scratch)
                    .expect("valid")
                    .body
                    .len()
            })
        });
    }

    // A static-tenants lookup: a hash-map hit and a constant-time compare,
    // the same work as a REST cache hit without the network.
    let auth = Authenticator::from_tenants_toml(&format!(
        "[[tenant]]\nid = \"{}\"\ncredentials = \"dXNlcjpwYXNz\"\n",
        f.tenant
    ))
    .expect("valid tenants");
    let waker = Waker::from(Arc::new(NoopWaker));
    g.bench_function("auth_and_process", |b| {
        b.iter(|| {
            let fut = auth.authenticate(&f.tenant, Some(b"Basic dXNlcjpwYXNz"));
            let mut fut = std::pin::pin!(fut);
            let Poll::Ready(tenant) = fut.as_mut().poll(&mut Context::from_waker(&waker)) else {
                unreachable!("static auth never waits")
            };
            let tenant = tenant.expect("known tenant");
            let p = Params {
                allowlist: tenant.allowlist.as_deref().unwrap_or(&f.allow),
                ..params(&f)
            };
            pipeline::process(black_box(&f.compressed), &p, &mut scratch)
                .expect("valid")
                .body
                .len()
        })
    });

    // The obvious implementation, for scale: prost decode into owned types,
    // retain, set labels, prost encode.
    g.bench_function("prost_reference", |b| {
        b.iter_batched(
            || (),
            |()| {
                let raw = snap::raw::Decoder::new()
                    .decompress_vec(black_box(&f.compressed))
                    .expect("valid");
                let mut req = prompb::WriteRequest::decode(raw.as_slice()).expect("valid");
                req.timeseries.retain(|ts| {
                    let name = ts.labels.iter().find(|l| l.name == "__name__");
                    f.allow.keeps(name.map(|l| l.value.as_bytes()))
                });
                for ts in &mut req.timeseries {
                    ts.labels.retain(|l| !f.labels.contains(&l.name));
                    for n in &f.labels {
                        ts.labels.push(prompb::Label {
                            name: n.clone(),
                            value: f.tenant.clone(),
                        });
                    }
                    ts.labels.sort_by(|a, b| a.name.cmp(&b.name));
                }
                snap::raw::Encoder::new()
                    .compress_vec(&req.encode_to_vec())
                    .expect("fits")
                    .len()
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

/// The tee's CPU work per request: the pipeline with the tee on, and the
/// writer turning the request's spool record into insert rows.
fn tee<M: Measurement>(c: &mut Criterion<M>) {
    let f = fixture();
    let mut g = c.benchmark_group("tee");
    g.throughput(Throughput::Elements(f.samples));
    let mut scratch = Scratch::default();
    let off = params(&f);
    g.bench_function("process_tee_off", |b| {
        b.iter(|| {
            pipeline::process(black_box(&f.compressed), &off, &mut scratch)
                .expect("valid")
                .body
                .len()
        })
    });
    let on = Params {
        tee: Some(Accepted::ANY),
        ..params(&f)
    };
    g.bench_function("process_tee_on", |b| {
        b.iter(|| {
            pipeline::process(black_box(&f.compressed), &on, &mut scratch)
                .expect("valid")
                .tee
                .kept
        })
    });
    let record = pipeline::process(&f.compressed, &on, &mut scratch)
        .expect("valid")
        .tee;
    assert!(record.kept > 0, "the payload has kubecost series");
    g.bench_function("writer_rows", |b| {
        b.iter(|| {
            let mut blocks = Vec::new();
            decode_record(black_box(record.payload()), &mut blocks).expect("decodes");
            let mut parts = Parts::new(&blocks, 200_000, 64 << 20);
            let mut rows = 0;
            while let Some(p) = parts.next_part() {
                rows += black_box(p).rows.len();
            }
            rows
        })
    });
    g.finish();
}

criterion_group!(benches, floor, stages, whole, tee);
criterion_main!(benches);
