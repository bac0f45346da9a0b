//! Remote-Write 1.0 wire format, decoded in place and re-encoded without an
//! intermediate owned `WriteRequest`.
//!
//! Why not prost's generated types on the hot path: they allocate a `String`
//! per label name and value and a `Vec` per series. rwgate only needs to look at
//! labels, rewrite two of them and copy everything else, so the decoder records
//! *offsets* into the decompressed buffer (no lifetimes, so the index vectors
//! are reused across requests) and the encoder copies the untouched fields
//! (samples, exemplars, histograms) byte for byte. The prost types generated
//! from `proto/` (`crate::prompb`) are the reference these are tested against.
//!
//! Protobuf wire rules used here: a field is a varint key `(number << 3) | type`,
//! type 0 varint, 1 fixed64, 2 length-delimited, 5 fixed32.

use std::fmt;

/// Wire types.
const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const FIXED32: u8 = 5;

/// A byte range `[start, end)` into the decompressed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Span {
    pub start: u32,
    pub end: u32,
}

impl Span {
    #[inline]
    pub fn get(self, buf: &[u8]) -> &[u8] {
        &buf[self.start as usize..self.end as usize]
    }
    #[inline]
    pub fn len(self) -> usize {
        (self.end - self.start) as usize
    }
    #[inline]
    pub fn is_empty(self) -> bool {
        self.end == self.start
    }
}

/// One label, as offsets of its name and value.
#[derive(Debug, Clone, Copy)]
pub struct LabelRef {
    pub name: Span,
    pub value: Span,
}

/// One series: its labels (a range of [`Decoded::labels`], sorted by name),
/// the whole `TimeSeries` message, and the bytes of its non-label fields.
#[derive(Debug, Clone, Copy)]
pub struct SeriesRef {
    pub labels_start: u32,
    pub labels_end: u32,
    /// The `TimeSeries` message body.
    pub body: Span,
    /// Bytes of the fields other than labels (copied verbatim when encoding).
    pub other_bytes: u32,
    /// Value of `__name__`, if present.
    pub name: Option<Span>,
    /// Number of samples plus histogram samples.
    pub samples: u32,
}

/// Limits on the shape of a request, checked while decoding.
#[derive(Debug, Clone, Copy)]
pub struct ShapeLimits {
    pub max_series: usize,
    pub max_labels_per_series: usize,
    pub max_label_name_bytes: usize,
    pub max_label_value_bytes: usize,
}

impl ShapeLimits {
    pub const UNLIMITED: ShapeLimits = ShapeLimits {
        max_series: usize::MAX,
        max_labels_per_series: usize::MAX,
        max_label_name_bytes: usize::MAX,
        max_label_value_bytes: usize::MAX,
    };
}

/// The index of a decoded `WriteRequest`; reusable across requests.
#[derive(Debug, Default)]
pub struct Decoded {
    pub series: Vec<SeriesRef>,
    pub labels: Vec<LabelRef>,
    /// `MetricMetadata` entries seen (not forwarded: they carry no tenant).
    pub metadata: u32,
}

impl Decoded {
    pub fn clear(&mut self) {
        self.series.clear();
        self.labels.clear();
        self.metadata = 0;
    }

    /// The labels of one series.
    #[inline]
    pub fn labels_of(&self, s: &SeriesRef) -> &[LabelRef] {
        &self.labels[s.labels_start as usize..s.labels_end as usize]
    }
}

/// Why a body is not a valid `WriteRequest`, or breaks a shape limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("protobuf: {what} at byte {at}")]
    Malformed { what: &'static str, at: usize },
    #[error("label {which} is not valid UTF-8 at byte {at}")]
    InvalidUtf8 { which: &'static str, at: usize },
    #[error("too many series: more than {limit} in one request")]
    TooManySeries { limit: usize },
    #[error("too many labels: a series has {count}, the limit is {limit}")]
    TooManyLabels { count: usize, limit: usize },
    #[error("label name too long: {len} bytes, the limit is {limit}")]
    LabelNameTooLong { len: usize, limit: usize },
    #[error("label value too long: {len} bytes, the limit is {limit}")]
    LabelValueTooLong { len: usize, limit: usize },
}

fn malformed(what: &'static str, at: usize) -> DecodeError {
    DecodeError::Malformed { what, at }
}

/// A cursor over protobuf fields.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Offset of `buf` in the whole request, for error positions and spans.
    base: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], base: usize) -> Self {
        Reader { buf, pos: 0, base }
    }

    #[inline]
    fn at(&self) -> usize {
        self.base + self.pos
    }

    #[inline]
    fn done(&self) -> bool {
        self.pos >= self.buf.len()
    }

    #[inline]
    fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut v: u64 = 0;
        for i in 0..10 {
            let Some(&b) = self.buf.get(self.pos) else {
                return Err(malformed("truncated varint", self.at()));
            };
            self.pos += 1;
            v |= u64::from(b & 0x7f) << (7 * i);
            if b < 0x80 {
                return Ok(v);
            }
        }
        Err(malformed("varint longer than 10 bytes", self.at()))
    }

    /// Reads a field key: (field number, wire type).
    #[inline]
    fn key(&mut self) -> Result<(u32, u8), DecodeError> {
        let k = self.varint()?;
        let field = (k >> 3) as u32;
        if field == 0 {
            return Err(malformed("field number 0", self.at()));
        }
        Ok((field, (k & 7) as u8))
    }

    /// Reads a length-delimited payload and returns its span (relative to base).
    #[inline]
    fn len_delimited(&mut self) -> Result<(usize, usize), DecodeError> {
        let len = self.varint()? as usize;
        let start = self.pos;
        let end = start
            .checked_add(len)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| malformed("length past end of message", self.at()))?;
        self.pos = end;
        Ok((self.base + start, self.base + end))
    }

    #[inline]
    fn fixed64(&mut self) -> Result<u64, DecodeError> {
        let b = self
            .buf
            .get(self.pos..self.pos + 8)
            .ok_or_else(|| malformed("truncated fixed64", self.at()))?;
        self.pos += 8;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }

    /// Skips a field of the given wire type.
    #[inline]
    fn skip(&mut self, wire_type: u8) -> Result<(), DecodeError> {
        match wire_type {
            VARINT => {
                self.varint()?;
            }
            FIXED64 => {
                self.fixed64()?;
            }
            LEN => {
                self.len_delimited()?;
            }
            FIXED32 => {
                if self.pos + 4 > self.buf.len() {
                    return Err(malformed("truncated fixed32", self.at()));
                }
                self.pos += 4;
            }
            _ => return Err(malformed("unsupported wire type", self.at())),
        }
        Ok(())
    }
}

/// Decodes a `prometheus.WriteRequest` from `buf` into `out` (cleared first).
/// Labels of each series are sorted by name if the sender did not sort them.
pub fn decode(buf: &[u8], limits: &ShapeLimits, out: &mut Decoded) -> Result<(), DecodeError> {
    out.clear();
    if buf.len() > u32::MAX as usize {
        return Err(malformed("message larger than 4 GiB", 0));
    }
    let mut r = Reader::new(buf, 0);
    while !r.done() {
        let (field, wt) = r.key()?;
        match (field, wt) {
            (1, LEN) => {
                if out.series.len() >= limits.max_series {
                    return Err(DecodeError::TooManySeries {
                        limit: limits.max_series,
                    });
                }
                let (s, e) = r.len_delimited()?;
                decode_series(buf, s, e, limits, out)?;
            }
            (3, LEN) => {
                r.len_delimited()?;
                out.metadata += 1;
            }
            (1 | 3, _) => return Err(malformed("wrong wire type for WriteRequest field", r.at())),
            (_, wt) => r.skip(wt)?,
        }
    }
    Ok(())
}

fn decode_series(
    buf: &[u8],
    start: usize,
    end: usize,
    limits: &ShapeLimits,
    out: &mut Decoded,
) -> Result<(), DecodeError> {
    let labels_start = out.labels.len();
    let mut r = Reader::new(&buf[start..end], start);
    let mut label_bytes = 0usize;
    let mut samples = 0u32;
    let mut name = None;
    let mut sorted = true;
    while !r.done() {
        let field_start = r.pos;
        let (field, wt) = r.key()?;
        match (field, wt) {
            (1, LEN) => {
                let (ls, le) = r.len_delimited()?;
                let label = decode_label(buf, ls, le, limits)?;
                let n = out.labels.len() - labels_start;
                if n >= limits.max_labels_per_series {
                    return Err(DecodeError::TooManyLabels {
                        count: count_labels(buf, start, end),
                        limit: limits.max_labels_per_series,
                    });
                }
                if let Some(prev) = out.labels.last().filter(|_| n > 0) {
                    if prev.name.get(buf) > label.name.get(buf) {
                        sorted = false;
                    }
                }
                if label.name.get(buf) == b"__name__" {
                    name = Some(label.value);
                }
                out.labels.push(label);
                label_bytes += r.pos - field_start;
            }
            (2 | 4, LEN) => {
                r.len_delimited()?;
                samples += 1;
            }
            (3, LEN) => {
                r.len_delimited()?;
            }
            (1..=4, _) => return Err(malformed("wrong wire type for TimeSeries field", r.at())),
            (_, wt) => r.skip(wt)?,
        }
    }
    if !sorted {
        out.labels[labels_start..].sort_unstable_by(|a, b| a.name.get(buf).cmp(b.name.get(buf)));
    }
    out.series.push(SeriesRef {
        labels_start: labels_start as u32,
        labels_end: out.labels.len() as u32,
        body: Span {
            start: start as u32,
            end: end as u32,
        },
        other_bytes: ((end - start) - label_bytes) as u32,
        name,
        samples,
    });
    Ok(())
}

fn count_labels(buf: &[u8], start: usize, end: usize) -> usize {
    let mut r = Reader::new(&buf[start..end], start);
    let mut n = 0;
    while !r.done() {
        match r.key() {
            Ok((1, LEN)) => n += 1,
            Ok((_, wt)) if r.skip(wt).is_ok() => continue,
            _ => break,
        }
        if r.len_delimited().is_err() {
            break;
        }
    }
    n
}

fn decode_label(
    buf: &[u8],
    start: usize,
    end: usize,
    limits: &ShapeLimits,
) -> Result<LabelRef, DecodeError> {
    let mut r = Reader::new(&buf[start..end], start);
    let mut name = Span::default();
    let mut value = Span::default();
    while !r.done() {
        let (field, wt) = r.key()?;
        match (field, wt) {
            (1, LEN) => {
                let (s, e) = r.len_delimited()?;
                name = Span {
                    start: s as u32,
                    end: e as u32,
                };
            }
            (2, LEN) => {
                let (s, e) = r.len_delimited()?;
                value = Span {
                    start: s as u32,
                    end: e as u32,
                };
            }
            (1 | 2, _) => return Err(malformed("wrong wire type for Label field", r.at())),
            (_, wt) => r.skip(wt)?,
        }
    }
    if name.len() > limits.max_label_name_bytes {
        return Err(DecodeError::LabelNameTooLong {
            len: name.len(),
            limit: limits.max_label_name_bytes,
        });
    }
    if value.len() > limits.max_label_value_bytes {
        return Err(DecodeError::LabelValueTooLong {
            len: value.len(),
            limit: limits.max_label_value_bytes,
        });
    }
    if std::str::from_utf8(name.get(buf)).is_err() {
        return Err(DecodeError::InvalidUtf8 {
            which: "name",
            at: name.start as usize,
        });
    }
    if std::str::from_utf8(value.get(buf)).is_err() {
        return Err(DecodeError::InvalidUtf8 {
            which: "value",
            at: value.start as usize,
        });
    }
    Ok(LabelRef { name, value })
}

/// One float sample of a series.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub value: f64,
    pub timestamp_ms: i64,
}

/// Calls `f` for each float sample of a series (histograms are skipped).
pub fn for_each_sample(
    buf: &[u8],
    series: &SeriesRef,
    mut f: impl FnMut(Sample),
) -> Result<(), DecodeError> {
    let (s, e) = (series.body.start as usize, series.body.end as usize);
    let mut r = Reader::new(&buf[s..e], s);
    while !r.done() {
        let (field, wt) = r.key()?;
        if (field, wt) != (2, LEN) {
            r.skip(wt)?;
            continue;
        }
        let (ss, se) = r.len_delimited()?;
        let mut sr = Reader::new(&buf[ss..se], ss);
        let mut sample = Sample {
            value: 0.0,
            timestamp_ms: 0,
        };
        while !sr.done() {
            match sr.key()? {
                (1, FIXED64) => sample.value = f64::from_bits(sr.fixed64()?),
                (2, VARINT) => sample.timestamp_ms = sr.varint()? as i64,
                (_, wt) => sr.skip(wt)?,
            }
        }
        f(sample);
    }
    Ok(())
}

/// Protobuf size of a varint.
#[inline]
pub fn varint_len(v: u64) -> usize {
    // 1 byte per 7 bits, at least 1.
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

#[inline]
pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

#[inline]
fn label_msg_len(name: usize, value: usize) -> usize {
    1 + varint_len(name as u64) + name + 1 + varint_len(value as u64) + value
}

#[inline]
fn put_label(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    let len = label_msg_len(name.len(), value.len());
    out.push((1 << 3) | LEN); // TimeSeries.labels
    put_varint(out, len as u64);
    out.push((1 << 3) | LEN); // Label.name
    put_varint(out, name.len() as u64);
    out.extend_from_slice(name);
    out.push((2 << 3) | LEN); // Label.value
    put_varint(out, value.len() as u64);
    out.extend_from_slice(value);
}

/// Labels to set on every series, replacing any the client sent with these
/// names. Sorted by name so they can be merged into sorted series labels.
#[derive(Debug, Clone)]
pub struct Injected<'a> {
    pairs: Vec<(&'a [u8], &'a [u8])>,
}

impl<'a> Injected<'a> {
    pub fn new(mut pairs: Vec<(&'a [u8], &'a [u8])>) -> Self {
        pairs.sort_unstable_by(|a, b| a.0.cmp(b.0));
        pairs.dedup_by(|a, b| a.0 == b.0);
        Injected { pairs }
    }

    #[inline]
    fn contains(&self, name: &[u8]) -> bool {
        self.pairs.iter().any(|(n, _)| *n == name)
    }
}

/// Appends one `TimeSeries` (as `WriteRequest.timeseries`, field 1) to `out`:
/// the series' labels merged with `inject` (which wins on equal names), in
/// name order, then its other fields copied verbatim.
pub fn encode_series(
    out: &mut Vec<u8>,
    buf: &[u8],
    decoded: &Decoded,
    series: &SeriesRef,
    inject: &Injected<'_>,
) {
    let labels = decoded.labels_of(series);
    // Size first: protobuf length prefixes come before the bytes.
    let mut len = series.other_bytes as usize;
    for l in labels {
        if !inject.contains(l.name.get(buf)) {
            let m = label_msg_len(l.name.len(), l.value.len());
            len += 1 + varint_len(m as u64) + m;
        }
    }
    for (n, v) in &inject.pairs {
        let m = label_msg_len(n.len(), v.len());
        len += 1 + varint_len(m as u64) + m;
    }
    out.reserve(len + 6);
    out.push((1 << 3) | LEN);
    put_varint(out, len as u64);

    // Merge two sorted lists.
    let mut inj = inject.pairs.iter().peekable();
    for l in labels {
        let name = l.name.get(buf);
        if inject.contains(name) {
            continue;
        }
        while let Some((n, v)) = inj.next_if(|(n, _)| *n < name) {
            put_label(out, n, v);
        }
        put_label(out, name, l.value.get(buf));
    }
    for (n, v) in inj {
        put_label(out, n, v);
    }

    // Copy the remaining fields as they came.
    let (s, e) = (series.body.start as usize, series.body.end as usize);
    let mut r = Reader::new(&buf[s..e], s);
    while !r.done() {
        let field_start = r.pos;
        // The body was validated by `decode`, so these cannot fail; stop
        // copying rather than panic if they somehow do.
        let Ok((field, wt)) = r.key() else { break };
        if r.skip(wt).is_err() {
            break;
        }
        if !(field == 1 && wt == LEN) {
            out.extend_from_slice(&buf[s + field_start..s + r.pos]);
        }
    }
}

/// Whether `name` is a valid Prometheus label name (`[a-zA-Z_][a-zA-Z0-9_]*`).
pub fn is_valid_label_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b'a'..=b'z' | b'A'..=b'Z' | b'_'))
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..{}", self.start, self.end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prompb;
    use prost::Message;

    fn ts(labels: &[(&str, &str)], samples: &[(f64, i64)]) -> prompb::TimeSeries {
        prompb::TimeSeries {
            labels: labels
                .iter()
                .map(|(n, v)| prompb::Label {
                    name: n.to_string(),
                    value: v.to_string(),
                })
                .collect(),
            samples: samples
                .iter()
                .map(|&(value, timestamp)| prompb::Sample { value, timestamp })
                .collect(),
            exemplars: vec![prompb::Exemplar {
                labels: vec![prompb::Label {
                    name: "trace_id".into(),
                    value: "abc".into(),
                }],
                value: 1.5,
                timestamp: 7,
            }],
            histograms: vec![],
        }
    }

    fn reencode(req: &prompb::WriteRequest, inject: &[(&str, &str)]) -> prompb::WriteRequest {
        let buf = req.encode_to_vec();
        let mut d = Decoded::default();
        decode(&buf, &ShapeLimits::UNLIMITED, &mut d).unwrap();
        let inj = Injected::new(
            inject
                .iter()
                .map(|(n, v)| (n.as_bytes(), v.as_bytes()))
                .collect(),
        );
        let mut out = Vec::new();
        for s in &d.series {
            encode_series(&mut out, &buf, &d, s, &inj);
        }
        prompb::WriteRequest::decode(out.as_slice()).unwrap()
    }

    #[test]
    fn round_trip_without_injection_is_identity() {
        let req = prompb::WriteRequest {
            timeseries: vec![
                ts(
                    &[("__name__", "up"), ("job", "a")],
                    &[(1.0, 1000), (0.0, 2000)],
                ),
                ts(
                    &[("__name__", "kube_pod_info"), ("pod", "x")],
                    &[(f64::NAN, -5)],
                ),
            ],
            metadata: vec![],
        };
        let got = reencode(&req, &[]);
        assert_eq!(got.timeseries.len(), 2);
        assert_eq!(got.timeseries[0], req.timeseries[0]);
        assert_eq!(got.timeseries[1].labels, req.timeseries[1].labels);
        assert!(got.timeseries[1].samples[0].value.is_nan());
        assert_eq!(got.timeseries[1].samples[0].timestamp, -5);
    }

    #[test]
    fn injection_replaces_spoofed_labels_and_keeps_order() {
        let req = prompb::WriteRequest {
            timeseries: vec![ts(
                &[
                    ("__name__", "up"),
                    ("cloud_account_id", "other-tenant"),
                    ("job", "a"),
                    ("tenant_id", "other-tenant"),
                    ("zone", "z"),
                ],
                &[(1.0, 1)],
            )],
            metadata: vec![],
        };
        let got = reencode(&req, &[("tenant_id", "me"), ("cloud_account_id", "me")]);
        let labels: Vec<(String, String)> = got.timeseries[0]
            .labels
            .iter()
            .map(|l| (l.name.clone(), l.value.clone()))
            .collect();
        let want = [
            ("__name__", "up"),
            ("cloud_account_id", "me"),
            ("job", "a"),
            ("tenant_id", "me"),
            ("zone", "z"),
        ];
        assert_eq!(
            labels,
            want.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect::<Vec<_>>()
        );
        assert_eq!(got.timeseries[0].samples, req.timeseries[0].samples);
        assert_eq!(got.timeseries[0].exemplars, req.timeseries[0].exemplars);
    }

    #[test]
    fn unsorted_labels_are_sorted() {
        let req = prompb::WriteRequest {
            timeseries: vec![ts(
                &[("zone", "z"), ("__name__", "up"), ("a", "1")],
                &[(1.0, 1)],
            )],
            metadata: vec![],
        };
        let got = reencode(&req, &[("tenant_id", "t")]);
        let names: Vec<&str> = got.timeseries[0]
            .labels
            .iter()
            .map(|l| l.name.as_str())
            .collect();
        assert_eq!(names, ["__name__", "a", "tenant_id", "zone"]);
    }

    #[test]
    fn samples_are_read_back() {
        let req = prompb::WriteRequest {
            timeseries: vec![ts(&[("__name__", "x")], &[(1.25, 1000), (-2.5, 2000)])],
            metadata: vec![],
        };
        let buf = req.encode_to_vec();
        let mut d = Decoded::default();
        decode(&buf, &ShapeLimits::UNLIMITED, &mut d).unwrap();
        let mut got = vec![];
        for_each_sample(&buf, &d.series[0], |s| got.push(s)).unwrap();
        assert_eq!(
            got,
            [
                Sample {
                    value: 1.25,
                    timestamp_ms: 1000
                },
                Sample {
                    value: -2.5,
                    timestamp_ms: 2000
                }
            ]
        );
        assert_eq!(d.series[0].samples, 2);
        assert_eq!(d.series[0].name.unwrap().get(&buf), b"x");
    }

    #[test]
    fn limits_are_enforced() {
        let req = prompb::WriteRequest {
            timeseries: vec![
                ts(&[("__name__", "x"), ("a", "1"), ("b", "2")], &[(1.0, 1)]),
                ts(&[("__name__", "y")], &[(1.0, 1)]),
            ],
            metadata: vec![],
        };
        let buf = req.encode_to_vec();
        let mut d = Decoded::default();
        let lim = |f: fn(&mut ShapeLimits)| {
            let mut l = ShapeLimits::UNLIMITED;
            f(&mut l);
            l
        };
        assert_eq!(
            decode(&buf, &lim(|l| l.max_series = 1), &mut d),
            Err(DecodeError::TooManySeries { limit: 1 })
        );
        assert_eq!(
            decode(&buf, &lim(|l| l.max_labels_per_series = 2), &mut d),
            Err(DecodeError::TooManyLabels { count: 3, limit: 2 })
        );
        assert_eq!(
            decode(&buf, &lim(|l| l.max_label_name_bytes = 7), &mut d),
            Err(DecodeError::LabelNameTooLong { len: 8, limit: 7 })
        );
        assert_eq!(
            decode(&buf, &lim(|l| l.max_label_value_bytes = 0), &mut d),
            Err(DecodeError::LabelValueTooLong { len: 1, limit: 0 })
        );
    }

    #[test]
    fn garbage_is_rejected_not_panicking() {
        let req = prompb::WriteRequest {
            timeseries: vec![ts(&[("__name__", "x"), ("a", "1")], &[(1.0, 1)])],
            metadata: vec![],
        };
        let buf = req.encode_to_vec();
        let mut d = Decoded::default();
        // Every truncation is either an error or a valid shorter message.
        for cut in 0..buf.len() {
            let _ = decode(&buf[..cut], &ShapeLimits::UNLIMITED, &mut d);
        }
        assert!(matches!(
            decode(b"\x0a\xff\xff\xff\xff\x0f", &ShapeLimits::UNLIMITED, &mut d),
            Err(DecodeError::Malformed { .. })
        ));
        assert!(matches!(
            decode(b"\x0a\x04\x0a\x02\xff\xfe", &ShapeLimits::UNLIMITED, &mut d),
            Err(DecodeError::Malformed { .. }) | Err(DecodeError::InvalidUtf8 { .. })
        ));
        let bad_utf8 = prompb::WriteRequest {
            timeseries: vec![],
            metadata: vec![],
        }
        .encode_to_vec();
        assert!(decode(&bad_utf8, &ShapeLimits::UNLIMITED, &mut d).is_ok());
    }

    #[test]
    fn varint_len_matches_encoding() {
        for v in [0u64, 1, 127, 128, 16383, 16384, u32::MAX as u64, u64::MAX] {
            let mut out = vec![];
            put_varint(&mut out, v);
            assert_eq!(out.len(), varint_len(v), "{v}");
        }
    }
}
