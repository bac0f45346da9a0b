//! The running tee: the spool the request path appends to, and the drain
//! task that empties it into ClickHouse. The request path
//! ([`Tee::append`]) never talks to ClickHouse: a ClickHouse outage only
//! makes the spool grow (up to its bound, then 503).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::clock::{duration_ms, unix_now_ms};
use crate::config::Config;
use crate::cost::clickhouse::ClickHouse;
use crate::cost::drain::Drain;
use crate::cost::record::{Accepted, TeeRecord, TimeWindow};
use crate::cost::spool::{Spool, SpoolError, SpoolOptions};
use crate::telemetry as t;

/// The spool and its drain task.
pub struct Tee {
    spool: Arc<Spool>,
    window: TimeWindow,
    stop: watch::Sender<bool>,
    drain: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl Tee {
    /// Opens the spool and starts the drain. Fails only if the spool cannot
    /// be opened or the client cannot be configured; ClickHouse being down
    /// is not an error here.
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
        let drain = Drain {
            ch,
            reader: Arc::new(std::sync::Mutex::new(reader)),
            spool: spool.clone(),
            cfg: cfg.spool.clone(),
            migrate: cfg.clickhouse.migrate_on_start,
        };
        let drain = tokio::spawn(drain.run(stop_rx));
        tracing::info!(
            spool = %cfg.spool.dir.display(),
            pending_bytes = spool.pending_bytes(),
            "tee started"
        );
        Ok(Tee {
            spool,
            window: TimeWindow {
                max_age_ms: duration_ms(cfg.spool.max_sample_age),
                max_future_ms: duration_ms(cfg.spool.max_sample_future),
            },
            stop,
            drain: std::sync::Mutex::new(Some(drain)),
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
    pub async fn append(&self, record: TeeRecord) -> Result<Vec<u8>, SpoolError> {
        if record.too_old > 0 {
            metrics::counter!(t::SAMPLES_REJECTED, "reason" => "too_old").increment(record.too_old);
        }
        if record.too_new > 0 {
            metrics::counter!(t::SAMPLES_REJECTED, "reason" => "too_far_in_future")
                .increment(record.too_new);
        }
        let kept = record.kept;
        let frame = record.into_frame();
        if kept == 0 {
            return Ok(frame.into_buffer());
        }
        let started = Instant::now();
        let frame = self.spool.append_frame(frame).await?;
        metrics::histogram!(t::SPOOL_APPEND_DURATION).record(started.elapsed().as_secs_f64());
        metrics::counter!(t::SAMPLES_SPOOLED).increment(kept);
        Ok(frame.into_buffer())
    }

    /// Unsent spool bytes.
    pub fn pending_bytes(&self) -> u64 {
        self.spool.pending_bytes()
    }

    /// Stops the drain (within `limit`; an insert in flight is abandoned
    /// and re-sent after restart) and flushes the spool's committer.
    pub async fn shutdown(&self, limit: Duration) {
        let _ = self.stop.send(true);
        let drain = self.drain.lock().ok().and_then(|mut d| d.take());
        if let Some(task) = drain {
            let abort = task.abort_handle();
            if tokio::time::timeout(limit, task).await.is_err() {
                abort.abort();
            }
        }
        let spool = self.spool.clone();
        let _ = tokio::task::spawn_blocking(move || spool.close()).await;
        tracing::info!(pending_bytes = self.spool.pending_bytes(), "tee stopped");
    }
}
