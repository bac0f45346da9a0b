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

use std::cmp::Ordering;
use std::fmt;

/// Wire types.
pub(crate) const VARINT: u8 = 0;
pub(crate) const FIXED64: u8 = 1;
pub(crate) const LEN: u8 = 2;
pub(crate) const FIXED32: u8 = 5;

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

/// One label, as offsets of its name and value, and of the whole
/// `TimeSeries.labels` field (key, length and message) so that an unchanged
/// label is copied to the output as it came.
#[derive(Debug, Clone, Copy)]
pub struct LabelRef {
    pub name: Span,
    pub value: Span,
    pub field: Span,
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
    /// Where those fields are, when they sit in one contiguous range (the
    /// usual case: labels first, then samples); `None` if they are spread
    /// between labels, and the encoder then picks them out one by one.
    pub other: Option<Span>,
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

pub(crate) fn malformed(what: &'static str, at: usize) -> DecodeError {
    DecodeError::Malformed { what, at }
}

/// A cursor over protobuf fields.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pub(crate) pos: usize,
    /// Offset of `buf` in the whole request, for error positions and spans.
    base: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8], base: usize) -> Self {
        Reader { buf, pos: 0, base }
    }

    #[inline]
    pub(crate) fn at(&self) -> usize {
        self.base + self.pos
    }

    #[inline]
    pub(crate) fn done(&self) -> bool {
        self.pos >= self.buf.len()
    }

    #[inline(always)]
    pub(crate) fn varint(&mut self) -> Result<u64, DecodeError> {
        // Keys and most lengths fit in one byte: take that path first.
        if let Some(&b) = self.buf.get(self.pos) {
            if b < 0x80 {
                self.pos += 1;
                return Ok(u64::from(b));
            }
        }
        self.varint_slow()
    }

    #[inline(never)]
    fn varint_slow(&mut self) -> Result<u64, DecodeError> {
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
    pub(crate) fn key(&mut self) -> Result<(u32, u8), DecodeError> {
        let k = self.varint()?;
        let field = (k >> 3) as u32;
        if field == 0 {
            return Err(malformed("field number 0", self.at()));
        }
        Ok((field, (k & 7) as u8))
    }

    /// Reads a length-delimited payload and returns its span (relative to base).
    #[inline]
    pub(crate) fn len_delimited(&mut self) -> Result<(usize, usize), DecodeError> {
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
    pub(crate) fn fixed64(&mut self) -> Result<u64, DecodeError> {
        let b = self
            .buf
            .get(self.pos..self.pos + 8)
            .ok_or_else(|| malformed("truncated fixed64", self.at()))?;
        self.pos += 8;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }

    /// Skips a field of the given wire type.
    #[inline]
    pub(crate) fn skip(&mut self, wire_type: u8) -> Result<(), DecodeError> {
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
    // The previous label's name, kept in a register rather than re-read
    // from `out.labels` (that reload showed in the profile).
    let mut prev: &[u8] = &[];
    // The non-label fields, while they stay one contiguous range.
    let mut other: Option<(usize, usize)> = None;
    let mut other_contiguous = true;
    while !r.done() {
        let field_start = r.pos;
        let (field, wt) = r.key()?;
        match (field, wt) {
            (1, LEN) => {
                let (ls, le) = r.len_delimited()?;
                let n = out.labels.len() - labels_start;
                if n >= limits.max_labels_per_series {
                    return Err(DecodeError::TooManyLabels {
                        count: count_labels(buf, start, end),
                        limit: limits.max_labels_per_series,
                    });
                }
                let field = Span {
                    start: (start + field_start) as u32,
                    end: le as u32,
                };
                let label = decode_label(buf, ls, le, field, limits)?;
                let label_name = label.name.get(buf);
                if n > 0 && cmp_names(prev, label_name) == Ordering::Greater {
                    sorted = false;
                }
                prev = label_name;
                if label_name.len() == 8 && label_name == b"__name__" {
                    name = Some(label.value);
                }
                out.labels.push(label);
                label_bytes += r.pos - field_start;
            }
            (1..=4, _) if wt != LEN => {
                return Err(malformed("wrong wire type for TimeSeries field", r.at()))
            }
            (_, wt) => {
                if (field, wt) == (2, LEN) || (field, wt) == (4, LEN) {
                    r.len_delimited()?;
                    samples += 1;
                } else {
                    r.skip(wt)?;
                }
                let (fs, fe) = (start + field_start, start + r.pos);
                other = match other {
                    None => Some((fs, fe)),
                    Some((os, oe)) if oe == fs => Some((os, fe)),
                    Some(o) => {
                        other_contiguous = false;
                        Some(o)
                    }
                };
            }
        }
    }
    if !sorted {
        out.labels[labels_start..].sort_unstable_by(|a, b| a.name.get(buf).cmp(b.name.get(buf)));
    }
    let other = match other {
        None => Some(Span::default()),
        Some((s, e)) if other_contiguous => Some(Span {
            start: s as u32,
            end: e as u32,
        }),
        Some(_) => None,
    };
    out.series.push(SeriesRef {
        labels_start: labels_start as u32,
        labels_end: out.labels.len() as u32,
        body: Span {
            start: start as u32,
            end: end as u32,
        },
        other_bytes: ((end - start) - label_bytes) as u32,
        other,
        name,
        samples,
    });
    Ok(())
}

/// Orders label names as byte strings. A byte loop rather than `a.cmp(b)`:
/// names are short and usually differ in their first bytes, and the
/// `memcmp` call behind the slice comparison cost more than the compare.
#[inline(always)]
pub fn cmp_names(a: &[u8], b: &[u8]) -> Ordering {
    for (x, y) in a.iter().zip(b) {
        if x != y {
            return x.cmp(y);
        }
    }
    a.len().cmp(&b.len())
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

#[inline]
fn decode_label(
    buf: &[u8],
    start: usize,
    end: usize,
    field: Span,
    limits: &ShapeLimits,
) -> Result<LabelRef, DecodeError> {
    let msg = &buf[start..end];
    let span = |s: usize, e: usize| Span {
        start: (start + s) as u32,
        end: (start + e) as u32,
    };
    // Fast path: `0x0a <n> name 0x12 <m> value` with one-byte lengths, the
    // shape every sender produces for labels shorter than 128 bytes.
    let (name, value) = match msg {
        [0x0a, n, rest @ ..]
            if *n < 0x80
                && rest.len() >= *n as usize + 2
                && rest[*n as usize] == 0x12
                && rest[*n as usize + 1] < 0x80
                && usize::from(rest[*n as usize + 1]) == rest.len() - *n as usize - 2 =>
        {
            let n = *n as usize;
            (span(2, 2 + n), span(4 + n, msg.len()))
        }
        _ => decode_label_slow(buf, start, end)?,
    };
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
    // All-ASCII (keys and one-byte lengths are ASCII too) is valid UTF-8:
    // one cheap word-at-a-time scan instead of two `from_utf8` calls.
    if !msg.is_ascii() {
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
    }
    Ok(LabelRef { name, value, field })
}

/// Any valid encoding of a `Label`: fields in any order, repeated (last
/// wins), multi-byte lengths, unknown fields skipped.
#[inline(never)]
fn decode_label_slow(buf: &[u8], start: usize, end: usize) -> Result<(Span, Span), DecodeError> {
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
    Ok((name, value))
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
    // Only the fields other than labels, when the decoder found them in
    // one range (the usual case): no walking over the labels again.
    let fields = series.other.unwrap_or(series.body);
    let (s, e) = (fields.start as usize, fields.end as usize);
    let mut r = Reader::new(&buf[s..e], s);
    while !r.done() {
        let (field, wt) = r.key()?;
        if (field, wt) != (2, LEN) {
            r.skip(wt)?;
            continue;
        }
        let (ss, se) = r.len_delimited()?;
        f(read_sample(buf, ss, se)?);
    }
    Ok(())
}

/// One `Sample` message (the same in 1.0 and 2.0; other fields skipped).
#[inline]
pub(crate) fn read_sample(buf: &[u8], start: usize, end: usize) -> Result<Sample, DecodeError> {
    let mut r = Reader::new(&buf[start..end], start);
    let mut sample = Sample {
        value: 0.0,
        timestamp_ms: 0,
    };
    while !r.done() {
        match r.key()? {
            (1, FIXED64) => sample.value = f64::from_bits(r.fixed64()?),
            (2, VARINT) => sample.timestamp_ms = r.varint()? as i64,
            (_, wt) => r.skip(wt)?,
        }
    }
    Ok(sample)
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
pub(crate) fn label_msg_len(name: usize, value: usize) -> usize {
    1 + varint_len(name as u64) + name + 1 + varint_len(value as u64) + value
}

#[inline]
pub(crate) fn put_label(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
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
/// names. Kept sorted by name, each already encoded as a `TimeSeries.labels`
/// field, so that the encoder merges them into the sorted series labels with
/// one copy each. Reusable: [`Injected::set`] refills it without allocating.
#[derive(Debug, Clone, Default)]
pub struct Injected {
    /// The encoded fields, concatenated.
    bytes: Vec<u8>,
    /// Per label, sorted by name: its name and its whole field in `bytes`.
    labels: Vec<(Span, Span)>,
}

impl Injected {
    pub fn new<'a>(pairs: impl IntoIterator<Item = (&'a [u8], &'a [u8])>) -> Self {
        let mut inject = Injected::default();
        inject.set(pairs);
        inject
    }

    /// Replaces the labels. On equal names the first pair wins.
    pub fn set<'a>(&mut self, pairs: impl IntoIterator<Item = (&'a [u8], &'a [u8])>) {
        self.bytes.clear();
        self.labels.clear();
        for (name, value) in pairs {
            let start = self.bytes.len();
            put_label(&mut self.bytes, name, value);
            let name_end = start + 2 + varint_len(label_msg_len(name.len(), value.len()) as u64);
            let name_end = name_end + varint_len(name.len() as u64) + name.len();
            let span = |s: usize, e: usize| Span {
                start: s as u32,
                end: e as u32,
            };
            self.labels.push((
                span(name_end - name.len(), name_end),
                span(start, self.bytes.len()),
            ));
        }
        let bytes = &self.bytes;
        // Stable, so that `dedup` keeps the first of equal names.
        self.labels
            .sort_by(|a, b| a.0.get(bytes).cmp(b.0.get(bytes)));
        self.labels
            .dedup_by(|a, b| a.0.get(bytes) == b.0.get(bytes));
    }

    /// How many labels there are.
    #[inline]
    pub(crate) fn len(&self) -> usize {
        self.labels.len()
    }

    #[inline]
    pub(crate) fn name(&self, i: usize) -> &[u8] {
        self.labels[i].0.get(&self.bytes)
    }

    #[inline]
    pub(crate) fn field(&self, i: usize) -> &[u8] {
        self.labels[i].1.get(&self.bytes)
    }

    /// The value of label `i` (after its name: the value's key, length, bytes).
    pub(crate) fn value(&self, i: usize) -> &[u8] {
        let (name, field) = self.labels[i];
        let at = name.end as usize + 1;
        let mut r = Reader::new(&self.bytes[at..field.end as usize], at);
        match r.varint() {
            Ok(len) => &self.bytes[field.end as usize - len as usize..field.end as usize],
            Err(_) => &[],
        }
    }
}

/// Bytes of `buf` waiting to be appended: adjacent ranges are merged so that
/// unchanged labels and the fields after them go out in one copy.
struct Run {
    start: usize,
    end: usize,
}

impl Run {
    #[inline(always)]
    fn add(&mut self, out: &mut Vec<u8>, buf: &[u8], span: Span) {
        let (s, e) = (span.start as usize, span.end as usize);
        if s != self.end {
            self.flush(out, buf);
            self.start = s;
        }
        self.end = e;
    }

    #[inline(always)]
    fn flush(&mut self, out: &mut Vec<u8>, buf: &[u8]) {
        out.extend_from_slice(&buf[self.start..self.end]);
        self.start = self.end;
    }
}

/// Appends one `TimeSeries` (as `WriteRequest.timeseries`, field 1) to `out`:
/// the series' labels merged with `inject` (which wins on equal names), in
/// name order, then its other fields copied verbatim.
///
/// Unchanged labels are copied as they came, whole fields at a time, and
/// runs of adjacent ones in one `memcpy`. The length prefix is written after
/// the body: room is left for the largest possible length and, in the rare
/// case the real length needs fewer varint bytes, the body is moved back.
pub fn encode_series(
    out: &mut Vec<u8>,
    buf: &[u8],
    decoded: &Decoded,
    series: &SeriesRef,
    inject: &Injected,
) {
    let labels = decoded.labels_of(series);
    let upper = series.body.len() + inject.bytes.len();
    let hdr = varint_len(upper as u64);
    out.reserve(1 + hdr + upper);
    out.push((1 << 3) | LEN);
    let len_at = out.len();
    out.resize(len_at + hdr, 0);
    let body_at = out.len();

    // Merge two sorted lists; an injected label replaces equal names.
    let mut run = Run { start: 0, end: 0 };
    let mut next = 0;
    for l in labels {
        let name = l.name.get(buf);
        let mut replaced = false;
        while next < inject.labels.len() {
            match cmp_names(inject.name(next), name) {
                Ordering::Less => {
                    run.flush(out, buf);
                    out.extend_from_slice(inject.field(next));
                    next += 1;
                }
                Ordering::Equal => {
                    replaced = true;
                    break;
                }
                Ordering::Greater => break,
            }
        }
        if !replaced {
            run.add(out, buf, l.field);
        }
    }
    if next < inject.labels.len() {
        run.flush(out, buf);
        for i in next..inject.labels.len() {
            out.extend_from_slice(inject.field(i));
        }
    }

    // The remaining fields, as they came.
    match series.other {
        Some(span) => {
            if !span.is_empty() {
                run.add(out, buf, span);
            }
            run.flush(out, buf);
        }
        None => {
            run.flush(out, buf);
            copy_other_fields(out, buf, series);
        }
    }

    let len = out.len() - body_at;
    let n = varint_len(len as u64);
    if n < hdr {
        out.copy_within(body_at.., len_at + n);
        out.truncate(len_at + n + len);
    }
    let mut v = len as u64;
    for b in &mut out[len_at..len_at + n] {
        *b = (v as u8 & 0x7f) | 0x80;
        v >>= 7;
    }
    out[len_at + n - 1] &= 0x7f;
}

/// Copies the non-label fields of a series one by one (when they are not
/// one contiguous range).
#[cold]
fn copy_other_fields(out: &mut Vec<u8>, buf: &[u8], series: &SeriesRef) {
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
pub(crate) mod tests {
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
        let inj = Injected::new(inject.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())));
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

    /// The request the shape limits are tested on, and each limit with the
    /// error it gives there: one table for both protocols (the 2.0 test
    /// sends the same series), so that they refuse alike.
    pub(crate) fn limits_request() -> prompb::WriteRequest {
        prompb::WriteRequest {
            timeseries: vec![
                ts(&[("__name__", "x"), ("a", "1"), ("b", "2")], &[(1.0, 1)]),
                ts(&[("__name__", "y")], &[(1.0, 1)]),
            ],
            metadata: vec![],
        }
    }

    pub(crate) fn limit_cases() -> [(ShapeLimits, DecodeError); 4] {
        let lim = |f: fn(&mut ShapeLimits)| {
            let mut l = ShapeLimits::UNLIMITED;
            f(&mut l);
            l
        };
        [
            (
                lim(|l| l.max_series = 1),
                DecodeError::TooManySeries { limit: 1 },
            ),
            (
                lim(|l| l.max_labels_per_series = 2),
                DecodeError::TooManyLabels { count: 3, limit: 2 },
            ),
            (
                lim(|l| l.max_label_name_bytes = 7),
                DecodeError::LabelNameTooLong { len: 8, limit: 7 },
            ),
            (
                lim(|l| l.max_label_value_bytes = 0),
                DecodeError::LabelValueTooLong { len: 1, limit: 0 },
            ),
        ]
    }

    #[test]
    fn limits_are_enforced() {
        let buf = limits_request().encode_to_vec();
        let mut d = Decoded::default();
        for (limits, want) in limit_cases() {
            assert_eq!(decode(&buf, &limits, &mut d), Err(want.clone()), "{want}");
        }
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

    /// What re-encoding must produce, computed the obvious way on prost types.
    fn reference(req: &prompb::WriteRequest, inject: &[(&str, &str)]) -> prompb::WriteRequest {
        let mut want = req.clone();
        for ts in &mut want.timeseries {
            ts.labels
                .retain(|l| !inject.iter().any(|(n, _)| *n == l.name));
            for (n, v) in inject {
                if !ts.labels.iter().any(|l| l.name == *n) {
                    ts.labels.push(prompb::Label {
                        name: n.to_string(),
                        value: v.to_string(),
                    });
                }
            }
            ts.labels.sort_by(|a, b| a.name.cmp(&b.name));
        }
        want.metadata.clear();
        want
    }

    #[test]
    fn generated_requests_match_the_prost_reference() {
        let inject = [("cloud_account_id", "me"), ("tenant_id", "me")];
        for (seed, labels) in [(1, 10), (2, 4), (3, 14)] {
            let p = crate::loadgen::Profile {
                series: 200,
                labels,
                samples: 2,
                ..Default::default()
            };
            let req = crate::loadgen::write_request(&p, "spoofed", seed);
            assert_eq!(reencode(&req, &inject), reference(&req, &inject));
        }
    }

    #[test]
    fn long_values_and_multibyte_lengths() {
        let long = "v".repeat(300);
        let utf8 = "Zürich–東京";
        let req = prompb::WriteRequest {
            timeseries: vec![
                ts(
                    &[("__name__", "up"), ("a", &long), ("b", utf8), ("c", "")],
                    &[(1.0, 1)],
                ),
                ts(&[("__name__", &long), ("tenant_id", &long)], &[(2.0, 2)]),
            ],
            metadata: vec![],
        };
        let inject = [("tenant_id", "t"), ("cloud_account_id", "t")];
        assert_eq!(reencode(&req, &inject), reference(&req, &inject));
    }

    #[test]
    fn length_prefix_shrinks_when_spoofed_labels_are_removed() {
        // Body under 128 bytes once the spoofed 60-byte value is gone, over
        // 128 if it had stayed: the one-byte prefix path with the body moved.
        let spoof = "x".repeat(60);
        let req = prompb::WriteRequest {
            timeseries: vec![prompb::TimeSeries {
                labels: [
                    ("__name__", "up"),
                    ("job", "node"),
                    ("tenant_id", spoof.as_str()),
                ]
                .iter()
                .map(|(n, v)| prompb::Label {
                    name: n.to_string(),
                    value: v.to_string(),
                })
                .collect(),
                samples: vec![prompb::Sample {
                    value: 1.0,
                    timestamp: 1,
                }],
                ..Default::default()
            }],
            metadata: vec![],
        };
        let inject = [("tenant_id", "me")];
        let buf = req.encode_to_vec();
        let mut d = Decoded::default();
        decode(&buf, &ShapeLimits::UNLIMITED, &mut d).unwrap();
        let inj = Injected::new(inject.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())));
        assert!(d.series[0].body.len() + inj.bytes.len() >= 128);
        let mut out = Vec::new();
        encode_series(&mut out, &buf, &d, &d.series[0], &inj);
        assert!(out[1] < 0x80, "one-byte length prefix");
        let got = prompb::WriteRequest::decode(out.as_slice()).unwrap();
        assert_eq!(got, reference(&req, &inject));
    }

    /// A `TimeSeries` written by hand with its fields in an unusual order:
    /// a sample between labels, a label with value before name, an unknown
    /// field. The encoder must still produce the reference.
    #[test]
    fn interleaved_and_reordered_fields() {
        fn field(out: &mut Vec<u8>, key: u8, body: &[u8]) {
            out.push(key);
            put_varint(out, body.len() as u64);
            out.extend_from_slice(body);
        }
        let label = |n: &str, v: &str, reversed: bool| {
            let mut m = Vec::new();
            if reversed {
                field(&mut m, 0x12, v.as_bytes());
                field(&mut m, 0x0a, n.as_bytes());
            } else {
                field(&mut m, 0x0a, n.as_bytes());
                field(&mut m, 0x12, v.as_bytes());
            }
            m
        };
        let sample = prompb::Sample {
            value: 3.5,
            timestamp: 9,
        }
        .encode_to_vec();
        let mut series = Vec::new();
        field(&mut series, 0x0a, &label("zone", "z", false));
        field(&mut series, 0x12, &sample);
        field(&mut series, 0x0a, &label("__name__", "up", true));
        series.extend_from_slice(&[0x78, 0x05]); // field 15, varint 5 (unknown)
        field(&mut series, 0x0a, &label("tenant_id", "evil", false));
        field(&mut series, 0x12, &sample);
        let mut buf = Vec::new();
        field(&mut buf, 0x0a, &series);

        let req = prompb::WriteRequest::decode(buf.as_slice()).unwrap();
        let inject = [("tenant_id", "me"), ("cloud_account_id", "me")];
        let mut d = Decoded::default();
        decode(&buf, &ShapeLimits::UNLIMITED, &mut d).unwrap();
        assert!(d.series[0].other.is_none(), "non-label fields are split");
        let inj = Injected::new(inject.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())));
        let mut out = Vec::new();
        encode_series(&mut out, &buf, &d, &d.series[0], &inj);
        let got = prompb::WriteRequest::decode(out.as_slice()).unwrap();
        assert_eq!(got, reference(&req, &inject));
        // The unknown field survives, byte for byte.
        assert!(out.windows(2).any(|w| w == [0x78, 0x05]));
        // Both samples are found between the labels.
        let mut got = vec![];
        for_each_sample(&buf, &d.series[0], |s| got.push(s)).unwrap();
        let want = Sample {
            value: 3.5,
            timestamp_ms: 9,
        };
        assert_eq!(got, [want, want]);
    }

    #[test]
    fn invalid_utf8_is_caught_on_the_fast_path() {
        // 0x0a 0x02 "ab" 0x12 0x02 0xc3 0x28: one-byte lengths, bad value.
        let label = [0x0a, 0x02, b'a', b'b', 0x12, 0x02, 0xc3, 0x28];
        let mut series = vec![0x0a, label.len() as u8];
        series.extend_from_slice(&label);
        let mut buf = vec![0x0a, series.len() as u8];
        buf.extend_from_slice(&series);
        let mut d = Decoded::default();
        assert_eq!(
            decode(&buf, &ShapeLimits::UNLIMITED, &mut d),
            Err(DecodeError::InvalidUtf8 {
                which: "value",
                at: 10
            })
        );
    }

    #[test]
    fn name_order_is_byte_order() {
        let names: [&[u8]; 7] = [b"", b"a", b"ab", b"b", b"__name__", b"job", b"jo\xff"];
        for a in names {
            for b in names {
                assert_eq!(cmp_names(a, b), a.cmp(b), "{a:?} {b:?}");
            }
        }
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
