//! Remote-Write 1.0 wire format, decoded in place and re-encoded without an
//! intermediate owned `WriteRequest`.
//!
//! Why not prost's generated types on the hot path: they allocate a `String`
//! per label name and value and a `Vec` per series. rwgate only needs to look at
//! labels, rewrite two of them and copy everything else, so the decoder records
//! *offsets* into the decompressed buffer (no lifetimes, so the index vectors
//! are reused across requests) and the encoder copies the untouched fields
//! (samples, exemplars, histograms) byte for byte. The prost types generated
//! from `third_party/prometheus/` (`crate::prompb`) are the reference these
//! are tested against.
//!
//! Protobuf wire rules used here: a field is a varint key `(number << 3) | type`,
//! type 0 varint, 1 fixed64, 2 length-delimited, 3/4 start/end of a group
//! (obsolete, but a decoder skips them), 5 fixed32.
//!
//! # What is refused, and how much of the request goes with it
//!
//! The decoder accepts exactly what prost accepts (every sub-message is
//! decoded, nothing is only skipped over), then applies the label rules of
//! the Remote-Write spec and the shape limits. Following the spec's
//! partial-write rule, one bad series is refused on its own and the rest of
//! the request goes on; the request as a whole is refused only when it
//! cannot be read or trusted at all:
//!
//! - **The whole request** ([`DecodeError`]): the `WriteRequest` itself does
//!   not decode (a series' bytes cannot even be delimited, or a metadata
//!   entry does not decode or holds a string that is not UTF-8: metadata
//!   is dropped, not forwarded, but prost refuses such a request), it has more than
//!   `max_series` series, or a label string (of a series or of an exemplar)
//!   in a series that decodes is not valid UTF-8.
//! - **One series** ([`Invalid`], counted in [`Decoded::refused`]): any part
//!   of it does not decode (a label, a sample, an exemplar, a histogram, or
//!   the series' own fields), it breaks a per-series shape limit, or its
//!   label set is one the spec forbids ([`check_label_set`]).
//!
//! In that order: a series that does not decode is refused whatever else
//! is wrong with it, because nothing more can be known about it.

use std::cmp::Ordering;
use std::fmt;

/// Wire types.
pub(crate) const VARINT: u8 = 0;
pub(crate) const FIXED64: u8 = 1;
pub(crate) const LEN: u8 = 2;
const START_GROUP: u8 = 3;
const END_GROUP: u8 = 4;
pub(crate) const FIXED32: u8 = 5;

/// How deeply groups may nest, counted as prost counts when it decodes a
/// whole `WriteRequest` (its recursion limit): a field skipped with budget
/// 0 fails, a group's fields get one less than the group. The
/// `WriteRequest`'s own fields start at this, a `TimeSeries`' at one less,
/// a label's, sample's, exemplar's or histogram's at two less, an
/// exemplar's label's at three less. Remote-Write 2.0 counts the same way:
/// a `Request`'s fields at this, a `TimeSeries`' at one less, a sample's,
/// histogram's, exemplar's or metadata's at two less, a `BucketSpan`'s at
/// three less.
pub(crate) const DEPTH: u32 = 100;

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

#[inline]
fn span(start: usize, end: usize) -> Span {
    Span {
        start: start as u32,
        end: end as u32,
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
    /// Value of `__name__` (a valid series has exactly one, not empty).
    pub name: Span,
    /// Number of samples plus histogram samples.
    pub samples: u32,
}

/// Limits on the shape of a request, checked while decoding.
#[derive(Debug, Clone, Copy)]
pub struct ShapeLimits {
    /// Series in the request (more refuses the request).
    pub max_series: usize,
    /// Labels of one series as sent (more refuses the series).
    pub max_labels_per_series: usize,
    /// Bytes of a label name (longer refuses the series).
    pub max_label_name_bytes: usize,
    /// Bytes of a label value (longer refuses the series).
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
    /// The valid series, in request order.
    pub series: Vec<SeriesRef>,
    pub labels: Vec<LabelRef>,
    /// `MetricMetadata` entries seen (not forwarded: they carry no tenant).
    pub metadata: u32,
    /// The series refused, by reason.
    pub refused: Refused,
}

impl Decoded {
    pub fn clear(&mut self) {
        self.series.clear();
        self.labels.clear();
        self.metadata = 0;
        self.refused = Refused::default();
    }

    /// The labels of one series.
    #[inline]
    pub fn labels_of(&self, s: &SeriesRef) -> &[LabelRef] {
        &self.labels[s.labels_start as usize..s.labels_end as usize]
    }
}

/// Why a body is not a valid `WriteRequest` at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("protobuf: {what} at byte {at}")]
    Malformed { what: &'static str, at: usize },
    #[error("label {which} is not valid UTF-8 at byte {at}")]
    InvalidUtf8 { which: &'static str, at: usize },
    #[error("a metadata string is not valid UTF-8 at byte {at}")]
    MetadataUtf8 { at: usize },
    /// The one limit that refuses a whole request; the per-series limits
    /// refuse the series alone, in 1.0 and 2.0 alike ([`Invalid`]).
    #[error("too many series: more than {limit} in one request")]
    TooManySeries { limit: usize },
}

pub(crate) fn malformed(what: &'static str, at: usize) -> DecodeError {
    DecodeError::Malformed { what, at }
}

/// The part of a series that did not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The `TimeSeries` message's own fields.
    Series,
    Label,
    Sample,
    Exemplar,
    Histogram,
}

/// Why one series is refused while the rest of its request goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalid {
    /// A label's name is empty.
    EmptyLabelName,
    /// Two labels have this name (`__name__` included).
    DuplicateLabelName { name: Span },
    /// No `__name__` label.
    MissingMetricName,
    /// `__name__` is empty.
    EmptyMetricName,
    /// Over one of the per-series [`ShapeLimits`].
    OverLimit(OverLimit),
    /// A part of the series does not decode.
    Malformed {
        part: Part,
        what: &'static str,
        at: u32,
    },
}

/// A series over one of the per-series [`ShapeLimits`]: one refusal, with
/// one reason name and one wording, in 1.0 and 2.0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverLimit {
    /// More labels than `max_labels_per_series` (counted as sent).
    TooManyLabels { count: u32, limit: u32 },
    /// A label name longer than `max_label_name_bytes`.
    LabelNameTooLong { len: u32, limit: u32 },
    /// A label value longer than `max_label_value_bytes`; `name` is the
    /// label's name in the body.
    LabelValueTooLong { name: Span, len: u32, limit: u32 },
}

impl OverLimit {
    /// Its place among the three, in the order of [`Invalid::REASONS`].
    pub(crate) fn index(&self) -> usize {
        match self {
            OverLimit::TooManyLabels { .. } => 0,
            OverLimit::LabelNameTooLong { .. } => 1,
            OverLimit::LabelValueTooLong { .. } => 2,
        }
    }
}

impl Invalid {
    /// Every reason, as metric label values (`rwgate_series_refused_total`).
    pub const REASONS: [&'static str; 12] = [
        "empty_label_name",
        "duplicate_label_name",
        "missing_metric_name",
        "empty_metric_name",
        "too_many_labels",
        "label_name_too_long",
        "label_value_too_long",
        "malformed_series",
        "malformed_label",
        "malformed_sample",
        "malformed_exemplar",
        "malformed_histogram",
    ];

    fn index(&self) -> usize {
        match self {
            Invalid::EmptyLabelName => 0,
            Invalid::DuplicateLabelName { .. } => 1,
            Invalid::MissingMetricName => 2,
            Invalid::EmptyMetricName => 3,
            Invalid::OverLimit(o) => 4 + o.index(),
            Invalid::Malformed { part, .. } => match part {
                Part::Series => 7,
                Part::Label => 8,
                Part::Sample => 9,
                Part::Exemplar => 10,
                Part::Histogram => 11,
            },
        }
    }

    /// A short fixed label for metrics.
    pub fn reason(&self) -> &'static str {
        Self::REASONS[self.index()]
    }

    fn malformed(part: Part) -> impl Fn(DecodeError) -> Invalid {
        move |e| match e {
            DecodeError::Malformed { what, at } => Invalid::Malformed {
                part,
                what,
                at: at as u32,
            },
            // Only `Reader` errors are turned into an `Invalid`.
            _ => Invalid::Malformed {
                part,
                what: "undecodable",
                at: 0,
            },
        }
    }

    /// What is wrong, as the end of a sentence about the series, with the
    /// label names it mentions read from `buf` (quoted and cut short, so
    /// that the line stays one line).
    pub fn describe(&self, buf: &[u8]) -> String {
        Describe { invalid: self, buf }.to_string()
    }
}

struct Describe<'a> {
    invalid: &'a Invalid,
    buf: &'a [u8],
}

impl fmt::Display for Describe<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let quoted = |s: Span| {
            let bytes = s.get(self.buf);
            let cut = &bytes[..bytes.len().min(64)];
            let text = String::from_utf8_lossy(cut);
            if cut.len() < bytes.len() {
                format!("{text:?}...")
            } else {
                format!("{text:?}")
            }
        };
        match *self.invalid {
            Invalid::EmptyLabelName => write!(f, "has a label with an empty name"),
            Invalid::DuplicateLabelName { name } => {
                write!(f, "has the label name {} more than once", quoted(name))
            }
            Invalid::MissingMetricName => write!(f, "has no __name__ label"),
            Invalid::EmptyMetricName => write!(f, "has an empty __name__"),
            Invalid::OverLimit(OverLimit::TooManyLabels { count, limit }) => {
                write!(f, "has {count} labels, the limit is {limit}")
            }
            Invalid::OverLimit(OverLimit::LabelNameTooLong { len, limit }) => {
                write!(f, "has a label name of {len} bytes, the limit is {limit}")
            }
            Invalid::OverLimit(OverLimit::LabelValueTooLong { name, len, limit }) => write!(
                f,
                "has a value of {len} bytes for label {}, the limit is {limit}",
                quoted(name)
            ),
            Invalid::Malformed { part, what, at } => {
                let part = match part {
                    Part::Series => "its fields",
                    Part::Label => "a label",
                    Part::Sample => "a sample",
                    Part::Exemplar => "an exemplar",
                    Part::Histogram => "a histogram",
                };
                write!(f, "does not decode: {part}: {what} at byte {at}")
            }
        }
    }
}

/// The series refused in one request, by reason.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Refused {
    /// Series refused per reason, indexed like [`Invalid::REASONS`].
    pub by_reason: [u32; Invalid::REASONS.len()],
    /// The first one: its position among the request's series (from 0),
    /// and why.
    pub first: Option<(u32, Invalid)>,
}

impl Refused {
    /// Series refused in all.
    pub fn count(&self) -> u32 {
        self.by_reason.iter().sum()
    }

    pub fn add(&mut self, series: u32, why: Invalid) {
        self.by_reason[why.index()] += 1;
        if self.first.is_none() {
            self.first = Some((series, why));
        }
    }
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

    /// A reader over `buf[start..end]`, positions relative to `buf`.
    fn over(buf: &'a [u8], start: usize, end: usize) -> Self {
        Reader::new(&buf[start..end], start)
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
            // The tenth byte holds the 64th bit only (as prost reads it).
            if i == 9 && b > 1 {
                break;
            }
            v |= u64::from(b & 0x7f) << (7 * i);
            if b < 0x80 {
                return Ok(v);
            }
        }
        Err(malformed("varint longer than 64 bits", self.at()))
    }

    /// Reads a field key: (field number, wire type).
    #[inline]
    pub(crate) fn key(&mut self) -> Result<(u32, u8), DecodeError> {
        let k = self.varint()?;
        if k > u64::from(u32::MAX) {
            return Err(malformed("field key larger than 32 bits", self.at()));
        }
        let field = (k >> 3) as u32;
        if field == 0 {
            return Err(malformed("field number 0", self.at()));
        }
        Ok((field, (k & 7) as u8))
    }

    /// Reads a length-delimited payload and returns its span (relative to base).
    #[inline]
    pub(crate) fn len_delimited(&mut self) -> Result<(usize, usize), DecodeError> {
        let len = self.varint()?;
        let start = self.pos;
        let end = usize::try_from(len)
            .ok()
            .and_then(|len| start.checked_add(len))
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

    /// Skips field `field` of the given wire type, with `depth` the nesting
    /// budget left (see [`DEPTH`]).
    #[inline]
    pub(crate) fn skip(
        &mut self,
        field: u32,
        wire_type: u8,
        depth: u32,
    ) -> Result<(), DecodeError> {
        if depth == 0 {
            return Err(malformed("groups nested too deep", self.at()));
        }
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
            START_GROUP => self.skip_group(field, depth)?,
            END_GROUP => return Err(malformed("end of a group never started", self.at())),
            _ => return Err(malformed("unsupported wire type", self.at())),
        }
        Ok(())
    }

    /// Skips the fields of a group up to its end marker (no sender uses
    /// groups any more, but a decoder must skip them as unknown fields).
    #[cold]
    #[inline(never)]
    fn skip_group(&mut self, field: u32, depth: u32) -> Result<(), DecodeError> {
        loop {
            let (inner, wt) = self.key()?;
            if wt == END_GROUP {
                if inner != field {
                    return Err(malformed("group ends with another field number", self.at()));
                }
                return Ok(());
            }
            self.skip(inner, wt, depth - 1)?;
        }
    }
}

/// Decodes a `prometheus.WriteRequest` from `buf` into `out` (cleared first).
/// Labels of each series are sorted by name if the sender did not sort them.
/// Invalid series are left out and counted in [`Decoded::refused`]; an
/// error means the whole request is refused (see the module docs).
pub fn decode(buf: &[u8], limits: &ShapeLimits, out: &mut Decoded) -> Result<(), DecodeError> {
    out.clear();
    if buf.len() > u32::MAX as usize {
        return Err(malformed("message larger than 4 GiB", 0));
    }
    let mut r = Reader::new(buf, 0);
    let mut seen = 0usize;
    while !r.done() {
        let (field, wt) = r.key()?;
        match (field, wt) {
            (1, LEN) => {
                if seen >= limits.max_series {
                    return Err(DecodeError::TooManySeries {
                        limit: limits.max_series,
                    });
                }
                let (s, e) = r.len_delimited()?;
                decode_series(buf, s, e, limits, seen as u32, out)?;
                seen += 1;
            }
            (3, LEN) => {
                let (s, e) = r.len_delimited()?;
                check_metadata(buf, s, e)?;
                out.metadata += 1;
            }
            (1 | 3, _) => return Err(malformed("wrong wire type for WriteRequest field", r.at())),
            (field, wt) => r.skip(field, wt, DEPTH)?,
        }
    }
    Ok(())
}

/// Checks that a `MetricMetadata` decodes as prost decodes it (its
/// strings UTF-8): it is not forwarded, but a request holding one that
/// does not decode is not a valid `WriteRequest`.
fn check_metadata(buf: &[u8], start: usize, end: usize) -> Result<(), DecodeError> {
    let mut r = Reader::over(buf, start, end);
    while !r.done() {
        match r.key()? {
            (1, VARINT) => {
                r.varint()?;
            }
            (2 | 4 | 5, LEN) => {
                let (s, e) = r.len_delimited()?;
                if std::str::from_utf8(&buf[s..e]).is_err() {
                    return Err(DecodeError::MetadataUtf8 { at: s });
                }
            }
            (1 | 2 | 4 | 5, _) => {
                return Err(malformed(
                    "wrong wire type for MetricMetadata field",
                    r.at(),
                ))
            }
            (field, wt) => r.skip(field, wt, DEPTH - 1)?,
        }
    }
    Ok(())
}

/// What reading a series found besides its labels.
struct Scan<'b> {
    label_bytes: usize,
    labels_sent: usize,
    samples: u32,
    /// The non-label fields, while they stay one contiguous range.
    other: Option<(usize, usize)>,
    other_contiguous: bool,
    /// The first label string that is not UTF-8 (fails the request if the
    /// series otherwise decodes).
    bad_utf8: Option<DecodeError>,
    /// The first label over a length limit.
    too_long: Option<OverLimit>,
    /// The label-set rules, checked as the labels are read.
    sorted: SortedCheck<'b>,
}

/// Decodes the series in `buf[start..end]` (number `index` in the request):
/// pushes it to `out.series` if it is valid, counts it in `out.refused` if
/// not. An error refuses the whole request.
fn decode_series(
    buf: &[u8],
    start: usize,
    end: usize,
    limits: &ShapeLimits,
    index: u32,
    out: &mut Decoded,
) -> Result<(), DecodeError> {
    let labels_start = out.labels.len();
    let mut scan = Scan {
        label_bytes: 0,
        labels_sent: 0,
        samples: 0,
        other: None,
        other_contiguous: true,
        bad_utf8: None,
        too_long: None,
        sorted: SortedCheck::default(),
    };
    let verdict = match scan_series(buf, start, end, limits, &mut scan, &mut out.labels) {
        Err(why) => Err(why),
        Ok(()) => {
            if let Some(e) = scan.bad_utf8 {
                return Err(e);
            }
            if let Some(why) = check_label_count(scan.labels_sent, limits).or(scan.too_long) {
                Err(Invalid::OverLimit(why))
            } else {
                let labels = &mut out.labels[labels_start..];
                scan.sorted
                    .verdict()
                    .unwrap_or_else(|| sort_and_check(buf, labels))
            }
        }
    };
    let name = match verdict {
        Ok(name) => name,
        Err(why) => {
            out.labels.truncate(labels_start);
            out.refused.add(index, why);
            return Ok(());
        }
    };
    let other = match scan.other {
        None => Some(Span::default()),
        Some((s, e)) if scan.other_contiguous => Some(span(s, e)),
        Some(_) => None,
    };
    out.series.push(SeriesRef {
        labels_start: labels_start as u32,
        labels_end: out.labels.len() as u32,
        body: span(start, end),
        other_bytes: ((end - start) - scan.label_bytes) as u32,
        other,
        name,
        samples: scan.samples,
    });
    Ok(())
}

/// Reads every field of a series, pushing its labels (up to the label
/// limit) to `labels`. An error is the part that does not decode.
fn scan_series<'b>(
    buf: &'b [u8],
    start: usize,
    end: usize,
    limits: &ShapeLimits,
    scan: &mut Scan<'b>,
    labels: &mut Vec<LabelRef>,
) -> Result<(), Invalid> {
    let in_series = Invalid::malformed(Part::Series);
    let mut r = Reader::over(buf, start, end);
    while !r.done() {
        let field_start = r.pos;
        let (field, wt) = r.key().map_err(&in_series)?;
        if (field, wt) == (1, LEN) {
            let (ls, le) = r.len_delimited().map_err(&in_series)?;
            let (name, value) = decode_label(buf, ls, le, DEPTH - 2, &mut scan.bad_utf8)
                .map_err(Invalid::malformed(Part::Label))?;
            scan.labels_sent += 1;
            scan.label_bytes += r.pos - field_start;
            if scan.labels_sent > limits.max_labels_per_series {
                continue;
            }
            if scan.too_long.is_none() {
                if let Some(over) = check_lengths(name, value, limits) {
                    scan.too_long = Some(over);
                }
            }
            let label = LabelRef {
                name,
                value,
                field: span(start + field_start, le),
            };
            scan.sorted.push(buf, &label);
            labels.push(label);
            continue;
        }
        match (field, wt) {
            (2, LEN) => {
                let (s, e) = r.len_delimited().map_err(&in_series)?;
                parse_sample(buf, s, e).map_err(Invalid::malformed(Part::Sample))?;
                scan.samples += 1;
            }
            (3, LEN) => {
                let (s, e) = r.len_delimited().map_err(&in_series)?;
                check_exemplar(buf, s, e, &mut scan.bad_utf8)
                    .map_err(Invalid::malformed(Part::Exemplar))?;
            }
            (4, LEN) => {
                let (s, e) = r.len_delimited().map_err(&in_series)?;
                check_histogram(buf, s, e, HISTOGRAM_V1_FIELDS)
                    .map_err(Invalid::malformed(Part::Histogram))?;
                scan.samples += 1;
            }
            (1..=4, _) => {
                return Err(Invalid::Malformed {
                    part: Part::Series,
                    what: "wrong wire type for TimeSeries field",
                    at: r.at() as u32,
                })
            }
            (field, wt) => r.skip(field, wt, DEPTH - 1).map_err(&in_series)?,
        }
        let (fs, fe) = (start + field_start, start + r.pos);
        scan.other = match scan.other {
            None => Some((fs, fe)),
            Some((os, oe)) if oe == fs => Some((os, fe)),
            Some(o) => {
                scan.other_contiguous = false;
                Some(o)
            }
        };
    }
    Ok(())
}

/// A limit as it is reported (`usize::MAX`, no limit, never is).
#[inline]
fn cap(limit: usize) -> u32 {
    limit.min(u32::MAX as usize) as u32
}

/// Too many labels, if `sent` (counted as sent) is over the limit. Too many
/// labels is the reason before a name or value too long, in 1.0 and 2.0.
#[inline]
pub(crate) fn check_label_count(sent: usize, limits: &ShapeLimits) -> Option<OverLimit> {
    (sent > limits.max_labels_per_series).then(|| OverLimit::TooManyLabels {
        count: sent as u32,
        limit: cap(limits.max_labels_per_series),
    })
}

/// The label `name` = `value`'s length limit it is over, the name's first.
#[inline]
pub(crate) fn check_lengths(name: Span, value: Span, limits: &ShapeLimits) -> Option<OverLimit> {
    if name.len() > limits.max_label_name_bytes {
        return Some(OverLimit::LabelNameTooLong {
            len: name.len() as u32,
            limit: cap(limits.max_label_name_bytes),
        });
    }
    if value.len() > limits.max_label_value_bytes {
        return Some(OverLimit::LabelValueTooLong {
            name,
            len: value.len() as u32,
            limit: cap(limits.max_label_value_bytes),
        });
    }
    None
}

/// Checks one series' label set against the rules of the Remote-Write spec
/// that every receiver enforces, sorting it by name first if the sender did
/// not: no empty name, no name twice (`__name__` included), a `__name__`
/// that is not empty. Returns the `__name__` value, the one name every
/// receiver (and so the allowlist) reads.
///
/// Only `name` and `value` of each label are read, so any decoder (the
/// Remote-Write 2.0 one too) can call this over its own label spans.
pub fn check_label_set(buf: &[u8], labels: &mut [LabelRef]) -> Result<Span, Invalid> {
    check_sorted(buf, labels).unwrap_or_else(|| sort_and_check(buf, labels))
}

/// [`check_label_set`] on labels sorted by name; `None` if they are not.
#[inline]
fn check_sorted(buf: &[u8], labels: &[LabelRef]) -> Option<Result<Span, Invalid>> {
    let mut check = SortedCheck::default();
    for l in labels {
        if !check.push(buf, l) {
            break;
        }
    }
    check.verdict()
}

/// [`check_label_set`] of labels found not sorted.
#[cold]
fn sort_and_check(buf: &[u8], labels: &mut [LabelRef]) -> Result<Span, Invalid> {
    labels.sort_unstable_by(|a, b| cmp_names(a.name.get(buf), b.name.get(buf)));
    // Sorted now, so this decides.
    check_sorted(buf, labels).unwrap_or(Err(Invalid::MissingMetricName))
}

/// [`check_label_set`]'s rules over labels taken one at a time, as long as
/// they come sorted by name: the decoder feeds it while it reads a series,
/// so that a sorted series (the usual case) is checked in the same pass.
#[derive(Default)]
struct SortedCheck<'b> {
    /// The previous label's name; `None` before the first.
    prev: Option<&'b [u8]>,
    metric: Option<Span>,
    /// The first rule broken, or that the labels are not sorted (`None`).
    end: Option<Option<Invalid>>,
}

impl<'b> SortedCheck<'b> {
    /// Takes the next label; false (and the label is ignored) once the
    /// verdict is known without the labels after it.
    #[inline(always)]
    fn push(&mut self, buf: &'b [u8], l: &LabelRef) -> bool {
        if self.end.is_some() {
            return false;
        }
        let name = l.name.get(buf);
        match self.prev {
            // The smallest name comes first: only it can be empty.
            None if name.is_empty() => self.end = Some(Some(Invalid::EmptyLabelName)),
            None => {}
            Some(prev) => match cmp_names(prev, name) {
                Ordering::Less => {}
                Ordering::Equal => {
                    self.end = Some(Some(Invalid::DuplicateLabelName { name: l.name }))
                }
                Ordering::Greater => self.end = Some(None),
            },
        }
        if name == b"__name__" {
            self.metric = Some(l.value);
        }
        self.prev = Some(name);
        self.end.is_none()
    }

    /// The verdict on the labels taken; `None` if they are not sorted.
    #[inline]
    fn verdict(self) -> Option<Result<Span, Invalid>> {
        match self.end {
            Some(None) => None,
            Some(Some(why)) => Some(Err(why)),
            None => Some(match self.metric {
                None => Err(Invalid::MissingMetricName),
                Some(v) if v.is_empty() => Err(Invalid::EmptyMetricName),
                Some(v) => Ok(v),
            }),
        }
    }
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

/// Decodes the `Label` message in `buf[start..end]` into its name and value
/// spans. A string that is not UTF-8 is noted in `bad_utf8` (if nothing was
/// noted before) rather than returned: the caller decides once it knows
/// the whole series decodes. `depth` is the nesting budget of its fields.
#[inline(always)]
fn decode_label(
    buf: &[u8],
    start: usize,
    end: usize,
    depth: u32,
    bad_utf8: &mut Option<DecodeError>,
) -> Result<(Span, Span), DecodeError> {
    let msg = &buf[start..end];
    // Fast path: `0x0a <n> name 0x12 <m> value` with one-byte lengths, the
    // shape every sender produces for labels shorter than 128 bytes.
    match msg {
        [0x0a, n, rest @ ..]
            if *n < 0x80
                && rest.len() >= *n as usize + 2
                && rest[*n as usize] == 0x12
                && rest[*n as usize + 1] < 0x80
                && usize::from(rest[*n as usize + 1]) == rest.len() - *n as usize - 2 =>
        {
            let n = *n as usize;
            let (name, value) = (span(start + 2, start + 2 + n), span(start + 4 + n, end));
            // All-ASCII (keys and one-byte lengths are ASCII too) is valid
            // UTF-8: one scan for the whole label.
            if !all_ascii(msg) && bad_utf8.is_none() {
                *bad_utf8 =
                    check_utf8(buf, name, "name").or_else(|| check_utf8(buf, value, "value"));
            }
            Ok((name, value))
        }
        _ => decode_label_slow(buf, Reader::over(buf, start, end), depth, bad_utf8),
    }
}

/// `<[u8]>::is_ascii`, eight bytes at a time, inlined: the standard one
/// is the same word-at-a-time test, but a call, and labels are short.
#[inline(always)]
fn all_ascii(b: &[u8]) -> bool {
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let Some(tail) = b.last_chunk::<8>() else {
        let mut any = 0;
        for &x in b {
            any |= x;
        }
        return any < 0x80;
    };
    // The last eight bytes cover what the whole words leave over. A plain
    // loop: the iterator adapters' fold was not inlined.
    let mut any = u64::from_le_bytes(*tail);
    let mut at = 0;
    while let Some(word) = b.get(at..at + 8) {
        any |= u64::from_le_bytes(word.try_into().expect("8 bytes"));
        at += 8;
    }
    any & HIGH == 0
}

#[inline]
fn check_utf8(buf: &[u8], s: Span, which: &'static str) -> Option<DecodeError> {
    std::str::from_utf8(s.get(buf))
        .is_err()
        .then_some(DecodeError::InvalidUtf8 {
            which,
            at: s.start as usize,
        })
}

/// Any valid encoding of a `Label`: fields in any order, repeated (last
/// wins; every occurrence must be UTF-8, as for any string field),
/// multi-byte lengths, unknown fields skipped.
#[inline(never)]
fn decode_label_slow(
    buf: &[u8],
    mut r: Reader<'_>,
    depth: u32,
    bad_utf8: &mut Option<DecodeError>,
) -> Result<(Span, Span), DecodeError> {
    let start = r.at();
    let mut name = span(start, start);
    let mut value = span(start, start);
    while !r.done() {
        let (field, wt) = r.key()?;
        match (field, wt) {
            (1 | 2, LEN) => {
                let (s, e) = r.len_delimited()?;
                let which = if field == 1 { "name" } else { "value" };
                if bad_utf8.is_none() {
                    *bad_utf8 = check_utf8(buf, span(s, e), which);
                }
                *(if field == 1 { &mut name } else { &mut value }) = span(s, e);
            }
            (1 | 2, _) => return Err(malformed("wrong wire type for Label field", r.at())),
            (field, wt) => r.skip(field, wt, depth)?,
        }
    }
    Ok((name, value))
}

/// Checks that an `Exemplar` decodes: its labels (strings UTF-8, noted in
/// `bad_utf8` like a series' labels), a fixed64 value, a varint timestamp.
fn check_exemplar(
    buf: &[u8],
    start: usize,
    end: usize,
    bad_utf8: &mut Option<DecodeError>,
) -> Result<(), DecodeError> {
    let mut r = Reader::over(buf, start, end);
    while !r.done() {
        let (field, wt) = r.key()?;
        match (field, wt) {
            (1, LEN) => {
                let (s, e) = r.len_delimited()?;
                decode_label(buf, s, e, DEPTH - 3, bad_utf8)?;
            }
            (2, FIXED64) => {
                r.fixed64()?;
            }
            (3, VARINT) => {
                r.varint()?;
            }
            (1..=3, _) => return Err(malformed("wrong wire type for Exemplar field", r.at())),
            (field, wt) => r.skip(field, wt, DEPTH - 2)?,
        }
    }
    Ok(())
}

/// The last `Histogram` field Remote-Write 1.0 knows (`custom_values`).
pub(crate) const HISTOGRAM_V1_FIELDS: u32 = 16;
/// The field 2.0 adds to `Histogram`: the start timestamp.
pub(crate) const HISTOGRAM_V2_FIELDS: u32 = 17;

/// Checks one `Histogram` as prost reads it, down to its bucket spans and
/// packed counts, knowing its fields up to `known` (a field past it is
/// skipped as unknown); true when it carries a start timestamp.
pub(crate) fn check_histogram(
    buf: &[u8],
    start: usize,
    end: usize,
    known: u32,
) -> Result<bool, DecodeError> {
    let mut r = Reader::over(buf, start, end);
    let mut has_start = false;
    while !r.done() {
        match r.key()? {
            (field, wt) if field > known => r.skip(field, wt, DEPTH - 2)?,
            (f @ (1 | 4 | 6 | 14 | 15 | 17), VARINT) => {
                r.varint()?;
                has_start |= f == 17;
            }
            (2 | 3 | 5 | 7 | 10 | 13 | 16, FIXED64) => {
                r.fixed64()?;
            }
            (9 | 12, VARINT) => {
                r.varint()?;
            }
            (8 | 11, LEN) => {
                let (s, e) = r.len_delimited()?;
                let mut span = Reader::over(buf, s, e);
                while !span.done() {
                    match span.key()? {
                        (1 | 2, VARINT) => {
                            span.varint()?;
                        }
                        (1 | 2, _) => {
                            return Err(malformed(
                                "a BucketSpan field has the wrong wire type",
                                span.at(),
                            ))
                        }
                        (field, wt) => span.skip(field, wt, DEPTH - 3)?,
                    }
                }
            }
            (9 | 12, LEN) => {
                let (s, e) = r.len_delimited()?;
                let mut packed = Reader::over(buf, s, e);
                while !packed.done() {
                    packed.varint()?;
                }
            }
            (10 | 13 | 16, LEN) => {
                let (s, e) = r.len_delimited()?;
                if (e - s) % 8 != 0 {
                    return Err(malformed(
                        "packed histogram counts are not whole doubles",
                        r.at(),
                    ));
                }
            }
            _ => {
                return Err(malformed(
                    "a Histogram field has the wrong wire type",
                    r.at(),
                ))
            }
        }
    }
    Ok(has_start)
}

/// One float sample of a series.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub value: f64,
    pub timestamp_ms: i64,
}

/// Decodes the `Sample` message in `buf[start..end]`.
#[inline]
fn parse_sample(buf: &[u8], start: usize, end: usize) -> Result<Sample, DecodeError> {
    let msg = &buf[start..end];
    // Fast path: `0x09 <8 bytes> 0x10 <varint>`, value and then a timestamp
    // of 1 to 9 bytes (any time after 1970), as senders write a sample.
    if let [0x09, v @ .., 0x10, t0, t1, t2, t3, t4, t5] = msg {
        // The timestamp's bytes are the varint's: all but the last have the
        // high bit set. Times from 1971 to 2109 take exactly 6 bytes.
        if v.len() == 8 && [*t0, *t1, *t2, *t3, *t4].iter().all(|b| *b >= 0x80) && *t5 < 0x80 {
            let value = f64::from_bits(u64::from_le_bytes(v.try_into().expect("8 bytes")));
            let ts = [*t0, *t1, *t2, *t3, *t4, *t5]
                .iter()
                .rev()
                .fold(0u64, |acc, b| (acc << 7) | u64::from(b & 0x7f));
            return Ok(Sample {
                value,
                timestamp_ms: ts as i64,
            });
        }
    }
    parse_sample_slow(buf, start, end)
}

#[inline(never)]
fn parse_sample_slow(buf: &[u8], start: usize, end: usize) -> Result<Sample, DecodeError> {
    let mut r = Reader::over(buf, start, end);
    let mut sample = Sample {
        value: 0.0,
        timestamp_ms: 0,
    };
    while !r.done() {
        match r.key()? {
            (1, FIXED64) => sample.value = f64::from_bits(r.fixed64()?),
            (2, VARINT) => sample.timestamp_ms = r.varint()? as i64,
            (1 | 2, _) => return Err(malformed("wrong wire type for Sample field", r.at())),
            (field, wt) => r.skip(field, wt, DEPTH - 2)?,
        }
    }
    Ok(sample)
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
    let mut r = Reader::over(buf, fields.start as usize, fields.end as usize);
    while !r.done() {
        let (field, wt) = r.key()?;
        if (field, wt) != (2, LEN) {
            r.skip(field, wt, DEPTH - 1)?;
            continue;
        }
        let (s, e) = r.len_delimited()?;
        f(parse_sample(buf, s, e)?);
    }
    Ok(())
}

/// One `Sample` message (the same in 1.0 and 2.0).
#[inline]
pub(crate) fn read_sample(buf: &[u8], start: usize, end: usize) -> Result<Sample, DecodeError> {
    parse_sample(buf, start, end)
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

    /// Merges a series' labels (sorted by name; `name` reads a label's
    /// name) with these (sorted too), which replace labels of the same
    /// name: yields each label of the result, in name order. The one merge
    /// of the 1.0 and the 2.0 encoders. An iterator rather than a callback,
    /// so that what each encoder does with a label stays in the encoder's
    /// own loop (a callback called from three places was not inlined: it
    /// made a call per label).
    #[inline(always)]
    pub(crate) fn merge<'s, L: Copy, N: Fn(L) -> &'s [u8]>(
        &'s self,
        labels: &'s [L],
        name: N,
    ) -> Merge<'s, L, N> {
        Merge {
            inject: self,
            labels,
            at: 0,
            next: 0,
            name,
        }
    }
}

/// The labels of a series merged with the [`Injected`] ones: see
/// [`Injected::merge`].
pub(crate) struct Merge<'s, L, N> {
    inject: &'s Injected,
    labels: &'s [L],
    /// The next label of the series.
    at: usize,
    /// The next injected label.
    next: usize,
    name: N,
}

impl<'s, L: Copy, N: Fn(L) -> &'s [u8]> Iterator for Merge<'s, L, N> {
    type Item = Merged<L>;

    #[inline(always)]
    fn next(&mut self) -> Option<Merged<L>> {
        while let Some(&l) = self.labels.get(self.at) {
            if self.next < self.inject.len() {
                match cmp_names(self.inject.name(self.next), (self.name)(l)) {
                    Ordering::Less => {
                        self.next += 1;
                        return Some(Merged::Tenant(self.next - 1));
                    }
                    // Replaced: the injected one comes after.
                    Ordering::Equal => {
                        self.at += 1;
                        continue;
                    }
                    Ordering::Greater => {}
                }
            }
            self.at += 1;
            return Some(Merged::Sent(l));
        }
        (self.next < self.inject.len()).then(|| {
            self.next += 1;
            Merged::Tenant(self.next - 1)
        })
    }
}

/// A label of a merged series ([`Injected::merge`]), in the order they are
/// written: one the series came with, or label `i` of the [`Injected`] set.
#[derive(Clone, Copy)]
pub(crate) enum Merged<L> {
    Sent(L),
    Tenant(usize),
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
    for m in inject.merge(labels, |l| l.name.get(buf)) {
        match m {
            Merged::Sent(l) => run.add(out, buf, l.field),
            Merged::Tenant(i) => {
                run.flush(out, buf);
                out.extend_from_slice(inject.field(i));
            }
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
        if r.skip(field, wt, DEPTH - 1).is_err() {
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
        assert_eq!(
            label_names(&got.timeseries[0].labels),
            ["__name__", "a", "tenant_id", "zone"]
        );
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
        assert_eq!(d.series[0].name.get(&buf), b"x");
    }

    /// `depth` groups of field `field` nested, a varint innermost: bodies
    /// whose nesting the decoders refuse exactly where prost does.
    pub(crate) fn nested_groups(field: u8, depth: usize) -> Vec<u8> {
        let mut g = vec![(field << 3) | 3; depth];
        g.extend_from_slice(&[0x08, 0x01]);
        g.extend(std::iter::repeat_n((field << 3) | 4, depth));
        g
    }

    /// The names of a series' labels, in the order it carries them.
    pub(crate) fn label_names(labels: &[prompb::Label]) -> Vec<&str> {
        labels.iter().map(|l| l.name.as_str()).collect()
    }

    /// The request the shape limits are tested on, the same series in 1.0
    /// and 2.0 (each protocol's `limits_are_enforced` sends it), and what
    /// each limit does there ([`limit_cases`]).
    pub(crate) fn limits_request() -> prompb::WriteRequest {
        prompb::WriteRequest {
            timeseries: vec![
                ts(&[("__name__", "x"), ("a", "1"), ("b", "2")], &[(1.0, 1)]),
                ts(&[("__name__", "y")], &[(1.0, 1)]),
            ],
            metadata: vec![],
        }
    }

    /// What a limit does to [`limits_request`], in both protocols alike.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(crate) enum LimitOutcome {
        /// The whole request is refused.
        Request(DecodeError),
        /// Only the series breaking the limit are refused, the others are
        /// written: the names of those kept, the number refused, and the
        /// first refusal's reason and words (as in the 400's line).
        Series {
            kept: &'static [&'static str],
            refused: u32,
            reason: &'static str,
            first: &'static str,
        },
    }

    /// Each shape limit and its outcome on [`limits_request`]: too many
    /// series refuses the request; the per-series limits refuse the series
    /// alone (a partial write), in 1.0 and 2.0 alike.
    pub(crate) fn limit_cases() -> [(ShapeLimits, LimitOutcome); 4] {
        let lim = |f: fn(&mut ShapeLimits)| {
            let mut l = ShapeLimits::UNLIMITED;
            f(&mut l);
            l
        };
        [
            (
                lim(|l| l.max_series = 1),
                LimitOutcome::Request(DecodeError::TooManySeries { limit: 1 }),
            ),
            (
                lim(|l| l.max_labels_per_series = 2),
                LimitOutcome::Series {
                    kept: &["y"],
                    refused: 1,
                    reason: "too_many_labels",
                    first: "has 3 labels, the limit is 2",
                },
            ),
            (
                lim(|l| l.max_label_name_bytes = 7),
                LimitOutcome::Series {
                    kept: &[],
                    refused: 2,
                    reason: "label_name_too_long",
                    first: "has a label name of 8 bytes, the limit is 7",
                },
            ),
            (
                lim(|l| l.max_label_value_bytes = 0),
                LimitOutcome::Series {
                    kept: &[],
                    refused: 2,
                    reason: "label_value_too_long",
                    first: "has a value of 1 bytes for label \"__name__\", the limit is 0",
                },
            ),
        ]
    }

    /// What one protocol's decode of [`limits_request`] under some limits
    /// came to: the names of the series kept, in order; how many were
    /// refused; the first refusal's reason and words.
    pub(crate) struct LimitSeen {
        pub kept: Vec<Vec<u8>>,
        pub refused: u32,
        pub first: Option<(&'static str, String)>,
    }

    /// Checks each of [`limit_cases`] against `run`, one protocol's decode
    /// of [`limits_request`] under the case's limits: the two protocols
    /// refuse alike.
    pub(crate) fn assert_limit_cases(
        mut run: impl FnMut(&ShapeLimits) -> Result<LimitSeen, DecodeError>,
    ) {
        for (limits, want) in limit_cases() {
            let seen = run(&limits);
            let LimitOutcome::Series {
                kept,
                refused,
                reason,
                first,
            } = want
            else {
                assert_eq!(seen.map(|_| ()).map_err(LimitOutcome::Request), Err(want));
                continue;
            };
            let seen = seen.unwrap();
            let kept: Vec<&[u8]> = kept.iter().map(|n| n.as_bytes()).collect();
            assert_eq!(seen.kept, kept, "{reason}");
            assert_eq!(seen.refused, refused, "{reason}");
            assert_eq!(seen.first, Some((reason, first.to_string())));
        }
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
    fn all_ascii_is_is_ascii() {
        for len in 0..40 {
            let mut b = vec![b'a'; len];
            assert!(all_ascii(&b), "{len}");
            for at in 0..len {
                b[at] = 0x80;
                assert!(!all_ascii(&b), "{len}, high bit at {at}");
                b[at] = 0x7f;
                assert!(all_ascii(&b), "{len}, 0x7f at {at}");
                b[at] = b'a';
            }
        }
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

    /// A `WriteRequest` field 1 around `series` (a `TimeSeries` body).
    fn request_of(series: &[Vec<u8>]) -> Vec<u8> {
        let mut buf = Vec::new();
        for s in series {
            buf.push(0x0a);
            put_varint(&mut buf, s.len() as u64);
            buf.extend_from_slice(s);
        }
        buf
    }

    fn field(out: &mut Vec<u8>, key: u8, body: &[u8]) {
        out.push(key);
        put_varint(out, body.len() as u64);
        out.extend_from_slice(body);
    }

    fn label_msg(n: &[u8], v: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        field(&mut m, 0x0a, n);
        field(&mut m, 0x12, v);
        m
    }

    type Pair = (Vec<u8>, Vec<u8>);

    fn l(n: &[u8], v: &[u8]) -> Pair {
        (n.to_vec(), v.to_vec())
    }

    /// A `TimeSeries` body with these labels (as given, unsorted or
    /// repeated) and one sample.
    fn raw_series(labels: &[Pair]) -> Vec<u8> {
        let mut s = Vec::new();
        for (n, v) in labels {
            field(&mut s, 0x0a, &label_msg(n, v));
        }
        let sample = prompb::Sample {
            value: 1.0,
            timestamp: 1_700_000_000_000,
        }
        .encode_to_vec();
        field(&mut s, 0x12, &sample);
        s
    }

    /// A series named `x` followed by the raw fields `extra`.
    fn with(extra: &[u8]) -> Vec<u8> {
        let mut s = Vec::new();
        field(&mut s, 0x0a, &label_msg(b"__name__", b"x"));
        s.extend_from_slice(extra);
        s
    }

    fn good() -> Vec<u8> {
        raw_series(&[l(b"__name__", b"up"), l(b"job", b"a")])
    }

    /// Decodes `buf`, expecting success, and returns (names of the valid
    /// series, reasons refused in order of `REASONS`, first refused index).
    fn verdicts(buf: &[u8]) -> (Vec<String>, Vec<(&'static str, u32)>, Option<u32>) {
        let mut d = Decoded::default();
        decode(buf, &ShapeLimits::UNLIMITED, &mut d).unwrap();
        let names = d
            .series
            .iter()
            .map(|s| String::from_utf8(s.name.get(buf).to_vec()).unwrap())
            .collect();
        let reasons = Invalid::REASONS
            .iter()
            .zip(d.refused.by_reason)
            .filter(|(_, n)| *n > 0)
            .map(|(r, n)| (*r, n))
            .collect();
        (names, reasons, d.refused.first.map(|(i, _)| i))
    }

    #[test]
    fn label_sets_the_spec_forbids_are_refused_alone() {
        let cases: [(Vec<Pair>, &str); 7] = [
            (vec![l(b"__name__", b"x"), l(b"", b"v")], "empty_label_name"),
            (
                vec![l(b"__name__", b"x"), l(b"job", b"a"), l(b"job", b"b")],
                "duplicate_label_name",
            ),
            // Unsorted, the repeat far apart: found after sorting.
            (
                vec![
                    l(b"job", b"a"),
                    l(b"__name__", b"x"),
                    l(b"zone", b"z"),
                    l(b"job", b"a"),
                ],
                "duplicate_label_name",
            ),
            (
                vec![l(b"__name__", b"up"), l(b"__name__", b"go_goroutines")],
                "duplicate_label_name",
            ),
            (vec![l(b"job", b"a")], "missing_metric_name"),
            (vec![], "missing_metric_name"),
            (
                vec![l(b"__name__", b""), l(b"job", b"a")],
                "empty_metric_name",
            ),
        ];
        for (labels, reason) in cases {
            let buf = request_of(&[good(), raw_series(&labels), good()]);
            let (names, reasons, first) = verdicts(&buf);
            assert_eq!(names, ["up", "up"], "{reason}");
            assert_eq!(reasons, [(reason, 1)], "{labels:?}");
            assert_eq!(first, Some(1));
        }
    }

    #[test]
    fn the_allowlist_reads_the_one_metric_name() {
        // Whichever `__name__` a reader would take, the series is refused,
        // so no reader can see a name the allowlist did not check.
        for names in [
            [b"up".as_slice(), b"go_goroutines"],
            [b"go_goroutines", b"up"],
        ] {
            let buf = request_of(&[raw_series(&[
                l(b"__name__", names[0]),
                l(b"__name__", names[1]),
            ])]);
            let (kept, reasons, _) = verdicts(&buf);
            assert!(kept.is_empty());
            assert_eq!(reasons, [("duplicate_label_name", 1)]);
        }
        let buf = request_of(&[raw_series(&[l(b"job", b"a"), l(b"__name__", b"up")])]);
        assert_eq!(verdicts(&buf).0, ["up"]);
    }

    #[test]
    fn parts_that_do_not_decode_refuse_their_series() {
        let mut cases: Vec<(Vec<u8>, &str)> = Vec::new();
        // A sample whose value is a varint, not a fixed64.
        cases.push((with(&[0x12, 0x02, 0x08, 0x01]), "malformed_sample"));
        // A sample whose timestamp is a fixed32.
        cases.push((with(&[0x12, 0x05, 0x15, 1, 2, 3, 4]), "malformed_sample"));
        // Garbage inside a sample: a length past its end.
        cases.push((with(&[0x12, 0x03, 0x1a, 0x09, 0x00]), "malformed_sample"));
        // A truncated fixed64 inside a sample.
        cases.push((with(&[0x12, 0x04, 0x09, 1, 2, 3]), "malformed_sample"));
        // An exemplar whose value is a varint; one with a truncated label.
        cases.push((with(&[0x1a, 0x02, 0x10, 0x01]), "malformed_exemplar"));
        cases.push((with(&[0x1a, 0x03, 0x0a, 0x05, 0x0a]), "malformed_exemplar"));
        // A histogram holding an end-group marker and a truncated varint.
        cases.push((with(&[0x22, 0x01, 0x0c]), "malformed_histogram"));
        cases.push((with(&[0x22, 0x02, 0x08, 0x80]), "malformed_histogram"));
        // A histogram whose float count (a double) is length-delimited, one
        // whose bucket span offset is a fixed32, one whose packed counts
        // are not whole doubles.
        cases.push((with(&[0x22, 0x03, 0x12, 0x01, 0x00]), "malformed_histogram"));
        cases.push((
            with(&[0x22, 0x07, 0x42, 0x05, 0x0d, 1, 2, 3, 4]),
            "malformed_histogram",
        ));
        cases.push((with(&[0x22, 0x03, 0x52, 0x01, 0x00]), "malformed_histogram"));
        // Samples as a varint field; an unknown field with wire type 7.
        cases.push((with(&[0x10, 0x01]), "malformed_series"));
        cases.push((with(&[0x7f, 0x00]), "malformed_series"));
        // A label whose name is a varint.
        cases.push((with(&[0x0a, 0x02, 0x08, 0x01]), "malformed_label"));
        for (series, reason) in cases {
            let buf = request_of(&[good(), series.clone()]);
            prompb::WriteRequest::decode(buf.as_slice()).expect_err("prost refuses it too");
            let (names, reasons, first) = verdicts(&buf);
            assert_eq!(names, ["up"], "{series:x?}");
            assert_eq!(reasons, [(reason, 1)], "{series:x?}");
            assert_eq!(first, Some(1));
        }
    }

    #[test]
    fn odd_but_valid_encodings_are_accepted_as_prost_accepts_them() {
        let cases: Vec<Vec<u8>> = vec![
            // An empty sample (value 0 and timestamp 0 are left out).
            with(&[0x12, 0x00]),
            // A sample with an unknown fixed32 field and the fields reversed.
            with(&[
                0x12, 0x10, 0x10, 0x05, 0x1d, 1, 2, 3, 4, 0x09, 0, 0, 0, 0, 0, 0, 0xf0, 0x3f,
            ]),
            // A group (field 5) holding a varint, skipped as unknown.
            with(&[0x2b, 0x08, 0x01, 0x2c]),
            // A histogram with an integer count, and bytes in field 17 (the
            // start timestamp 2.0 adds, unknown to 1.0) and in field 20.
            with(&[
                0x22, 0x0b, 0x08, 0x96, 0x01, 0x8a, 0x01, 0x01, 0x00, 0xa2, 0x01, 0x01, 0x00,
            ]),
            // A ten-byte varint timestamp (negative).
            with(&[
                0x12, 0x0b, 0x10, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
            ]),
        ];
        for series in cases {
            let buf = request_of(std::slice::from_ref(&series));
            prompb::WriteRequest::decode(buf.as_slice()).expect("prost accepts it");
            assert_eq!(
                verdicts(&buf),
                (vec!["x".to_string()], vec![], None),
                "{series:x?}"
            );
        }
        // A ten-byte varint whose last byte carries more than the 64th bit.
        let series = with(&[
            0x12, 0x0b, 0x10, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02,
        ]);
        let buf = request_of(&[series]);
        prompb::WriteRequest::decode(buf.as_slice()).expect_err("prost refuses it");
        assert_eq!(verdicts(&buf).1, [("malformed_sample", 1)]);
    }

    /// Found by the fuzzer (`crate::fuzz`): metadata entries were only
    /// delimited, so a request prost refuses (a metadata field of the wrong
    /// wire type, a string that is not UTF-8) was accepted.
    #[test]
    fn metadata_decodes_as_prost_decodes_it() {
        let series = {
            let mut s = Vec::new();
            field(&mut s, 0x0a, &label_msg(b"__name__", b"up"));
            s
        };
        let with_metadata = |m: &[u8]| {
            let mut buf = request_of(std::slice::from_ref(&series));
            field(&mut buf, 0x1a, m);
            buf
        };
        let cases: [(&[u8], bool); 7] = [
            // type, family name, help, unit.
            (
                &[
                    0x08, 0x03, 0x12, 0x01, b'u', 0x22, 0x01, b'h', 0x2a, 0x01, b's',
                ],
                true,
            ),
            // An unknown field.
            (&[0x30, 0x05], true),
            // help as a varint.
            (&[0x20, 0x04], false),
            // type as a string.
            (&[0x0a, 0x00], false),
            // A family name that is not UTF-8.
            (&[0x12, 0x01, 0xff], false),
            // A unit that is not UTF-8.
            (&[0x2a, 0x02, 0xc3, 0x28], false),
            // A length past the end.
            (&[0x22, 0x05, b'h'], false),
        ];
        let mut d = Decoded::default();
        for (m, ok) in cases {
            let buf = with_metadata(m);
            let prost_ok = prompb::WriteRequest::decode(buf.as_slice()).is_ok();
            assert_eq!(prost_ok, ok, "{m:x?}: prost");
            let got = decode(&buf, &ShapeLimits::UNLIMITED, &mut d);
            assert_eq!(got.is_ok(), ok, "{m:x?}: {got:?}");
            if ok {
                assert_eq!((d.series.len(), d.metadata), (1, 1));
            }
        }
        let buf = with_metadata(&[0x12, 0x01, 0xff]);
        assert_eq!(
            decode(&buf, &ShapeLimits::UNLIMITED, &mut d),
            Err(DecodeError::MetadataUtf8 { at: buf.len() - 1 })
        );
    }

    #[test]
    fn groups_nest_as_deep_as_prost_allows() {
        // `depth` groups of field 5 nested in a sample.
        let nested = |depth: usize| {
            let mut s = Vec::new();
            field(&mut s, 0x0a, &label_msg(b"__name__", b"x"));
            field(&mut s, 0x12, &nested_groups(5, depth));
            request_of(&[s])
        };
        let mut d = Decoded::default();
        let mut deepest = None;
        for depth in 90..110 {
            let buf = nested(depth);
            let prost_ok = prompb::WriteRequest::decode(buf.as_slice()).is_ok();
            decode(&buf, &ShapeLimits::UNLIMITED, &mut d).unwrap();
            assert_eq!(d.series.len() == 1, prost_ok, "depth {depth}");
            if prost_ok {
                deepest = Some(depth);
            }
        }
        // The edge is inside the range tried.
        assert!(matches!(deepest, Some(90..=108)), "{deepest:?}");
    }

    #[test]
    fn a_series_that_does_not_decode_is_refused_whatever_its_labels_hold() {
        // Invalid UTF-8 in a label, then a sample that does not decode: the
        // series is refused, the request goes on.
        let mut s = raw_series(&[l(b"__name__", b"x"), l(b"job", b"\xff")]);
        s.extend_from_slice(&[0x12, 0x02, 0x08, 0x01]);
        let buf = request_of(&[good(), s]);
        assert_eq!(verdicts(&buf).1, [("malformed_sample", 1)]);
    }

    #[test]
    fn limits_are_enforced() {
        // The table shared with 2.0: the two protocols refuse alike.
        let buf = limits_request().encode_to_vec();
        let mut d = Decoded::default();
        assert_limit_cases(|limits| {
            decode(&buf, limits, &mut d)?;
            Ok(LimitSeen {
                kept: d.series.iter().map(|s| s.name.get(&buf).to_vec()).collect(),
                refused: d.refused.count(),
                first: d
                    .refused
                    .first
                    .map(|(_, why)| (why.reason(), why.describe(&buf))),
            })
        });
        let lim = |f: fn(&mut ShapeLimits)| {
            let mut l = ShapeLimits::UNLIMITED;
            f(&mut l);
            l
        };
        // Too many series refuses the request.
        assert_eq!(
            decode(&buf, &lim(|l| l.max_series = 1), &mut d),
            Err(DecodeError::TooManySeries { limit: 1 })
        );
        // The per-series limits refuse the series that breaks them.
        let refused = |l: ShapeLimits, d: &mut Decoded| {
            decode(&buf, &l, d).unwrap();
            let names: Vec<&[u8]> = d.series.iter().map(|s| s.name.get(&buf)).collect();
            (names, d.refused.first)
        };
        let (names, first) = refused(lim(|l| l.max_labels_per_series = 2), &mut d);
        assert_eq!(names, [b"y"]);
        assert_eq!(
            first,
            Some((
                0,
                Invalid::OverLimit(OverLimit::TooManyLabels { count: 3, limit: 2 })
            ))
        );
        let (names, first) = refused(lim(|l| l.max_label_name_bytes = 7), &mut d);
        assert!(names.is_empty());
        assert_eq!(
            first,
            Some((
                0,
                Invalid::OverLimit(OverLimit::LabelNameTooLong { len: 8, limit: 7 })
            ))
        );
        assert_eq!(d.refused.count(), 2);
        let (names, first) = refused(lim(|l| l.max_label_value_bytes = 0), &mut d);
        assert!(names.is_empty());
        assert!(matches!(
            first,
            Some((
                0,
                Invalid::OverLimit(OverLimit::LabelValueTooLong {
                    len: 1,
                    limit: 0,
                    ..
                })
            ))
        ));
        // Labels past the count limit are not kept in the index.
        let many: Vec<(String, String)> = (0..1000)
            .map(|i| (format!("l{i:04}"), "v".into()))
            .collect();
        let mut labels: Vec<(&str, &str)> = vec![("__name__", "x")];
        labels.extend(many.iter().map(|(n, v)| (n.as_str(), v.as_str())));
        let buf = prompb::WriteRequest {
            timeseries: vec![ts(&labels, &[(1.0, 1)])],
            metadata: vec![],
        }
        .encode_to_vec();
        decode(&buf, &lim(|l| l.max_labels_per_series = 10), &mut d).unwrap();
        assert_eq!(
            d.refused.first,
            Some((
                0,
                Invalid::OverLimit(OverLimit::TooManyLabels {
                    count: 1001,
                    limit: 10
                })
            ))
        );
        assert!(d.labels.is_empty());
    }

    #[test]
    fn refusals_describe_themselves_in_one_line() {
        let buf = request_of(&[raw_series(&[
            l(b"__name__", b"x"),
            l(b"jo\nb", b"a"),
            l(b"jo\nb", b"b"),
        ])]);
        let mut d = Decoded::default();
        decode(&buf, &ShapeLimits::UNLIMITED, &mut d).unwrap();
        let (_, why) = d.refused.first.unwrap();
        let text = why.describe(&buf);
        assert_eq!(text, r#"has the label name "jo\nb" more than once"#);
        let long = vec![b'n'; 300];
        let buf = request_of(&[raw_series(&[
            l(b"__name__", b"x"),
            l(&long, b"a"),
            l(&long, b"b"),
        ])]);
        decode(&buf, &ShapeLimits::UNLIMITED, &mut d).unwrap();
        let text = d.refused.first.unwrap().1.describe(&buf);
        assert!(text.len() < 110 && text.contains("nnn\"..."), "{text}");
    }

    #[test]
    fn truncations_end_at_a_series_boundary_or_refuse_the_request() {
        let req = prompb::WriteRequest {
            timeseries: vec![
                ts(&[("__name__", "x"), ("a", "1")], &[(1.0, 1)]),
                ts(&[("__name__", "y"), ("b", "2")], &[(2.0, 2), (3.0, 3)]),
            ],
            metadata: vec![],
        };
        let buf = req.encode_to_vec();
        let first_len = 2 + req.timeseries[0].encoded_len();
        let mut d = Decoded::default();
        for cut in 0..=buf.len() {
            let got = decode(&buf[..cut], &ShapeLimits::UNLIMITED, &mut d);
            let ok = got.is_ok();
            let prost = prompb::WriteRequest::decode(&buf[..cut]);
            match cut {
                0 => assert_eq!((got, d.series.len()), (Ok(()), 0)),
                c if c == first_len => assert_eq!((got, d.series.len()), (Ok(()), 1)),
                c if c == buf.len() => assert_eq!((got, d.series.len()), (Ok(()), 2)),
                _ => assert!(
                    matches!(got, Err(DecodeError::Malformed { .. })),
                    "cut at {cut}: {got:?}"
                ),
            }
            // prost agrees on every cut.
            assert_eq!(ok, prost.is_ok(), "cut at {cut}");
            assert_eq!(d.refused.count(), 0);
        }
        assert!(matches!(
            decode(b"\x0a\xff\xff\xff\xff\x0f", &ShapeLimits::UNLIMITED, &mut d),
            Err(DecodeError::Malformed { .. })
        ));
    }

    #[test]
    fn bad_utf8_refuses_the_request() {
        let exemplar = |n: &[u8], v: &[u8]| {
            let mut e = Vec::new();
            field(&mut e, 0x0a, &label_msg(n, v));
            let mut s = raw_series(&[l(b"__name__", b"x")]);
            field(&mut s, 0x1a, &e);
            s
        };
        // A long value takes the slow path (two-byte length).
        let long_bad = [b"v".repeat(200), b"\xc3\x28".to_vec()].concat();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                raw_series(&[l(b"__name__", b"x"), l(b"j\xffb", b"a")]),
                "name",
            ),
            (
                raw_series(&[l(b"__name__", b"x"), l(b"job", b"\xc3\x28")]),
                "value",
            ),
            (
                raw_series(&[l(b"__name__", b"x"), l(b"job", &long_bad)]),
                "value",
            ),
            (exemplar(b"trace_id", b"\xe2\x28\xa1"), "value"),
            (exemplar(b"\xf0\x28", b"t"), "name"),
        ];
        for (series, which) in cases {
            let buf = request_of(&[good(), series]);
            let mut d = Decoded::default();
            let err = decode(&buf, &ShapeLimits::UNLIMITED, &mut d).unwrap_err();
            let DecodeError::InvalidUtf8 { which: w, at } = err else {
                panic!("{err:?}")
            };
            assert_eq!(w, which);
            // `at` is where the bad string starts.
            assert!(std::str::from_utf8(&buf[at..]).is_err() && at > good().len());
            prompb::WriteRequest::decode(buf.as_slice()).expect_err("prost refuses it too");
        }
        // A repeated name whose overwritten first occurrence is not UTF-8.
        let mut label = Vec::new();
        field(&mut label, 0x0a, b"\xff");
        field(&mut label, 0x0a, b"job");
        field(&mut label, 0x12, b"a");
        let mut s = raw_series(&[l(b"__name__", b"x")]);
        field(&mut s, 0x0a, &label);
        let buf = request_of(&[s]);
        let mut d = Decoded::default();
        assert!(matches!(
            decode(&buf, &ShapeLimits::UNLIMITED, &mut d),
            Err(DecodeError::InvalidUtf8 { which: "name", .. })
        ));
    }

    #[test]
    fn check_label_set_sorts_and_names_the_metric() {
        let buf = b"zone__name__upjob";
        let l = |n: (u32, u32), v: (u32, u32)| LabelRef {
            name: Span {
                start: n.0,
                end: n.1,
            },
            value: Span {
                start: v.0,
                end: v.1,
            },
            field: Span::default(),
        };
        let mut labels = [
            l((0, 4), (13, 14)),
            l((4, 12), (12, 14)),
            l((14, 17), (0, 1)),
        ];
        let name = check_label_set(buf, &mut labels).unwrap();
        assert_eq!(name.get(buf), b"up");
        let names: Vec<&[u8]> = labels.iter().map(|l| l.name.get(buf)).collect();
        assert_eq!(names, [b"__name__".as_slice(), b"job", b"zone"]);
        let mut dup = [
            l((14, 17), (0, 1)),
            l((4, 12), (12, 14)),
            l((14, 17), (0, 2)),
        ];
        assert_eq!(
            check_label_set(buf, &mut dup),
            Err(Invalid::DuplicateLabelName {
                name: Span { start: 14, end: 17 }
            })
        );
    }
}
