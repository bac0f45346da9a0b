//! The Remote-Write 2.0 property: [`wire_v2::decode`] and
//! [`pipeline::process_v2`] (to a 1.0 and to a 2.0 upstream) against prost.
//!
//! The reference decodes with prost into the messages of
//! `third_party/prometheus/io/prometheus/write/v2/types.proto` with two
//! changes: symbol references are read as `uint64` (prost reads a
//! `uint32` by truncating the varint, the gateway refuses a reference past the table however
//! large), and `TimeSeries` field 6 is rc.3's `int64 created_timestamp`
//! (which the gateway accepts and rc.4 reserves). Each series is decoded on
//! its own, framed as field 5 at the depth it has inside a `Request`. Then
//! the decoder's rules:
//!
//! - the request is refused when prost refuses its framing or a symbol (not
//!   UTF-8), when it has more than `max_series` series, or when its symbol
//!   table does not start with the empty string (or is missing while there
//!   are series);
//! - a series is refused alone when prost refuses it, when its
//!   `labels_refs` or an exemplar's have an odd length, when a reference
//!   (label, exemplar, metadata help or unit) is past the table, when it
//!   has more label pairs than `max_labels_per_series`, a name or value
//!   over its length limit, an empty name, a name twice, or no or an empty
//!   `__name__`;
//! - every other series is valid, with prost's reading of it (a repeated
//!   singular field: the last one, a repeated message: merged).

use proptest::test_runner::TestCaseError;
use prost::Message;

use super::expect::{self, fail, TeeWant};
use super::inputs::Input;
use crate::config::RemoteWriteVersion;
use crate::pipeline::{self, Outcome, Scratch};
use crate::wire::ShapeLimits;
use crate::wire_v2::{self, DecodedV2, Written};
use crate::{prompb, prompb_v2};

#[derive(Clone, PartialEq, Message)]
struct RawRequest {
    #[prost(string, repeated, tag = "4")]
    symbols: Vec<String>,
    #[prost(bytes = "vec", repeated, tag = "5")]
    timeseries: Vec<Vec<u8>>,
}

/// One series framed as field 5, at the depth it has inside a `Request`.
#[derive(Clone, PartialEq, Message)]
struct OneSeries {
    #[prost(message, optional, tag = "5")]
    series: Option<RawSeries>,
}

#[derive(Clone, PartialEq, Message)]
struct RawSeries {
    #[prost(uint64, repeated, tag = "1")]
    labels_refs: Vec<u64>,
    #[prost(message, repeated, tag = "2")]
    samples: Vec<prompb_v2::Sample>,
    #[prost(message, repeated, tag = "3")]
    histograms: Vec<prompb_v2::Histogram>,
    #[prost(message, repeated, tag = "4")]
    exemplars: Vec<RawExemplar>,
    #[prost(message, optional, tag = "5")]
    metadata: Option<RawMetadata>,
    /// rc.3's created timestamp.
    #[prost(int64, optional, tag = "6")]
    created_timestamp: Option<i64>,
}

#[derive(Clone, PartialEq, Message)]
struct RawExemplar {
    #[prost(uint64, repeated, tag = "1")]
    labels_refs: Vec<u64>,
    #[prost(double, tag = "2")]
    value: f64,
    #[prost(int64, tag = "3")]
    timestamp: i64,
}

#[derive(Clone, PartialEq, Message)]
struct RawMetadata {
    #[prost(int32, tag = "1")]
    r#type: i32,
    #[prost(uint64, tag = "3")]
    help_ref: u64,
    #[prost(uint64, tag = "4")]
    unit_ref: u64,
}

/// The gateway's 2.0 output as prost decodes it.
#[derive(Clone, PartialEq, Message)]
struct OutRequest {
    #[prost(string, repeated, tag = "4")]
    symbols: Vec<String>,
    #[prost(message, repeated, tag = "5")]
    timeseries: Vec<RawSeries>,
}

/// `series` resolved through `symbols`, `tenant` set on their labels
/// (replacing any of the same name) and the labels sorted by name, then
/// interned afresh, in order: what two 2.0 bodies that say the same share,
/// whatever their symbol tables. `None` if a reference is past the table.
fn canonical<'r>(
    symbols: &[String],
    series: impl IntoIterator<Item = &'r RawSeries>,
    tenant: &[(&str, &str)],
) -> Option<OutRequest> {
    let mut table = prompb_v2::Symbols::new();
    let timeseries = series
        .into_iter()
        .map(|ts| reintern(symbols, ts, tenant, &mut table))
        .collect::<Option<_>>()?;
    Some(OutRequest {
        symbols: table.into_table(),
        timeseries,
    })
}

/// One series of [`canonical`].
fn reintern(
    symbols: &[String],
    ts: &RawSeries,
    tenant: &[(&str, &str)],
    table: &mut prompb_v2::Symbols,
) -> Option<RawSeries> {
    let sym = |r: u64| symbols.get(usize::try_from(r).ok()?).map(String::as_str);
    let pairs = |refs: &[u64]| -> Option<Vec<(&str, &str)>> {
        refs.chunks(2)
            .map(|p| match p {
                [n, v] => Some((sym(*n)?, sym(*v)?)),
                _ => None,
            })
            .collect()
    };
    let refs = |table: &mut prompb_v2::Symbols, pairs: &[(&str, &str)]| -> Vec<u64> {
        table.refs(pairs).into_iter().map(u64::from).collect()
    };
    let mut labels = pairs(&ts.labels_refs)?;
    labels.retain(|(n, _)| !tenant.iter().any(|(t, _)| t == n));
    labels.extend_from_slice(tenant);
    labels.sort_by(|a, b| a.0.cmp(b.0));
    let labels_refs = refs(table, &labels);
    let mut exemplars = Vec::with_capacity(ts.exemplars.len());
    for e in &ts.exemplars {
        exemplars.push(RawExemplar {
            labels_refs: refs(table, &pairs(&e.labels_refs)?),
            value: e.value,
            timestamp: e.timestamp,
        });
    }
    let metadata = match &ts.metadata {
        None => None,
        Some(m) => Some(RawMetadata {
            r#type: m.r#type,
            help_ref: table.intern(sym(m.help_ref)?).into(),
            unit_ref: table.intern(sym(m.unit_ref)?).into(),
        }),
    };
    Some(RawSeries {
        labels_refs,
        samples: ts.samples.clone(),
        histograms: ts.histograms.clone(),
        exemplars,
        metadata,
        created_timestamp: ts.created_timestamp,
    })
}

/// A valid series as the reference sees it.
#[derive(Debug, Clone)]
struct Series {
    raw: RawSeries,
    /// As the prost reference type reads it (for [`prompb_v2::Request::to_v1`]).
    ts: prompb_v2::TimeSeries,
    tee: TeeWant,
}

/// What the reference accepts of a decompressed body.
#[derive(Debug)]
struct Accepted {
    symbols: Vec<String>,
    /// Each series in request order, `None` if refused.
    series: Vec<Option<Series>>,
}

/// What the reference accepts of a decompressed body; `None`: it refuses it.
fn reference(raw: &[u8], limits: &ShapeLimits) -> Option<Accepted> {
    let Ok(req) = RawRequest::decode(raw) else {
        return None;
    };
    if req.timeseries.len() > limits.max_series {
        return None;
    }
    match req.symbols.first() {
        Some(first) if !first.is_empty() => return None,
        None if !req.timeseries.is_empty() => return None,
        _ => {}
    }
    let series = req
        .timeseries
        .iter()
        .map(|bytes| {
            let mut framed = vec![0x2a];
            prost::encoding::encode_varint(bytes.len() as u64, &mut framed);
            framed.extend_from_slice(bytes);
            match OneSeries::decode(framed.as_slice()) {
                Ok(OneSeries { series: Some(ts) }) => check(&req.symbols, ts, bytes, limits),
                _ => None,
            }
        })
        .collect();
    Some(Accepted {
        symbols: req.symbols,
        series,
    })
}

/// The per-series rules.
fn check(symbols: &[String], raw: RawSeries, bytes: &[u8], limits: &ShapeLimits) -> Option<Series> {
    if raw.labels_refs.len() % 2 != 0 || raw.exemplars.iter().any(|e| e.labels_refs.len() % 2 != 0)
    {
        return None;
    }
    // Every reference in range (`canonical` says).
    canonical(symbols, [&raw], &[])?;
    let (labels, name) = expect::label_rules(
        raw.labels_refs
            .chunks(2)
            .map(|p| {
                (
                    symbols[p[0] as usize].as_bytes().to_vec(),
                    symbols[p[1] as usize].as_bytes().to_vec(),
                )
            })
            .collect(),
        limits,
    )?;
    let ts = prompb_v2::TimeSeries::decode(bytes).expect("a valid series decodes");
    Some(Series {
        tee: TeeWant {
            name,
            labels,
            samples: raw
                .samples
                .iter()
                .map(|s| (s.timestamp, s.value.to_bits()))
                .collect(),
        },
        raw,
        ts,
    })
}

/// [`wire_v2::decode`] against the reference: the same decision for the
/// request and for each series; for the valid ones the same labels, name,
/// metadata, counts and float samples. Returns what the reference accepted.
fn check_decode(raw: &[u8], limits: &ShapeLimits) -> Result<Option<Accepted>, TestCaseError> {
    let mut d = DecodedV2::default();
    let got = wire_v2::decode(raw, limits, &mut d);
    let Some(accepted) = expect::decision(reference(raw, limits), got)? else {
        return Ok(None);
    };
    let series = &accepted.series;
    if d.series.len() != series.len() {
        return Err(fail(format!(
            "decode reads {} series, the reference {}",
            d.series.len(),
            series.len()
        )));
    }
    for (i, (s, want)) in d.series.iter().zip(series).enumerate() {
        let want = match (s.invalid, want) {
            (Some(_), None) => continue,
            (None, Some(want)) => want,
            (got, want) => {
                return Err(fail(format!(
                    "series {i}: decode says {got:?}, the reference {}",
                    if want.is_some() { "valid" } else { "refused" }
                )))
            }
        };
        let labels: Vec<(Vec<u8>, Vec<u8>)> = d
            .label_pairs(raw, s)
            .map(|(n, v)| (n.to_vec(), v.to_vec()))
            .collect();
        expect::same_series(
            labels,
            d.name(raw, s),
            |f| wire_v2::for_each_sample(raw, s, f),
            &want.tee,
        )
        .map_err(|e| fail(format!("series {i}: {e}")))?;
        let meta = s.metadata.map(|m| (m.kind, m.help, m.unit));
        let want_meta = want
            .raw
            .metadata
            .as_ref()
            .map(|m| (m.r#type as u32, m.help_ref as u32, m.unit_ref as u32));
        let counts = (s.samples, s.histograms, s.exemplars);
        let want_counts = (
            want.raw.samples.len() as u32,
            want.raw.histograms.len() as u32,
            want.raw.exemplars.len() as u32,
        );
        if meta != want_meta || counts != want_counts {
            return Err(fail(format!(
                "series {i}: decode's metadata {meta:?} and counts {counts:?}, the reference's {want_meta:?} {want_counts:?}"
            )));
        }
    }
    Ok(Some(accepted))
}

/// [`pipeline::process_v2`] on a body as sent, to a 1.0 and to a 2.0
/// upstream: the snappy layer, the decoder, the same decision as the
/// reference, and for an accepted request the counts, the refused series,
/// the forwarded body and the tee. To 1.0, prost decodes the body to
/// exactly what [`prompb_v2::Request::to_v1`] makes of the kept series; to
/// 2.0, to the kept series with the tenant labels set, references resolved.
pub fn check_process(input: &Input) -> Result<(), TestCaseError> {
    for upstream in [RemoteWriteVersion::V1, RemoteWriteVersion::V2] {
        expect::check_processed(
            input,
            |p| pipeline::process_v2(&input.body, p, upstream, &mut Scratch::default()),
            check_decode,
            |want, out| {
                check_outcome(&want.symbols, &want.series, upstream, &out)
                    .map_err(|e| fail(format!("to a {upstream:?} upstream: {e}")))
            },
        )?;
    }
    Ok(())
}

fn check_outcome(
    symbols: &[String],
    series: &[Option<Series>],
    upstream: RemoteWriteVersion,
    out: &Outcome,
) -> Result<(), TestCaseError> {
    let valid: Vec<&Series> = series.iter().flatten().collect();
    let refused = (series.len() - valid.len()) as u64;
    expect::check_refused(out, refused, series.len() as u64)?;
    let allow = expect::allowlist();
    let (kept, dropped): (Vec<&Series>, Vec<&Series>) =
        valid.iter().partition(|s| allow.keeps(Some(&s.tee.name)));
    let held = |s: &[&Series]| {
        s.iter().fold(Written::default(), |w, s| {
            w + Written {
                samples: s.raw.samples.len() as u64,
                histograms: s.raw.histograms.len() as u64,
                exemplars: s.raw.exemplars.len() as u64,
            }
        })
    };
    let samples = |w: Written| w.samples + w.histograms;
    expect::check_received(
        out,
        (valid.len() as u64, samples(held(&valid)), kept.len() as u64),
    )?;
    let counts = (out.kept, out.dropped);
    let want_counts = (held(&kept), held(&dropped));
    if counts != want_counts || out.body_version != upstream {
        return Err(fail(format!(
            "what the kept and the dropped series held {counts:?}, want {want_counts:?}"
        )));
    }
    let body = expect::forwarded(out)?;
    match upstream {
        RemoteWriteVersion::V1 => {
            let got = prompb::WriteRequest::decode(body.as_slice())
                .map_err(|e| fail(format!("prost refuses the forwarded body: {e}")))?;
            let want = prompb_v2::Request {
                symbols: symbols.to_vec(),
                timeseries: kept.iter().map(|s| s.ts.clone()).collect(),
            }
            .to_v1(&expect::tenant_pairs());
            expect::same_message(&got, &want)?;
        }
        RemoteWriteVersion::V2 => {
            let got = OutRequest::decode(body.as_slice())
                .map_err(|e| fail(format!("prost refuses the forwarded body: {e}")))?;
            if !body.is_empty() && got.symbols.first().map(String::as_str) != Some("") {
                return Err(fail("the forwarded symbols do not start with \"\""));
            }
            let got = canonical(&got.symbols, &got.timeseries, &[])
                .ok_or_else(|| fail("a forwarded reference is past the table"))?;
            let want = canonical(
                symbols,
                kept.iter().map(|s| &s.raw),
                &expect::tenant_pairs(),
            )
            .expect("checked in range");
            expect::same_message(&got, &want)?;
        }
    }
    let tee: Vec<TeeWant> = valid.iter().map(|s| s.tee.clone()).collect();
    expect::check_tee(out, &tee)
}
