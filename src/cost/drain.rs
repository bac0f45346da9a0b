//! The drain: reads the spool in large batches and inserts them into
//! ClickHouse (the touched index, new series rows, then the samples),
//! releasing spool entries only after ClickHouse acknowledged them. A crash
//! between the two re-sends rows, which the raw table's ReplacingMergeTree
//! key collapses. Availability errors are retried with backoff for as long
//! as it takes; a part ClickHouse refuses for its content is split until
//! the refused rows are isolated, and those go to a dead-letter file.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::clock::{human_wait, month_of, unix_now, unix_now_ms, Backoff};
use crate::config::SpoolConfig;
use crate::cost::batch::{
    series_of, sort_like_raw_table, touched_rows, HashedKeys, Part, Parts, SeenSeries,
};
use crate::cost::clickhouse::{ClickHouse, ClickHouseError, RawRow, SeriesRow, TouchedRow};
use crate::cost::record::{decode_record, SeriesBlock};
use crate::cost::spool::{Pos, Record, Spool, SpoolReader};
use crate::telemetry as t;

/// Drains the spool into the raw table.
pub struct Drain {
    pub ch: ClickHouse,
    pub reader: Arc<std::sync::Mutex<SpoolReader>>,
    pub spool: Arc<Spool>,
    pub cfg: SpoolConfig,
    /// Run `migrate` first (retrying until it succeeds).
    pub migrate: bool,
}

/// Rows ClickHouse refused for their content, in the spool directory.
pub const DEAD_LETTER_FILE: &str = "dead-letter.jsonl";

/// Most payload bytes read from the spool in one go.
const READ_CHUNK_BYTES: usize = 16 << 20;

/// How often the drain looks whether a read's worth of records is waiting
/// while a batch fills.
const FILL_POLL: Duration = Duration::from_millis(50);

/// Spool read failures in a row after which the drain logs only every
/// so often (it keeps retrying with backoff).
const READ_ERRORS_LOGGED: u32 = 5;

/// Why an insert loop ended early.
struct Stopped;

/// Spool read failures in a row, and the backoff between them.
struct ReadErrors {
    count: u32,
    backoff: Backoff,
}

impl Drain {
    /// Runs until `stop` turns true, or its sender is gone (the tee was
    /// dropped without a shutdown: nobody is left to stop it).
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let retry = (self.cfg.retry_backoff, self.cfg.retry_max_backoff);
        if self.migrate && !self.ch.migrate_until_done(retry, &mut stop).await {
            return;
        }
        let mut read_errors = ReadErrors {
            count: 0,
            backoff: Backoff::new(self.cfg.retry_backoff, self.cfg.retry_max_backoff),
        };
        let mut seen = SeenSeries::default();
        // A closed channel makes every `changed()` return at once: without
        // the `has_changed` check the loop would spin.
        while !*stop.borrow() && stop.has_changed().is_ok() {
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
    /// series this drain has not written this month, retrying availability
    /// errors with backoff. A part that fails because of its data, or times
    /// out, is split in halves and the halves are retried; a single row that
    /// fails because of its data goes to the dead-letter file.
    async fn insert_part(
        &self,
        part: Part<'_, '_>,
        seen: &mut SeenSeries,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), Stopped> {
        let mut backoff = Backoff::new(self.cfg.retry_backoff, self.cfg.retry_max_backoff);
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
                        .insert::<TouchedRow>(&self.ch.config.touched_table, &touched)
                        .await?;
                    if !series_rows.is_empty() {
                        self.ch
                            .insert::<SeriesRow>(&self.ch.config.series_table, &series_rows)
                            .await?;
                    }
                    self.ch
                        .insert::<RawRow>(&self.ch.config.raw_table, &rows)
                        .await
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
                let wait = backoff.next_delay();
                tracing::warn!(error = %e, rows = rows.len(), retry_in = %human_wait(wait), "clickhouse insert failed; retrying");
                self.publish_gauges();
                if sleep_or_stop(wait, stop).await {
                    return Err(Stopped);
                }
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
        e: &ClickHouseError,
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

    /// Collects a batch: waits for data, lets it accumulate on disk for
    /// `batch_max_age` (or until a read's worth is waiting), then reads it
    /// in one go, up to [`READ_CHUNK_BYTES`]. Between reads the drain only
    /// naps and looks at a counter: it does not wake for every request.
    /// `None` if stopped, or if nothing arrived within a second (gauges are
    /// refreshed meanwhile) or the read failed (after a backoff).
    async fn next_batch(
        &self,
        stop: &mut watch::Receiver<bool>,
        read_errors: &mut ReadErrors,
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
                read_errors.count = 0;
                read_errors.backoff.reset();
                let end = records.last()?.end;
                Some((records.into_iter().map(|r| r.payload).collect(), end))
            }
            Err(e) => {
                // Do not spin: back off, and log the first few and then
                // one in a hundred.
                let failures = read_errors.count.saturating_add(1);
                read_errors.count = failures;
                metrics::counter!(t::SPOOL_READ_ERRORS).increment(1);
                let wait = read_errors.backoff.next_delay();
                if failures <= READ_ERRORS_LOGGED || failures % 100 == 0 {
                    tracing::error!(error = %e, failures, retry_in = %human_wait(wait), "spool read failed");
                }
                sleep_or_stop(wait, stop).await;
                None
            }
        }
    }

    async fn read(&self) -> std::io::Result<Vec<Record>> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::spool::SpoolOptions;

    /// The tee dropped without a shutdown drops the drain's stop sender:
    /// the drain ends instead of spinning on a closed channel.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_drain_ends_when_its_tee_is_dropped() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut cfg = crate::config::Config::default();
        cfg.clickhouse.url = Some("http://127.0.0.1:1".into());
        cfg.spool.dir = dir.path().into();
        let opts = SpoolOptions::from_config(&cfg.spool);
        let (spool, reader) = Spool::open(&opts).expect("open the spool");
        let drain = Drain {
            ch: ClickHouse::new(&cfg.clickhouse).expect("client"),
            reader: Arc::new(std::sync::Mutex::new(reader)),
            spool: Arc::new(spool),
            cfg: cfg.spool.clone(),
            migrate: false,
        };
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(drain.run(stop_rx));
        drop(stop);
        let ended = tokio::time::timeout(Duration::from_secs(10), task).await;
        assert!(
            matches!(ended, Ok(Ok(()))),
            "the drain still runs 10s after its stop sender was dropped"
        );
    }
}
