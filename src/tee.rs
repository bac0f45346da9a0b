//! The ClickHouse tee: `cloudtuner_kubecost_*` samples are appended to the
//! durable [`spool`](crate::spool) before the request is acknowledged; a
//! background writer drains the spool into the raw table of ClickHouse in
//! large batches, and the [`rollup`](crate::rollup) derives expense rows
//! from there.
//!
//! The request path ([`Tee::append`]) never talks to ClickHouse: a ClickHouse
//! outage only makes the spool grow (up to its bound, then 503). The writer
//! releases spool entries only after ClickHouse acknowledged their insert, so
//! a crash between the two re-sends rows, which the raw table's
//! ReplacingMergeTree key collapses.
//!
//! Nothing is copied per label or per sample on the way: the request path
//! writes the spool record straight from the decoded request
//! ([`RecordBuilder`]), and the writer reads rows as views into the spool
//! record ([`SeriesBlock`], [`RawRow`]) that serialise straight to
//! ClickHouse's RowBinary.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::clickhouse::{ClickHouse, RawRow, SeriesRow, TouchedRow};
use crate::config::Config;
use crate::spool::{Pos, Spool, SpoolOptions, SpoolReader};
use crate::telemetry as t;

/// The metric-name prefix of the cost exporter's gauges, the only series teed.
pub const TEE_PREFIX: &[u8; 20] = b"cloudtuner_kubecost_";

/// Whether a metric name is teed (a fixed-size compare, inlined: the
/// `memcmp` call of `starts_with` ran for every kept series).
#[inline]
pub fn is_teed(name: &[u8]) -> bool {
    name.first_chunk() == Some(TEE_PREFIX)
}

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

/// Why teed samples could not be made durable (the request then fails with 503).
#[derive(Debug, thiserror::Error)]
pub enum TeeError {
    #[error("spool is full")]
    SpoolFull,
    #[error("spool write failed: {0}")]
    Io(#[from] std::io::Error),
}

/// One spool record: the teed samples of one request, and what was refused.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct TeeRecord {
    /// The record after `spool::HEADER_LEN` bytes kept for the spool's
    /// header (so that appending copies nothing); empty when nothing was
    /// kept.
    frame: Vec<u8>,
    /// Samples in the record.
    pub kept: u64,
    /// Samples refused as older than the accepted window.
    pub too_old: u64,
    /// Samples refused as further ahead than the accepted window.
    pub too_new: u64,
}

/// Writes one spool record, a series at a time, straight from the decoded
/// request (no owned copies of labels or samples). Series whose samples all
/// fall outside the accepted window are left out.
///
/// ```text
/// record := u32 groups, group*
/// group  := str account, str metric, u16 labels, (str name, str value)*,
///           u32 samples, (i64 ts_ms, f64 value)*
/// str    := u32 len, bytes (UTF-8)
/// ```
pub struct RecordBuilder {
    rec: TeeRecord,
    accepted: Accepted,
    groups: u32,
    /// Where the open series starts, and where its sample count is.
    open: Option<(usize, usize)>,
    open_samples: u32,
}

impl TeeRecord {
    /// The record's bytes.
    pub fn payload(&self) -> &[u8] {
        self.frame.get(HEADER..).unwrap_or_default()
    }
}

const HEADER: usize = crate::spool::HEADER_LEN as usize;

impl RecordBuilder {
    pub fn new(accepted: Accepted) -> RecordBuilder {
        RecordBuilder::with_buffer(accepted, Vec::new())
    }

    /// A builder writing into `buf` (cleared first): a buffer reused from
    /// an earlier request is already large enough.
    pub fn with_buffer(accepted: Accepted, mut buf: Vec<u8>) -> RecordBuilder {
        buf.clear();
        buf.resize(HEADER, 0);
        buf.extend_from_slice(&0u32.to_le_bytes());
        RecordBuilder {
            rec: TeeRecord {
                frame: buf,
                ..TeeRecord::default()
            },
            accepted,
            groups: 0,
            open: None,
            open_samples: 0,
        }
    }

    /// Starts a series. `labels` are every label but `__name__`, sorted by
    /// name, at most `u16::MAX` of them, names and values valid UTF-8 (the
    /// wire decoder checked; the writer checks again and skips a record
    /// that is not).
    pub fn begin_series(&mut self, account: &str, metric: &[u8], labels: &[(&[u8], &[u8])]) {
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
            self.rec.frame[count_at..count_at + 4]
                .copy_from_slice(&self.open_samples.to_le_bytes());
            self.groups += 1;
        }
    }

    /// The record (an empty payload when no sample was kept).
    pub fn finish(mut self) -> TeeRecord {
        self.end_series();
        if self.groups == 0 {
            self.rec.frame.clear();
        } else {
            self.rec.frame[HEADER..HEADER + 4].copy_from_slice(&self.groups.to_le_bytes());
        }
        self.rec
    }
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
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
/// record: rows are materialised a bounded part at a time ([`Parts`]).
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
    /// is, for the writer's memory of rows written.
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

    fn row(&self, i: usize) -> RawRow<'_> {
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
        // are one valid string as a rule): a check per string was ~9% of
        // the tee's CPU.
        let group_at = c.at;
        spans.clear();
        spans.push(c.span()?);
        let identity_at = c.at;
        spans.push(c.span()?);
        let nlabels = c.u16()?;
        let labels_at = c.at;
        for _ in 0..2 * nlabels {
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

const DAY_MS: i64 = 86_400_000;

/// The UTC month (`year * 12 + month`) of a millisecond timestamp: the raw
/// table is partitioned by month, and an INSERT may touch only so many
/// partitions (100 by default on modern servers).
fn month_of(ts_ms: i64) -> i64 {
    let days = ts_ms.div_euclid(DAY_MS);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    y * 12 + m - 1
}

/// Cuts series blocks into insert parts of rows: each part holds one month,
/// at most `max_rows` rows and about `max_bytes` bytes on the wire (a single
/// row larger than that is a part of its own). Rows are views into the
/// blocks, made only as parts are taken.
///
/// A part also names the blocks its rows come from (a run of them; with
/// samples of several months, some of the run may have no row in it).
pub struct Parts<'b, 'a> {
    blocks: &'b [SeriesBlock<'a>],
    months: Vec<i64>,
    max_rows: usize,
    max_bytes: usize,
    /// Rows in all blocks (to size a part's row vector once).
    total_rows: usize,
    /// (month index, block, sample) of the next row.
    at: (usize, usize, usize),
}

impl<'b, 'a> Parts<'b, 'a> {
    pub fn new(blocks: &'b [SeriesBlock<'a>], max_rows: usize, max_bytes: usize) -> Self {
        // Nearly always one month, at most a few: a short list beats a set,
        // and consecutive samples mostly share a day.
        let mut months: Vec<i64> = Vec::new();
        let mut last_day = None;
        let mut total_rows = 0;
        for b in blocks {
            total_rows += b.len();
            for (t, _) in b.samples() {
                let day = t.div_euclid(DAY_MS);
                if last_day == Some(day) {
                    continue;
                }
                last_day = Some(day);
                let m = month_of(t);
                if !months.contains(&m) {
                    months.push(m);
                }
            }
        }
        months.sort_unstable();
        Parts {
            blocks,
            months,
            max_rows: max_rows.max(1),
            max_bytes,
            total_rows,
            at: (0, 0, 0),
        }
    }

    /// The next part, or `None` when all rows were given out.
    pub fn next_part(&mut self) -> Option<Part<'b, 'a>> {
        let (mut m, mut b, mut i) = self.at;
        let single_month = self.months.len() == 1;
        while m < self.months.len() {
            let month = self.months[m];
            let mut rows = Vec::with_capacity(self.max_rows.min(self.total_rows));
            let mut bytes = 0;
            // The first and last block with a row in `rows`.
            let (mut first, mut last) = (b, b);
            while b < self.blocks.len() {
                let block = &self.blocks[b];
                let size = block.row_bytes();
                while i < block.len() {
                    if single_month || month_of(block.sample(i).0) == month {
                        if !rows.is_empty()
                            && (rows.len() >= self.max_rows || bytes + size > self.max_bytes)
                        {
                            self.at = (m, b, i);
                            return Some(Part {
                                rows,
                                blocks: &self.blocks[first..=last],
                            });
                        }
                        if rows.is_empty() {
                            first = b;
                        }
                        last = b;
                        rows.push(block.row(i));
                        bytes += size;
                    }
                    i += 1;
                }
                b += 1;
                i = 0;
            }
            m += 1;
            b = 0;
            self.at = (m, 0, 0);
            if !rows.is_empty() {
                return Some(Part {
                    rows,
                    blocks: &self.blocks[first..=last],
                });
            }
        }
        self.at = (m, b, i);
        None
    }
}

/// One insert's worth of sample rows, and the series blocks they come from.
pub struct Part<'b, 'a> {
    pub rows: Vec<RawRow<'b>>,
    pub blocks: &'b [SeriesBlock<'a>],
}

/// The running tee: spool, ClickHouse writer task, and (if enabled) the rollup.
pub struct Tee {
    spool: Arc<Spool>,
    window: TimeWindow,
    stop: watch::Sender<bool>,
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

impl Tee {
    /// Opens the spool and starts the writer (and rollup) tasks. Fails only
    /// if the spool cannot be opened or the client cannot be configured;
    /// ClickHouse being down is not an error here.
    pub async fn start(cfg: &Config) -> anyhow::Result<Tee> {
        let ch = ClickHouse::new(&cfg.clickhouse)?;
        let opts = SpoolOptions {
            dir: cfg.spool.dir.clone(),
            max_bytes: cfg.spool.max_bytes.bytes(),
            segment_bytes: cfg.spool.segment_bytes.bytes(),
            commit_delay: cfg.spool.commit_delay,
            commit_interval: cfg.spool.commit_interval,
        };
        let dir = opts.dir.display().to_string();
        let (spool, reader) = tokio::task::spawn_blocking(move || Spool::open(&opts))
            .await?
            .map_err(|e| anyhow::anyhow!("cannot open the spool in {dir}: {e}"))?;
        let spool = Arc::new(spool);
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        let writer = Writer {
            ch: ch.clone(),
            reader: Arc::new(std::sync::Mutex::new(reader)),
            spool: spool.clone(),
            cfg: cfg.spool.clone(),
            migrate: cfg.clickhouse.migrate_on_start,
        };
        tasks.push(tokio::spawn(writer.run(stop_rx.clone())));
        if cfg.rollup.enabled {
            let rollup = crate::rollup::Rollup::new(ch, &cfg.rollup);
            tasks.push(tokio::spawn(rollup.run(cfg.rollup.interval, stop_rx)));
        }
        tracing::info!(
            spool = %cfg.spool.dir.display(),
            pending_bytes = spool.pending_bytes(),
            rollup = cfg.rollup.enabled,
            "tee started"
        );
        Ok(Tee {
            spool,
            window: TimeWindow {
                max_age_ms: duration_ms(cfg.spool.max_sample_age),
                max_future_ms: duration_ms(cfg.spool.max_sample_future),
            },
            stop,
            tasks: std::sync::Mutex::new(tasks),
        })
    }

    /// The sample timestamps accepted right now: samples older than
    /// `spool.max_sample_age` or further ahead than `spool.max_sample_future`
    /// are not teed, only counted.
    pub fn accepted_now(&self) -> Accepted {
        self.window.at(unix_now_ms())
    }

    /// Makes a request's record durable (returns after the shared fsync),
    /// and counts what it kept and refused. Gives back the record's buffer
    /// for reuse.
    pub async fn append(&self, record: TeeRecord) -> Result<Vec<u8>, TeeError> {
        if record.too_old > 0 {
            metrics::counter!(t::SAMPLES_REJECTED, "reason" => "too_old").increment(record.too_old);
        }
        if record.too_new > 0 {
            metrics::counter!(t::SAMPLES_REJECTED, "reason" => "too_far_in_future")
                .increment(record.too_new);
        }
        if record.kept == 0 {
            return Ok(record.frame);
        }
        let started = Instant::now();
        let buf = self.spool.append_frame(record.frame).await?;
        metrics::histogram!(t::SPOOL_APPEND_DURATION).record(started.elapsed().as_secs_f64());
        metrics::counter!(t::SAMPLES_SPOOLED).increment(record.kept);
        Ok(buf)
    }

    /// Unsent spool bytes.
    pub fn pending_bytes(&self) -> u64 {
        self.spool.pending_bytes()
    }

    /// Stops the writer and rollup (within `limit`; an insert in flight is
    /// abandoned and re-sent after restart) and flushes the spool writer.
    pub async fn shutdown(&self, limit: Duration) {
        let _ = self.stop.send(true);
        let tasks: Vec<_> = self
            .tasks
            .lock()
            .map(|mut t| t.drain(..).collect())
            .unwrap_or_default();
        for t in tasks {
            let abort = t.abort_handle();
            if tokio::time::timeout(limit, t).await.is_err() {
                abort.abort();
            }
        }
        let spool = self.spool.clone();
        let _ = tokio::task::spawn_blocking(move || spool.close()).await;
        tracing::info!(pending_bytes = self.spool.pending_bytes(), "tee stopped");
    }
}

/// Drains the spool into the raw table.
struct Writer {
    ch: ClickHouse,
    reader: Arc<std::sync::Mutex<SpoolReader>>,
    spool: Arc<Spool>,
    cfg: crate::config::SpoolConfig,
    migrate: bool,
}

/// Rows ClickHouse refused for their content, in the spool directory.
pub const DEAD_LETTER_FILE: &str = "dead-letter.jsonl";

/// Most payload bytes read from the spool in one go.
const READ_CHUNK_BYTES: usize = 16 << 20;

/// How often the writer looks whether a read's worth of records is waiting
/// while a batch fills.
const FILL_POLL: Duration = Duration::from_millis(50);

/// Spool read failures in a row after which the writer logs only every
/// so often (it keeps retrying with backoff).
const READ_ERRORS_LOGGED: u32 = 5;

/// Why an insert loop ended early.
struct Stopped;

impl Writer {
    async fn run(self, mut stop: watch::Receiver<bool>) {
        if self.migrate {
            self.migrate_until_done(&mut stop).await;
        }
        let mut read_errors = 0;
        let mut seen = SeenSeries::default();
        while !*stop.borrow() {
            let Some((records, end)) = self.next_batch(&mut stop, &mut read_errors).await else {
                continue;
            };
            if self
                .write_batch(&records, &mut seen, &mut stop)
                .await
                .is_err()
            {
                return;
            }
            if let Err(e) = self.ack(end).await {
                tracing::error!(error = %e, "spool: cannot record the acknowledged position");
            }
            if let Ok(mut r) = self.reader.lock() {
                r.recycle(records);
            }
            self.publish_gauges();
        }
    }

    /// Decodes a batch of records and inserts every part until ClickHouse
    /// takes it (or it is dead-lettered); the spool keeps the batch
    /// meanwhile.
    async fn write_batch(
        &self,
        records: &[Vec<u8>],
        seen: &mut SeenSeries,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), Stopped> {
        let mut blocks = Vec::new();
        for r in records {
            if let Err(e) = decode_record(r, &mut blocks) {
                metrics::counter!(t::RECORDS_UNDECODABLE).increment(1);
                tracing::error!(error = %e, "skipping an undecodable spool record");
            }
        }
        sort_like_raw_table(&mut blocks);
        let mut parts = Parts::new(&blocks, self.cfg.batch_max_rows, self.max_bytes());
        while let Some(part) = parts.next_part() {
            self.insert_part(part, seen, stop).await?;
        }
        Ok(())
    }

    fn max_bytes(&self) -> usize {
        usize::try_from(self.cfg.batch_max_bytes.bytes()).unwrap_or(usize::MAX)
    }

    /// Inserts a part's rows, with their touched index and the rows of
    /// series this writer has not written this month, retrying availability
    /// errors with backoff. A part that fails because of its data, or times
    /// out, is split in halves and the halves are retried; a single row that
    /// fails because of its data goes to the dead-letter file.
    async fn insert_part(
        &self,
        part: Part<'_, '_>,
        seen: &mut SeenSeries,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), Stopped> {
        let mut backoff = self.cfg.retry_backoff;
        let month = month_of(unix_now_ms());
        // A series is in many records of a batch: one row for it.
        let mut fresh = HashSet::with_hasher(HashedKeys::default());
        let series: Vec<&SeriesBlock> = part
            .blocks
            .iter()
            .filter(|b| seen.needs_row(b.key, month) && fresh.insert(b.key))
            .collect();
        let mut todo = vec![(part.rows, series)];
        while let Some((mut rows, mut series)) = todo.pop() {
            loop {
                let now = unix_now() as u32;
                for r in &mut rows {
                    r.ingest_time = now;
                }
                let labels: Vec<_> = series.iter().map(|b| b.labels()).collect();
                let series_rows: Vec<SeriesRow> = series
                    .iter()
                    .zip(&labels)
                    .map(|(b, l)| b.series_row(l, now))
                    .collect();
                // The touched index first: if the raw insert then fails, the
                // rollup merely re-derives a bucket that did not change. The
                // series before their samples: a sample's labels are always
                // there to join.
                let touched = touched_rows(&rows, now);
                let result = async {
                    self.ch
                        .insert::<TouchedRow>(&self.ch.touched_table, &touched)
                        .await?;
                    if !series_rows.is_empty() {
                        self.ch
                            .insert::<SeriesRow>(&self.ch.series_table, &series_rows)
                            .await?;
                    }
                    self.ch.insert::<RawRow>(&self.ch.raw_table, &rows).await
                }
                .await;
                let e = match result {
                    Ok(()) => {
                        let month = month_of(i64::from(now) * 1000);
                        for b in &series {
                            seen.wrote_row(b.key, month);
                        }
                        metrics::counter!(t::BATCHES_WRITTEN, "table" => "samples").increment(1);
                        metrics::counter!(t::ROWS_WRITTEN, "table" => "samples")
                            .increment(rows.len() as u64);
                        metrics::counter!(t::ROWS_WRITTEN, "table" => "series")
                            .increment(series_rows.len() as u64);
                        break;
                    }
                    Err(e) => e,
                };
                metrics::counter!(t::BATCHES_FAILED, "table" => "samples").increment(1);
                let splittable = e.is_data_error() || e.is_timeout();
                if splittable && rows.len() > 1 {
                    tracing::warn!(error = %e, rows = rows.len(), "clickhouse insert failed; retrying in two halves");
                    let second = rows.split_off(rows.len() / 2);
                    let second_series = series_of(&series, &second);
                    series = series_of(&series, &rows);
                    todo.push((second, second_series));
                    todo.push((rows, series));
                    break;
                }
                if e.is_data_error() {
                    self.dead_letter(&rows, &series_rows, &e).await;
                    break;
                }
                tracing::warn!(error = %e, rows = rows.len(), retry_in = ?backoff, "clickhouse insert failed; retrying");
                self.publish_gauges();
                if sleep_or_stop(jitter(backoff), stop).await {
                    return Err(Stopped);
                }
                backoff = (backoff * 2).min(self.cfg.retry_max_backoff);
            }
        }
        Ok(())
    }

    /// Appends rows ClickHouse refuses for their content to
    /// `<spool dir>/dead-letter.jsonl` (one JSON object per sample row, with
    /// the error, and its series row if that was in the failed insert),
    /// counts and logs them. They are not retried.
    async fn dead_letter(
        &self,
        rows: &[RawRow<'_>],
        series: &[SeriesRow<'_>],
        e: &crate::clickhouse::ClickHouseError,
    ) {
        metrics::counter!(t::ROWS_DEAD_LETTERED).increment(rows.len() as u64);
        let path = self.cfg.dir.join(DEAD_LETTER_FILE);
        let mut text = String::new();
        let error = e.to_string();
        for r in rows {
            let s = series
                .iter()
                .find(|s| (s.series_id, s.account, s.metric) == (r.series_id, r.account, r.metric));
            let line = match s {
                Some(s) => serde_json::json!({ "error": error, "row": r, "series": s }),
                None => serde_json::json!({ "error": error, "row": r }),
            };
            text.push_str(&line.to_string());
            text.push('\n');
        }
        let p = path.clone();
        let written = tokio::task::spawn_blocking(move || {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&p)?;
            f.write_all(text.as_bytes())?;
            f.sync_data()
        })
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r);
        match written {
            Ok(()) => {
                tracing::error!(error = %e, rows = rows.len(), file = %path.display(), "clickhouse refuses these rows for their content; written to the dead-letter file, not retried")
            }
            Err(w) => {
                tracing::error!(error = %e, write_error = %w, rows = rows.len(), "clickhouse refuses these rows for their content, and the dead-letter file cannot be written; they are dropped")
            }
        }
    }

    async fn migrate_until_done(&self, stop: &mut watch::Receiver<bool>) {
        let mut backoff = self.cfg.retry_backoff;
        loop {
            match self.ch.migrate().await {
                Ok(r) => {
                    tracing::info!(server = %r.server_version, created = ?r.created, columns_added = ?r.columns_added, "clickhouse schema checked");
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "clickhouse migrate failed; retrying");
                    if sleep_or_stop(jitter(backoff), stop).await {
                        return;
                    }
                    backoff = (backoff * 2).min(self.cfg.retry_max_backoff);
                }
            }
        }
    }

    /// Collects a batch: waits for data, lets it accumulate on disk for
    /// `batch_max_age` (or until a read's worth is waiting), then reads it
    /// in one go, up to [`READ_CHUNK_BYTES`]. Between reads the writer only
    /// naps and looks at a counter: it does not wake for every request.
    /// `None` if stopped, or if nothing arrived within a second (gauges are
    /// refreshed meanwhile) or the read failed (after a backoff).
    async fn next_batch(
        &self,
        stop: &mut watch::Receiver<bool>,
        read_errors: &mut u32,
    ) -> Option<(Vec<Vec<u8>>, Pos)> {
        while !self.reader.lock().map(|r| r.has_unread()).unwrap_or(false) {
            tokio::select! {
                () = self.spool.committed() => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {
                    self.publish_gauges();
                    return None;
                }
                _ = stop.changed() => return None,
            }
        }
        let deadline = Instant::now() + self.cfg.batch_max_age;
        let enough = READ_CHUNK_BYTES.min(self.max_bytes()) as u64;
        while self.spool.pending_bytes() < enough {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            if sleep_or_stop(left.min(FILL_POLL), stop).await {
                return None;
            }
        }
        match self.read().await {
            Ok(records) => {
                *read_errors = 0;
                let end = records.last()?.end;
                Some((records.into_iter().map(|r| r.payload).collect(), end))
            }
            Err(e) => {
                // Do not spin: back off, and log the first few and then
                // one in a hundred.
                *read_errors = read_errors.saturating_add(1);
                metrics::counter!(t::SPOOL_READ_ERRORS).increment(1);
                let backoff = self
                    .cfg
                    .retry_backoff
                    .saturating_mul(1 << (*read_errors - 1).min(16))
                    .min(self.cfg.retry_max_backoff);
                if *read_errors <= READ_ERRORS_LOGGED || *read_errors % 100 == 0 {
                    tracing::error!(error = %e, failures = *read_errors, retry_in = ?backoff, "spool read failed");
                }
                sleep_or_stop(jitter(backoff), stop).await;
                None
            }
        }
    }

    async fn read(&self) -> std::io::Result<Vec<crate::spool::Record>> {
        let reader = self.reader.clone();
        // Every record holds at least one row.
        let max_rows = self.cfg.batch_max_rows;
        let result = tokio::task::spawn_blocking(move || {
            let mut r = reader
                .lock()
                .map_err(|_| std::io::Error::other("spool reader lock poisoned"))?;
            r.read(max_rows, READ_CHUNK_BYTES)
        })
        .await;
        result.map_err(std::io::Error::other)?
    }

    async fn ack(&self, end: Pos) -> std::io::Result<()> {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || {
            reader
                .lock()
                .map_err(|_| std::io::Error::other("spool reader lock poisoned"))?
                .ack(end)
        })
        .await
        .map_err(std::io::Error::other)?
    }

    fn publish_gauges(&self) {
        metrics::gauge!(t::SPOOL_BYTES).set(self.spool.pending_bytes() as f64);
        let oldest = self.reader.lock().ok().and_then(|r| r.oldest_unacked_ms());
        let age = oldest.map_or(0.0, |ms| (unix_now_ms() - ms).max(0) as f64 / 1000.0);
        metrics::gauge!(t::SPOOL_OLDEST_AGE).set(age);
    }
}

/// The series rows a writer has written, with the month (of ingest time)
/// each went into: a series needs a row once per month, so that a month's
/// partitions of the series table hold every series of the same month's
/// samples. Bounded: when full it starts over (a series then gets a second
/// row in the month, which the table's ReplacingMergeTree collapses).
#[derive(Default)]
struct SeenSeries {
    months: HashMap<u64, i64, HashedKeys>,
}

/// Series rows a writer remembers (about 36 MiB when full).
const SEEN_SERIES_MAX: usize = 1 << 20;

impl SeenSeries {
    fn needs_row(&self, key: u64, month: i64) -> bool {
        self.months.get(&key) != Some(&month)
    }

    fn wrote_row(&mut self, key: u64, month: i64) {
        if self.months.len() >= SEEN_SERIES_MAX && !self.months.contains_key(&key) {
            self.months.clear();
        }
        self.months.insert(key, month);
    }
}

/// The series of `series` that `rows` hold samples of.
fn series_of<'b, 'a>(
    series: &[&'b SeriesBlock<'a>],
    rows: &[RawRow<'_>],
) -> Vec<&'b SeriesBlock<'a>> {
    let ids: HashSet<u64, HashedKeys> = rows.iter().map(|r| r.series_id).collect();
    series
        .iter()
        .copied()
        .filter(|b| ids.contains(&b.series_id))
        .collect()
}

/// The distinct (minute, charged metric, account, hour) of a batch.
fn touched_rows(rows: &[RawRow<'_>], now: u32) -> Vec<TouchedRow> {
    let minute = now - now % 60;
    let mut set = std::collections::BTreeSet::new();
    let mut last = None;
    for r in rows {
        let hour = (r.ts.div_euclid(3_600_000) * 3600).clamp(0, u32::MAX as i64) as u32;
        let key = (r.metric, r.account, hour);
        // Rows come in runs of one series: most are the key just seen.
        if last == Some(key) {
            continue;
        }
        last = Some(key);
        if crate::rollup::CHARGED_METRICS.contains(&r.metric) {
            set.insert(key);
        }
    }
    set.into_iter()
        .map(|(metric, account, hour)| TouchedRow {
            ingest_minute: minute,
            metric: metric.to_string(),
            account: account.to_string(),
            hour,
        })
        .collect()
}

/// Orders series blocks as the raw table orders rows (account, metric,
/// series id, then time), so that inserted rows arrive sorted: ClickHouse
/// checks whether an inserted block is already in key order and then skips
/// sorting it and permuting every column (that sort was ~20% of its CPU
/// under load; 18.16 does the check too). Rows out of order (a series whose
/// samples overlap across records) are only slower, never wrong: ClickHouse
/// sorts them.
///
/// A batch holds each series many times (once per request), so blocks are
/// grouped by series (one hash lookup each), the few distinct series are
/// sorted (strings ranked once per distinct value, so the sort compares
/// numbers), and each group is put in time order (already so, as a rule).
fn sort_like_raw_table<'a>(blocks: &mut Vec<SeriesBlock<'a>>) {
    // Strings by their XXH3 (a collision only misorders, never loses).
    let id = |s: &str| xxhash_rust::xxh3::xxh3_64(s.as_bytes());
    let mut group_of: HashMap<u64, u32, HashedKeys> = HashMap::default();
    let mut group: Vec<u32> = Vec::with_capacity(blocks.len());
    // Per group: its first block (for the group's key) and its size.
    let mut groups: Vec<(usize, u32)> = Vec::new();
    for (i, b) in blocks.iter().enumerate() {
        let g = *group_of.entry(b.key).or_insert_with(|| {
            groups.push((i, 0));
            (groups.len() - 1) as u32
        });
        groups[g as usize].1 += 1;
        group.push(g);
    }
    let mut names: HashMap<u64, &'a str, HashedKeys> = HashMap::default();
    for &(first, _) in &groups {
        let b = &blocks[first];
        names.entry(id(b.account)).or_insert(b.account);
        names.entry(id(b.metric)).or_insert(b.metric);
    }
    let mut sorted: Vec<(&'a str, u64)> = names.into_iter().map(|(h, s)| (s, h)).collect();
    sorted.sort_unstable();
    let rank: HashMap<u64, u32, HashedKeys> = sorted
        .into_iter()
        .enumerate()
        .map(|(i, (_, h))| (h, i as u32))
        .collect();
    let mut order: Vec<u32> = (0..groups.len() as u32).collect();
    order.sort_unstable_by_key(|&g| {
        let b = &blocks[groups[g as usize].0];
        (
            rank[&id(b.account)],
            rank[&id(b.metric)],
            b.series_id,
            b.key,
        )
    });
    // Where each group starts in the output.
    let mut start = vec![0usize; groups.len()];
    let mut at = 0;
    for &g in &order {
        start[g as usize] = at;
        at += groups[g as usize].1 as usize;
    }
    let mut out: Vec<Option<SeriesBlock<'a>>> = vec![None; blocks.len()];
    for (b, g) in blocks.drain(..).zip(group) {
        let slot = &mut start[g as usize];
        out[*slot] = Some(b);
        *slot += 1;
    }
    blocks.extend(out.into_iter().flatten());
    // Each group in time order: a stable sort of a run already in order
    // is one pass.
    let mut at = 0;
    for &g in &order {
        let n = groups[g as usize].1 as usize;
        blocks[at..at + n].sort_by_key(|b| b.samples().next().map_or(i64::MIN, |(ts, _)| ts));
        at += n;
    }
}

/// Hash maps keyed by 64-bit hashes (series keys, XXH3 of strings): the
/// key is its own hash. SipHash, the default, was ~5% of the tee's extra CPU.
type HashedKeys = BuildHasherDefault<KeyIsHash>;

#[derive(Default)]
struct KeyIsHash(u64);

impl Hasher for KeyIsHash {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write_u64(&mut self, key: u64) {
        self.0 = key;
    }

    /// Not used by the `u64` keys above; mixes bytes in for completeness.
    fn write(&mut self, bytes: &[u8]) {
        self.0 = xxhash_rust::xxh3::xxh3_64_with_seed(bytes, self.0);
    }
}

/// Sleeps `d` unless stopped first (then returns true).
async fn sleep_or_stop(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    if *stop.borrow() {
        return true;
    }
    tokio::select! {
        () = tokio::time::sleep(d) => false,
        _ = stop.changed() => true,
    }
}

/// Between half and the whole of `d`.
pub(crate) fn jitter(d: Duration) -> Duration {
    use rand::Rng;
    d.mul_f64(rand::thread_rng().gen_range(0.5..=1.0))
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 4)
}

fn unix_now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
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

    fn all_rows<'b>(blocks: &'b [SeriesBlock<'_>]) -> Vec<RawRow<'b>> {
        let mut parts = Parts::new(blocks, usize::MAX, usize::MAX);
        let mut rows = Vec::new();
        while let Some(p) = parts.next_part() {
            assert!(p
                .rows
                .iter()
                .all(|r| p.blocks.iter().any(|b| b.series_id == r.series_id)));
            rows.extend(p.rows);
        }
        rows
    }

    #[test]
    fn a_reused_buffer_makes_the_same_record() {
        let series = [("a", vec![(1, 0.5)]), ("b", vec![(2, 1.5)])];
        let fresh = record(Accepted::ANY, &series);
        let b = RecordBuilder::with_buffer(Accepted::ANY, vec![0xab; 100_000]);
        let reused = fill(b, &series);
        assert_eq!(reused.payload(), fresh.payload());
        assert_eq!(reused.frame.len(), HEADER + fresh.payload().len());
        // Nothing kept: an empty payload, the buffer's memory kept.
        let empty = RecordBuilder::with_buffer(Accepted::ANY, reused.frame).finish();
        assert!(empty.payload().is_empty());
        assert!(empty.frame.capacity() >= 100_000);
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

    /// Rows reach ClickHouse in the raw table's key order (account, metric,
    /// series id, time) whatever the order of requests and series.
    #[test]
    fn batches_are_sorted_like_the_raw_table() {
        let mut records = Vec::new();
        for (account, ts) in [("acc-b", 20), ("acc-a", 30), ("acc-b", 10), ("acc-a", 10)] {
            let mut b = RecordBuilder::new(Accepted::ANY);
            for (metric, ns) in [
                (&b"cloudtuner_kubecost_pod_cost"[..], b"z"),
                (b"cloudtuner_kubecost_node_cost", b"a"),
                (b"cloudtuner_kubecost_pod_cost", b"a"),
                (b"cloudtuner_kubecost_node_cost", b"m"),
            ] {
                b.begin_series(account, metric, &[(b"namespace", ns)]);
                b.sample(ts, 1.0);
                b.sample(ts + 1, 2.0);
            }
            records.push(b.finish().payload().to_vec());
        }
        let mut blocks = Vec::new();
        for r in &records {
            decode_record(r, &mut blocks).unwrap();
        }
        sort_like_raw_table(&mut blocks);
        let rows = all_rows(&blocks);
        assert_eq!(rows.len(), 32);
        let keys: Vec<_> = rows
            .iter()
            .map(|r| (r.account, r.metric, r.series_id, r.ts))
            .collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
        assert_eq!(keys[0].0, "acc-a");
        assert_eq!(keys[0].1, "cloudtuner_kubecost_node_cost");
    }

    #[test]
    fn only_cloudtuner_kubecost_names_are_teed() {
        assert!(is_teed(METRIC));
        assert!(is_teed(b"cloudtuner_kubecost_"));
        assert!(!is_teed(b"cloudtuner_kubecost"));
        assert!(!is_teed(b"kubecost_cluster_cost"));
        assert!(!is_teed(b"xcloudtuner_kubecost_cost"));
        assert!(!is_teed(b""));
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
        let mut identity = Vec::new();
        put_str(&mut identity, METRIC);
        identity.extend_from_slice(&2u16.to_le_bytes());
        for s in [&b"namespace"[..], b"a", b"pod", b"p"] {
            put_str(&mut identity, s);
        }
        assert_eq!(base, xxhash_rust::xxh3::xxh3_64(&identity));
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

    #[test]
    fn months_are_utc_calendar_months() {
        assert_eq!(month_of(0), 1970 * 12);
        // 2024-02-29T23:59:59.999Z and 2024-03-01T00:00:00Z.
        assert_eq!(month_of(1_709_251_199_999), 2024 * 12 + 1);
        assert_eq!(month_of(1_709_251_200_000), 2024 * 12 + 2);
        assert_eq!(month_of(-1), 1969 * 12 + 11);
    }

    /// One 32 KB request (one series, 60 labels of 4 KiB, 4,000 samples)
    /// used to expand to ~1 GB of rows in the writer at once; now a sample
    /// row holds no labels (its series row does, once), and parts are one
    /// month each and bounded in (wire) bytes.
    #[test]
    fn parts_bound_rows_by_bytes_and_split_by_month() {
        let names: Vec<String> = (0..60).map(|i| format!("l{i:02}")).collect();
        let value = "a".repeat(4096);
        let labels: Vec<(&[u8], &[u8])> = names
            .iter()
            .map(|n| (n.as_bytes(), value.as_bytes()))
            .collect();
        let feb_end = 1_709_251_200_000 - 2_000;
        let mut b = RecordBuilder::new(Accepted::ANY);
        b.begin_series("acc", METRIC, &labels);
        for i in 0..4000 {
            b.sample(feb_end + i, 1.0);
        }
        let rec = b.finish();
        assert!(rec.payload().len() < 400_000, "{}", rec.payload().len());
        let mut blocks = Vec::new();
        decode_record(rec.payload(), &mut blocks).unwrap();
        let row = blocks[0].row_bytes();
        assert!(row < 200, "{row}");
        assert_eq!(blocks[0].labels().len(), 60);
        let max_bytes = 8 << 10;
        let mut parts = Parts::new(&blocks, 200_000, max_bytes);
        let (mut n, mut count) = (0, 0);
        let mut months = Vec::new();
        while let Some(p) = parts.next_part() {
            let p = p.rows;
            assert!(
                p.len() * row <= max_bytes,
                "{} rows of {row} bytes",
                p.len()
            );
            let m = month_of(p[0].ts);
            assert!(p.iter().all(|r| month_of(r.ts) == m), "one month per part");
            months.push(m);
            n += p.len();
            count += 1;
        }
        assert_eq!(n, 4000);
        assert!(months.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(months.first(), Some(&(2024 * 12 + 1)));
        assert_eq!(months.last(), Some(&(2024 * 12 + 2)));
        assert!(count >= 4000 * row / max_bytes, "{count}");
        // The row-count bound holds as well.
        let mut parts = Parts::new(&blocks, 7, usize::MAX);
        while let Some(p) = parts.next_part() {
            assert!(p.rows.len() <= 7);
        }
    }

    #[test]
    fn a_series_row_is_needed_once_per_month() {
        let mut seen = SeenSeries::default();
        assert!(seen.needs_row(1, 100));
        seen.wrote_row(1, 100);
        assert!(!seen.needs_row(1, 100));
        assert!(seen.needs_row(2, 100));
        assert!(seen.needs_row(1, 101), "a new month needs the row again");
        seen.wrote_row(1, 101);
        assert!(!seen.needs_row(1, 101));
        // Bounded: full, it starts over rather than grow.
        for k in 0..SEEN_SERIES_MAX as u64 + 10 {
            seen.wrote_row(k, 101);
        }
        assert!(seen.months.len() <= SEEN_SERIES_MAX);
        assert!(!seen.needs_row(SEEN_SERIES_MAX as u64 + 9, 101));
    }

    #[test]
    fn touched_rows_are_distinct_per_charged_metric_account_and_hour() {
        let row = |metric, account, ts| RawRow {
            account,
            metric,
            cluster: "",
            namespace: "",
            pod: "",
            series_id: 0,
            ts,
            value: 1.0,
            ingest_time: 0,
        };
        let ns = crate::rollup::NAMESPACE_METRIC;
        let rows = [
            row(ns, "a", 0),
            row(ns, "a", 1),
            row(ns, "b", 2),
            row(ns, "a", 3),
            row(ns, "a", 3_600_000),
            row("cloudtuner_kubecost_namespace_cpu_cost", "a", 0),
        ];
        let t = touched_rows(&rows, 125);
        let keys: Vec<_> = t
            .iter()
            .map(|r| (r.ingest_minute, r.account.as_str(), r.hour))
            .collect();
        assert_eq!(keys, [(120, "a", 0), (120, "a", 3600), (120, "b", 0)]);
    }
}
