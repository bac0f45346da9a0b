//! What the pipeline must do with what the reference accepted, shared by
//! the 1.0 and 2.0 properties: the parameters every case runs with, the
//! snappy layer (the `snap` crate's decoder is its reference), the tenant
//! labels, and the tee record.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use proptest::test_runner::TestCaseError;

use super::inputs::Input;
use crate::config::DEFAULT_ALLOWLIST;
use crate::cost::names::is_teed;
use crate::cost::record::{self, decode_record, Accepted};
use crate::filter::Allowlist;
use crate::pipeline::{Outcome, Params, PipelineError};
use crate::wire::ShapeLimits;

/// Labels as (name, value) bytes.
pub type Labels = Vec<(Vec<u8>, Vec<u8>)>;

/// The tenant labels every case sets (a sender may spoof them).
pub const TENANT_LABELS: [&str; 2] = ["cloud_account_id", "tenant_id"];
/// The account they are set to.
pub const ACCOUNT: &str = "0f0e0d0c-0b0a-4908-8706-050403020100";

/// A failed property, with what differs.
pub fn fail(what: impl Into<String>) -> TestCaseError {
    TestCaseError::fail(what.into())
}

/// The default allowlist (what a tenant without its own gets).
pub fn allowlist() -> &'static Allowlist {
    static ALLOW: OnceLock<Allowlist> = OnceLock::new();
    ALLOW.get_or_init(|| Allowlist::new(DEFAULT_ALLOWLIST).expect("the default allowlist"))
}

/// The tenant label names as the pipeline takes them.
pub fn tenant_names() -> &'static [String] {
    static NAMES: OnceLock<Vec<String>> = OnceLock::new();
    NAMES.get_or_init(|| TENANT_LABELS.iter().map(|s| s.to_string()).collect())
}

/// The tenant labels as name/value pairs.
pub fn tenant_pairs() -> [(&'static str, &'static str); 2] {
    TENANT_LABELS.map(|n| (n, ACCOUNT))
}

/// The parameters of one case: the default allowlist, the tenant labels,
/// the tee on for every timestamp.
pub fn params(limits: ShapeLimits, max_decoded_bytes: u64) -> Params<'static> {
    Params {
        account: ACCOUNT,
        tenant_labels: tenant_names(),
        allowlist: allowlist(),
        limits,
        max_decoded_bytes,
        tee: Some(Accepted::ANY),
    }
}

/// The limits the pipeline decodes with: the configured ones, with labels
/// per series capped at what a spool record holds (its labels but
/// `__name__`, plus the tenant labels, in at most [`record::MAX_LABELS`]).
pub fn pipeline_limits(limits: &ShapeLimits) -> ShapeLimits {
    let fit = (record::MAX_LABELS + 1).saturating_sub(TENANT_LABELS.len());
    ShapeLimits {
        max_labels_per_series: limits.max_labels_per_series.min(fit),
        ..*limits
    }
}

/// The decoder's decision on a request against the reference's (`None`:
/// refused): what the reference accepted when both accept, `None` when
/// both refuse.
pub fn decision<V>(
    reference: Option<V>,
    got: Result<(), crate::wire::DecodeError>,
) -> Result<Option<V>, TestCaseError> {
    match (reference, got) {
        (None, Err(_)) => Ok(None),
        (None, Ok(())) => Err(fail("decode accepts what the reference refuses")),
        (Some(_), Err(e)) => Err(fail(format!(
            "decode refuses what the reference accepts: {e}"
        ))),
        (Some(v), Ok(())) => Ok(Some(v)),
    }
}

/// A valid series as the decoder read it (its sorted labels, its metric
/// name, its float samples through `samples`) is the reference's.
pub fn same_series(
    labels: Vec<(Vec<u8>, Vec<u8>)>,
    name: Option<&[u8]>,
    samples: impl FnOnce(&mut dyn FnMut(crate::wire::Sample)) -> Result<(), crate::wire::DecodeError>,
    want: &TeeWant,
) -> Result<(), TestCaseError> {
    if labels != want.labels || name != Some(want.name.as_slice()) {
        return Err(fail(format!(
            "decode's labels {labels:?}, the reference's {:?}",
            want.labels
        )));
    }
    let mut got = Vec::new();
    samples(&mut |x| got.push((x.timestamp_ms, x.value.to_bits())))
        .map_err(|e| fail(format!("the samples of a valid series: {e}")))?;
    if got != want.samples {
        return Err(fail(format!(
            "decode's samples {got:?}, the reference's {:?}",
            want.samples
        )));
    }
    Ok(())
}

/// A series' labels (name, value) as sent, against the per-series limits
/// (labels counted as sent, name and value lengths) and the spec's label
/// rules (no empty name, no name twice, a non-empty `__name__`): the
/// labels sorted by name and the metric name, or `None` if the series is
/// refused.
pub fn label_rules(
    mut labels: Vec<(Vec<u8>, Vec<u8>)>,
    limits: &ShapeLimits,
) -> Option<(Labels, Vec<u8>)> {
    if labels.len() > limits.max_labels_per_series
        || labels.iter().any(|(n, v)| {
            n.len() > limits.max_label_name_bytes || v.len() > limits.max_label_value_bytes
        })
    {
        return None;
    }
    labels.sort();
    if labels.iter().any(|(n, _)| n.is_empty()) || labels.windows(2).any(|w| w[0].0 == w[1].0) {
        return None;
    }
    let name = labels.iter().find(|(n, _)| n == b"__name__")?.1.clone();
    (!name.is_empty()).then_some((labels, name))
}

/// The pipeline property of one protocol on an input: runs `process` on
/// its body as sent with the case's [`params`] and checks its
/// snappy layer ([`snappy`]); then, on the decompressed body and the limits
/// the pipeline decodes it with ([`pipeline_limits`]), `decode` checks the
/// decoder against the reference and returns what the reference accepted
/// (`None`: it refused the request, which `process` must refuse as
/// undecodable); what it accepted goes to `check` with the outcome.
pub fn check_processed<A: std::fmt::Debug>(
    input: &Input,
    process: impl FnOnce(&Params<'_>) -> Result<Outcome, PipelineError>,
    decode: impl FnOnce(&[u8], &ShapeLimits) -> Result<Option<A>, TestCaseError>,
    check: impl FnOnce(A, Outcome) -> Result<(), TestCaseError>,
) -> Result<(), TestCaseError> {
    let got = process(&params(input.limits, input.max_decoded));
    let Some(raw) = snappy(&input.body, input.max_decoded, &got)? else {
        return Ok(());
    };
    match (decode(&raw, &pipeline_limits(&input.limits))?, got) {
        (None, Err(PipelineError::Decode(_))) => Ok(()),
        (Some(want), Ok(out)) => check(want, out),
        (want, got) => Err(fail(format!("reference {want:?}, process {got:?}"))),
    }
}

/// The counts every protocol's outcome has: the valid series received,
/// their samples (histograms included), the series kept.
pub fn check_received(out: &Outcome, want: (u64, u64, u64)) -> Result<(), TestCaseError> {
    let got = (out.series_received, out.samples_received, out.series_kept);
    if got != want {
        return Err(fail(format!(
            "(series, samples) received and series kept {got:?}, want {want:?}"
        )));
    }
    Ok(())
}

/// The series `out` refused: `refused` of the request's `series` (none of
/// none when nothing was refused).
pub fn check_refused(out: &Outcome, refused: u64, series: u64) -> Result<(), TestCaseError> {
    let got = out
        .refused
        .as_ref()
        .map_or((0, 0), |r| (r.refused, r.series));
    let want = (refused, if refused > 0 { series } else { 0 });
    if got != want {
        return Err(fail(format!(
            "process refuses {got:?} (refused, of series), want {want:?}"
        )));
    }
    Ok(())
}

/// The body `out` forwards, decompressed (empty when it forwards none).
pub fn forwarded(out: &Outcome) -> Result<Vec<u8>, TestCaseError> {
    if out.body.is_empty() {
        return Ok(Vec::new());
    }
    snap::raw::Decoder::new()
        .decompress_vec(&out.body)
        .map_err(|e| fail(format!("the forwarded body is not snappy: {e}")))
}

/// The snappy layer of `process`/`process_v2`, against the `snap` crate's
/// own decoder: a body it refuses is refused (as invalid snappy, a length
/// its bytes cannot expand to, or one over the limit); a body it decodes
/// to more than `max` bytes is refused as too large; any other body is
/// decompressed, and never refused by the expansion bound. Returns the
/// decompressed body when the rest of the property applies.
pub fn snappy<T: std::fmt::Debug>(
    compressed: &[u8],
    max: u64,
    got: &Result<T, PipelineError>,
) -> Result<Option<Vec<u8>>, TestCaseError> {
    let raw = match snap::raw::Decoder::new().decompress_vec(compressed) {
        Err(_) => {
            return match got {
                Err(
                    PipelineError::Snappy(_)
                    | PipelineError::SnappyLength { .. }
                    | PipelineError::DecodedTooLarge { .. },
                ) => Ok(None),
                other => Err(fail(format!("snap refuses the body, process: {other:?}"))),
            }
        }
        Ok(raw) => raw,
    };
    if raw.len() as u64 > max {
        return match got {
            Err(PipelineError::DecodedTooLarge { .. }) => Ok(None),
            other => Err(fail(format!(
                "{} bytes decompressed over the limit {max}, process: {other:?}",
                raw.len()
            ))),
        };
    }
    if let Err(e @ (PipelineError::Snappy(_) | PipelineError::SnappyLength { .. })) = got {
        return Err(fail(format!(
            "snap decodes the body, process refuses it: {e}"
        )));
    }
    Ok(Some(raw))
}

/// What was forwarded is what was wanted, compared as prost encodes them:
/// bit for bit (NaN included).
pub fn same_message<M: prost::Message + std::fmt::Debug>(
    got: &M,
    want: &M,
) -> Result<(), TestCaseError> {
    if got.encode_to_vec() == want.encode_to_vec() {
        return Ok(());
    }
    Err(fail(format!("forwarded {got:?}\nwant {want:?}")))
}

/// Labels after tenancy: the tenant labels set to the account (replacing
/// any the sender put), sorted by name.
pub fn with_tenant(labels: &[(Vec<u8>, Vec<u8>)]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out: Vec<_> = labels
        .iter()
        .filter(|(n, _)| !TENANT_LABELS.iter().any(|t| t.as_bytes() == n.as_slice()))
        .cloned()
        .collect();
    for (n, v) in tenant_pairs() {
        out.push((n.as_bytes().to_vec(), v.as_bytes().to_vec()));
    }
    out.sort();
    out
}

/// A valid series as the tee sees it.
#[derive(Debug, Clone)]
pub struct TeeWant {
    pub name: Vec<u8>,
    /// Sorted by name, as sent (before tenancy).
    pub labels: Vec<(Vec<u8>, Vec<u8>)>,
    /// Float samples: (timestamp, value bits).
    pub samples: Vec<(i64, u64)>,
}

/// The tee record of `out` holds exactly the valid series with the tee
/// prefix that have samples, allowlisted or not, in request order, with
/// the tenant labels set and their float samples.
pub fn check_tee(out: &Outcome, valid: &[TeeWant]) -> Result<(), TestCaseError> {
    let mut teed = Vec::new();
    if !out.tee.payload().is_empty() {
        decode_record(out.tee.payload(), &mut teed)
            .map_err(|e| fail(format!("the spool record does not decode: {e}")))?;
    }
    let want: Vec<&TeeWant> = valid
        .iter()
        .filter(|s| is_teed(&s.name) && !s.samples.is_empty())
        .collect();
    if teed.len() != want.len() {
        return Err(fail(format!(
            "{} series teed, want {}",
            teed.len(),
            want.len()
        )));
    }
    let column = |n: &[u8]| matches!(n, b"cluster" | b"namespace" | b"pod");
    for (t, want) in teed.iter().zip(want) {
        let mut labels: BTreeMap<&str, &str> = t.labels().into_iter().collect();
        for (k, v) in [
            ("cluster", t.cluster),
            ("namespace", t.namespace),
            ("pod", t.pod),
        ] {
            if !v.is_empty() {
                labels.insert(k, v);
            }
        }
        let want_labels = with_tenant(&want.labels);
        let want_labels: BTreeMap<&str, &str> = want_labels
            .iter()
            .filter(|(n, v)| n != b"__name__" && !(column(n) && v.is_empty()))
            .map(|(n, v)| (utf8(n), utf8(v)))
            .collect();
        let samples: Vec<(i64, u64)> = t.samples().map(|(ts, v)| (ts, v.to_bits())).collect();
        if t.account != ACCOUNT
            || t.metric.as_bytes() != want.name.as_slice()
            || labels != want_labels
            || samples != want.samples
        {
            return Err(fail(format!("teed {t:?}, want {want:?}")));
        }
    }
    Ok(())
}

/// A label string the reference checked is UTF-8.
pub fn utf8(b: &[u8]) -> &str {
    std::str::from_utf8(b).expect("the reference checked UTF-8")
}
