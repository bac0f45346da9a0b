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

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::clickhouse::{series_id, ClickHouse, RawRow, TouchedRow};
use crate::config::Config;
use crate::spool::{Pos, Spool, SpoolOptions, SpoolReader};
use crate::telemetry as t;

/// The metric-name prefix of the cost exporter's gauges, the only series teed.
pub const TEE_PREFIX: &[u8] = b"cloudtuner_kubecost_";

/// The teed samples of one series, after tenancy enforcement. The labels
/// are held once per series, never per sample, so memory stays proportional
/// to the request (one series of 60 labels of 4 KiB and 4,000 samples is
/// 240 KiB here, not 1 GB).
#[derive(Debug, Clone, PartialEq)]
pub struct TeeSeries {
    /// The authenticated account id.
    pub account: String,
    /// `__name__`.
    pub metric: String,
    /// Every label but `__name__`, sorted by name (tenant labels included).
    pub labels: Vec<(String, String)>,
    /// `(timestamp_ms, value)`.
    pub samples: Vec<(i64, f64)>,
}

/// Timestamps the tee accepts, relative to now; samples outside are not
/// teed (counted in `rwgate_tee_samples_rejected_total`).
#[derive(Debug, Clone, Copy)]
pub struct TimeWindow {
    pub max_age_ms: i64,
    pub max_future_ms: i64,
}

impl TimeWindow {
    /// Accepts everything.
    pub const ANY: TimeWindow = TimeWindow {
        max_age_ms: i64::MAX / 4,
        max_future_ms: i64::MAX / 4,
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

/// What [`encode`] kept and refused.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Encoded {
    pub kept: u64,
    pub too_old: u64,
    pub too_new: u64,
}

/// Encodes series as one spool record, one group per series, keeping only
/// samples whose timestamp lies in `window` around `now_ms`.
///
/// ```text
/// record := u32 groups, group*
/// group  := str account, str metric, u16 labels, (str name, str value)*,
///           u32 samples, (i64 ts_ms, f64 value)*
/// str    := u32 len, bytes
/// ```
pub fn encode(series: &[TeeSeries], window: TimeWindow, now_ms: i64) -> (Vec<u8>, Encoded) {
    fn put_str(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    let oldest = now_ms.saturating_sub(window.max_age_ms);
    let newest = now_ms.saturating_add(window.max_future_ms);
    let mut stats = Encoded::default();
    let mut out =
        Vec::with_capacity(64 + series.iter().map(|s| s.samples.len()).sum::<usize>() * 16);
    out.extend_from_slice(&0u32.to_le_bytes());
    let mut groups = 0u32;
    for s in series {
        let keep = |&&(t, _): &&(i64, f64)| (oldest..=newest).contains(&t);
        let n = s.samples.iter().filter(keep).count();
        let too_old = s.samples.iter().filter(|x| x.0 < oldest).count() as u64;
        stats.too_old += too_old;
        stats.too_new += (s.samples.len() - n) as u64 - too_old;
        if n == 0 {
            continue;
        }
        stats.kept += n as u64;
        put_str(&mut out, &s.account);
        put_str(&mut out, &s.metric);
        out.extend_from_slice(&(s.labels.len() as u16).to_le_bytes());
        for (n, v) in &s.labels {
            put_str(&mut out, n);
            put_str(&mut out, v);
        }
        out.extend_from_slice(&(n as u32).to_le_bytes());
        for &(t, v) in s.samples.iter().filter(keep) {
            out.extend_from_slice(&t.to_le_bytes());
            out.extend_from_slice(&v.to_le_bytes());
        }
        groups += 1;
    }
    out[0..4].copy_from_slice(&groups.to_le_bytes());
    (out, stats)
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
    fn u64(&mut self) -> Result<u64, DecodeRecordError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn str(&mut self) -> Result<String, DecodeRecordError> {
        let n = self.u32()? as usize;
        let at = self.at;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| DecodeRecordError(at))
    }
}

/// One series of a spool record, in raw-table form but with its samples
/// still compact: rows are materialised a bounded part at a time.
#[derive(Debug, Clone, PartialEq)]
pub struct SeriesBlock {
    pub account: String,
    pub metric: String,
    pub cluster: String,
    pub namespace: String,
    pub pod: String,
    pub label_names: Vec<String>,
    pub label_values: Vec<String>,
    pub series_id: u64,
    pub samples: Vec<(i64, f64)>,
}

impl SeriesBlock {
    /// Estimated bytes of one of its rows in memory (and on the wire).
    pub fn row_bytes(&self) -> usize {
        let strings = self.label_names.iter().chain(&self.label_values);
        96 + self.account.len()
            + self.metric.len()
            + self.cluster.len()
            + self.namespace.len()
            + self.pod.len()
            + strings.map(|s| s.len() + 24).sum::<usize>()
    }

    fn row(&self, ts: i64, value: f64) -> RawRow {
        RawRow {
            account: self.account.clone(),
            metric: self.metric.clone(),
            cluster: self.cluster.clone(),
            namespace: self.namespace.clone(),
            pod: self.pod.clone(),
            label_names: self.label_names.clone(),
            label_values: self.label_values.clone(),
            series_id: self.series_id,
            ts,
            value,
            ingest_time: 0,
        }
    }
}

/// Decodes one spool record into raw-table rows (`ingest_time` left 0; the
/// writer stamps it at insert time). On error `out` is left as it was.
pub fn decode_rows(record: &[u8], out: &mut Vec<RawRow>) -> Result<(), DecodeRecordError> {
    for b in decode_record(record)? {
        out.extend(b.samples.iter().map(|&(t, v)| b.row(t, v)));
    }
    Ok(())
}

/// Decodes one spool record into its series; all or nothing.
pub fn decode_record(record: &[u8]) -> Result<Vec<SeriesBlock>, DecodeRecordError> {
    let mut out = Vec::new();
    let mut c = Cursor { buf: record, at: 0 };
    let groups = c.u32()?;
    for _ in 0..groups {
        let account = c.str()?;
        let metric = c.str()?;
        let nlabels = c.u16()?;
        let mut labels = Vec::with_capacity(nlabels as usize);
        for _ in 0..nlabels {
            labels.push((c.str()?, c.str()?));
        }
        let id = series_id(&metric, &labels);
        let (mut cluster, mut namespace, mut pod) = (String::new(), String::new(), String::new());
        let mut names = Vec::with_capacity(labels.len());
        let mut values = Vec::with_capacity(labels.len());
        for (n, v) in labels {
            match n.as_str() {
                "cluster" => cluster = v,
                "namespace" => namespace = v,
                "pod" => pod = v,
                _ => {
                    names.push(n);
                    values.push(v);
                }
            }
        }
        let n = c.u32()? as usize;
        // Each sample is 16 bytes: a corrupt count cannot over-allocate.
        let mut samples = Vec::with_capacity(n.min((record.len() - c.at) / 16));
        for _ in 0..n {
            let ts = c.u64()? as i64;
            let value = f64::from_bits(c.u64()?);
            samples.push((ts, value));
        }
        out.push(SeriesBlock {
            account,
            metric,
            cluster,
            namespace,
            pod,
            label_names: names,
            label_values: values,
            series_id: id,
            samples,
        });
    }
    if c.at != record.len() {
        return Err(DecodeRecordError(c.at));
    }
    Ok(out)
}

/// The UTC month (`year * 12 + month`) of a millisecond timestamp: the raw
/// table is partitioned by month, and an INSERT may touch only so many
/// partitions (100 by default on modern servers).
fn month_of(ts_ms: i64) -> i64 {
    let days = ts_ms.div_euclid(86_400_000);
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
/// at most `max_rows` rows and about `max_bytes` bytes (a single row larger
/// than that is a part of its own). Rows are made only as parts are taken,
/// so memory is bounded by one part, however far a record expands.
pub struct Parts<'a> {
    blocks: &'a [SeriesBlock],
    months: Vec<i64>,
    max_rows: usize,
    max_bytes: usize,
    /// (month index, block, sample) of the next row.
    at: (usize, usize, usize),
}

impl<'a> Parts<'a> {
    pub fn new(blocks: &'a [SeriesBlock], max_rows: usize, max_bytes: usize) -> Parts<'a> {
        let months: std::collections::BTreeSet<i64> = blocks
            .iter()
            .flat_map(|b| b.samples.iter().map(|s| month_of(s.0)))
            .collect();
        Parts {
            blocks,
            months: months.into_iter().collect(),
            max_rows: max_rows.max(1),
            max_bytes,
            at: (0, 0, 0),
        }
    }

    /// The next part, or `None` when all rows were given out.
    pub fn next_part(&mut self) -> Option<Vec<RawRow>> {
        let (mut m, mut b, mut i) = self.at;
        while m < self.months.len() {
            let month = self.months[m];
            let mut rows = Vec::new();
            let mut bytes = 0;
            while b < self.blocks.len() {
                let block = &self.blocks[b];
                let size = block.row_bytes();
                while i < block.samples.len() {
                    let (t, v) = block.samples[i];
                    if month_of(t) == month {
                        if !rows.is_empty()
                            && (rows.len() >= self.max_rows || bytes + size > self.max_bytes)
                        {
                            self.at = (m, b, i);
                            return Some(rows);
                        }
                        rows.push(block.row(t, v));
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
                return Some(rows);
            }
        }
        self.at = (m, b, i);
        None
    }
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

    /// Makes the samples of `series` durable (returns after the shared
    /// fsync). Samples with absurd timestamps (older than
    /// `spool.max_sample_age`, or further ahead than
    /// `spool.max_sample_future`) are not teed, only counted.
    pub async fn append(&self, series: &[TeeSeries]) -> Result<(), TeeError> {
        if series.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let (payload, stats) = encode(series, self.window, unix_now_ms());
        if stats.too_old > 0 {
            metrics::counter!(t::SAMPLES_REJECTED, "reason" => "too_old").increment(stats.too_old);
        }
        if stats.too_new > 0 {
            metrics::counter!(t::SAMPLES_REJECTED, "reason" => "too_far_in_future")
                .increment(stats.too_new);
        }
        if stats.kept == 0 {
            return Ok(());
        }
        self.spool.append(&payload).await?;
        metrics::histogram!(t::SPOOL_APPEND_DURATION).record(started.elapsed().as_secs_f64());
        metrics::counter!(t::SAMPLES_SPOOLED).increment(stats.kept);
        Ok(())
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
        while !*stop.borrow() {
            let Some((blocks, end)) = self.next_batch(&mut stop).await else {
                continue;
            };
            // Insert every part until ClickHouse takes it (or it is
            // dead-lettered); the spool keeps the batch meanwhile.
            let mut parts = Parts::new(&blocks, self.cfg.batch_max_rows, self.max_bytes());
            let mut stopped = false;
            while let Some(part) = parts.next_part() {
                if self.insert_part(part, &mut stop).await.is_err() {
                    stopped = true;
                    break;
                }
            }
            if stopped {
                return;
            }
            if let Err(e) = self.ack(end).await {
                tracing::error!(error = %e, "spool: cannot record the acknowledged position");
            }
            self.publish_gauges();
        }
    }

    fn max_bytes(&self) -> usize {
        usize::try_from(self.cfg.batch_max_bytes.bytes()).unwrap_or(usize::MAX)
    }

    /// Inserts `rows` (and their touched index), retrying availability errors
    /// with backoff. A part that fails because of its data, or times out, is
    /// split in halves and the halves are retried; a single row that fails
    /// because of its data goes to the dead-letter file.
    async fn insert_part(
        &self,
        rows: Vec<RawRow>,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), Stopped> {
        let mut backoff = self.cfg.retry_backoff;
        let mut todo = vec![rows];
        while let Some(mut part) = todo.pop() {
            loop {
                let now = unix_now() as u32;
                for r in &mut part {
                    r.ingest_time = now;
                }
                // The touched index first: if the raw insert then fails, the
                // rollup merely re-derives a bucket that did not change.
                let touched = touched_rows(&part, now);
                let result = match self.ch.insert(&self.ch.touched_table, &touched).await {
                    Ok(()) => self.ch.insert(&self.ch.raw_table, &part).await,
                    Err(e) => Err(e),
                };
                let e = match result {
                    Ok(()) => {
                        metrics::counter!(t::BATCHES_WRITTEN, "table" => "samples").increment(1);
                        metrics::counter!(t::ROWS_WRITTEN, "table" => "samples")
                            .increment(part.len() as u64);
                        break;
                    }
                    Err(e) => e,
                };
                metrics::counter!(t::BATCHES_FAILED, "table" => "samples").increment(1);
                let splittable = e.is_data_error() || e.is_timeout();
                if splittable && part.len() > 1 {
                    tracing::warn!(error = %e, rows = part.len(), "clickhouse insert failed; retrying in two halves");
                    let second = part.split_off(part.len() / 2);
                    todo.push(second);
                    todo.push(part);
                    break;
                }
                if e.is_data_error() {
                    self.dead_letter(&part, &e).await;
                    break;
                }
                tracing::warn!(error = %e, rows = part.len(), retry_in = ?backoff, "clickhouse insert failed; retrying");
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
    /// `<spool dir>/dead-letter.jsonl` (one JSON object per row, with the
    /// error), counts and logs them. They are not retried.
    async fn dead_letter(&self, rows: &[RawRow], e: &crate::clickhouse::ClickHouseError) {
        metrics::counter!(t::ROWS_DEAD_LETTERED).increment(rows.len() as u64);
        let path = self.cfg.dir.join(DEAD_LETTER_FILE);
        let mut text = String::new();
        for r in rows {
            let line = serde_json::json!({ "error": e.to_string(), "row": r });
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

    /// Collects a batch: waits for data, then until `batch_max_rows` rows or
    /// until the first record is `batch_max_age` old. `None` if stopped or
    /// nothing arrived within a second (gauges are refreshed meanwhile).
    async fn next_batch(
        &self,
        stop: &mut watch::Receiver<bool>,
    ) -> Option<(Vec<SeriesBlock>, Pos)> {
        let mut blocks = Vec::new();
        let (mut rows, mut bytes) = (0usize, 0usize);
        let mut end = None;
        let mut first_ms: Option<i64> = None;
        let mut read_errors = 0u32;
        let mut backoff = self.cfg.retry_backoff;
        loop {
            let records = match self.read().await {
                Ok(r) => {
                    read_errors = 0;
                    backoff = self.cfg.retry_backoff;
                    r
                }
                Err(e) => {
                    // Do not spin: back off, and log the first few and then
                    // one in a hundred.
                    read_errors = read_errors.saturating_add(1);
                    metrics::counter!(t::SPOOL_READ_ERRORS).increment(1);
                    if read_errors <= READ_ERRORS_LOGGED || read_errors % 100 == 0 {
                        tracing::error!(error = %e, failures = read_errors, retry_in = ?backoff, "spool read failed");
                    }
                    if sleep_or_stop(jitter(backoff), stop).await {
                        return None;
                    }
                    backoff = (backoff * 2).min(self.cfg.retry_max_backoff);
                    // Nothing collected yet: let the caller loop (and see stop).
                    first_ms?;
                    Vec::new()
                }
            };
            for rec in records {
                first_ms.get_or_insert(rec.appended_ms);
                match decode_record(&rec.payload) {
                    Ok(bs) => {
                        for b in &bs {
                            rows += b.samples.len();
                            bytes =
                                bytes.saturating_add(b.row_bytes().saturating_mul(b.samples.len()));
                        }
                        blocks.extend(bs);
                    }
                    Err(e) => {
                        metrics::counter!(t::RECORDS_UNDECODABLE).increment(1);
                        tracing::error!(error = %e, "skipping an undecodable spool record");
                    }
                }
                end = Some(rec.end);
            }
            if rows >= self.cfg.batch_max_rows || bytes >= self.max_bytes() {
                break;
            }
            let wait = match first_ms {
                Some(ms) => {
                    let age = Duration::from_millis((unix_now_ms() - ms).max(0) as u64);
                    match self.cfg.batch_max_age.checked_sub(age) {
                        Some(left) if !left.is_zero() => left,
                        _ => break,
                    }
                }
                None => Duration::from_secs(1),
            };
            let has_unread = self.reader.lock().map(|r| r.has_unread()).unwrap_or(false);
            if !has_unread {
                let waiter = self.spool.committed();
                tokio::select! {
                    () = waiter => {}
                    () = tokio::time::sleep(wait) => {
                        if first_ms.is_none() {
                            self.publish_gauges();
                            return None;
                        }
                    }
                    _ = stop.changed() => return None,
                }
            }
        }
        end.map(|e| (blocks, e))
    }

    async fn read(&self) -> std::io::Result<Vec<crate::spool::Record>> {
        let reader = self.reader.clone();
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

/// The distinct (minute, charged metric, account, hour) of a batch.
fn touched_rows(rows: &[RawRow], now: u32) -> Vec<TouchedRow> {
    let minute = now - now % 60;
    let mut set = std::collections::BTreeSet::new();
    for r in rows {
        if crate::rollup::CHARGED_METRICS.contains(&r.metric.as_str()) {
            let hour = r.ts.div_euclid(3_600_000) * 3600;
            set.insert((
                r.metric.as_str(),
                r.account.as_str(),
                hour.clamp(0, u32::MAX as i64) as u32,
            ));
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

    fn series(ns: &str, samples: Vec<(i64, f64)>) -> TeeSeries {
        TeeSeries {
            account: "acc".into(),
            metric: "cloudtuner_kubecost_namespace_total_cost".into(),
            labels: vec![
                ("cluster".into(), "c1".into()),
                ("instance".into(), "x:9".into()),
                ("namespace".into(), ns.into()),
            ],
            samples,
        }
    }

    #[test]
    fn records_round_trip_into_rows() {
        let s = vec![
            series("a", vec![(1, 0.5), (2, 0.25)]),
            series("b", vec![(1, f64::NAN)]),
        ];
        let (rec, stats) = encode(&s, TimeWindow::ANY, 0);
        assert_eq!(stats.kept, 3);
        let mut rows = Vec::new();
        decode_rows(&rec, &mut rows).unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].namespace, "a");
        assert_eq!(rows[0].cluster, "c1");
        assert_eq!(rows[0].label_names, ["instance"]);
        assert_eq!(rows[0].label_values, ["x:9"]);
        assert_eq!((rows[1].ts, rows[1].value), (2, 0.25));
        assert_eq!(rows[0].series_id, rows[1].series_id);
        assert_ne!(rows[0].series_id, rows[2].series_id);
        assert!(rows[2].value.is_nan());
        // Truncated records are refused, not misread, and append nothing
        // (the first group alone decodes fine before the cut).
        for cut in 0..rec.len() {
            let mut out = vec![rows[0].clone()];
            assert!(decode_rows(&rec[..cut], &mut out).is_err());
            assert_eq!(out.len(), 1, "cut at {cut}: nothing appended");
        }
    }

    #[test]
    fn absurd_timestamps_are_not_teed() {
        let day = 86_400_000;
        let now = 1_000 * day;
        let w = TimeWindow {
            max_age_ms: 365 * day,
            max_future_ms: day,
        };
        let s = vec![
            series(
                "a",
                vec![(now - 366 * day, 1.0), (now - 364 * day, 2.0), (now, 3.0)],
            ),
            series("b", vec![(now + 2 * day, 4.0), (0, 5.0)]),
        ];
        let (rec, stats) = encode(&s, w, now);
        assert_eq!(
            stats,
            Encoded {
                kept: 2,
                too_old: 2,
                too_new: 1
            }
        );
        let blocks = decode_record(&rec).unwrap();
        assert_eq!(blocks.len(), 1, "a series with nothing left is not written");
        assert_eq!(blocks[0].samples, [(now - 364 * day, 2.0), (now, 3.0)]);
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
    /// used to expand to ~1 GB of rows in the writer at once; parts are now
    /// one month each and bounded in bytes, made one at a time.
    #[test]
    fn parts_bound_rows_by_bytes_and_split_by_month() {
        let labels: Vec<(String, String)> = (0..60)
            .map(|i| (format!("l{i:02}"), "a".repeat(4096)))
            .collect();
        let feb_end = 1_709_251_200_000 - 2_000;
        let s = TeeSeries {
            account: "acc".into(),
            metric: "cloudtuner_kubecost_namespace_total_cost".into(),
            labels,
            samples: (0..4000).map(|i| (feb_end + i, 1.0)).collect(),
        };
        let (rec, _) = encode(&[s], TimeWindow::ANY, 0);
        assert!(rec.len() < 400_000, "{}", rec.len());
        let blocks = decode_record(&rec).unwrap();
        let row = blocks[0].row_bytes();
        assert!(row > 60 * 4096, "{row}");
        let max_bytes = 8 << 20;
        let mut parts = Parts::new(&blocks, 200_000, max_bytes);
        let (mut n, mut count) = (0, 0);
        let mut months = Vec::new();
        while let Some(p) = parts.next_part() {
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
            assert!(p.len() <= 7);
        }
    }
}
