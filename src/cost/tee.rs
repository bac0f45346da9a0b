//! The running tee: the spool the request path appends to, and the drain
//! task that empties it into ClickHouse. The request path
//! ([`Tee::reserve`], then [`TeeWrite::write`]) never talks to ClickHouse: a ClickHouse outage only
//! makes the spool grow (up to its bound, then 503).

use std::sync::Arc;
use std::time::Instant;

use crate::clock::{duration_ms, unix_now_ms};
use crate::config::Config;
use crate::cost::clickhouse::ClickHouse;
use crate::cost::drain::Drain;
use crate::cost::record::{Accepted, TeeRecord, TimeWindow};
use crate::cost::spool::{Reserved, Spool, SpoolError, SpoolOptions};
use crate::health::{Component, Health, Supervised};
use crate::telemetry as t;

/// A request's record with its room in the spool taken ([`Tee::reserve`]).
pub enum TeeWrite<'a> {
    /// No sample to keep: only the buffer to give back.
    Nothing(Vec<u8>),
    /// The room and how many samples the record keeps.
    Reserved(Reserved<'a>, u64),
}

impl TeeWrite<'_> {
    /// Makes the record durable (returns after the shared fsync). Gives
    /// back the record's buffer for reuse.
    pub async fn write(self) -> Result<Vec<u8>, SpoolError> {
        let (reserved, kept) = match self {
            TeeWrite::Nothing(buf) => return Ok(buf),
            TeeWrite::Reserved(reserved, kept) => (reserved, kept),
        };
        let started = Instant::now();
        let frame = reserved.write().await?;
        metrics::histogram!(t::SPOOL_APPEND_DURATION).record(started.elapsed().as_secs_f64());
        metrics::counter!(t::SAMPLES_SPOOLED).increment(kept);
        Ok(frame.into_buffer())
    }
}

/// The spool and its drain task.
pub struct Tee {
    spool: Arc<Spool>,
    window: TimeWindow,
    drain: std::sync::Mutex<Option<Supervised>>,
}

impl Tee {
    /// Opens the spool and starts the drain writing to `ch`, both
    /// reporting their death into `health`. Fails only if the spool cannot
    /// be opened; ClickHouse being down is not an error here.
    pub async fn start(cfg: &Config, ch: ClickHouse, health: &Arc<Health>) -> anyhow::Result<Tee> {
        let mut opts = SpoolOptions::from_config(&cfg.spool);
        opts.health = Some(health.reporter(Component::Spool));
        let dir = opts.dir.display().to_string();
        let (spool, reader) = tokio::task::spawn_blocking(move || Spool::open(&opts))
            .await?
            .map_err(|e| anyhow::anyhow!("cannot open the spool in {dir}: {e}"))?;
        let spool = Arc::new(spool);
        let drain = Drain {
            ch,
            reader: Arc::new(std::sync::Mutex::new(reader)),
            spool: spool.clone(),
            cfg: cfg.spool.clone(),
            migrate: cfg.clickhouse.migrate_on_start,
        };
        let drain = health.spawn(Component::TeeWriter, |stop| drain.run(stop));
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
            drain: std::sync::Mutex::new(Some(drain)),
        })
    }

    /// The sample timestamps accepted right now: samples older than
    /// `spool.max_sample_age` or further ahead than `spool.max_sample_future`
    /// are not teed, only counted.
    pub fn accepted_now(&self) -> Accepted {
        self.window.at(unix_now_ms())
    }

    /// Takes the room a request's record needs in the spool, or says at
    /// once why the spool cannot take it, before anything is forwarded;
    /// counts what the record kept and refused.
    pub fn reserve(&self, record: TeeRecord) -> Result<TeeWrite<'_>, SpoolError> {
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
            return Ok(TeeWrite::Nothing(frame.into_buffer()));
        }
        Ok(TeeWrite::Reserved(self.spool.reserve(frame)?, kept))
    }

    /// [`Tee::reserve`] and [`TeeWrite::write`] in one.
    pub async fn append(&self, record: TeeRecord) -> Result<Vec<u8>, SpoolError> {
        self.reserve(record)?.write().await
    }

    /// Unsent spool bytes.
    pub fn pending_bytes(&self) -> u64 {
        self.spool.pending_bytes()
    }

    /// Stops the drain by `deadline` (an insert in flight is abandoned and
    /// re-sent after restart) and flushes the spool's committer, waiting
    /// for that flush until `deadline` too (appends already acknowledged
    /// are durable; the flush only syncs what nobody waits for).
    pub async fn shutdown(&self, deadline: tokio::time::Instant) {
        let drain = self.drain.lock().ok().and_then(|mut d| d.take());
        if let Some(task) = drain {
            task.stop(deadline).await;
        }
        let spool = self.spool.clone();
        let close = tokio::task::spawn_blocking(move || spool.close());
        if tokio::time::timeout_at(deadline, close).await.is_err() {
            tracing::warn!("grace period over before the spool's committer finished");
        }
        tracing::info!(pending_bytes = self.spool.pending_bytes(), "tee stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A drain that dies (here cancelled, as nothing but a fault cancels
    /// it) marks the tee writer down: the probes fail naming it and its
    /// gauge reads 0, while the spool stays up.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dead_drain_marks_the_tee_writer_down() {
        t::metrics_handle();
        let dir = tempfile::tempdir().expect("temp dir");
        let mut cfg = Config::default();
        cfg.clickhouse.url = Some("http://127.0.0.1:1".into());
        cfg.spool.dir = dir.path().into();
        let health = Arc::new(Health::default());
        health.set_serving(true);
        let ch = ClickHouse::new(&cfg.clickhouse).expect("the client builds");
        let tee = Tee::start(&cfg, ch, &health).await.expect("tee starts");
        assert_eq!(health.ready(), Ok(()));
        if let Some(drain) = tee.drain.lock().expect("drain lock").as_ref() {
            drain.kill();
        }
        let dead = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match health.ready() {
                    Err(e) => return e.to_string(),
                    Ok(()) => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
        })
        .await
        .expect("not ready within 10s of the drain's death");
        assert_eq!(
            dead,
            "the tee writer (spool to ClickHouse) stopped: it was cancelled; the spool keeps the cost samples until it is full; restart rwgate"
        );
        let metrics = t::metrics_handle().render();
        for (component, up) in [("tee_writer", 0), ("spool", 1)] {
            let line = format!("{}{{component=\"{component}\"}} {up}", t::COMPONENT_UP);
            assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
        }
        tee.shutdown(tokio::time::Instant::now() + Duration::from_secs(5))
            .await;
    }
}
