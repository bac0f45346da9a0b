//! The CPU work of one request, with no I/O: snappy-decompress (after checking
//! the declared length), decode, filter, enforce tenancy, re-encode,
//! snappy-compress, and pick out the samples to tee. Pure, so it is unit-tested
//! and benchmarked directly. [`process`] takes Remote-Write 1.0,
//! [`process_v2`] takes 2.0 and gives 1.0 or 2.0 for the upstream.

use std::cmp::Ordering;

use crate::config::RemoteWriteVersion;
use crate::cost::names::is_teed;
use crate::cost::record::{Accepted, RecordBuilder, TeeRecord};
use crate::filter::Allowlist;
use crate::wire::{self, DecodeError, Decoded, Injected, Sample, ShapeLimits};
use crate::wire_v2::{self, DecodedV2, Family, Invalid, Written};

/// Buffers reused from one request to the next (see [`ScratchPool`]).
#[derive(Default)]
pub struct Scratch {
    decompressed: Vec<u8>,
    decoded: Decoded,
    encoded: Vec<u8>,
    compressed: Vec<u8>,
    inject: Injected,
    /// A tee record buffer (given back by [`ScratchPool::recycle_tee`]).
    tee: Vec<u8>,
    decoded_v2: DecodedV2,
    /// Metadata of the forwarded 2.0 series, folded for a 1.0 upstream.
    families: Vec<Family>,
    /// The tenant labels' symbols in a 2.0 body for the upstream.
    tenant_symbols: Vec<(u32, u32)>,
}

/// What to do with a request.
pub struct Params<'a> {
    pub account: &'a str,
    /// Label names set to `account` on every series.
    pub tenant_labels: &'a [String],
    pub allowlist: &'a Allowlist,
    pub limits: ShapeLimits,
    pub max_decoded_bytes: u64,
    /// Collect `cloudtuner_kubecost_*` samples with timestamps in this
    /// window for the tee (`None`: no tee).
    pub tee: Option<Accepted>,
}

/// The result of [`process`].
#[derive(Debug, Default)]
pub struct Outcome {
    /// Snappy-compressed `WriteRequest` of the kept series (empty if none).
    pub body: Vec<u8>,
    pub series_received: u64,
    pub samples_received: u64,
    pub series_kept: u64,
    pub samples_kept: u64,
    pub series_dropped: u64,
    pub samples_dropped: u64,
    /// Metadata entries dropped (they carry no tenant).
    pub metadata_dropped: u64,
    /// The tee's spool record (empty when there is no tee or nothing to tee).
    pub tee: TeeRecord,
    /// Remote-Write 2.0 only: what the kept series hold, and what the
    /// allowlist dropped, by kind (the `*-Written` headers count both).
    pub kept: Written,
    pub dropped: Written,
    /// Remote-Write 2.0 only: series refused as invalid (a partial write),
    /// and the first one's reason.
    pub series_refused: u64,
    pub first_refusal: Option<Invalid>,
    /// Those series by reason, indexed as [`Invalid::REASONS`].
    pub refused_by_reason: [u64; Invalid::REASONS.len()],
    /// Which protocol `body` is.
    pub body_version: RemoteWriteVersion,
}

/// Why a body could not be processed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PipelineError {
    #[error("decompressed body too large: {declared} bytes declared, the limit is {limit}")]
    DecodedTooLarge { declared: u64, limit: u64 },
    #[error("invalid snappy block: {0}")]
    Snappy(String),
    #[error("invalid remote-write body: {0}")]
    Decode(#[from] DecodeError),
}

/// The decompressed length a snappy body declares in its header.
pub fn declared_len(compressed: &[u8]) -> Result<u64, PipelineError> {
    snap::raw::decompress_len(compressed)
        .map(|n| n as u64)
        .map_err(|e| PipelineError::Snappy(e.to_string()))
}

/// Runs the pipeline on one compressed body. `out_body` in the outcome is a
/// fresh `Vec` (the caller hands it to the HTTP client); everything else is
/// reused through `scratch`.
pub fn process(
    compressed: &[u8],
    p: &Params<'_>,
    scratch: &mut Scratch,
) -> Result<Outcome, PipelineError> {
    decompress(compressed, p.max_decoded_bytes, &mut scratch.decompressed)?;
    let buf = &scratch.decompressed;
    let decoded = &mut scratch.decoded;
    wire::decode(buf, &p.limits, decoded)?;

    let inject = &mut scratch.inject;
    set_tenant(inject, p);
    let mut out = Outcome {
        metadata_dropped: u64::from(decoded.metadata),
        ..Outcome::default()
    };
    let encoded = &mut scratch.encoded;
    encoded.clear();
    let mut tee = p
        .tee
        .map(|a| RecordBuilder::with_buffer(a, std::mem::take(&mut scratch.tee)));
    let mut tee_labels = Vec::new();
    for s in &decoded.series {
        out.series_received += 1;
        out.samples_received += u64::from(s.samples);
        let name = s.name.map(|n| n.get(buf));
        if !p.allowlist.keeps(name) {
            out.series_dropped += 1;
            out.samples_dropped += u64::from(s.samples);
            continue;
        }
        out.series_kept += 1;
        out.samples_kept += u64::from(s.samples);
        wire::encode_series(encoded, buf, decoded, s, inject);
        if let (Some(tee), Some(name)) = (&mut tee, name) {
            if is_teed(name) {
                let labels = decoded
                    .labels_of(s)
                    .iter()
                    .map(|l| (l.name.get(buf), l.value.get(buf)));
                collect_tee(labels, name, p, &mut tee_labels, tee, |f| {
                    wire::for_each_sample(buf, s, f)
                })?;
            }
        }
    }
    finish(out, tee, encoded, &mut scratch.compressed)
}

/// Sets `inject` to the tenant labels: each of `p.tenant_labels`, the account.
/// Public for the benches, which time the encoders with the same set.
pub fn set_tenant(inject: &mut Injected, p: &Params<'_>) {
    inject.set(
        p.tenant_labels
            .iter()
            .map(|n| (n.as_bytes(), p.account.as_bytes())),
    );
}

/// The end of a request's work: the tee record sealed, the kept series
/// compressed (nothing kept, no body).
fn finish(
    mut out: Outcome,
    tee: Option<RecordBuilder>,
    encoded: &[u8],
    compressed: &mut Vec<u8>,
) -> Result<Outcome, PipelineError> {
    if let Some(tee) = tee {
        out.tee = tee.finish();
    }
    if out.series_kept > 0 {
        out.body = compress(encoded, compressed)?;
    }
    Ok(out)
}

/// Snappy-decompresses `compressed` into `out`, refusing before allocating
/// anything a body that declares more than `max` bytes.
fn decompress(compressed: &[u8], max: u64, out: &mut Vec<u8>) -> Result<(), PipelineError> {
    let declared = declared_len(compressed)?;
    if declared > max {
        return Err(PipelineError::DecodedTooLarge {
            declared,
            limit: max,
        });
    }
    out.resize(declared as usize, 0);
    let n = snap::raw::Decoder::new()
        .decompress(compressed, out)
        .map_err(|e| PipelineError::Snappy(e.to_string()))?;
    out.truncate(n);
    Ok(())
}

/// Snappy-compresses `encoded` (through the reused buffer `c`) into the
/// body handed to the HTTP client.
fn compress(encoded: &[u8], c: &mut Vec<u8>) -> Result<Vec<u8>, PipelineError> {
    c.resize(snap::raw::max_compress_len(encoded.len()), 0);
    let n = snap::raw::Encoder::new()
        .compress(encoded, c)
        .map_err(|e| PipelineError::Snappy(e.to_string()))?;
    Ok(c[..n].to_vec())
}

/// [`process`] for a Remote-Write 2.0 body: the same guards, allowlist,
/// tenancy and tee, and the kept series encoded as `upstream` takes them
/// (1.0: converted, their metadata folded per metric family; 2.0: as they
/// came, with the tenant labels set). Series that cannot be written are
/// left out and counted ([`Outcome::series_refused`]): the rest goes on.
pub fn process_v2(
    compressed: &[u8],
    p: &Params<'_>,
    upstream: RemoteWriteVersion,
    scratch: &mut Scratch,
) -> Result<Outcome, PipelineError> {
    decompress(compressed, p.max_decoded_bytes, &mut scratch.decompressed)?;
    let buf = &scratch.decompressed;
    let d = &mut scratch.decoded_v2;
    wire_v2::decode(buf, &p.limits, d)?;

    let inject = &mut scratch.inject;
    set_tenant(inject, p);
    let mut out = Outcome {
        body_version: upstream,
        ..Outcome::default()
    };
    let encoded = &mut scratch.encoded;
    encoded.clear();
    let families = &mut scratch.families;
    families.clear();
    let tenant_symbols = &mut scratch.tenant_symbols;
    if upstream == RemoteWriteVersion::V2 {
        wire_v2::encode_symbols(encoded, buf, d, inject, tenant_symbols);
    }
    let mut tee = p
        .tee
        .map(|a| RecordBuilder::with_buffer(a, std::mem::take(&mut scratch.tee)));
    let mut tee_labels = Vec::new();
    for s in &d.series {
        out.series_received += 1;
        if let Some(why) = s.invalid {
            out.series_refused += 1;
            out.refused_by_reason[why.index()] += 1;
            out.first_refusal.get_or_insert(why);
            continue;
        }
        let held = Written {
            samples: u64::from(s.samples),
            histograms: u64::from(s.histograms),
            exemplars: u64::from(s.exemplars),
        };
        let samples = u64::from(s.samples + s.histograms);
        out.samples_received += samples;
        let name = d.name(buf, s);
        if !p.allowlist.keeps(name) {
            out.series_dropped += 1;
            out.samples_dropped += samples;
            out.dropped = out.dropped + held;
            continue;
        }
        out.series_kept += 1;
        out.samples_kept += samples;
        out.kept = out.kept + held;
        match upstream {
            RemoteWriteVersion::V1 => {
                wire_v2::encode_series_v1(encoded, buf, d, s, inject);
                wire_v2::note_family(families, buf, d, s);
            }
            RemoteWriteVersion::V2 => {
                wire_v2::encode_series_v2(encoded, buf, d, s, inject, tenant_symbols)
            }
        }
        if let (Some(tee), Some(name)) = (&mut tee, name) {
            if is_teed(name) {
                collect_tee(d.label_pairs(buf, s), name, p, &mut tee_labels, tee, |f| {
                    wire_v2::for_each_sample(buf, s, f)
                })?;
            }
        }
    }
    if upstream == RemoteWriteVersion::V1 {
        wire_v2::encode_metadata_v1(encoded, buf, d, families);
    }
    finish(out, tee, encoded, &mut scratch.compressed)
}

/// Appends one series to the tee record: its labels after tenancy
/// enforcement, sorted, without `__name__`, borrowed from the body, and its
/// samples (`samples` calls its argument for each).
fn collect_tee<'b>(
    series_labels: impl Iterator<Item = (&'b [u8], &'b [u8])>,
    name: &'b [u8],
    p: &'b Params<'_>,
    labels: &mut Vec<(&'b [u8], &'b [u8])>,
    tee: &mut RecordBuilder,
    samples: impl FnOnce(&mut dyn FnMut(Sample)) -> Result<(), DecodeError>,
) -> Result<(), PipelineError> {
    labels.clear();
    labels.extend(
        series_labels.filter(|(n, _)| {
            *n != b"__name__" && !p.tenant_labels.iter().any(|t| t.as_bytes() == *n)
        }),
    );
    // The decoder sorted the labels by name, so the tenant labels go in by
    // binary search rather than a sort per series. Only repeated
    // names (which Prometheus never sends) need their values ordered, so
    // that the record does not depend on the sender's order.
    if labels
        .windows(2)
        .any(|w| wire::cmp_names(w[0].0, w[1].0) != Ordering::Less)
    {
        labels.sort_unstable();
    }
    for t in p.tenant_labels {
        let t = t.as_bytes();
        let at = labels.partition_point(|(n, _)| wire::cmp_names(n, t) == Ordering::Less);
        labels.insert(at, (t, p.account.as_bytes()));
    }
    tee.begin_series(p.account, name, labels);
    samples(&mut |sample| tee.sample(sample.timestamp_ms, sample.value))?;
    tee.end_series();
    Ok(())
}

/// A small pool of [`Scratch`] buffers so that steady-state requests allocate
/// nothing for decoding and encoding. Buffers that grew past `max_keep` bytes
/// (a rare huge request) are dropped instead of pinning the memory.
pub struct ScratchPool {
    free: std::sync::Mutex<Vec<Scratch>>,
    /// Tee record buffers back from the spool, for the next requests.
    free_tee: std::sync::Mutex<Vec<Vec<u8>>>,
    max_keep: usize,
}

impl ScratchPool {
    pub fn new(max_keep: usize) -> Self {
        ScratchPool {
            free: std::sync::Mutex::new(Vec::new()),
            free_tee: std::sync::Mutex::new(Vec::new()),
            max_keep,
        }
    }

    pub fn take(&self) -> Scratch {
        let mut s: Scratch = self
            .free
            .lock()
            .ok()
            .and_then(|mut f| f.pop())
            .unwrap_or_default();
        if s.tee.capacity() == 0 {
            if let Some(buf) = self.free_tee.lock().ok().and_then(|mut f| f.pop()) {
                s.tee = buf;
            }
        }
        s
    }

    /// Keeps a tee record buffer the spool gave back (a teed request's
    /// record moves to the spool thread and back, so it is not in the
    /// [`Scratch`] when that returns).
    pub fn recycle_tee(&self, buf: Vec<u8>) {
        if buf.capacity() == 0 || buf.capacity() > self.max_keep {
            return;
        }
        if let Ok(mut f) = self.free_tee.lock() {
            if f.len() < 64 {
                f.push(buf);
            }
        }
    }

    pub fn give(&self, s: Scratch) {
        let size = s.decompressed.capacity()
            + s.encoded.capacity()
            + s.compressed.capacity()
            + s.tee.capacity();
        if size > self.max_keep {
            return;
        }
        if let Ok(mut f) = self.free.lock() {
            if f.len() < 64 {
                f.push(s);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prompb;
    use prost::Message;

    fn series(name: &str, extra: &[(&str, &str)], v: f64) -> prompb::TimeSeries {
        let mut labels = vec![prompb::Label {
            name: "__name__".into(),
            value: name.into(),
        }];
        labels.extend(extra.iter().map(|(n, v)| prompb::Label {
            name: n.to_string(),
            value: v.to_string(),
        }));
        prompb::TimeSeries {
            labels,
            samples: vec![prompb::Sample {
                value: v,
                timestamp: 1_700_000_000_000,
            }],
            ..Default::default()
        }
    }

    fn compress(req: &prompb::WriteRequest) -> Vec<u8> {
        snap::raw::Encoder::new()
            .compress_vec(&req.encode_to_vec())
            .unwrap()
    }

    fn params<'a>(allow: &'a Allowlist, labels: &'a [String]) -> Params<'a> {
        Params {
            account: "acc",
            tenant_labels: labels,
            allowlist: allow,
            limits: ShapeLimits::UNLIMITED,
            max_decoded_bytes: 1 << 20,
            tee: Some(Accepted::ANY),
        }
    }

    #[test]
    fn filters_enforces_and_tees() {
        let allow = Allowlist::new(crate::config::DEFAULT_ALLOWLIST).unwrap();
        let labels = vec!["cloud_account_id".to_string(), "tenant_id".to_string()];
        let req = prompb::WriteRequest {
            timeseries: vec![
                series("up", &[("cloud_account_id", "evil")], 1.0),
                series("go_goroutines", &[], 5.0),
                series(
                    "cloudtuner_kubecost_namespace_total_cost",
                    &[("namespace", "ns1"), ("tenant_id", "evil")],
                    0.25,
                ),
            ],
            metadata: vec![prompb::MetricMetadata::default()],
        };
        let mut scratch = Scratch::default();
        let out = process(&compress(&req), &params(&allow, &labels), &mut scratch).unwrap();
        assert_eq!(
            (out.series_received, out.series_kept, out.series_dropped),
            (3, 2, 1)
        );
        assert_eq!(
            (out.samples_received, out.samples_kept, out.samples_dropped),
            (3, 2, 1)
        );
        assert_eq!(out.metadata_dropped, 1);

        let body = snap::raw::Decoder::new().decompress_vec(&out.body).unwrap();
        let fwd = prompb::WriteRequest::decode(body.as_slice()).unwrap();
        assert_eq!(fwd.timeseries.len(), 2);
        for ts in &fwd.timeseries {
            let get = |n: &str| {
                ts.labels
                    .iter()
                    .filter(|l| l.name == n)
                    .map(|l| l.value.as_str())
                    .collect::<Vec<_>>()
            };
            assert_eq!(get("cloud_account_id"), ["acc"]);
            assert_eq!(get("tenant_id"), ["acc"]);
        }
        assert_eq!((out.tee.kept, out.tee.too_old, out.tee.too_new), (1, 0, 0));
        let mut teed = Vec::new();
        crate::cost::record::decode_record(out.tee.payload(), &mut teed).unwrap();
        assert_eq!(teed.len(), 1);
        let t = &teed[0];
        assert_eq!(
            (t.account, t.metric, t.namespace),
            ("acc", "cloudtuner_kubecost_namespace_total_cost", "ns1")
        );
        assert_eq!(
            t.labels(),
            [("cloud_account_id", "acc"), ("tenant_id", "acc")]
        );
        assert_eq!(t.samples().collect::<Vec<_>>(), [(1_700_000_000_000, 0.25)]);
    }

    /// The teed labels are sorted by name whatever order the sender used
    /// (the series id hashes them), tenant labels in their places.
    #[test]
    fn teed_labels_are_sorted_with_tenant_labels_in_place() {
        let allow = Allowlist::new(crate::config::DEFAULT_ALLOWLIST).unwrap();
        let labels = vec!["cloud_account_id".to_string(), "tenant_id".to_string()];
        let metric = "cloudtuner_kubecost_namespace_total_cost";
        let sorted = [
            ("app", "a"),
            ("namespace", "n"),
            ("tenant_id", "evil"),
            ("zone", "z"),
        ];
        let mut shuffled = sorted;
        shuffled.reverse();
        let mut records = Vec::new();
        for order in [&sorted, &shuffled] {
            let req = prompb::WriteRequest {
                timeseries: vec![series(metric, order, 1.0)],
                metadata: vec![],
            };
            let out = process(
                &compress(&req),
                &params(&allow, &labels),
                &mut Scratch::default(),
            )
            .unwrap();
            records.push(out.tee.payload().to_vec());
        }
        assert_eq!(records[0], records[1]);
        let mut teed = Vec::new();
        crate::cost::record::decode_record(&records[0], &mut teed).unwrap();
        assert_eq!(
            teed[0].labels(),
            [
                ("app", "a"),
                ("cloud_account_id", "acc"),
                ("tenant_id", "acc"),
                ("zone", "z")
            ]
        );
    }

    #[test]
    fn declared_length_is_checked_before_decompressing() {
        // A 6-byte body declaring 4 GiB - 1 of output.
        let bomb = [0xff, 0xff, 0xff, 0xff, 0x0f, 0x00];
        let allow = Allowlist::new("up").unwrap();
        let labels = vec!["tenant_id".to_string()];
        let mut scratch = Scratch::default();
        let err = process(&bomb, &params(&allow, &labels), &mut scratch).unwrap_err();
        assert!(
            matches!(err, PipelineError::DecodedTooLarge { declared, .. } if declared == u32::MAX as u64)
        );
        assert_eq!(scratch.decompressed.capacity(), 0, "nothing was allocated");
    }

    #[test]
    fn bad_snappy_and_protobuf_name_the_problem() {
        let allow = Allowlist::new("up").unwrap();
        let labels = vec!["tenant_id".to_string()];
        let mut scratch = Scratch::default();
        let err = process(b"\x05hello", &params(&allow, &labels), &mut scratch).unwrap_err();
        assert!(err.to_string().starts_with("invalid snappy block"), "{err}");
        let not_proto = snap::raw::Encoder::new()
            .compress_vec(b"\x0a\x09abc")
            .unwrap();
        let err = process(&not_proto, &params(&allow, &labels), &mut scratch).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("invalid remote-write body: protobuf"),
            "{err}"
        );
    }

    fn snappy(raw: &[u8]) -> Vec<u8> {
        snap::raw::Encoder::new().compress_vec(raw).unwrap()
    }

    /// The same series as 1.0 and as 2.0 give the same forwarded 1.0 body
    /// and the same tee record, byte for byte.
    #[test]
    fn remote_write_2_forwards_and_tees_as_1_0_does() {
        let allow = Allowlist::new(crate::config::DEFAULT_ALLOWLIST).unwrap();
        let labels = vec!["cloud_account_id".to_string(), "tenant_id".to_string()];
        let p = crate::loadgen::Profile {
            series: 300,
            samples: 2,
            ..Default::default()
        };
        let v1 = crate::loadgen::write_request(&p, "spoofed", 7);
        let v2 = crate::prompb_v2::Request::from_v1(&v1);
        let params = params(&allow, &labels);
        let one = process(&compress(&v1), &params, &mut Scratch::default()).unwrap();
        let two = process_v2(
            &snappy(&v2.encode_to_vec()),
            &params,
            RemoteWriteVersion::V1,
            &mut Scratch::default(),
        )
        .unwrap();
        assert_eq!(two.body_version, RemoteWriteVersion::V1);
        assert_eq!(
            snap::raw::Decoder::new().decompress_vec(&two.body).unwrap(),
            snap::raw::Decoder::new().decompress_vec(&one.body).unwrap()
        );
        assert!(two.tee.kept > 0);
        assert_eq!(two.tee.payload(), one.tee.payload());
        assert_eq!(
            (two.series_kept, two.series_dropped, two.samples_kept),
            (one.series_kept, one.series_dropped, one.samples_kept)
        );
        assert_eq!(two.kept.samples + two.dropped.samples, 600);
        assert_eq!((two.kept.histograms, two.kept.exemplars), (0, 0));
        assert_eq!(two.series_refused, 0);
    }

    #[test]
    fn remote_write_2_refuses_invalid_series_alone() {
        use crate::prompb_v2::{self as v2, Symbols};
        let allow = Allowlist::new(crate::config::DEFAULT_ALLOWLIST).unwrap();
        let labels = vec!["tenant_id".to_string()];
        let mut sym = Symbols::new();
        let good = |sym: &mut Symbols, name: &str| v2::TimeSeries {
            labels_refs: sym.refs(&[("__name__", name), ("tenant_id", "evil")]),
            samples: vec![v2::Sample {
                value: 1.0,
                timestamp: 1,
                start_timestamp: 0,
            }],
            ..Default::default()
        };
        let up = good(&mut sym, "up");
        let dropped = good(&mut sym, "go_goroutines");
        let mut odd = good(&mut sym, "up");
        odd.labels_refs.pop();
        let mut dup = good(&mut sym, "kube_pod_info");
        dup.labels_refs.extend(sym.refs(&[("__name__", "up")]));
        let req = v2::Request {
            symbols: sym.into_table(),
            timeseries: vec![odd, up, dup, dropped],
        };
        for upstream in [RemoteWriteVersion::V1, RemoteWriteVersion::V2] {
            let out = process_v2(
                &snappy(&req.encode_to_vec()),
                &params(&allow, &labels),
                upstream,
                &mut Scratch::default(),
            )
            .unwrap();
            assert_eq!(
                (out.series_kept, out.series_dropped, out.series_refused),
                (1, 1, 2)
            );
            assert_eq!(out.first_refusal, Some(Invalid::OddLabelRefs));
            assert_eq!(
                out.refused_by_reason[Invalid::DuplicateLabelName.index()],
                1
            );
            assert_eq!((out.kept.samples, out.dropped.samples), (1, 1));
            let raw = snap::raw::Decoder::new().decompress_vec(&out.body).unwrap();
            let labels: Vec<(String, String)> = match upstream {
                RemoteWriteVersion::V1 => {
                    let fwd = prompb::WriteRequest::decode(raw.as_slice()).unwrap();
                    assert_eq!(fwd.timeseries.len(), 1);
                    fwd.timeseries[0]
                        .labels
                        .iter()
                        .map(|l| (l.name.clone(), l.value.clone()))
                        .collect()
                }
                RemoteWriteVersion::V2 => {
                    let fwd = v2::Request::decode(raw.as_slice()).unwrap();
                    assert_eq!(fwd.timeseries.len(), 1);
                    fwd.labels_of(0)
                        .unwrap()
                        .into_iter()
                        .map(|(n, v)| (n.to_string(), v.to_string()))
                        .collect()
                }
            };
            assert_eq!(
                labels,
                [
                    ("__name__".to_string(), "up".to_string()),
                    ("tenant_id".to_string(), "acc".to_string())
                ]
            );
        }
    }
}
