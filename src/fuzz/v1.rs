//! The Remote-Write 1.0 property: [`wire::decode`] and [`pipeline::process`]
//! against prost.
//!
//! The reference decodes with prost into the messages below:
//! `third_party/prometheus/types.proto` with every string as `bytes` (so
//! that UTF-8 is judged apart, as the decoder's rules say), each series
//! decoded on its own, framed as field 1 so that prost decodes it at the depth it has
//! inside a whole `WriteRequest`. Then the decoder's rules, written the
//! obvious way:
//!
//! - the request is refused when prost refuses its framing or a metadata
//!   entry (its strings included: metadata is dropped, but must decode), when it has
//!   more than `max_series` series, or when a series that decodes holds a
//!   label string (of the series or of an exemplar) that is not UTF-8;
//! - a series is refused alone when prost refuses it, when it has more
//!   labels than `max_labels_per_series` (counted as sent), a name or a
//!   value over its length limit, an empty label name, a name twice, or no
//!   or an empty `__name__` (the spec's label rules);
//! - every other series is valid: its labels sorted by name, a label's
//!   name and value the last of their occurrences (as prost merges them).

use proptest::test_runner::TestCaseError;
use prost::Message;

use super::expect::{self, fail, with_tenant, TeeWant};
use super::inputs::Input;
use crate::pipeline::{self, Outcome, Scratch};
use crate::prompb;
use crate::wire::{self, Decoded, ShapeLimits};

#[derive(Clone, PartialEq, Message)]
struct RawRequest {
    #[prost(bytes = "vec", repeated, tag = "1")]
    timeseries: Vec<Vec<u8>>,
    /// Decoded by prost (strings UTF-8), though the gateway drops it.
    #[prost(message, repeated, tag = "3")]
    metadata: Vec<prompb::MetricMetadata>,
}

/// One series framed as field 1, so that prost decodes it at the depth it
/// has inside a `WriteRequest`.
#[derive(Clone, PartialEq, Message)]
struct OneSeries {
    #[prost(message, optional, tag = "1")]
    series: Option<RawSeries>,
}

#[derive(Clone, PartialEq, Message)]
struct RawSeries {
    #[prost(message, repeated, tag = "1")]
    labels: Vec<RawLabel>,
    #[prost(message, repeated, tag = "2")]
    samples: Vec<prompb::Sample>,
    #[prost(message, repeated, tag = "3")]
    exemplars: Vec<RawExemplar>,
    #[prost(message, repeated, tag = "4")]
    histograms: Vec<prompb::Histogram>,
}

/// The histograms of a series as bytes (the gateway copies them as they
/// came).
#[derive(Clone, PartialEq, Message)]
struct HistogramBytes {
    #[prost(bytes = "vec", repeated, tag = "4")]
    histograms: Vec<Vec<u8>>,
}

/// A label with every occurrence of its fields (the last one counts; each
/// must be UTF-8, as a string's would).
#[derive(Clone, PartialEq, Message)]
struct RawLabel {
    #[prost(bytes = "vec", repeated, tag = "1")]
    name: Vec<Vec<u8>>,
    #[prost(bytes = "vec", repeated, tag = "2")]
    value: Vec<Vec<u8>>,
}

impl RawLabel {
    fn name(&self) -> &[u8] {
        self.name.last().map_or(&[], |v| v)
    }
    fn value(&self) -> &[u8] {
        self.value.last().map_or(&[], |v| v)
    }
    fn utf8(&self) -> bool {
        self.name
            .iter()
            .chain(&self.value)
            .all(|s| std::str::from_utf8(s).is_ok())
    }
    fn to_label(&self) -> prompb::Label {
        prompb::Label {
            name: expect::utf8(self.name()).to_string(),
            value: expect::utf8(self.value()).to_string(),
        }
    }
}

#[derive(Clone, PartialEq, Message)]
struct RawExemplar {
    #[prost(message, repeated, tag = "1")]
    labels: Vec<RawLabel>,
    #[prost(double, tag = "2")]
    value: f64,
    #[prost(int64, tag = "3")]
    timestamp: i64,
}

/// A series as prost decodes the gateway's output: its histograms as
/// bytes, to be compared with the input's byte for byte.
#[derive(Clone, PartialEq, Message)]
struct OutSeries {
    #[prost(message, repeated, tag = "1")]
    labels: Vec<prompb::Label>,
    #[prost(message, repeated, tag = "2")]
    samples: Vec<prompb::Sample>,
    #[prost(message, repeated, tag = "3")]
    exemplars: Vec<prompb::Exemplar>,
    #[prost(bytes = "vec", repeated, tag = "4")]
    histograms: Vec<Vec<u8>>,
}

#[derive(Clone, PartialEq, Message)]
struct OutRequest {
    #[prost(message, repeated, tag = "1")]
    timeseries: Vec<OutSeries>,
    /// Must stay empty: metadata names no tenant and is not forwarded.
    #[prost(bytes = "vec", repeated, tag = "3")]
    metadata: Vec<Vec<u8>>,
}

/// A valid series as the reference sees it.
#[derive(Debug, Clone)]
struct Series {
    tee: TeeWant,
    /// Histograms: counted as samples by the gateway.
    histograms: usize,
    /// What the upstream must get, before tenancy (labels sorted).
    out: OutSeries,
}

/// What the reference accepts of a decompressed body.
#[derive(Debug)]
struct Accepted {
    valid: Vec<Series>,
    refused: u32,
    metadata: usize,
}

/// What the reference accepts of a decompressed body; `None`: it refuses it.
fn reference(raw: &[u8], limits: &ShapeLimits) -> Option<Accepted> {
    let Ok(req) = RawRequest::decode(raw) else {
        return None;
    };
    if req.timeseries.len() > limits.max_series {
        return None;
    }
    let mut valid = Vec::new();
    let mut refused = 0;
    for bytes in &req.timeseries {
        let mut framed = vec![0x0a];
        prost::encoding::encode_varint(bytes.len() as u64, &mut framed);
        framed.extend_from_slice(bytes);
        let Ok(OneSeries { series: Some(ts) }) = OneSeries::decode(framed.as_slice()) else {
            refused += 1;
            continue;
        };
        let utf8 = ts.labels.iter().all(RawLabel::utf8)
            && ts
                .exemplars
                .iter()
                .all(|e| e.labels.iter().all(RawLabel::utf8));
        if !utf8 {
            return None;
        }
        let histograms = HistogramBytes::decode(bytes.as_slice())
            .expect("the series decoded")
            .histograms;
        match check(&ts, histograms, limits) {
            Some(series) => valid.push(series),
            None => refused += 1,
        }
    }
    Some(Accepted {
        valid,
        refused,
        metadata: req.metadata.len(),
    })
}

/// The per-series limits and label rules.
fn check(ts: &RawSeries, histograms: Vec<Vec<u8>>, limits: &ShapeLimits) -> Option<Series> {
    let (labels, name) = expect::label_rules(
        ts.labels
            .iter()
            .map(|l| (l.name().to_vec(), l.value().to_vec()))
            .collect(),
        limits,
    )?;
    Some(Series {
        tee: TeeWant {
            name,
            samples: ts
                .samples
                .iter()
                .map(|s| (s.timestamp, s.value.to_bits()))
                .collect(),
            labels,
        },
        histograms: histograms.len(),
        out: OutSeries {
            labels: Vec::new(),
            samples: ts.samples.clone(),
            exemplars: ts
                .exemplars
                .iter()
                .map(|e| prompb::Exemplar {
                    labels: e.labels.iter().map(RawLabel::to_label).collect(),
                    value: e.value,
                    timestamp: e.timestamp,
                })
                .collect(),
            histograms,
        },
    })
}

fn labels_out(labels: &[(Vec<u8>, Vec<u8>)]) -> Vec<prompb::Label> {
    labels
        .iter()
        .map(|(n, v)| prompb::Label {
            name: expect::utf8(n).to_string(),
            value: expect::utf8(v).to_string(),
        })
        .collect()
}

/// [`wire::decode`] against the reference on a decompressed body: the same
/// decision for the request and for each series, and for the valid ones
/// the same labels, metric name and samples. Returns what the reference
/// accepted.
fn check_decode(raw: &[u8], limits: &ShapeLimits) -> Result<Option<Accepted>, TestCaseError> {
    let mut d = Decoded::default();
    let got = wire::decode(raw, limits, &mut d);
    let Some(accepted) = expect::decision(reference(raw, limits), got)? else {
        return Ok(None);
    };
    let Accepted { valid, refused, .. } = &accepted;
    let refused = *refused;
    if d.refused.count() != refused {
        return Err(fail(format!(
            "decode refuses {} series, the reference {refused}",
            d.refused.count()
        )));
    }
    if d.series.len() != valid.len() {
        return Err(fail(format!(
            "decode keeps {} series, the reference {}",
            d.series.len(),
            valid.len()
        )));
    }
    for (s, want) in d.series.iter().zip(valid) {
        let labels: Vec<(Vec<u8>, Vec<u8>)> = d
            .labels_of(s)
            .iter()
            .map(|l| (l.name.get(raw).to_vec(), l.value.get(raw).to_vec()))
            .collect();
        expect::same_series(
            labels,
            Some(s.name.get(raw)),
            |f| wire::for_each_sample(raw, s, f),
            &want.tee,
        )?;
        if s.samples as usize != want.tee.samples.len() + want.histograms {
            return Err(fail(format!(
                "decode counts {} samples, the reference {} and {} histograms",
                s.samples,
                want.tee.samples.len(),
                want.histograms
            )));
        }
    }
    Ok(Some(accepted))
}

/// [`pipeline::process`] on a body as sent: the snappy layer
/// (`expect::snappy`), the decoder (`check_decode`), the same decision
/// as the reference, and for an accepted request the counts, the refused
/// series, the forwarded body (prost decodes it to exactly the valid
/// series the allowlist keeps, tenant labels set, nothing else) and the tee.
pub fn check_process(input: &Input) -> Result<(), TestCaseError> {
    expect::check_processed(
        input,
        |p| pipeline::process(&input.body, p, &mut Scratch::default()),
        check_decode,
        check_outcome,
    )
}

/// What [`pipeline::process`] gave for a request the reference accepted.
fn check_outcome(want: Accepted, out: Outcome) -> Result<(), TestCaseError> {
    let Accepted {
        valid,
        refused,
        metadata,
    } = want;
    expect::check_refused(
        &out,
        u64::from(refused),
        u64::from(refused) + valid.len() as u64,
    )?;
    let allow = expect::allowlist();
    let kept: Vec<&Series> = valid
        .iter()
        .filter(|s| allow.keeps(Some(&s.tee.name)))
        .collect();
    let samples = |s: &[&Series]| -> u64 {
        s.iter()
            .map(|s| (s.tee.samples.len() + s.histograms) as u64)
            .sum()
    };
    let all: Vec<&Series> = valid.iter().collect();
    expect::check_received(&out, (valid.len() as u64, samples(&all), kept.len() as u64))?;
    let counts = (out.samples_kept, out.metadata_dropped);
    let want_counts = (samples(&kept), metadata as u64);
    if counts != want_counts {
        return Err(fail(format!(
            "samples kept and metadata dropped {counts:?}, want {want_counts:?}"
        )));
    }
    let want = OutRequest {
        timeseries: kept
            .iter()
            .map(|s| OutSeries {
                labels: labels_out(&with_tenant(&s.tee.labels)),
                ..s.out.clone()
            })
            .collect(),
        metadata: Vec::new(),
    };
    // An empty body decodes to the empty request.
    let forwarded = OutRequest::decode(expect::forwarded(&out)?.as_slice())
        .map_err(|e| fail(format!("prost refuses the forwarded body: {e}")))?;
    expect::same_message(&forwarded, &want)?;
    let tee: Vec<TeeWant> = valid.into_iter().map(|s| s.tee).collect();
    expect::check_tee(&out, &tee)
}
