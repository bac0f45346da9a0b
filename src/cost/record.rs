//! The spool record of the tee: the cost samples of one request, written
//! straight from the decoded request ([`RecordBuilder`]) and read back by
//! the drain as views into the record ([`SeriesBlock`]) that serialise
//! straight to ClickHouse's RowBinary. Nothing is copied per label or per
//! sample on the way.
//!
//! ```text
//! record := u32 groups, group*
//! group  := str account, str metric, u16 labels, (str name, str value)*,
//!           u32 samples, (i64 ts_ms, f64 value)*
//! str    := u32 len, bytes (UTF-8)
//! ```

use crate::cost::clickhouse::{RawRow, SeriesRow};
use crate::cost::spool::Frame;

/// Most labels a series' group in a record holds (counted in 16 bits).
pub const MAX_LABELS: usize = u16::MAX as usize;

/// Timestamps the tee accepts, relative to now; samples outside are not
/// teed (counted in `rwgate_tee_samples_rejected_total`).
#[derive(Debug, Clone, Copy)]
pub struct TimeWindow {
    pub max_age_ms: i64,
    pub max_future_ms: i64,
}

impl TimeWindow {
    /// The accepted timestamps at `now_ms`.
    pub fn at(self, now_ms: i64) -> Accepted {
        Accepted {
            oldest_ms: now_ms.saturating_sub(self.max_age_ms),
            newest_ms: now_ms.saturating_add(self.max_future_ms),
        }
    }
}

/// The sample timestamps the tee accepts (milliseconds, both ends included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    pub oldest_ms: i64,
    pub newest_ms: i64,
}

impl Accepted {
    /// Accepts everything.
    pub const ANY: Accepted = Accepted {
        oldest_ms: i64::MIN,
        newest_ms: i64::MAX,
    };
}

/// One spool record: the teed samples of one request, and what was refused.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct TeeRecord {
    /// The record in a spool frame (appending copies nothing); an empty
    /// payload when nothing was kept.
    frame: Frame,
    /// Samples in the record.
    pub kept: u64,
    /// Samples refused as older than the accepted window.
    pub too_old: u64,
    /// Samples refused as further ahead than the accepted window.
    pub too_new: u64,
}

impl TeeRecord {
    /// The record's bytes.
    pub fn payload(&self) -> &[u8] {
        self.frame.payload()
    }

    /// The frame to append to the spool.
    pub fn into_frame(self) -> Frame {
        self.frame
    }
}

/// Writes one spool record, a series at a time, straight from the decoded
/// request (no owned copies of labels or samples). Series whose samples all
/// fall outside the accepted window are left out.
pub struct RecordBuilder {
    rec: TeeRecord,
    accepted: Accepted,
    groups: u32,
    /// Where the open series starts, and where its sample count is.
    open: Option<(usize, usize)>,
    open_samples: u32,
}

impl RecordBuilder {
    pub fn new(accepted: Accepted) -> RecordBuilder {
        RecordBuilder::with_buffer(accepted, Vec::new())
    }

    /// A builder writing into `buf` (cleared first): a buffer reused from
    /// an earlier request is already large enough.
    pub fn with_buffer(accepted: Accepted, buf: Vec<u8>) -> RecordBuilder {
        let mut frame = Frame::with_buffer(buf);
        frame.extend_from_slice(&0u32.to_le_bytes());
        RecordBuilder {
            rec: TeeRecord {
                frame,
                ..TeeRecord::default()
            },
            accepted,
            groups: 0,
            open: None,
            open_samples: 0,
        }
    }

    /// Starts a series. `labels` are every label but `__name__`, sorted by
    /// name, at most [`MAX_LABELS`] of them (the pipeline's decode limits
    /// refuse larger series), names and values valid UTF-8 (the wire
    /// decoder checked; the drain checks again and skips a record that is
    /// not).
    pub fn begin_series(&mut self, account: &str, metric: &[u8], labels: &[(&[u8], &[u8])]) {
        debug_assert!(labels.len() <= MAX_LABELS, "{} labels", labels.len());
        self.end_series();
        let out = &mut self.rec.frame;
        // Start at 16 KiB rather than doubling up from a few bytes: a
        // request's record is ~35 KB when a tenth of 1,000 series is teed.
        if out.capacity() < 16 << 10 {
            out.reserve((16 << 10) - out.len());
        }
        let start = out.len();
        put_str(out, account.as_bytes());
        put_str(out, metric);
        out.extend_from_slice(&(labels.len() as u16).to_le_bytes());
        for (n, v) in labels {
            put_str(out, n);
            put_str(out, v);
        }
        self.open = Some((start, out.len()));
        out.extend_from_slice(&0u32.to_le_bytes());
        self.open_samples = 0;
    }

    /// Adds a sample to the series opened by [`begin_series`](Self::begin_series),
    /// if its timestamp is accepted.
    pub fn sample(&mut self, ts_ms: i64, value: f64) {
        debug_assert!(
            self.open.is_some(),
            "sample() outside begin_series/end_series"
        );
        if ts_ms < self.accepted.oldest_ms {
            self.rec.too_old += 1;
        } else if ts_ms > self.accepted.newest_ms {
            self.rec.too_new += 1;
        } else {
            self.rec.frame.extend_from_slice(&ts_ms.to_le_bytes());
            self.rec.frame.extend_from_slice(&value.to_le_bytes());
            self.open_samples += 1;
            self.rec.kept += 1;
        }
    }

    /// Closes the open series (dropping it if no sample was accepted).
    pub fn end_series(&mut self) {
        let Some((start, count_at)) = self.open.take() else {
            return;
        };
        if self.open_samples == 0 {
            self.rec.frame.truncate(start);
        } else {
            self.rec.frame.payload_mut()[count_at..count_at + 4]
                .copy_from_slice(&self.open_samples.to_le_bytes());
            self.groups += 1;
        }
    }

    /// The record (an empty payload when no sample was kept).
    pub fn finish(mut self) -> TeeRecord {
        self.end_series();
        if self.groups == 0 {
            self.rec.frame.truncate(0);
        } else {
            self.rec.frame.payload_mut()[..4].copy_from_slice(&self.groups.to_le_bytes());
        }
        self.rec
    }
}

fn put_str(out: &mut Frame, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s);
}
/// A spool record that does not decode.
#[derive(Debug, thiserror::Error)]
#[error("undecodable spool record at byte {0}")]
pub struct DecodeRecordError(usize);

struct Cursor<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeRecordError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or(DecodeRecordError(self.at))?;
        let s = &self.buf[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u16(&mut self) -> Result<u16, DecodeRecordError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, DecodeRecordError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    /// Where the next length-prefixed string lies (unchecked bytes).
    fn span(&mut self) -> Result<(usize, usize), DecodeRecordError> {
        let n = self.u32()? as usize;
        let at = self.at;
        self.take(n)?;
        Ok((at, self.at))
    }
}

/// One series of a spool record, in raw-table form, borrowed from the
/// record: rows are materialised a bounded part at a time
/// ([`Parts`](crate::cost::batch::Parts)).
#[derive(Debug, Clone, PartialEq)]
pub struct SeriesBlock<'a> {
    pub account: &'a str,
    pub metric: &'a str,
    pub cluster: &'a str,
    pub namespace: &'a str,
    pub pod: &'a str,
    /// Every label but `__name__` as the record encodes them (checked
    /// UTF-8), `(u32 len, name, u32 len, value)` pairs: read by
    /// [`labels`](Self::labels) only for a series row, not per sample.
    label_bytes: &'a [u8],
    /// The stable id of the series: XXH3-64 of its metric name and sorted
    /// labels as the record encodes them (length-prefixed, so unambiguous).
    pub series_id: u64,
    /// XXH3-64 of the account's and the series' ids: which series row this
    /// is, for the drain's memory of rows written.
    pub key: u64,
    /// `(i64 ts_ms, f64 value)` pairs, 16 bytes each, little endian.
    samples: &'a [u8],
}

impl<'a> SeriesBlock<'a> {
    /// Samples in the series.
    pub fn len(&self) -> usize {
        self.samples.len() / 16
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// The `i`th `(timestamp_ms, value)`.
    pub fn sample(&self, i: usize) -> (i64, f64) {
        let b = &self.samples[i * 16..i * 16 + 16];
        let word = |k: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[k..k + 8]);
            a
        };
        (i64::from_le_bytes(word(0)), f64::from_le_bytes(word(8)))
    }

    /// Every `(timestamp_ms, value)`.
    pub fn samples(&self) -> impl ExactSizeIterator<Item = (i64, f64)> + '_ {
        (0..self.len()).map(|i| self.sample(i))
    }

    /// Estimated bytes of one of its sample rows on the wire to ClickHouse.
    pub fn row_bytes(&self) -> usize {
        40 + self.account.len()
            + self.metric.len()
            + self.cluster.len()
            + self.namespace.len()
            + self.pod.len()
    }

    /// The labels other than `cluster`, `namespace` and `pod`, sorted by
    /// name.
    pub fn labels(&self) -> Vec<(&'a str, &'a str)> {
        let mut c = Cursor {
            buf: self.label_bytes,
            at: 0,
        };
        let mut next = || {
            let (a, b) = c.span().ok()?;
            std::str::from_utf8(&self.label_bytes[a..b]).ok()
        };
        let mut out = Vec::new();
        while let (Some(n), Some(v)) = (next(), next()) {
            if !matches!(n, "cluster" | "namespace" | "pod") {
                out.push((n, v));
            }
        }
        out
    }

    /// Its row in the series table, with `labels` = [`labels`](Self::labels).
    pub fn series_row<'s>(
        &'s self,
        labels: &'s [(&'a str, &'a str)],
        ingest_time: u32,
    ) -> SeriesRow<'s> {
        SeriesRow {
            account: self.account,
            metric: self.metric,
            series_id: self.series_id,
            cluster: self.cluster,
            namespace: self.namespace,
            pod: self.pod,
            label_names: labels,
            label_values: labels,
            ingest_time,
        }
    }

    /// Its `i`th sample as a raw-table row (`ingest_time` left 0).
    pub fn row(&self, i: usize) -> RawRow<'_> {
        let (ts, value) = self.sample(i);
        RawRow {
            account: self.account,
            metric: self.metric,
            cluster: self.cluster,
            namespace: self.namespace,
            pod: self.pod,
            series_id: self.series_id,
            ts,
            value,
            ingest_time: 0,
        }
    }
}

/// Decodes one spool record, appending its series to `out`; all or nothing
/// (on error `out` is left as it was).
pub fn decode_record<'a>(
    record: &'a [u8],
    out: &mut Vec<SeriesBlock<'a>>,
) -> Result<(), DecodeRecordError> {
    let len_before = out.len();
    let result = decode_into(record, out);
    if result.is_err() {
        out.truncate(len_before);
    }
    result
}

fn decode_into<'a>(
    record: &'a [u8],
    out: &mut Vec<SeriesBlock<'a>>,
) -> Result<(), DecodeRecordError> {
    let mut c = Cursor { buf: record, at: 0 };
    let groups = c.u32()?;
    // The account's hash (for the key), kept while accounts repeat.
    let mut account_hash: Option<(&[u8], u64)> = None;
    let mut spans: Vec<(usize, usize)> = Vec::new();
    for _ in 0..groups {
        // Find the strings first, then check UTF-8 once over the group's
        // head (account, metric, labels and their small length prefixes
        // are one valid string as a rule), not one check per string.
        let group_at = c.at;
        spans.clear();
        spans.push(c.span()?);
        let identity_at = c.at;
        spans.push(c.span()?);
        let nlabels = c.u16()?;
        let labels_at = c.at;
        // In `usize`: twice 65535 does not fit the u16 count.
        for _ in 0..2 * usize::from(nlabels) {
            spans.push(c.span()?);
        }
        let head_end = c.at;
        let head = &record[group_at..head_end];
        let text = std::str::from_utf8(head).ok();
        let str_at = |(a, b): (usize, usize)| -> Result<&'a str, DecodeRecordError> {
            match text {
                Some(t) => t.get(a - group_at..b - group_at),
                None => std::str::from_utf8(&record[a..b]).ok(),
            }
            .ok_or(DecodeRecordError(a))
        };
        let (account, metric) = (str_at(spans[0])?, str_at(spans[1])?);
        let (mut cluster, mut namespace, mut pod) = ("", "", "");
        for pair in spans[2..].chunks_exact(2) {
            let slot = match &record[pair[0].0..pair[0].1] {
                b"cluster" => Some(&mut cluster),
                b"namespace" => Some(&mut namespace),
                b"pod" => Some(&mut pod),
                _ => None,
            };
            match slot {
                Some(slot) => *slot = str_at(pair[1])?,
                // Checked with the head; read only for a series row.
                None if text.is_some() => {}
                None => {
                    str_at(pair[0])?;
                    str_at(pair[1])?;
                }
            }
        }
        let series_id = xxhash_rust::xxh3::xxh3_64(&record[identity_at..head_end]);
        let account_id = match account_hash {
            Some((a, h)) if a == account.as_bytes() => h,
            _ => {
                let h = xxhash_rust::xxh3::xxh3_64(account.as_bytes());
                account_hash = Some((account.as_bytes(), h));
                h
            }
        };
        let mut pair = [0u8; 16];
        pair[..8].copy_from_slice(&account_id.to_le_bytes());
        pair[8..].copy_from_slice(&series_id.to_le_bytes());
        let key = xxhash_rust::xxh3::xxh3_64(&pair);
        let n = c.u32()? as usize;
        let samples = c.take(n.checked_mul(16).ok_or(DecodeRecordError(c.at))?)?;
        out.push(SeriesBlock {
            account,
            metric,
            cluster,
            namespace,
            pod,
            label_bytes: &record[labels_at..head_end],
            series_id,
            key,
            samples,
        });
    }
    if c.at != record.len() {
        return Err(DecodeRecordError(c.at));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const METRIC: &[u8] = b"cloudtuner_kubecost_namespace_total_cost";

    /// A record of series `(namespace, samples)` of one metric and account.
    fn record(accepted: Accepted, series: &[(&str, Vec<(i64, f64)>)]) -> TeeRecord {
        fill(RecordBuilder::new(accepted), series)
    }

    /// Writes series `(namespace, samples)` with `b`.
    fn fill(mut b: RecordBuilder, series: &[(&str, Vec<(i64, f64)>)]) -> TeeRecord {
        for (ns, samples) in series {
            let labels: [(&[u8], &[u8]); 3] = [
                (b"cluster", b"c1"),
                (b"instance", b"x:9"),
                (b"namespace", ns.as_bytes()),
            ];
            b.begin_series("acc", METRIC, &labels);
            for &(t, v) in samples {
                b.sample(t, v);
            }
            b.end_series();
        }
        b.finish()
    }

    /// Every row of `blocks`, series by series.
    fn all_rows<'b>(blocks: &'b [SeriesBlock<'_>]) -> Vec<RawRow<'b>> {
        blocks
            .iter()
            .flat_map(|b| (0..b.len()).map(move |i| b.row(i)))
            .collect()
    }

    #[test]
    fn a_reused_buffer_makes_the_same_record() {
        let series = [("a", vec![(1, 0.5)]), ("b", vec![(2, 1.5)])];
        let fresh = record(Accepted::ANY, &series);
        let b = RecordBuilder::with_buffer(Accepted::ANY, vec![0xab; 100_000]);
        let reused = fill(b, &series);
        assert_eq!(reused.payload(), fresh.payload());
        assert_eq!(reused.frame.len(), fresh.payload().len());
        // Nothing kept: an empty payload, the buffer's memory kept.
        let empty = RecordBuilder::with_buffer(Accepted::ANY, reused.frame.into_buffer()).finish();
        assert!(empty.payload().is_empty());
        assert!(empty.into_frame().into_buffer().capacity() >= 100_000);
    }

    #[test]
    fn records_round_trip_into_rows() {
        let rec = record(
            Accepted::ANY,
            &[("a", vec![(1, 0.5), (2, 0.25)]), ("b", vec![(1, f64::NAN)])],
        );
        assert_eq!(rec.kept, 3);
        let mut blocks = Vec::new();
        decode_record(rec.payload(), &mut blocks).unwrap();
        let rows = all_rows(&blocks);
        assert_eq!(rows.len(), 3);
        assert_eq!(
            (
                rows[0].account,
                rows[0].metric,
                rows[0].namespace,
                rows[0].cluster,
                rows[0].pod
            ),
            (
                "acc",
                "cloudtuner_kubecost_namespace_total_cost",
                "a",
                "c1",
                ""
            )
        );
        let labels = blocks[0].labels();
        let series = blocks[0].series_row(&labels, 7);
        assert_eq!(
            (
                series.account,
                series.metric,
                series.series_id,
                series.namespace
            ),
            ("acc", rows[0].metric, rows[0].series_id, "a")
        );
        assert_eq!(series.label_names, [("instance", "x:9")]);
        assert_eq!(series.label_values, [("instance", "x:9")]);
        assert_eq!(series.ingest_time, 7);
        assert_eq!((rows[1].ts, rows[1].value), (2, 0.25));
        assert_eq!(rows[0].series_id, rows[1].series_id);
        assert_ne!(rows[0].series_id, rows[2].series_id);
        assert!(rows[2].value.is_nan());
        // Truncated records are refused, not misread, and append nothing
        // (the first group alone decodes fine before the cut).
        for cut in 0..rec.payload().len() {
            let mut out = vec![blocks[0].clone()];
            assert!(decode_record(&rec.payload()[..cut], &mut out).is_err());
            assert_eq!(out.len(), 1, "cut at {cut}: nothing appended");
        }
        // A label that is not UTF-8 makes the record undecodable.
        let mut b = RecordBuilder::new(Accepted::ANY);
        b.begin_series("acc", METRIC, &[(b"namespace", b"\xff")]);
        b.sample(1, 1.0);
        assert!(decode_record(b.finish().payload(), &mut Vec::new()).is_err());
    }

    /// Strings are checked once per series when its head is one valid
    /// string, one at a time when a length prefix is not (a string of 128
    /// bytes or more): both ways read the same labels and refuse bad bytes.
    #[test]
    fn record_strings_are_checked_whether_or_not_the_head_is_one_string() {
        let long = "ü".repeat(100); // 200 bytes: its length prefix is not UTF-8
        for value in ["short-é", long.as_str()] {
            let mut b = RecordBuilder::new(Accepted::ANY);
            let labels: [(&[u8], &[u8]); 2] = [(b"namespace", value.as_bytes()), (b"zone", b"z")];
            b.begin_series("acc", METRIC, &labels);
            b.sample(1, 1.0);
            let rec = b.finish();
            let mut blocks = Vec::new();
            decode_record(rec.payload(), &mut blocks).unwrap();
            assert_eq!(
                (blocks[0].namespace, blocks[0].labels().as_slice()),
                (value, [("zone", "z")].as_slice())
            );
            // The same series with one byte of a value broken is refused.
            let mut bad = rec.payload().to_vec();
            let at = bad
                .windows(2)
                .position(|w| w == "é".as_bytes() || w == "ü".as_bytes());
            bad[at.unwrap() + 1] = b'x';
            assert!(decode_record(&bad, &mut Vec::new()).is_err(), "{value}");
        }
        // Keys tell accounts apart; series ids do not.
        let block = |account: &str| {
            let mut b = RecordBuilder::new(Accepted::ANY);
            b.begin_series(account, METRIC, &[(b"namespace", b"n")]);
            b.sample(1, 1.0);
            let rec = b.finish();
            let mut blocks = Vec::new();
            decode_record(rec.payload(), &mut blocks).unwrap();
            (blocks[0].series_id, blocks[0].key)
        };
        let (a, b) = (block("acc-a"), block("acc-b"));
        assert_eq!(a.0, b.0);
        assert_ne!(a.1, b.1);
    }

    /// The series id is part of the raw table's key: a sample re-sent after
    /// an upgrade collapses with its first copy only if the id is the same.
    /// It depends on the metric and every label, and never changes: the
    /// value below was computed when XXH3 of the record encoding became the
    /// id; a different value means re-sent rows would no longer collapse.
    #[test]
    fn series_ids_are_stable_and_depend_on_every_label() {
        let id = |metric: &[u8], labels: &[(&[u8], &[u8])]| {
            let mut b = RecordBuilder::new(Accepted::ANY);
            b.begin_series("acc", metric, labels);
            b.sample(1, 1.0);
            let rec = b.finish();
            let mut blocks = Vec::new();
            decode_record(rec.payload(), &mut blocks).unwrap();
            blocks[0].series_id
        };
        let base = id(METRIC, &[(b"namespace", b"a"), (b"pod", b"p")]);
        assert_eq!(base, SERIES_ID_PINNED);
        // By definition: XXH3-64 of the metric and labels as encoded.
        let mut identity = Frame::default();
        put_str(&mut identity, METRIC);
        identity.extend_from_slice(&2u16.to_le_bytes());
        for s in [&b"namespace"[..], b"a", b"pod", b"p"] {
            put_str(&mut identity, s);
        }
        assert_eq!(base, xxhash_rust::xxh3::xxh3_64(identity.payload()));
        assert_ne!(base, id(METRIC, &[(b"namespace", b"b"), (b"pod", b"p")]));
        assert_ne!(base, id(METRIC, &[(b"namespace", b"a"), (b"pod", b"q")]));
        assert_ne!(
            base,
            id(
                b"cloudtuner_kubecost_pod_total_cost",
                &[(b"namespace", b"a"), (b"pod", b"p")]
            )
        );
        // Length prefixes keep `a=bc` and `ab=c` apart.
        assert_ne!(id(METRIC, &[(b"a", b"bc")]), id(METRIC, &[(b"ab", b"c")]));
    }

    const SERIES_ID_PINNED: u64 = 17_957_660_498_502_101_637;

    #[test]
    fn absurd_timestamps_are_not_teed() {
        let day = 86_400_000;
        let now = 1_000 * day;
        let w = TimeWindow {
            max_age_ms: 365 * day,
            max_future_ms: day,
        };
        let rec = record(
            w.at(now),
            &[
                (
                    "a",
                    vec![(now - 366 * day, 1.0), (now - 364 * day, 2.0), (now, 3.0)],
                ),
                ("b", vec![(now + 2 * day, 4.0), (0, 5.0)]),
            ],
        );
        assert_eq!((rec.kept, rec.too_old, rec.too_new), (2, 2, 1));
        let mut blocks = Vec::new();
        decode_record(rec.payload(), &mut blocks).unwrap();
        assert_eq!(blocks.len(), 1, "a series with nothing left is not written");
        assert_eq!(
            blocks[0].samples().collect::<Vec<_>>(),
            [(now - 364 * day, 2.0), (now, 3.0)]
        );
        // Nothing kept at all: an empty record, which append skips.
        let rec = record(w.at(now), &[("b", vec![(0, 5.0)])]);
        assert_eq!((rec.kept, rec.too_old, rec.payload().len()), (0, 1, 0));
    }
}
