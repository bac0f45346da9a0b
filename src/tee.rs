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

/// One teed sample, after tenancy enforcement.
#[derive(Debug, Clone, PartialEq)]
pub struct TeeSample {
    /// The authenticated account id.
    pub account: String,
    /// `__name__`.
    pub metric: String,
    /// Every label but `__name__`, sorted by name (tenant labels included).
    pub labels: Vec<(String, String)>,
    pub timestamp_ms: i64,
    pub value: f64,
}

/// Why teed samples could not be made durable (the request then fails with 503).
#[derive(Debug, thiserror::Error)]
pub enum TeeError {
    #[error("spool is full")]
    SpoolFull,
    #[error("spool write failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Encodes samples as one spool record: consecutive samples of one series
/// share a header.
///
/// ```text
/// record := u32 groups, group*
/// group  := str account, str metric, u16 labels, (str name, str value)*,
///           u32 samples, (i64 ts_ms, f64 value)*
/// str    := u32 len, bytes
/// ```
pub fn encode(samples: &[TeeSample]) -> Vec<u8> {
    fn put_str(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    let mut out = Vec::with_capacity(64 + samples.len() * 24);
    out.extend_from_slice(&0u32.to_le_bytes());
    let mut groups = 0u32;
    let mut i = 0;
    while i < samples.len() {
        let s = &samples[i];
        let mut j = i + 1;
        while j < samples.len()
            && samples[j].metric == s.metric
            && samples[j].account == s.account
            && samples[j].labels == s.labels
        {
            j += 1;
        }
        put_str(&mut out, &s.account);
        put_str(&mut out, &s.metric);
        out.extend_from_slice(&(s.labels.len() as u16).to_le_bytes());
        for (n, v) in &s.labels {
            put_str(&mut out, n);
            put_str(&mut out, v);
        }
        out.extend_from_slice(&((j - i) as u32).to_le_bytes());
        for x in &samples[i..j] {
            out.extend_from_slice(&x.timestamp_ms.to_le_bytes());
            out.extend_from_slice(&x.value.to_le_bytes());
        }
        groups += 1;
        i = j;
    }
    out[0..4].copy_from_slice(&groups.to_le_bytes());
    out
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

/// Decodes one spool record into raw-table rows (`ingest_time` left 0; the
/// writer stamps it at insert time).
pub fn decode_rows(record: &[u8], out: &mut Vec<RawRow>) -> Result<(), DecodeRecordError> {
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
        let n = c.u32()?;
        for _ in 0..n {
            let ts = c.u64()? as i64;
            let value = f64::from_bits(c.u64()?);
            out.push(RawRow {
                account: account.clone(),
                metric: metric.clone(),
                cluster: cluster.clone(),
                namespace: namespace.clone(),
                pod: pod.clone(),
                label_names: names.clone(),
                label_values: values.clone(),
                series_id: id,
                ts,
                value,
                ingest_time: 0,
            });
        }
    }
    if c.at != record.len() {
        return Err(DecodeRecordError(c.at));
    }
    Ok(())
}

/// The running tee: spool, ClickHouse writer task, and (if enabled) the rollup.
pub struct Tee {
    spool: Arc<Spool>,
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
            stop,
            tasks: std::sync::Mutex::new(tasks),
        })
    }

    /// Makes `samples` durable (returns after the shared fsync).
    pub async fn append(&self, samples: &[TeeSample]) -> Result<(), TeeError> {
        if samples.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let payload = encode(samples);
        self.spool.append(&payload).await?;
        metrics::histogram!(t::SPOOL_APPEND_DURATION).record(started.elapsed().as_secs_f64());
        metrics::counter!(t::SAMPLES_SPOOLED).increment(samples.len() as u64);
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

/// Most payload bytes read from the spool in one go.
const READ_CHUNK_BYTES: usize = 16 << 20;

impl Writer {
    async fn run(self, mut stop: watch::Receiver<bool>) {
        if self.migrate {
            self.migrate_until_done(&mut stop).await;
        }
        let mut backoff = self.cfg.retry_backoff;
        while !*stop.borrow() {
            let Some((mut rows, end)) = self.next_batch(&mut stop).await else {
                continue;
            };
            // Insert until ClickHouse takes it; the spool keeps it meanwhile.
            loop {
                let now = unix_now() as u32;
                for r in &mut rows {
                    r.ingest_time = now;
                }
                // The touched index first: if the raw insert then fails, the
                // rollup merely re-derives a bucket that did not change.
                let touched = touched_rows(&rows, now);
                let result = match self.ch.insert(&self.ch.touched_table, &touched).await {
                    Ok(()) => self.ch.insert(&self.ch.raw_table, &rows).await,
                    Err(e) => Err(e),
                };
                match result {
                    Ok(()) => {
                        metrics::counter!(t::BATCHES_WRITTEN, "table" => "samples").increment(1);
                        metrics::counter!(t::ROWS_WRITTEN, "table" => "samples")
                            .increment(rows.len() as u64);
                        backoff = self.cfg.retry_backoff;
                        if let Err(e) = self.ack(end).await {
                            tracing::error!(error = %e, "spool: cannot record the acknowledged position");
                        }
                        break;
                    }
                    Err(e) => {
                        metrics::counter!(t::BATCHES_FAILED, "table" => "samples").increment(1);
                        tracing::warn!(error = %e, rows = rows.len(), retry_in = ?backoff, "clickhouse insert failed; retrying");
                        self.publish_gauges();
                        if sleep_or_stop(jitter(backoff), &mut stop).await {
                            return;
                        }
                        backoff = (backoff * 2).min(self.cfg.retry_max_backoff);
                    }
                }
            }
            self.publish_gauges();
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
    async fn next_batch(&self, stop: &mut watch::Receiver<bool>) -> Option<(Vec<RawRow>, Pos)> {
        let mut rows = Vec::new();
        let mut end = None;
        let mut first_ms: Option<i64> = None;
        loop {
            let records = self.read().await;
            for rec in records {
                first_ms.get_or_insert(rec.appended_ms);
                if let Err(e) = decode_rows(&rec.payload, &mut rows) {
                    metrics::counter!(t::RECORDS_UNDECODABLE).increment(1);
                    tracing::error!(error = %e, "skipping an undecodable spool record");
                }
                end = Some(rec.end);
            }
            if rows.len() >= self.cfg.batch_max_rows {
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
        end.map(|e| (rows, e))
    }

    async fn read(&self) -> Vec<crate::spool::Record> {
        let reader = self.reader.clone();
        let max_rows = self.cfg.batch_max_rows;
        let result = tokio::task::spawn_blocking(move || {
            let mut r = reader
                .lock()
                .map_err(|_| std::io::Error::other("spool reader lock poisoned"))?;
            r.read(max_rows, READ_CHUNK_BYTES)
        })
        .await;
        match result {
            Ok(Ok(recs)) => recs,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "spool read failed");
                Vec::new()
            }
            Err(e) => {
                tracing::error!(error = %e, "spool read task failed");
                Vec::new()
            }
        }
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

fn unix_now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(ns: &str, ts: i64, v: f64) -> TeeSample {
        TeeSample {
            account: "acc".into(),
            metric: "cloudtuner_kubecost_namespace_total_cost".into(),
            labels: vec![
                ("cluster".into(), "c1".into()),
                ("instance".into(), "x:9".into()),
                ("namespace".into(), ns.into()),
            ],
            timestamp_ms: ts,
            value: v,
        }
    }

    #[test]
    fn records_round_trip_into_rows() {
        let samples = vec![
            sample("a", 1, 0.5),
            sample("a", 2, 0.25),
            sample("b", 1, f64::NAN),
        ];
        let rec = encode(&samples);
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
        // Truncated records are refused, not misread.
        for cut in 0..rec.len() {
            assert!(decode_rows(&rec[..cut], &mut Vec::new()).is_err());
        }
    }
}
