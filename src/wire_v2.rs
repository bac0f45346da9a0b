//! Remote-Write 2.0 wire format (`io.prometheus.write.v2.Request`, spec
//! 2.0-rc.4), decoded in place as [`crate::wire`] decodes 1.0, and encoded
//! again in one of two forms:
//!
//! - Remote-Write 1.0 ([`encode_series_v1`], [`encode_metadata_v1`]), for
//!   upstreams that take only 1.0 (every released Thanos): labels resolved
//!   from the symbol table, samples copied as they came (a 2.0 `Sample` is
//!   a 1.0 `Sample` on the wire unless it carries a start timestamp),
//!   histograms copied under their 1.0 field number, exemplars rebuilt with
//!   their labels, and per-series metadata folded into one 1.0
//!   `MetricMetadata` per metric family.
//! - Remote-Write 2.0 ([`encode_symbols`], [`encode_series_v2`]), for
//!   upstreams that take it: the symbol table as it came with the tenant
//!   labels' strings appended, each series' `labels_refs` rewritten and its
//!   other fields copied byte for byte.
//!
//! The symbol table is indexed, not copied: a symbol is a [`Span`] of the
//! decompressed body and a label is a pair of symbol indices, so decoding
//! allocates nothing per label (the index vectors are reused across
//! requests). The prost types in [`crate::prompb_v2`] are the reference
//! these are tested against.
//!
//! What is refused, and how much of the request it takes with it:
//! - the whole request (400): bad protobuf framing of the `Request`, a
//!   symbol table that does not start with the empty string, a symbol that
//!   is not UTF-8, and the shape limits of [`ShapeLimits`], as for 1.0;
//! - one series (a partial write, [`Invalid`]): an odd number of
//!   `labels_refs`, a reference past the symbol table (in labels, exemplars
//!   or metadata), an empty or repeated label name, a missing or empty
//!   `__name__`, or anything inside the series that does not decode.
//!
//! rc.3 senders put the series' created timestamp in `TimeSeries` field 6,
//! which rc.4 reserves: it is accepted, forwarded to a 2.0 upstream as it
//! came, and dropped for 1.0 (which has no place for it), like the rc.4
//! start timestamps.

use std::cmp::Ordering;
use std::fmt;

use crate::wire::{
    self, check_histogram, check_label_count, check_lengths, cmp_names, label_msg_len, malformed,
    put_label, put_varint, read_sample, varint_len, DecodeError, Injected, Merged, OverLimit,
    Reader, Sample, ShapeLimits, Span, DEPTH, FIXED64, HISTOGRAM_V2_FIELDS, LEN, VARINT,
};

/// The `Content-Type` of a 2.0 request (the media type with its `proto`).
pub const CONTENT_TYPE: &str = "application/x-protobuf;proto=io.prometheus.write.v2.Request";
/// The `proto` parameter naming the 2.0 message.
pub const PROTO: &str = "io.prometheus.write.v2.Request";
/// `X-Prometheus-Remote-Write-Version` of a 2.0 request.
pub const VERSION: &str = "2.0.0";

/// What a 2.0 receiver says it wrote, in the response headers the spec
/// requires on success and on error.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Written {
    pub samples: u64,
    pub histograms: u64,
    pub exemplars: u64,
}

/// `X-Prometheus-Remote-Write-*-Written` header names (in the lower case
/// HTTP/2 requires; names are case-insensitive).
pub const SAMPLES_WRITTEN: &str = "x-prometheus-remote-write-samples-written";
pub const HISTOGRAMS_WRITTEN: &str = "x-prometheus-remote-write-histograms-written";
pub const EXEMPLARS_WRITTEN: &str = "x-prometheus-remote-write-exemplars-written";

impl std::ops::Add for Written {
    type Output = Written;
    fn add(self, o: Written) -> Written {
        Written {
            samples: self.samples + o.samples,
            histograms: self.histograms + o.histograms,
            exemplars: self.exemplars + o.exemplars,
        }
    }
}

impl Written {
    /// The counts a response carries, `None` if it carries none of the
    /// headers (a missing one counts 0, as the spec lets senders assume).
    pub fn from_headers(h: &http::HeaderMap) -> Option<Written> {
        let get = |name: &str| {
            h.get(name)
                .map(|v| v.to_str().ok().and_then(|t| t.trim().parse::<u64>().ok()))
        };
        let (s, hi, e) = (
            get(SAMPLES_WRITTEN),
            get(HISTOGRAMS_WRITTEN),
            get(EXEMPLARS_WRITTEN),
        );
        if s.is_none() && hi.is_none() && e.is_none() {
            return None;
        }
        Some(Written {
            samples: s.flatten().unwrap_or(0),
            histograms: hi.flatten().unwrap_or(0),
            exemplars: e.flatten().unwrap_or(0),
        })
    }

    /// Sets the three headers.
    pub fn insert_into(&self, h: &mut http::HeaderMap) {
        for (name, n) in [
            (SAMPLES_WRITTEN, self.samples),
            (HISTOGRAMS_WRITTEN, self.histograms),
            (EXEMPLARS_WRITTEN, self.exemplars),
        ] {
            h.insert(
                http::HeaderName::from_static(name),
                http::HeaderValue::from(n),
            );
        }
    }
}

/// One label of a series: the indices of its name and value in the symbol
/// table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LabelSyms {
    pub name: u32,
    pub value: u32,
}

/// A series' `Metadata`: the metric type (numbered as 1.0's
/// `MetricMetadata.MetricType`) and the symbols of its help and unit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Meta {
    pub kind: u32,
    pub help: u32,
    pub unit: u32,
}

/// Where the fields of one kind sit in a series: from the first to the last
/// of them, and whether nothing else lies between.
#[derive(Debug, Clone, Copy, Default)]
pub struct FieldRun {
    pub span: Span,
    pub contiguous: bool,
}

impl FieldRun {
    #[inline]
    fn add(&mut self, start: usize, end: usize) {
        let (start, end) = (start as u32, end as u32);
        if self.span.is_empty() {
            *self = FieldRun {
                span: Span { start, end },
                contiguous: true,
            };
        } else {
            self.contiguous &= self.span.end == start;
            self.span.end = end;
        }
    }
}

/// One decoded series.
#[derive(Debug, Clone, Copy, Default)]
pub struct SeriesV2 {
    /// Its labels: a range of the decoder's label table, sorted by name.
    pub labels_start: u32,
    pub labels_end: u32,
    /// The `TimeSeries` message body.
    pub body: Span,
    /// The symbol of `__name__`'s value.
    pub name: Option<u32>,
    pub samples: u32,
    pub histograms: u32,
    pub exemplars: u32,
    pub sample_run: FieldRun,
    pub histogram_run: FieldRun,
    pub exemplar_run: FieldRun,
    /// Every field but `labels_refs` (what a 2.0 upstream gets verbatim).
    pub other: FieldRun,
    pub metadata: Option<Meta>,
    /// Every sample holds only a value and a timestamp, so the samples go
    /// to 1.0 as they came; otherwise each is rewritten with just those.
    pub plain_samples: bool,
    /// Some histogram carries a start timestamp (left out for 1.0).
    pub histogram_start: bool,
    /// Why the series is refused, if it is (a partial write).
    pub invalid: Option<Invalid>,
}

/// Why one series is refused while the rest of the request is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalid {
    /// `labels_refs` (of the series or of an exemplar) has an odd length.
    OddLabelRefs,
    /// A reference past the end of the symbol table.
    SymbolOutOfRange {
        index: u64,
        symbols: u32,
    },
    EmptyLabelName,
    DuplicateLabelName,
    /// No `__name__`, or an empty one.
    MissingName,
    /// Something inside the series does not decode.
    Malformed {
        what: &'static str,
    },
    /// Over one of the per-series [`ShapeLimits`], as in 1.0 (a label
    /// value's `name` is the label name's symbol in the body).
    OverLimit(OverLimit),
}

impl Invalid {
    /// The metric labels of the reasons, by [`Invalid::index`].
    /// The names shared with 1.0 are 1.0's ([`wire::Invalid::REASONS`]).
    pub const REASONS: [&'static str; 9] = [
        "odd_labels_refs",
        "symbol_out_of_range",
        "empty_label_name",
        "duplicate_label_name",
        "missing_metric_name",
        "malformed_series",
        "too_many_labels",
        "label_name_too_long",
        "label_value_too_long",
    ];

    /// The reason's place in [`Invalid::REASONS`].
    pub fn index(&self) -> usize {
        match self {
            Invalid::OddLabelRefs => 0,
            Invalid::SymbolOutOfRange { .. } => 1,
            Invalid::EmptyLabelName => 2,
            Invalid::DuplicateLabelName => 3,
            Invalid::MissingName => 4,
            Invalid::Malformed { .. } => 5,
            Invalid::OverLimit(o) => 6 + o.index(),
        }
    }

    /// The same refusal in 1.0's terms, for the reasons 1.0 also has a
    /// series for (the shape limits): one wording and one reason name.
    pub fn as_v1(&self) -> Option<wire::Invalid> {
        match *self {
            Invalid::OverLimit(o) => Some(wire::Invalid::OverLimit(o)),
            _ => None,
        }
    }

    /// What is wrong, as the end of a sentence about the series (label
    /// names it mentions read from `buf`, the request's body), worded as
    /// 1.0 words the refusals the two share.
    pub fn describe(&self, buf: &[u8]) -> String {
        match self.as_v1() {
            Some(v1) => v1.describe(buf),
            None => format!("is invalid: {self}"),
        }
    }

    /// A short fixed label for metrics.
    pub fn reason(&self) -> &'static str {
        Self::REASONS[self.index()]
    }
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Invalid::OddLabelRefs => f.write_str("labels_refs has an odd number of entries"),
            Invalid::SymbolOutOfRange { index, symbols } => write!(
                f,
                "symbol reference {index} is past the end of the symbol table ({symbols} symbols)"
            ),
            Invalid::EmptyLabelName => f.write_str("a label name is empty"),
            Invalid::DuplicateLabelName => f.write_str("a label name appears twice"),
            Invalid::MissingName => f.write_str("__name__ is missing or empty"),
            Invalid::Malformed { what } => write!(f, "{what}"),
            Invalid::OverLimit(OverLimit::TooManyLabels { count, limit }) => {
                write!(f, "{count} labels, the limit is {limit}")
            }
            Invalid::OverLimit(OverLimit::LabelNameTooLong { len, limit }) => {
                write!(f, "a label name of {len} bytes, the limit is {limit}")
            }
            Invalid::OverLimit(OverLimit::LabelValueTooLong { len, limit, .. }) => {
                write!(f, "a label value of {len} bytes, the limit is {limit}")
            }
        }
    }
}

/// The index of a decoded `Request`; reusable across requests.
#[derive(Debug, Default)]
pub struct DecodedV2 {
    /// Each symbol's bytes in the body, by index.
    symbols: Vec<Span>,
    /// The `symbols` fields as they came (runs of adjacent fields).
    symbol_fields: Vec<Span>,
    pub series: Vec<SeriesV2>,
    labels: Vec<LabelSyms>,
}

impl DecodedV2 {
    pub fn clear(&mut self) {
        self.symbols.clear();
        self.symbol_fields.clear();
        self.series.clear();
        self.labels.clear();
    }

    /// The bytes of symbol `i` (validated by [`decode`] to be in range).
    #[inline]
    pub fn symbol<'b>(&self, buf: &'b [u8], i: u32) -> &'b [u8] {
        self.symbols[i as usize].get(buf)
    }

    /// The labels of one series.
    #[inline]
    pub fn labels_of(&self, s: &SeriesV2) -> &[LabelSyms] {
        &self.labels[s.labels_start as usize..s.labels_end as usize]
    }

    /// The labels of one series as name/value bytes, sorted by name.
    pub fn label_pairs<'a>(
        &'a self,
        buf: &'a [u8],
        s: &SeriesV2,
    ) -> impl Iterator<Item = (&'a [u8], &'a [u8])> + 'a {
        self.labels_of(s)
            .iter()
            .map(move |l| (self.symbol(buf, l.name), self.symbol(buf, l.value)))
    }

    /// The value of `__name__`.
    #[inline]
    pub fn name<'b>(&self, buf: &'b [u8], s: &SeriesV2) -> Option<&'b [u8]> {
        s.name.map(|n| self.symbol(buf, n))
    }
}

/// Why decoding one series stopped: an error that refuses the whole
/// request, or one that refuses only the series (the shape limits
/// included, as in 1.0).
enum Stop {
    Request(DecodeError),
    Invalid(Invalid),
}

impl From<DecodeError> for Stop {
    fn from(e: DecodeError) -> Stop {
        match e {
            DecodeError::Malformed { what, .. } => Stop::Invalid(Invalid::Malformed { what }),
            other => Stop::Request(other),
        }
    }
}

fn invalid(what: &'static str) -> Stop {
    Stop::Invalid(Invalid::Malformed { what })
}

#[inline]
fn span(start: usize, end: usize) -> Span {
    Span {
        start: start as u32,
        end: end as u32,
    }
}

/// Decodes an `io.prometheus.write.v2.Request` from `buf` into `out`
/// (cleared first). Labels of each series are sorted by name if the sender
/// did not sort them. Series that cannot be written are kept in
/// `out.series` with [`SeriesV2::invalid`] set.
pub fn decode(buf: &[u8], limits: &ShapeLimits, out: &mut DecodedV2) -> Result<(), DecodeError> {
    out.clear();
    if buf.len() > u32::MAX as usize {
        return Err(malformed("message larger than 4 GiB", 0));
    }
    // First the framing: symbols and series may come in any order, and a
    // series can only be read once the whole table is known.
    let mut r = Reader::new(buf, 0);
    while !r.done() {
        let field_start = r.pos;
        let (field, wt) = r.key()?;
        match (field, wt) {
            (4, LEN) => {
                let (s, e) = r.len_delimited()?;
                out.symbols.push(span(s, e));
                match out.symbol_fields.last_mut() {
                    Some(run) if run.end as usize == field_start => run.end = e as u32,
                    _ => out.symbol_fields.push(span(field_start, e)),
                }
            }
            (5, LEN) => {
                if out.series.len() >= limits.max_series {
                    return Err(DecodeError::TooManySeries {
                        limit: limits.max_series,
                    });
                }
                let (s, e) = r.len_delimited()?;
                out.series.push(SeriesV2 {
                    body: span(s, e),
                    plain_samples: true,
                    ..SeriesV2::default()
                });
            }
            (4 | 5, _) => return Err(malformed("wrong wire type for Request field", r.at())),
            (field, wt) => r.skip(field, wt, DEPTH)?,
        }
    }
    check_symbols(buf, out)?;
    for i in 0..out.series.len() {
        let labels_start = out.labels.len();
        let mut s = out.series[i];
        match decode_series(buf, &out.symbols, limits, &mut out.labels, &mut s) {
            Ok(()) => {}
            Err(Stop::Request(e)) => return Err(e),
            Err(Stop::Invalid(why)) => {
                out.labels.truncate(labels_start);
                s.invalid = Some(why);
            }
        }
        s.labels_start = labels_start as u32;
        s.labels_end = out.labels.len() as u32;
        out.series[i] = s;
    }
    Ok(())
}

/// The table must start with the empty string and hold only UTF-8.
fn check_symbols(buf: &[u8], d: &DecodedV2) -> Result<(), DecodeError> {
    match d.symbols.first() {
        Some(first) if !first.is_empty() => {
            return Err(malformed(
                "symbols must start with the empty string",
                first.start as usize,
            ))
        }
        None if !d.series.is_empty() => {
            return Err(malformed(
                "series without a symbol table (it must start with the empty string)",
                0,
            ))
        }
        _ => {}
    }
    // All-ASCII fields (keys, one-byte lengths and ASCII text) are valid
    // UTF-8: one scan per run of fields rather than one call per symbol.
    if d.symbol_fields.iter().all(|run| run.get(buf).is_ascii()) {
        return Ok(());
    }
    for s in &d.symbols {
        if std::str::from_utf8(s.get(buf)).is_err() {
            return Err(DecodeError::InvalidUtf8 {
                which: "name or value",
                at: s.start as usize,
            });
        }
    }
    Ok(())
}

/// Checks a symbol reference against the table.
#[inline]
fn symbol_ref(v: u64, symbols: usize) -> Result<u32, Stop> {
    if v < symbols as u64 {
        Ok(v as u32)
    } else {
        Err(Stop::Invalid(Invalid::SymbolOutOfRange {
            index: v,
            symbols: symbols as u32,
        }))
    }
}

/// The labels of a series as they are read, in pairs.
struct LabelReader<'a> {
    buf: &'a [u8],
    symbols: &'a [Span],
    limits: &'a ShapeLimits,
    start: usize,
    pending: Option<u32>,
    sorted: bool,
    prev: &'a [u8],
    /// Labels sent, kept or not (only the limit's worth is kept).
    sent: u32,
    /// The first label name or value over its limit.
    too_long: Option<OverLimit>,
}

impl<'a> LabelReader<'a> {
    #[inline]
    fn add(&mut self, v: u64, labels: &mut Vec<LabelSyms>) -> Result<(), Stop> {
        let r = symbol_ref(v, self.symbols.len())?;
        let Some(name) = self.pending.take() else {
            self.pending = Some(r);
            return Ok(());
        };
        // As in 1.0, a series over a limit is read to its end (a part that
        // does not decode is the reason then), and too many labels is the
        // reason before a name or value too long.
        self.sent += 1;
        let n = labels.len() - self.start;
        if n >= self.limits.max_labels_per_series {
            return Ok(());
        }
        let name_span = self.symbols[name as usize];
        let name_bytes = name_span.get(self.buf);
        if self.too_long.is_none() {
            self.too_long = check_lengths(name_span, self.symbols[r as usize], self.limits);
        }
        if n > 0 && cmp_names(self.prev, name_bytes) == Ordering::Greater {
            self.sorted = false;
        }
        self.prev = name_bytes;
        labels.push(LabelSyms { name, value: r });
        Ok(())
    }
}

fn decode_series(
    buf: &[u8],
    symbols: &[Span],
    limits: &ShapeLimits,
    labels: &mut Vec<LabelSyms>,
    s: &mut SeriesV2,
) -> Result<(), Stop> {
    let (start, end) = (s.body.start as usize, s.body.end as usize);
    let mut lr = LabelReader {
        buf,
        symbols,
        limits,
        start: labels.len(),
        pending: None,
        sorted: true,
        prev: &[],
        sent: 0,
        too_long: None,
    };
    let mut meta_refs = [None, None];
    let mut r = Reader::new(&buf[start..end], start);
    while !r.done() {
        let field_start = start + r.pos;
        let (field, wt) = r.key()?;
        match (field, wt) {
            (1, LEN) => {
                let (ps, pe) = r.len_delimited()?;
                let mut packed = Reader::new(&buf[ps..pe], ps);
                while !packed.done() {
                    lr.add(packed.varint()?, labels)?;
                }
            }
            (1, VARINT) => lr.add(r.varint()?, labels)?,
            (2, LEN) => {
                let (ps, pe) = r.len_delimited()?;
                s.plain_samples &= check_sample(buf, ps, pe)?;
                s.samples += 1;
                s.sample_run.add(field_start, pe);
            }
            (3, LEN) => {
                let (ps, pe) = r.len_delimited()?;
                s.histogram_start |= check_histogram(buf, ps, pe, HISTOGRAM_V2_FIELDS)?;
                s.histograms += 1;
                s.histogram_run.add(field_start, pe);
            }
            (4, LEN) => {
                let (ps, pe) = r.len_delimited()?;
                check_exemplar(buf, ps, pe, symbols.len())?;
                s.exemplars += 1;
                s.exemplar_run.add(field_start, pe);
            }
            (5, LEN) => {
                let (ps, pe) = r.len_delimited()?;
                let m = s.metadata.get_or_insert_with(Meta::default);
                read_metadata(buf, ps, pe, m, &mut meta_refs)?;
            }
            // rc.3's created timestamp (reserved in rc.4).
            (6, VARINT) => {
                r.varint()?;
            }
            (1..=6, _) => return Err(invalid("a TimeSeries field has the wrong wire type")),
            (field, wt) => r.skip(field, wt, DEPTH - 1)?,
        }
        if field != 1 {
            s.other.add(field_start, start + r.pos);
        }
    }
    if let Some(m) = &mut s.metadata {
        if let Some(help) = meta_refs[0] {
            m.help = symbol_ref(help, symbols.len())?;
        }
        if let Some(unit) = meta_refs[1] {
            m.unit = symbol_ref(unit, symbols.len())?;
        }
    }
    if lr.pending.is_some() {
        return Err(Stop::Invalid(Invalid::OddLabelRefs));
    }
    if let Some(why) = check_label_count(lr.sent as usize, limits).or(lr.too_long) {
        return Err(Stop::Invalid(Invalid::OverLimit(why)));
    }
    let series_labels = &mut labels[lr.start..];
    if !lr.sorted {
        series_labels.sort_unstable_by(|a, b| {
            symbols[a.name as usize]
                .get(buf)
                .cmp(symbols[b.name as usize].get(buf))
        });
    }
    s.name = check_label_set(buf, symbols, series_labels)?;
    Ok(())
}

/// The rules of a label set (sorted by name): no empty name, no name twice,
/// a non-empty `__name__`, whose value's symbol is returned.
fn check_label_set(
    buf: &[u8],
    symbols: &[Span],
    labels: &[LabelSyms],
) -> Result<Option<u32>, Stop> {
    let mut name = None;
    let mut prev: Option<&[u8]> = None;
    for l in labels {
        let n = symbols[l.name as usize].get(buf);
        if n.is_empty() {
            return Err(Stop::Invalid(Invalid::EmptyLabelName));
        }
        if prev == Some(n) {
            return Err(Stop::Invalid(Invalid::DuplicateLabelName));
        }
        if n == b"__name__" {
            name = Some(l.value);
        }
        prev = Some(n);
    }
    match name {
        Some(v) if !symbols[v as usize].is_empty() => Ok(name),
        _ => Err(Stop::Invalid(Invalid::MissingName)),
    }
}

/// Checks one `Sample`; true when it holds only a value and a timestamp.
#[inline]
fn check_sample(buf: &[u8], start: usize, end: usize) -> Result<bool, Stop> {
    // The usual shape: value, then a timestamp whose varint ends the message.
    let msg = &buf[start..end];
    if msg.len() >= 11 && msg[0] == 0x09 && msg[9] == 0x10 {
        let ts = &msg[10..];
        if ts[..ts.len() - 1].iter().all(|&b| b >= 0x80)
            && ts[ts.len() - 1] < 0x80
            && ts.len() <= 10
        {
            return Ok(true);
        }
    }
    let mut r = Reader::new(msg, start);
    let mut plain = true;
    while !r.done() {
        match r.key()? {
            (1, FIXED64) => {
                r.fixed64()?;
            }
            (2, VARINT) => {
                r.varint()?;
            }
            (3, VARINT) => {
                r.varint()?;
                plain = false;
            }
            (1..=3, _) => return Err(invalid("a Sample field has the wrong wire type")),
            (field, wt) => {
                r.skip(field, wt, DEPTH - 2)?;
                plain = false;
            }
        }
    }
    Ok(plain)
}

/// Checks one `Exemplar`: its label references come in pairs, in range.
fn check_exemplar(buf: &[u8], start: usize, end: usize, symbols: usize) -> Result<(), Stop> {
    let mut r = Reader::new(&buf[start..end], start);
    let mut refs = 0usize;
    while !r.done() {
        match r.key()? {
            (1, LEN) => {
                let (s, e) = r.len_delimited()?;
                let mut packed = Reader::new(&buf[s..e], s);
                while !packed.done() {
                    symbol_ref(packed.varint()?, symbols)?;
                    refs += 1;
                }
            }
            (1, VARINT) => {
                symbol_ref(r.varint()?, symbols)?;
                refs += 1;
            }
            (2, FIXED64) => {
                r.fixed64()?;
            }
            (3, VARINT) => {
                r.varint()?;
            }
            (1..=3, _) => return Err(invalid("an Exemplar field has the wrong wire type")),
            (field, wt) => r.skip(field, wt, DEPTH - 2)?,
        }
    }
    if refs % 2 != 0 {
        return Err(Stop::Invalid(Invalid::OddLabelRefs));
    }
    Ok(())
}

/// Reads a series' `Metadata` into `m` and `refs` (help, unit), as prost
/// reads it: a field given twice is the last one, a second `Metadata`
/// merges into the first. The references are checked against the table
/// once the series is read, so that only those that remain count (the
/// fuzzer found an overridden one refusing a series prost accepts).
fn read_metadata(
    buf: &[u8],
    start: usize,
    end: usize,
    m: &mut Meta,
    refs: &mut [Option<u64>; 2],
) -> Result<(), Stop> {
    let mut r = Reader::new(&buf[start..end], start);
    while !r.done() {
        match r.key()? {
            (1, VARINT) => m.kind = r.varint()? as u32,
            (3, VARINT) => refs[0] = Some(r.varint()?),
            (4, VARINT) => refs[1] = Some(r.varint()?),
            (1 | 3 | 4, _) => return Err(invalid("a Metadata field has the wrong wire type")),
            (field, wt) => r.skip(field, wt, DEPTH - 2)?,
        }
    }
    Ok(())
}

/// The fields of a message that decoded already: (field number, the whole
/// field, its payload). Stops at the first error, which cannot happen on a
/// validated message.
struct Fields<'a> {
    r: Reader<'a>,
    base: usize,
}

impl<'a> Fields<'a> {
    fn new(buf: &'a [u8], span: Span) -> Self {
        let (s, e) = (span.start as usize, span.end as usize);
        Fields {
            r: Reader::new(&buf[s..e], s),
            base: s,
        }
    }
}

impl Iterator for Fields<'_> {
    type Item = (u32, Span, Span);

    fn next(&mut self) -> Option<(u32, Span, Span)> {
        if self.r.done() {
            return None;
        }
        let field_start = self.base + self.r.pos;
        let (field, wt) = self.r.key().ok()?;
        let payload_start = self.base + self.r.pos;
        let payload = if wt == LEN {
            let (s, e) = self.r.len_delimited().ok()?;
            span(s, e)
        } else {
            self.r.skip(field, wt, DEPTH).ok()?;
            span(payload_start, self.base + self.r.pos)
        };
        Some((field, span(field_start, self.base + self.r.pos), payload))
    }
}

/// The fields numbered `number` in a series, looking only where the
/// decoder saw them.
fn fields_numbered<'b>(
    buf: &'b [u8],
    s: &SeriesV2,
    run: FieldRun,
    number: u32,
) -> impl Iterator<Item = (Span, Span)> + 'b {
    let within = if run.contiguous { run.span } else { s.body };
    Fields::new(buf, within)
        .filter(move |(f, _, _)| *f == number)
        .map(|(_, whole, payload)| (whole, payload))
}

/// Calls `f` for each float sample of a series (histograms are not samples).
pub fn for_each_sample(
    buf: &[u8],
    s: &SeriesV2,
    mut f: impl FnMut(Sample),
) -> Result<(), DecodeError> {
    if s.samples == 0 {
        return Ok(());
    }
    for (_, payload) in fields_numbered(buf, s, s.sample_run, 2) {
        f(read_sample(
            buf,
            payload.start as usize,
            payload.end as usize,
        )?);
    }
    Ok(())
}

/// [`Injected::merge`] of a 2.0 series' labels, named by symbol: the
/// tenant labels replace labels of the same name whatever symbol the
/// sender used.
#[inline(always)]
fn merge_labels<'s>(
    buf: &'s [u8],
    d: &'s DecodedV2,
    s: &'s SeriesV2,
    inject: &'s Injected,
) -> impl Iterator<Item = Merged<LabelSyms>> + 's {
    inject.merge(d.labels_of(s), |l| d.symbol(buf, l.name))
}

/// Size of a length-delimited field with a one-byte key.
#[inline]
fn field_len(payload: usize) -> usize {
    1 + varint_len(payload as u64) + payload
}

#[inline]
fn put_field_header(out: &mut Vec<u8>, key: u8, payload: usize) {
    out.push(key);
    put_varint(out, payload as u64);
}

/// Bytes of the fields of `msg` that `keep` keeps, and appends them.
fn kept_len(buf: &[u8], msg: Span, keep: impl Fn(u32) -> bool) -> usize {
    Fields::new(buf, msg)
        .filter(|(f, _, _)| keep(*f))
        .map(|(_, whole, _)| whole.len())
        .sum()
}

fn put_kept(out: &mut Vec<u8>, buf: &[u8], msg: Span, keep: impl Fn(u32) -> bool) {
    for (f, whole, _) in Fields::new(buf, msg) {
        if keep(f) {
            out.extend_from_slice(whole.get(buf));
        }
    }
}

/// 1.0 `Sample` fields: value and timestamp.
fn v1_sample_field(f: u32) -> bool {
    f == 1 || f == 2
}

/// 1.0 `Histogram` fields: all but the start timestamp.
fn v1_histogram_field(f: u32) -> bool {
    f != 17
}

/// 1.0 `Exemplar` fields other than labels: value and timestamp.
fn v1_exemplar_field(f: u32) -> bool {
    f == 2 || f == 3
}

/// The label references of an exemplar, in pairs.
fn exemplar_labels(buf: &[u8], msg: Span, mut f: impl FnMut(u32, u32)) {
    let mut pending = None;
    let mut add = |v: u64| match pending.take() {
        None => pending = Some(v as u32),
        Some(n) => f(n, v as u32),
    };
    for (field, _, payload) in Fields::new(buf, msg) {
        if field != 1 {
            continue;
        }
        let (s, e) = (payload.start as usize, payload.end as usize);
        let mut r = Reader::new(&buf[s..e], s);
        while let Ok(v) = r.varint() {
            add(v);
            if r.done() {
                break;
            }
        }
    }
}

/// Size of one exemplar as a 1.0 `Exemplar` message body.
fn exemplar_v1_len(buf: &[u8], d: &DecodedV2, msg: Span) -> usize {
    let mut len = kept_len(buf, msg, v1_exemplar_field);
    exemplar_labels(buf, msg, |n, v| {
        len += field_len(label_msg_len(
            d.symbols[n as usize].len(),
            d.symbols[v as usize].len(),
        ));
    });
    len
}

/// Size of a series as a 1.0 `TimeSeries` body: labels, samples,
/// exemplars, histograms.
fn series_v1_len(buf: &[u8], d: &DecodedV2, s: &SeriesV2, inject: &Injected) -> usize {
    let mut len = merge_labels(buf, d, s, inject)
        .map(|m| match m {
            Merged::Sent(l) => field_len(label_msg_len(
                d.symbols[l.name as usize].len(),
                d.symbols[l.value as usize].len(),
            )),
            Merged::Tenant(i) => inject.field(i).len(),
        })
        .sum();
    if s.samples > 0 {
        len += if s.plain_samples && s.sample_run.contiguous {
            s.sample_run.span.len()
        } else {
            fields_numbered(buf, s, s.sample_run, 2)
                .map(|(_, p)| field_len(kept_len(buf, p, v1_sample_field)))
                .sum()
        };
    }
    if s.exemplars > 0 {
        len += fields_numbered(buf, s, s.exemplar_run, 4)
            .map(|(_, p)| field_len(exemplar_v1_len(buf, d, p)))
            .sum::<usize>();
    }
    if s.histograms > 0 {
        len += fields_numbered(buf, s, s.histogram_run, 3)
            .map(|(_, p)| {
                field_len(if s.histogram_start {
                    kept_len(buf, p, v1_histogram_field)
                } else {
                    p.len()
                })
            })
            .sum::<usize>();
    }
    len
}

/// Appends one series as a 1.0 `WriteRequest.timeseries` field: its labels
/// merged with `inject` (which wins on equal names) in name order, its
/// samples, exemplars and histograms. The length is computed first, so the
/// body is written once, in place.
pub fn encode_series_v1(
    out: &mut Vec<u8>,
    buf: &[u8],
    d: &DecodedV2,
    s: &SeriesV2,
    inject: &Injected,
) {
    let len = series_v1_len(buf, d, s, inject);
    out.reserve(field_len(len));
    put_field_header(out, (1 << 3) | LEN, len);
    for m in merge_labels(buf, d, s, inject) {
        match m {
            Merged::Sent(l) => put_label(out, d.symbol(buf, l.name), d.symbol(buf, l.value)),
            Merged::Tenant(i) => out.extend_from_slice(inject.field(i)),
        }
    }
    if s.samples > 0 {
        if s.plain_samples && s.sample_run.contiguous {
            // `TimeSeries.samples` is field 2 in both versions.
            out.extend_from_slice(s.sample_run.span.get(buf));
        } else {
            for (_, p) in fields_numbered(buf, s, s.sample_run, 2) {
                put_field_header(out, (2 << 3) | LEN, kept_len(buf, p, v1_sample_field));
                put_kept(out, buf, p, v1_sample_field);
            }
        }
    }
    if s.exemplars > 0 {
        for (_, p) in fields_numbered(buf, s, s.exemplar_run, 4) {
            put_field_header(out, (3 << 3) | LEN, exemplar_v1_len(buf, d, p));
            exemplar_labels(buf, p, |n, v| {
                put_label(out, d.symbol(buf, n), d.symbol(buf, v));
            });
            put_kept(out, buf, p, v1_exemplar_field);
        }
    }
    if s.histograms > 0 {
        for (_, p) in fields_numbered(buf, s, s.histogram_run, 3) {
            if s.histogram_start {
                put_field_header(out, (4 << 3) | LEN, kept_len(buf, p, v1_histogram_field));
                put_kept(out, buf, p, v1_histogram_field);
            } else {
                put_field_header(out, (4 << 3) | LEN, p.len());
                out.extend_from_slice(p.get(buf));
            }
        }
    }
}

/// One metric family's metadata for a 1.0 upstream: the family is the
/// series name without the suffix its type adds (`_bucket`, `_sum`,
/// `_count`, `_created` of classic histograms and summaries).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Family {
    name: u32,
    family_len: u32,
    meta: Meta,
}

/// 1.0 and 2.0 number metric types alike.
const HISTOGRAM: u32 = 3;
const GAUGEHISTOGRAM: u32 = 4;
const SUMMARY: u32 = 5;

fn family_len(name: &[u8], kind: u32) -> usize {
    let suffixes: &[&[u8]] = match kind {
        HISTOGRAM | GAUGEHISTOGRAM => &[b"_bucket", b"_sum", b"_count", b"_created"],
        SUMMARY => &[b"_sum", b"_count", b"_created"],
        _ => &[],
    };
    suffixes
        .iter()
        .find_map(|sfx| name.strip_suffix(*sfx).filter(|base| !base.is_empty()))
        .map_or(name.len(), <[u8]>::len)
}

impl Family {
    fn family<'b>(&self, buf: &'b [u8], d: &DecodedV2) -> &'b [u8] {
        &d.symbol(buf, self.name)[..self.family_len as usize]
    }

    /// Orders by what is written: family, type, help, unit.
    fn cmp_bytes(&self, other: &Family, buf: &[u8], d: &DecodedV2) -> Ordering {
        self.family(buf, d)
            .cmp(other.family(buf, d))
            .then(self.meta.kind.cmp(&other.meta.kind))
            .then_with(|| {
                d.symbol(buf, self.meta.help)
                    .cmp(d.symbol(buf, other.meta.help))
            })
            .then_with(|| {
                d.symbol(buf, self.meta.unit)
                    .cmp(d.symbol(buf, other.meta.unit))
            })
    }
}

/// Notes the metadata of a forwarded series, once per run of series of one
/// family (duplicates further apart go in [`encode_metadata_v1`]).
pub fn note_family(families: &mut Vec<Family>, buf: &[u8], d: &DecodedV2, s: &SeriesV2) {
    let (Some(meta), Some(name)) = (s.metadata, s.name) else {
        return;
    };
    if meta == Meta::default() {
        return; // Nothing said: type unspecified, no help, no unit.
    }
    let fam = Family {
        name,
        family_len: family_len(d.symbol(buf, name), meta.kind) as u32,
        meta,
    };
    match families.last() {
        Some(last) if *last == fam || last.cmp_bytes(&fam, buf, d) == Ordering::Equal => {}
        _ => families.push(fam),
    }
}

/// Appends one 1.0 `WriteRequest.metadata` field per distinct family noted
/// (sorted by family name).
pub fn encode_metadata_v1(
    out: &mut Vec<u8>,
    buf: &[u8],
    d: &DecodedV2,
    families: &mut Vec<Family>,
) {
    families.sort_unstable_by(|a, b| a.cmp_bytes(b, buf, d));
    families.dedup_by(|a, b| a.cmp_bytes(b, buf, d) == Ordering::Equal);
    for f in families.iter() {
        let family = f.family(buf, d);
        let help = d.symbol(buf, f.meta.help);
        let unit = d.symbol(buf, f.meta.unit);
        // Zero-valued fields are left out, as protobuf encoders do.
        let mut len = field_len(family.len());
        if f.meta.kind != 0 {
            len += 1 + varint_len(u64::from(f.meta.kind));
        }
        for text in [help, unit] {
            if !text.is_empty() {
                len += field_len(text.len());
            }
        }
        put_field_header(out, (3 << 3) | LEN, len);
        if f.meta.kind != 0 {
            out.push((1 << 3) | VARINT);
            put_varint(out, u64::from(f.meta.kind));
        }
        put_field_header(out, (2 << 3) | LEN, family.len());
        out.extend_from_slice(family);
        for (key, text) in [((4 << 3) | LEN, help), ((5 << 3) | LEN, unit)] {
            if !text.is_empty() {
                put_field_header(out, key, text.len());
                out.extend_from_slice(text);
            }
        }
    }
}

/// Appends the request's symbol table as it came, then whichever of the
/// tenant labels' names and values it lacks, and fills `refs` with each
/// tenant label's (name, value) symbols (by [`Injected`] order).
pub fn encode_symbols<'i>(
    out: &mut Vec<u8>,
    buf: &[u8],
    d: &DecodedV2,
    inject: &'i Injected,
    refs: &mut Vec<(u32, u32)>,
) {
    for run in &d.symbol_fields {
        out.extend_from_slice(run.get(buf));
    }
    // At most three strings, looked up in the sender's table first: the
    // table stays free of duplicates, as the spec asks.
    fn intern<'i>(
        out: &mut Vec<u8>,
        buf: &[u8],
        d: &DecodedV2,
        added: &mut Vec<&'i [u8]>,
        text: &'i [u8],
    ) -> u32 {
        if let Some(i) = d.symbols.iter().position(|s| s.get(buf) == text) {
            return i as u32;
        }
        if let Some(i) = added.iter().position(|a| *a == text) {
            return (d.symbols.len() + i) as u32;
        }
        put_field_header(out, (4 << 3) | LEN, text.len());
        out.extend_from_slice(text);
        added.push(text);
        (d.symbols.len() + added.len() - 1) as u32
    }
    let mut added: Vec<&'i [u8]> = Vec::new();
    refs.clear();
    if d.symbols.is_empty() {
        // The table must start with the empty string.
        intern(out, buf, d, &mut added, b"");
    }
    for i in 0..inject.len() {
        let name = intern(out, buf, d, &mut added, inject.name(i));
        let value = intern(out, buf, d, &mut added, inject.value(i));
        refs.push((name, value));
    }
}

/// Appends one series as a 2.0 `Request.timeseries` field: `labels_refs`
/// merged with the tenant labels (`tenant` from [`encode_symbols`]), every
/// other field as it came.
pub fn encode_series_v2(
    out: &mut Vec<u8>,
    buf: &[u8],
    d: &DecodedV2,
    s: &SeriesV2,
    inject: &Injected,
    tenant: &[(u32, u32)],
) {
    let pair_len = |n: u32, v: u32| varint_len(u64::from(n)) + varint_len(u64::from(v));
    let refs = || {
        merge_labels(buf, d, s, inject).map(|m| match m {
            Merged::Sent(l) => (l.name, l.value),
            Merged::Tenant(i) => tenant[i],
        })
    };
    let refs_len = refs().map(|(n, v)| pair_len(n, v)).sum();
    let other_len = if s.other.contiguous || s.other.span.is_empty() {
        s.other.span.len()
    } else {
        kept_len(buf, s.body, |f| f != 1)
    };
    let len = field_len(refs_len) + other_len;
    out.reserve(field_len(len));
    put_field_header(out, (5 << 3) | LEN, len);
    put_field_header(out, (1 << 3) | LEN, refs_len);
    for (n, v) in refs() {
        put_varint(out, u64::from(n));
        put_varint(out, u64::from(v));
    }
    if s.other.contiguous || s.other.span.is_empty() {
        out.extend_from_slice(s.other.span.get(buf));
    } else {
        put_kept(out, buf, s.body, |f| f != 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prompb;
    use crate::prompb_v2::{self as v2, Symbols};
    use prost::Message;

    const TENANT: [(&str, &str); 2] = [("cloud_account_id", "me"), ("tenant_id", "me")];

    fn injected(pairs: &[(&str, &str)]) -> Injected {
        Injected::new(pairs.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())))
    }

    fn sample(value: f64, timestamp: i64) -> v2::Sample {
        v2::Sample {
            value,
            timestamp,
            start_timestamp: 0,
        }
    }

    fn ts(sym: &mut Symbols, labels: &[(&str, &str)], samples: &[(f64, i64)]) -> v2::TimeSeries {
        v2::TimeSeries {
            labels_refs: sym.refs(labels),
            samples: samples.iter().map(|&(v, t)| sample(v, t)).collect(),
            ..Default::default()
        }
    }

    fn histogram(ts: i64, start: i64) -> v2::Histogram {
        v2::Histogram::example(ts, start)
    }

    fn decoded(buf: &[u8]) -> DecodedV2 {
        let mut d = DecodedV2::default();
        decode(buf, &ShapeLimits::UNLIMITED, &mut d).expect("decodes");
        d
    }

    /// The 1.0 body rwgate forwards for `buf`, with every series kept.
    fn convert_bytes(buf: &[u8], inject: &[(&str, &str)]) -> Vec<u8> {
        let d = decoded(buf);
        let inj = injected(inject);
        let mut out = Vec::new();
        let mut families = Vec::new();
        for s in &d.series {
            assert_eq!(s.invalid, None);
            encode_series_v1(&mut out, buf, &d, s, &inj);
            note_family(&mut families, buf, &d, s);
        }
        encode_metadata_v1(&mut out, buf, &d, &mut families);
        out
    }

    /// Converting must give exactly what prost encodes for the reference.
    fn assert_converts(req: &v2::Request, inject: &[(&str, &str)]) -> prompb::WriteRequest {
        let out = convert_bytes(&req.encode_to_vec(), inject);
        let want = req.to_v1(inject);
        assert_eq!(prompb::WriteRequest::decode(out.as_slice()).unwrap(), want);
        assert_eq!(out, want.encode_to_vec(), "byte for byte");
        want
    }

    #[test]
    fn generated_requests_convert_to_the_prost_reference() {
        for (seed, labels, samples) in [(1, 10, 1), (2, 4, 3), (3, 14, 2)] {
            let p = crate::loadgen::Profile {
                series: 200,
                labels,
                samples,
                ..Default::default()
            };
            let v1 = crate::loadgen::write_request(&p, "spoofed", seed);
            let req = v2::Request::from_v1(&v1);
            let got = assert_converts(&req, &TENANT);
            assert_eq!(got.timeseries.len(), 200);
            // The same series the 1.0 request carries, labels and samples.
            for (a, b) in got.timeseries.iter().zip(&v1.timeseries) {
                assert_eq!(a.samples, b.samples);
                let names = crate::wire::tests::label_names(&b.labels);
                assert!(names.contains(&"cloud_account_id"));
                assert!(a
                    .labels
                    .iter()
                    .any(|l| l.name == "cloud_account_id" && l.value == "me"));
            }
        }
    }

    #[test]
    fn histograms_exemplars_and_start_timestamps() {
        let mut sym = Symbols::new();
        let mut h = ts(&mut sym, &[("__name__", "rpc_seconds"), ("job", "a")], &[]);
        h.histograms = vec![histogram(1000, 500), histogram(2000, 0)];
        h.histograms[1].count = Some(v2::histogram::Count::CountFloat(3.5));
        h.histograms[1].positive_counts = vec![1.0, 2.5];
        h.histograms[1].custom_values = vec![0.1, 1.0];
        h.exemplars = vec![v2::Exemplar {
            labels_refs: sym.refs(&[("trace_id", "abc"), ("span_id", "1")]),
            value: 0.25,
            timestamp: 999,
        }];
        let mut f = ts(&mut sym, &[("__name__", "up"), ("job", "a")], &[(1.0, 5)]);
        f.samples[0].start_timestamp = 3;
        f.samples.push(sample(0.0, 0)); // every field at its default
        f.exemplars = vec![v2::Exemplar {
            labels_refs: vec![],
            value: 1.0,
            timestamp: 5,
        }];
        let req = v2::Request {
            symbols: sym.into_table(),
            timeseries: vec![h, f],
        };
        let got = assert_converts(&req, &TENANT);
        assert_eq!(got.timeseries[0].histograms.len(), 2);
        assert_eq!(got.timeseries[0].histograms[1].custom_values, [0.1, 1.0]);
        assert_eq!(
            got.timeseries[0].exemplars[0].labels[0],
            prompb::Label {
                name: "trace_id".into(),
                value: "abc".into()
            }
        );
        let d = decoded(&req.encode_to_vec());
        assert_eq!(
            (
                d.series[0].histograms,
                d.series[0].exemplars,
                d.series[0].samples
            ),
            (2, 1, 0)
        );
        assert!(d.series[0].histogram_start);
        assert!(
            !d.series[1].plain_samples,
            "the start timestamp is left out"
        );
    }

    #[test]
    fn plain_samples_are_copied_as_they_came() {
        let mut sym = Symbols::new();
        let s = ts(
            &mut sym,
            &[("__name__", "up")],
            &[(1.0, 1_700_000_000_000), (2.0, 1_700_000_015_000)],
        );
        let req = v2::Request {
            symbols: sym.into_table(),
            timeseries: vec![s],
        };
        let buf = req.encode_to_vec();
        let d = decoded(&buf);
        assert!(d.series[0].plain_samples && d.series[0].sample_run.contiguous);
        let out = convert_bytes(&buf, &[]);
        let run = d.series[0].sample_run.span.get(&buf);
        assert!(out.windows(run.len()).any(|w| w == run));
        let mut got = vec![];
        for_each_sample(&buf, &d.series[0], |s| got.push((s.timestamp_ms, s.value))).unwrap();
        assert_eq!(got, [(1_700_000_000_000, 1.0), (1_700_000_015_000, 2.0)]);
    }

    #[test]
    fn metadata_is_folded_per_metric_family() {
        let mut sym = Symbols::new();
        let help = sym.intern("Request latency.");
        let unit = sym.intern("seconds");
        let mut series = Vec::new();
        let meta = |kind: i32, help: u32, unit: u32| {
            Some(v2::Metadata {
                r#type: kind,
                help_ref: help,
                unit_ref: unit,
            })
        };
        for (name, le) in [
            ("http_seconds_bucket", "0.1"),
            ("http_seconds_bucket", "+Inf"),
            ("http_seconds_sum", ""),
            ("http_seconds_count", ""),
        ] {
            let mut labels = vec![("__name__", name)];
            if !le.is_empty() {
                labels.push(("le", le));
            }
            let mut s = ts(&mut sym, &labels, &[(1.0, 1)]);
            s.metadata = meta(3, help, unit);
            series.push(s);
        }
        let mut c = ts(&mut sym, &[("__name__", "jobs_total")], &[(1.0, 1)]);
        c.metadata = meta(1, 0, 0);
        series.push(c);
        // The histogram's family again, after another family.
        let mut again = ts(
            &mut sym,
            &[("__name__", "http_seconds_count"), ("x", "y")],
            &[],
        );
        again.metadata = meta(3, help, unit);
        series.push(again);
        let mut q = ts(&mut sym, &[("__name__", "rpc_quantiles_sum")], &[(1.0, 1)]);
        q.metadata = meta(5, 0, 0);
        series.push(q);
        // Nothing said: no entry.
        let mut none = ts(&mut sym, &[("__name__", "bare")], &[(1.0, 1)]);
        none.metadata = meta(0, 0, 0);
        series.push(none);
        let req = v2::Request {
            symbols: sym.into_table(),
            timeseries: series,
        };
        let got = assert_converts(&req, &[]);
        let families: Vec<(&str, i32, &str)> = got
            .metadata
            .iter()
            .map(|m| (m.metric_family_name.as_str(), m.r#type, m.help.as_str()))
            .collect();
        assert_eq!(
            families,
            [
                ("http_seconds", 3, "Request latency."),
                ("jobs_total", 1, ""),
                ("rpc_quantiles", 5, "")
            ]
        );
        assert_eq!(got.metadata[0].unit, "seconds");
    }

    #[test]
    fn tenant_labels_replace_the_senders_whatever_symbol_it_used() {
        // The sender interned "tenant_id" twice and spoofs both tenant
        // labels, one through each copy; its labels are not sorted.
        let symbols: Vec<String> = [
            "",
            "zone",
            "z",
            "tenant_id",
            "evil",
            "__name__",
            "up",
            "cloud_account_id",
            "tenant_id",
        ]
        .map(String::from)
        .to_vec();
        let req = v2::Request {
            symbols,
            timeseries: vec![v2::TimeSeries {
                labels_refs: vec![1, 2, 8, 4, 5, 6, 7, 4],
                samples: vec![sample(1.0, 1)],
                ..Default::default()
            }],
        };
        let got = assert_converts(&req, &TENANT);
        let labels: Vec<(&str, &str)> = got.timeseries[0]
            .labels
            .iter()
            .map(|l| (l.name.as_str(), l.value.as_str()))
            .collect();
        assert_eq!(
            labels,
            [
                ("__name__", "up"),
                ("cloud_account_id", "me"),
                ("tenant_id", "me"),
                ("zone", "z")
            ]
        );
    }

    /// The 2.0 body rwgate forwards for `buf`, with every series kept.
    fn passthrough(buf: &[u8], inject: &[(&str, &str)]) -> Vec<u8> {
        let d = decoded(buf);
        let inj = injected(inject);
        let mut out = Vec::new();
        let mut tenant = Vec::new();
        encode_symbols(&mut out, buf, &d, &inj, &mut tenant);
        for s in &d.series {
            encode_series_v2(&mut out, buf, &d, s, &inj, &tenant);
        }
        out
    }

    #[test]
    fn passthrough_keeps_every_field_and_sets_tenant_labels() {
        let mut sym = Symbols::new();
        sym.intern("tenant_id"); // already in the sender's table
        let mut a = ts(
            &mut sym,
            &[("job", "a"), ("__name__", "up"), ("tenant_id", "evil")],
            &[(1.0, 10), (2.0, 20)],
        );
        a.metadata = Some(v2::Metadata {
            r#type: 2,
            help_ref: sym.intern("Up."),
            unit_ref: 0,
        });
        a.exemplars = vec![v2::Exemplar {
            labels_refs: sym.refs(&[("trace_id", "t1")]),
            value: 1.0,
            timestamp: 10,
        }];
        let mut h = ts(&mut sym, &[("__name__", "lat")], &[]);
        h.histograms = vec![histogram(30, 7)];
        let req = v2::Request {
            symbols: sym.into_table(),
            timeseries: vec![a, h],
        };
        let out = passthrough(&req.encode_to_vec(), &TENANT);
        let got = v2::Request::decode(out.as_slice()).unwrap();
        // The table as it came, plus what it lacked, once each.
        assert_eq!(got.symbols[..req.symbols.len()], req.symbols[..]);
        assert_eq!(got.symbols[req.symbols.len()..], ["cloud_account_id", "me"]);
        assert_eq!(
            got.labels_of(0).unwrap(),
            [
                ("__name__", "up"),
                ("cloud_account_id", "me"),
                ("job", "a"),
                ("tenant_id", "me")
            ]
        );
        assert_eq!(
            got.labels_of(1).unwrap(),
            [
                ("__name__", "lat"),
                ("cloud_account_id", "me"),
                ("tenant_id", "me")
            ]
        );
        for (g, w) in got.timeseries.iter().zip(&req.timeseries) {
            assert_eq!(
                (&g.samples, &g.histograms, &g.exemplars, &g.metadata),
                (&w.samples, &w.histograms, &w.exemplars, &w.metadata)
            );
        }
    }

    /// rc.3 put the created timestamp in `TimeSeries` field 6.
    fn with_created_timestamp(req: &v2::Request, ct: u64) -> Vec<u8> {
        let mut buf = Vec::new();
        for s in &req.symbols {
            put_field_header(&mut buf, (4 << 3) | LEN, s.len());
            buf.extend_from_slice(s.as_bytes());
        }
        for ts in &req.timeseries {
            let mut body = ts.encode_to_vec();
            body.push((6 << 3) | VARINT);
            put_varint(&mut body, ct);
            put_field_header(&mut buf, (5 << 3) | LEN, body.len());
            buf.extend_from_slice(&body);
        }
        buf
    }

    #[test]
    fn rc3_created_timestamp_is_tolerated() {
        let mut sym = Symbols::new();
        let s = ts(&mut sym, &[("__name__", "c_total")], &[(5.0, 2000)]);
        let req = v2::Request {
            symbols: sym.into_table(),
            timeseries: vec![s],
        };
        let rc3 = with_created_timestamp(&req, 1_700_000_000_000);
        assert_eq!(v2::Request::decode(rc3.as_slice()).unwrap(), req);
        // To 1.0: as if it were not there.
        assert_eq!(
            convert_bytes(&rc3, &TENANT),
            req.to_v1(&TENANT).encode_to_vec()
        );
        // To 2.0: kept as it came.
        let out = passthrough(&rc3, &TENANT);
        let mut field6 = vec![(6 << 3) | VARINT];
        put_varint(&mut field6, 1_700_000_000_000);
        assert!(out.windows(field6.len()).any(|w| w == field6));
    }

    fn refused(req: &v2::Request) -> Vec<Option<Invalid>> {
        decoded(&req.encode_to_vec())
            .series
            .iter()
            .map(|s| s.invalid)
            .collect()
    }

    fn one(symbols: &[&str], series: v2::TimeSeries) -> v2::Request {
        v2::Request {
            symbols: symbols.iter().map(|s| s.to_string()).collect(),
            timeseries: vec![series],
        }
    }

    fn refs(labels_refs: &[u32]) -> v2::TimeSeries {
        v2::TimeSeries {
            labels_refs: labels_refs.to_vec(),
            samples: vec![sample(1.0, 1)],
            ..Default::default()
        }
    }

    #[test]
    fn invalid_series_are_refused_alone() {
        let syms = ["", "__name__", "up", "job", "a", "job"];
        let cases: &[(v2::TimeSeries, Invalid)] = &[
            (refs(&[1, 2, 3]), Invalid::OddLabelRefs),
            (
                refs(&[1, 2, 3, 6]),
                Invalid::SymbolOutOfRange {
                    index: 6,
                    symbols: 6,
                },
            ),
            (refs(&[1, 2, 0, 4]), Invalid::EmptyLabelName),
            // The same name through two symbols.
            (refs(&[1, 2, 3, 4, 5, 4]), Invalid::DuplicateLabelName),
            (refs(&[1, 2, 1, 4]), Invalid::DuplicateLabelName),
            (refs(&[3, 4]), Invalid::MissingName),
            (refs(&[1, 0, 3, 4]), Invalid::MissingName),
            (
                v2::TimeSeries {
                    exemplars: vec![v2::Exemplar {
                        labels_refs: vec![3],
                        value: 1.0,
                        timestamp: 1,
                    }],
                    ..refs(&[1, 2])
                },
                Invalid::OddLabelRefs,
            ),
            (
                v2::TimeSeries {
                    metadata: Some(v2::Metadata {
                        r#type: 1,
                        help_ref: 99,
                        unit_ref: 0,
                    }),
                    ..refs(&[1, 2])
                },
                Invalid::SymbolOutOfRange {
                    index: 99,
                    symbols: 6,
                },
            ),
        ];
        for (series, why) in cases {
            let good = refs(&[1, 2, 3, 4]);
            let req = v2::Request {
                symbols: syms.iter().map(|s| s.to_string()).collect(),
                timeseries: vec![good.clone(), series.clone(), good],
            };
            assert_eq!(refused(&req), [None, Some(*why), None], "{why}");
        }
    }

    /// A series body written by hand: `__name__ = up` (packed
    /// `labels_refs`), then `extra`.
    fn hand_series(extra: &[u8]) -> Vec<u8> {
        hand_series_with(&[0x0a, 0x02, 1, 2], extra)
    }

    fn hand_series_with(labels: &[u8], extra: &[u8]) -> Vec<u8> {
        let mut series = labels.to_vec();
        series.extend_from_slice(extra);
        let mut buf = Vec::new();
        for s in ["", "__name__", "up"] {
            put_field_header(&mut buf, 0x22, s.len());
            buf.extend_from_slice(s.as_bytes());
        }
        put_field_header(&mut buf, 0x2a, series.len());
        buf.extend_from_slice(&series);
        buf
    }

    #[test]
    fn undecodable_fields_refuse_their_series() {
        let cases: &[&[u8]] = &[
            // A Sample whose value is a varint.
            &[0x12, 0x04, 0x08, 0x01, 0x10, 0x01],
            // Garbage inside a Sample (a length past its end).
            &[0x12, 0x03, 0x0a, 0x09, 0x00],
            // A Histogram sum that is a varint.
            &[0x1a, 0x02, 0x18, 0x01],
            // Packed histogram counts that are not whole doubles.
            &[0x1a, 0x05, 0x52, 0x03, 0x00, 0x00, 0x00],
            // An Exemplar value that is a varint.
            &[0x22, 0x02, 0x10, 0x01],
            // samples with the wrong wire type.
            &[0x10, 0x01],
            // rc.3's created timestamp as a string.
            &[0x32, 0x01, 0x00],
        ];
        for extra in cases {
            let buf = hand_series(extra);
            let d = decoded(&buf);
            assert!(
                matches!(d.series[0].invalid, Some(Invalid::Malformed { .. })),
                "{extra:x?}: {:?}",
                d.series[0].invalid
            );
            assert!(d.labels_of(&d.series[0]).is_empty());
        }
        // Unknown fields, unpacked labels_refs and a field 6 varint are fine.
        let buf = hand_series_with(&[0x08, 1, 0x08, 2], &[0x78, 0x05, 0x30, 0x07]);
        let d = decoded(&buf);
        assert_eq!(d.series[0].invalid, None);
        assert_eq!(d.name(&buf, &d.series[0]), Some(&b"up"[..]));
        // A reference past the table, unpacked.
        let d = decoded(&hand_series_with(&[0x08, 1, 0x08, 3], &[]));
        assert_eq!(
            d.series[0].invalid,
            Some(Invalid::SymbolOutOfRange {
                index: 3,
                symbols: 3
            })
        );
    }

    /// Found by the fuzzer (`crate::fuzz`): a series' metadata is read as
    /// prost reads it (the last of a field given twice, a second
    /// `Metadata` merged into the first), so a reference overridden by a
    /// later one does not refuse the series.
    #[test]
    fn metadata_is_read_as_prost_merges_it() {
        let cases: [(&[u8], Option<Meta>); 3] = [
            // help 99 (past the table), then help 2.
            (
                &[0x2a, 0x04, 0x18, 0x63, 0x18, 0x02],
                Some(Meta {
                    kind: 0,
                    help: 2,
                    unit: 0,
                }),
            ),
            // {type 3, help 1}, then {unit 2}.
            (
                &[0x2a, 0x04, 0x08, 0x03, 0x18, 0x01, 0x2a, 0x02, 0x20, 0x02],
                Some(Meta {
                    kind: 3,
                    help: 1,
                    unit: 2,
                }),
            ),
            // {help 99}, then {unit 1}: help is still past the table.
            (&[0x2a, 0x02, 0x18, 0x63, 0x2a, 0x02, 0x20, 0x01], None),
        ];
        for (extra, want) in cases {
            let buf = hand_series(extra);
            let d = decoded(&buf);
            match want {
                Some(meta) => {
                    assert_eq!(d.series[0].invalid, None, "{extra:x?}");
                    assert_eq!(d.series[0].metadata, Some(meta), "{extra:x?}");
                    let m = v2::Request::decode(buf.as_slice()).unwrap().timeseries[0]
                        .metadata
                        .unwrap();
                    assert_eq!(
                        (m.r#type as u32, m.help_ref, m.unit_ref),
                        (meta.kind, meta.help, meta.unit),
                        "prost reads {extra:x?} the same"
                    );
                }
                None => assert!(
                    matches!(
                        d.series[0].invalid,
                        Some(Invalid::SymbolOutOfRange { index: 99, .. })
                    ),
                    "{extra:x?}: {:?}",
                    d.series[0].invalid
                ),
            }
        }
    }

    /// Found by the fuzzer (`crate::fuzz`): unknown groups inside a series
    /// were skipped with the whole request's nesting budget, so a series
    /// prost refuses (groups nested past its recursion limit) was accepted.
    #[test]
    fn groups_nest_as_deep_as_prost_allows() {
        // `depth` groups of field 7 nested in a series, in a sample, in a
        // histogram's bucket span.
        let groups = |depth: usize| crate::wire::tests::nested_groups(7, depth);
        type Place = (&'static str, fn(Vec<u8>) -> Vec<u8>);
        let places: [Place; 3] = [
            ("series", |g| g),
            ("sample", |g| {
                let mut f = vec![0x12];
                put_varint(&mut f, g.len() as u64);
                f.extend_from_slice(&g);
                f
            }),
            ("bucket span", |g| {
                let mut span = vec![0x42];
                put_varint(&mut span, g.len() as u64);
                span.extend_from_slice(&g);
                let mut f = vec![0x1a];
                put_varint(&mut f, span.len() as u64);
                f.extend_from_slice(&span);
                f
            }),
        ];
        for (place, put) in places {
            let mut deepest = None;
            for depth in 90..105 {
                let buf = hand_series(&put(groups(depth)));
                let prost_ok = v2::Request::decode(buf.as_slice()).is_ok();
                let d = decoded(&buf);
                assert_eq!(
                    d.series[0].invalid.is_none(),
                    prost_ok,
                    "{place}, depth {depth}: {:?}",
                    d.series[0].invalid
                );
                if prost_ok {
                    deepest = Some(depth);
                }
            }
            // The edge is inside the range tried.
            assert!(matches!(deepest, Some(90..=103)), "{place}: {deepest:?}");
        }
    }

    #[test]
    fn bad_symbol_tables_refuse_the_request() {
        let mut d = DecodedV2::default();
        let lim = ShapeLimits::UNLIMITED;
        let req = one(&["x", "__name__", "up"], refs(&[1, 2]));
        assert!(matches!(
            decode(&req.encode_to_vec(), &lim, &mut d),
            Err(DecodeError::Malformed { what, .. }) if what.contains("empty string")
        ));
        let req = one(&[], refs(&[]));
        assert!(decode(&req.encode_to_vec(), &lim, &mut d).is_err());
        // An empty request is fine.
        assert!(decode(&[], &lim, &mut d).is_ok());
        // A symbol that is not UTF-8, written by hand.
        let mut buf = hand_series(&[]);
        buf.extend_from_slice(&[0x22, 0x02, 0xc3, 0x28]);
        assert!(matches!(
            decode(&buf, &lim, &mut d),
            Err(DecodeError::InvalidUtf8 { .. })
        ));
        // Non-ASCII UTF-8 is fine.
        let req = one(&["", "__name__", "Zürich–東京"], refs(&[1, 2]));
        assert!(decode(&req.encode_to_vec(), &lim, &mut d).is_ok());
        assert_eq!(
            d.name(&req.encode_to_vec(), &d.series[0]),
            Some("Zürich–東京".as_bytes())
        );
    }

    #[test]
    fn limits_are_enforced() {
        use crate::wire::tests::{assert_limit_cases, limits_request, LimitSeen};
        // The 1.0 test's series and table: the two protocols refuse alike.
        let buf = v2::Request::from_v1(&limits_request()).encode_to_vec();
        let mut d = DecodedV2::default();
        assert_limit_cases(|limits| {
            decode(&buf, limits, &mut d)?;
            let invalid: Vec<Invalid> = d.series.iter().filter_map(|s| s.invalid).collect();
            // One set of reason names: 1.0's, for the refusals 1.0 has too.
            for why in &invalid {
                assert_eq!(why.as_v1().map(|v1| v1.reason()), Some(why.reason()));
            }
            Ok(LimitSeen {
                kept: d
                    .series
                    .iter()
                    .filter(|s| s.invalid.is_none())
                    .filter_map(|s| d.name(&buf, s).map(<[u8]>::to_vec))
                    .collect(),
                refused: invalid.len() as u32,
                first: invalid
                    .first()
                    .map(|why| (why.reason(), why.describe(&buf))),
            })
        });
    }

    #[test]
    fn a_series_over_two_limits_has_1_0s_reason() {
        // Series 0 has too many labels and a value too long: too many
        // labels is the reason, in both protocols; series 1 only the value.
        let req = crate::wire::tests::limits_request();
        let mut limits = ShapeLimits::UNLIMITED;
        limits.max_labels_per_series = 2;
        limits.max_label_value_bytes = 0;
        let buf = v2::Request::from_v1(&req).encode_to_vec();
        let mut d = DecodedV2::default();
        decode(&buf, &limits, &mut d).unwrap();
        let got: Vec<&str> = d
            .series
            .iter()
            .filter_map(|s| s.invalid)
            .map(|i| i.reason())
            .collect();
        assert_eq!(got, ["too_many_labels", "label_value_too_long"]);
        let mut d1 = crate::wire::Decoded::default();
        crate::wire::decode(&req.encode_to_vec(), &limits, &mut d1).unwrap();
        let v1: Vec<&str> = crate::wire::Invalid::REASONS
            .iter()
            .zip(d1.refused.by_reason)
            .filter(|(_, n)| *n > 0)
            .map(|(r, _)| *r)
            .collect();
        assert_eq!(v1, ["too_many_labels", "label_value_too_long"]);
        // A part that does not decode is the reason over a limit, as in 1.0.
        let buf = hand_series(&[0x12, 0x02, 0x09, 0x01]);
        let mut d = DecodedV2::default();
        let mut one_label = ShapeLimits::UNLIMITED;
        one_label.max_labels_per_series = 0;
        decode(&buf, &one_label, &mut d).unwrap();
        assert!(
            matches!(d.series[0].invalid, Some(Invalid::Malformed { .. })),
            "{:?}",
            d.series[0].invalid
        );
    }

    #[test]
    fn unsorted_labels_leave_sorted() {
        let mut sym = Symbols::new();
        let s = ts(
            &mut sym,
            &[("zone", "z"), ("__name__", "up"), ("a", "1")],
            &[(1.0, 1)],
        );
        let req = v2::Request {
            symbols: sym.into_table(),
            timeseries: vec![s],
        };
        let got = assert_converts(&req, &[("tenant_id", "t")]);
        assert_eq!(
            crate::wire::tests::label_names(&got.timeseries[0].labels),
            ["__name__", "a", "tenant_id", "zone"]
        );
        let got = v2::Request::decode(
            passthrough(&req.encode_to_vec(), &[("tenant_id", "t")]).as_slice(),
        )
        .unwrap();
        let names: Vec<&str> = got.labels_of(0).unwrap().iter().map(|l| l.0).collect();
        assert_eq!(names, ["__name__", "a", "tenant_id", "zone"]);
    }

    #[test]
    fn truncated_and_corrupted_bodies_never_panic() {
        let p = crate::loadgen::Profile {
            series: 20,
            ..Default::default()
        };
        let mut req = v2::Request::from_v1(&crate::loadgen::write_request(&p, "t", 9));
        req.timeseries[3].histograms = vec![histogram(1, 1)];
        let buf = req.encode_to_vec();
        let mut d = DecodedV2::default();
        let inj = injected(&TENANT);
        let encode_all = |buf: &[u8], d: &DecodedV2| {
            let mut out = Vec::new();
            let mut tenant = Vec::new();
            encode_symbols(&mut out, buf, d, &inj, &mut tenant);
            for s in d.series.iter().filter(|s| s.invalid.is_none()) {
                encode_series_v1(&mut out, buf, d, s, &inj);
                encode_series_v2(&mut out, buf, d, s, &inj, &tenant);
                for_each_sample(buf, s, |_| {}).unwrap();
            }
        };
        for cut in 0..buf.len() {
            if decode(&buf[..cut], &ShapeLimits::UNLIMITED, &mut d).is_ok() {
                encode_all(&buf[..cut], &d);
            }
        }
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..2000 {
            let mut b = buf.clone();
            for _ in 0..3 {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let at = (rng as usize) % b.len();
                b[at] = (rng >> 32) as u8;
            }
            if decode(&b, &ShapeLimits::UNLIMITED, &mut d).is_ok() {
                encode_all(&b, &d);
            }
        }
    }
}
