//! The rollup: derives expense rows (`expenses`, CollapsingMergeTree) from
//! the raw samples, writing only differences.
//!
//! # The money rule
//!
//! For one resource (a namespace, or a pod), the samples of all its series
//! (HA replicas, exporter restarts) are merged by timestamp; equal
//! timestamps count once (the largest value; stale markers and other
//! non-finite values are ignored). A sample of rate `r` USD/h at `t` accrues
//! `r * dt / 3600` to the bucket (UTC day or hour) holding `t`, where `dt` is
//! the time since the resource's previous sample, capped by `max_gap` so that
//! no money is invented across an outage; the very first sample of a
//! resource uses the nominal `step`.
//!
//! # A pass
//!
//! 1. Which (account, bucket) changed: from the touched index (rows the
//!    writer inserted since the watermark minus `overlap`), or for
//!    `reconcile`, every bucket of a range. Each changed bucket also marks
//!    the next bucket, because a late sample changes the `dt` of the sample
//!    after it, which may sit in the next bucket.
//! 2. Per bucket: the samples of those accounts from `max_gap` before the
//!    bucket to its end, deduplicated by timestamp; for resources without a
//!    sample in that lead-in, whether any earlier sample exists at all (one
//!    `LIMIT 1 BY` query) decides between `max_gap` and `step`.
//! 3. The bucket's current value is read back (`SUM(cost*sign)`,
//!    `SUM(sign)`); where it differs, `(old, -1)` and `(new, +1)` go into one
//!    insert with all other changes of the pass, so `SUM(cost*sign)` is right
//!    at every moment and merges collapse the pairs.
//! 4. The watermark (pass start) is stored in ClickHouse.
//!
//! A crash anywhere is harmless: the next pass reads back what was written
//! and finds no difference. Two rollup writers at once are not (both would
//! write the same correction): run exactly one per ClickHouse.
//!
//! Residual case, documented: if a resource's *first ever* sample arrives
//! after later ones and more than one bucket before the next existing
//! sample (history back-filled in reverse with a gap), the later sample's
//! `step`-charged first interval becomes a `max_gap`-capped one only when
//! its bucket is next touched or reconciled.

pub mod money;
pub mod sql;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use clickhouse::Row;
use serde::Deserialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::clock::{unix_now, Day, HumanDuration, DAY_MS};
use crate::config::{Charge, Config, Grain, RollupConfig};
use crate::cost::clickhouse::{ClickHouse, ClickHouseError, ExpenseRow, StateRow};
use crate::cost::names::{charged_metric, Resource};
use crate::telemetry as t;

use money::{correction, MoneyRule};
use sql::{chunk_by_bytes, in_list, namespace_condition, namespace_weight, quote, IN_LIST_BUDGET};

/// Most rows in one expenses insert (a bucket's rows never straddle two).
const MAX_INSERT_ROWS: usize = 100_000;

/// Consecutive failed passes after which an (account, bucket) whose queries
/// fail because of their content (not availability) is skipped, so that it
/// cannot hold the watermark back for every other account.
pub const MAX_BUCKET_FAILURES: u32 = 3;

/// What a pass did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct PassReport {
    pub buckets_examined: usize,
    pub buckets_changed: usize,
    pub rows_written: usize,
    /// (account, bucket)s given up on after [`MAX_BUCKET_FAILURES`] passes.
    pub buckets_skipped: usize,
}

/// Why a pass failed.
#[derive(Debug, thiserror::Error)]
pub enum RollupError {
    #[error(transparent)]
    ClickHouse(#[from] ClickHouseError),
}

impl RollupError {
    /// Retrying the same work cannot help (see [`ClickHouseError::is_data_error`]).
    pub fn is_data_error(&self) -> bool {
        match self {
            RollupError::ClickHouse(e) => e.is_data_error(),
        }
    }
}

/// The rollup writer.
pub struct Rollup {
    ch: ClickHouse,
    rule: MoneyRule,
    charge: Charge,
    grain: Grain,
    overlap: Duration,
    /// Consecutive failed passes per (account, bucket), for data errors only.
    failures: std::sync::Mutex<HashMap<(String, i64), u32>>,
}

#[derive(Debug, Row, Deserialize)]
struct BucketRow {
    account: String,
    bucket: i64,
}

// Field names are the queries' column names (validated where the server
// supports it; see `cost::clickhouse`).
#[derive(Debug, Row, Deserialize)]
struct SampleRow {
    account: String,
    namespace: String,
    #[serde(rename = "p")]
    pod: String,
    ts: i64,
    #[serde(rename = "v")]
    value: f64,
}

#[derive(Debug, Row, Deserialize)]
struct KeyRow {
    account: String,
    namespace: String,
    #[serde(rename = "p")]
    pod: String,
}

#[derive(Debug, Row, Deserialize)]
struct ExistingRow {
    #[serde(rename = "cloud_account_id")]
    account: String,
    resource_id: String,
    #[serde(rename = "c")]
    cost: f64,
    #[serde(rename = "s")]
    signs: i64,
}
impl Rollup {
    pub fn new(ch: ClickHouse, cfg: &RollupConfig) -> Rollup {
        Rollup {
            ch,
            rule: MoneyRule::from_config(cfg),
            charge: cfg.charge,
            grain: cfg.grain,
            overlap: cfg.overlap,
            failures: std::sync::Mutex::new(HashMap::new()),
        }
    }

    fn metric(&self) -> &'static str {
        charged_metric(self.charge)
    }

    /// The watermark's name: one per expenses table, charge and grain.
    fn state_name(&self) -> String {
        format!(
            "{}:{:?}:{:?}",
            self.ch.expenses_table, self.charge, self.grain
        )
        .to_lowercase()
    }

    /// Runs a pass every `interval` until stopped.
    pub async fn run(self, interval: Duration, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            if *stop.borrow() {
                return;
            }
            match self.pass().await {
                Ok(r) => {
                    metrics::counter!(t::ROLLUP_PASSES, "result" => "ok").increment(1);
                    if r.buckets_changed > 0 {
                        tracing::debug!(
                            buckets_examined = r.buckets_examined,
                            buckets_changed = r.buckets_changed,
                            rows_written = r.rows_written,
                            buckets_skipped = r.buckets_skipped,
                            "rollup pass"
                        );
                    }
                }
                Err(e) => {
                    metrics::counter!(t::ROLLUP_PASSES, "result" => "error").increment(1);
                    tracing::warn!(error = %e, "rollup pass failed; retrying next interval");
                }
            }
        }
    }

    /// One incremental pass: buckets touched since the watermark.
    pub async fn pass(&self) -> Result<PassReport, RollupError> {
        let started = Instant::now();
        self.ch.check_server().await?;
        let pass_start = unix_now() as u32;
        let watermark = self.watermark().await?;
        let since = watermark.map_or(0, |w| w.saturating_sub(self.overlap.as_secs() as u32));
        let bucket_hours = self.rule.bucket_ms / 3_600_000;
        let sql = format!(
            "SELECT DISTINCT account, intDiv(toInt64(toUInt32(hour)), {}) AS bucket FROM {} \
             WHERE metric = {} AND ingest_minute >= {}",
            bucket_hours * 3600,
            self.ch.touched_table,
            quote(self.metric()),
            since - since % 60,
        );
        let touched: Vec<BucketRow> = self
            .ch
            .timed(self.ch.client().query(&sql).fetch_all::<BucketRow>())
            .await?;
        let report = self.derive(touched, None).await?;
        self.set_watermark(pass_start).await?;
        metrics::gauge!(t::ROLLUP_LAG).set(unix_now().saturating_sub(pass_start as u64) as f64);
        metrics::histogram!(t::ROLLUP_PASS_DURATION).record(started.elapsed().as_secs_f64());
        Ok(report)
    }

    /// Re-derives every bucket of the UTC days `from..=to`, for one account
    /// or all.
    pub async fn reconcile(
        &self,
        from: Day,
        to: Day,
        account: Option<&str>,
    ) -> Result<PassReport, RollupError> {
        self.ch.check_server().await?;
        let from_ms = from.start_ms();
        let to_ms = to.start_ms() + DAY_MS;
        let mut sql = format!(
            "SELECT DISTINCT account, intDiv(ts, {}) AS bucket FROM {} \
             WHERE metric = {} AND ts >= {from_ms} AND ts < {to_ms}",
            self.rule.bucket_ms,
            self.ch.raw_table,
            quote(self.metric()),
        );
        if let Some(a) = account {
            sql.push_str(&format!(" AND account = {}", quote(a)));
        }
        let touched: Vec<BucketRow> = self
            .ch
            .timed(self.ch.client().query(&sql).fetch_all::<BucketRow>())
            .await?;
        let last = to_ms / self.rule.bucket_ms;
        self.derive(touched, Some(last)).await
    }

    /// Re-derives the given (account, bucket)s and the bucket after each
    /// (not beyond `last_bucket` when given).
    async fn derive(
        &self,
        touched: Vec<BucketRow>,
        last_bucket: Option<i64>,
    ) -> Result<PassReport, RollupError> {
        let mut by_bucket: BTreeMap<i64, BTreeSet<String>> = BTreeMap::new();
        for t in touched {
            for b in [t.bucket, t.bucket + 1] {
                if last_bucket.map_or(true, |l| b < l) {
                    by_bucket.entry(b).or_default().insert(t.account.clone());
                }
            }
        }
        let mut report = PassReport::default();
        let mut pending: Vec<ExpenseRow> = Vec::new();
        // A data error of one (account, bucket) that has not yet failed
        // MAX_BUCKET_FAILURES times: the others are written, then the pass
        // fails (the watermark stays) and the next pass tries it again.
        let mut unresolved: Option<RollupError> = None;
        for (bucket, accounts) in by_bucket {
            let accounts: Vec<String> = accounts.into_iter().collect();
            for chunk in chunk_by_bytes(&accounts, IN_LIST_BUDGET, |a| a.len() + 3) {
                let rows = match self.derive_bucket(bucket, chunk, &mut report).await {
                    Ok(rows) => {
                        self.succeeded(bucket, chunk);
                        rows
                    }
                    Err(e) if !e.is_data_error() => return Err(e),
                    Err(e) => {
                        // Something in this data: isolate it account by
                        // account, so that the others still get their rows.
                        tracing::warn!(error = %e, bucket, accounts = chunk.len(), "rollup: a bucket failed; retrying it account by account");
                        let mut rows = Vec::new();
                        for account in chunk {
                            let one = std::slice::from_ref(account);
                            match self.derive_bucket(bucket, one, &mut report).await {
                                Ok(r) => {
                                    self.succeeded(bucket, one);
                                    rows.extend(r);
                                }
                                Err(e) if !e.is_data_error() => return Err(e),
                                Err(e) => {
                                    if self.failed(bucket, account, &e) {
                                        report.buckets_skipped += 1;
                                    } else {
                                        unresolved.get_or_insert(e);
                                    }
                                }
                            }
                        }
                        rows
                    }
                };
                if pending.len() + rows.len() > MAX_INSERT_ROWS && !pending.is_empty() {
                    report.rows_written += pending.len();
                    self.write(&mut pending).await?;
                }
                pending.extend(rows);
            }
        }
        report.rows_written += pending.len();
        self.write(&mut pending).await?;
        match unresolved {
            Some(e) => Err(e),
            None => Ok(report),
        }
    }

    /// Forgets earlier failures of these (account, bucket)s.
    fn succeeded(&self, bucket: i64, accounts: &[String]) {
        if let Ok(mut f) = self.failures.lock() {
            if !f.is_empty() {
                for a in accounts {
                    f.remove(&(a.clone(), bucket));
                }
            }
        }
    }

    /// Records a data error of (account, bucket); true when it has now failed
    /// [`MAX_BUCKET_FAILURES`] passes in a row and is skipped (logged, counted).
    fn failed(&self, bucket: i64, account: &str, e: &RollupError) -> bool {
        let n = match self.failures.lock() {
            Ok(mut f) => {
                if f.len() > 100_000 {
                    f.clear(); // bounded; worst case a bucket is retried longer
                }
                let n = f.entry((account.to_string(), bucket)).or_insert(0);
                *n += 1;
                *n
            }
            Err(_) => MAX_BUCKET_FAILURES,
        };
        if n < MAX_BUCKET_FAILURES {
            tracing::warn!(error = %e, account, bucket, failures = n, "rollup: bucket failed; retrying next pass");
            return false;
        }
        if let Ok(mut f) = self.failures.lock() {
            f.remove(&(account.to_string(), bucket));
        }
        metrics::counter!(t::ROLLUP_BUCKETS_SKIPPED).increment(1);
        tracing::error!(error = %e, account, bucket, failures = n, "rollup: skipping a bucket that keeps failing; its expense rows are not updated (rwgate reconcile re-derives it once fixed)");
        true
    }

    async fn write(&self, rows: &mut Vec<ExpenseRow>) -> Result<(), RollupError> {
        if rows.is_empty() {
            return Ok(());
        }
        match self
            .ch
            .insert::<ExpenseRow>(&self.ch.expenses_table, rows)
            .await
        {
            Ok(()) => {
                metrics::counter!(t::BATCHES_WRITTEN, "table" => "expenses").increment(1);
                metrics::counter!(t::ROWS_WRITTEN, "table" => "expenses")
                    .increment(rows.len() as u64);
                rows.clear();
                Ok(())
            }
            Err(e) => {
                metrics::counter!(t::BATCHES_FAILED, "table" => "expenses").increment(1);
                Err(e.into())
            }
        }
    }

    /// The correction rows of one bucket for some accounts.
    async fn derive_bucket(
        &self,
        bucket: i64,
        accounts: &[String],
        report: &mut PassReport,
    ) -> Result<Vec<ExpenseRow>, RollupError> {
        let start = bucket * self.rule.bucket_ms;
        let end = start + self.rule.bucket_ms;
        let lead_in = start - self.rule.max_gap_ms;
        let pod_expr = match self.charge {
            Charge::Namespace => "''",
            Charge::Pod => "pod",
        };
        let accts = in_list(accounts);
        let pod_filter = match self.charge {
            Charge::Namespace => "",
            Charge::Pod => " AND pod != ''",
        };
        let sql = format!(
            "SELECT account, namespace, {pod_expr} AS p, ts, max(value) AS v \
             FROM {raw} WHERE metric = {m} AND account IN {accts} \
             AND ts >= {lead_in} AND ts < {end} AND isFinite(value) AND namespace != ''{pod_filter} \
             GROUP BY account, namespace, p, ts ORDER BY account, namespace, p, ts",
            raw = self.ch.raw_table,
            m = quote(self.metric()),
        );
        let samples: Vec<SampleRow> = self
            .ch
            .timed(self.ch.client().query(&sql).fetch_all::<SampleRow>())
            .await?;
        let mut series: BTreeMap<Resource, Vec<(i64, f64)>> = BTreeMap::new();
        for s in samples {
            series
                .entry(Resource {
                    account: s.account,
                    namespace: s.namespace,
                    pod: s.pod,
                })
                .or_default()
                .push((s.ts, s.value));
        }
        // Resources with a sample in the bucket but none in the lead-in:
        // does any earlier sample exist (max_gap) or none at all (step)?
        let need_history: Vec<&Resource> = series
            .iter()
            .filter(|(_, v)| v.first().is_some_and(|&(t, _)| t >= start))
            .map(|(k, _)| k)
            .collect();
        let mut has_earlier: BTreeSet<Resource> = BTreeSet::new();
        let nss: Vec<&String> = need_history
            .iter()
            .map(|r| &r.namespace)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        for nss in chunk_by_bytes(&nss, IN_LIST_BUDGET, namespace_weight) {
            let sql = format!(
                "SELECT account, namespace, {pod_expr} AS p FROM {raw} \
                 WHERE metric = {m} AND account IN {accts} AND {nss} \
                 AND ts < {lead_in} AND isFinite(value){pod_filter} LIMIT 1 BY account, namespace, p",
                raw = self.ch.raw_table,
                m = quote(self.metric()),
                nss = namespace_condition(nss),
            );
            let rows: Vec<KeyRow> = self
                .ch
                .timed(self.ch.client().query(&sql).fetch_all::<KeyRow>())
                .await?;
            // MD5 matches are re-checked by the exact key here.
            has_earlier.extend(rows.into_iter().map(|k| Resource {
                account: k.account,
                namespace: k.namespace,
                pod: k.pod,
            }));
        }
        // What the expenses table holds now.
        let prefix = match self.charge {
            Charge::Namespace => "k8s-ns-",
            Charge::Pod => "k8s-pod-",
        };
        let date = (start / 1000) as u32;
        let sql = format!(
            "SELECT cloud_account_id, resource_id, SUM(cost * sign) AS c, toInt64(SUM(sign)) AS s \
             FROM {exp} WHERE cloud_account_id IN {accts} AND date = toDateTime({date}) \
             AND startsWith(resource_id, {p}) GROUP BY cloud_account_id, resource_id",
            exp = self.ch.expenses_table,
            p = quote(prefix),
        );
        let existing: Vec<ExistingRow> = self
            .ch
            .timed(self.ch.client().query(&sql).fetch_all::<ExistingRow>())
            .await?;
        let existing: HashMap<(String, String), (f64, i64)> = existing
            .into_iter()
            .map(|e| ((e.account, e.resource_id), (e.cost, e.signs)))
            .collect();

        let mut rows = Vec::new();
        for (res, samples) in &series {
            report.buckets_examined += 1;
            let Some(cost) = self
                .rule
                .bucket_cost(samples, bucket, has_earlier.contains(res))
            else {
                continue;
            };
            let rid = res.cloud_resource_id(self.charge);
            let key = (res.account.clone(), rid);
            let fix = correction(existing.get(&key).copied(), cost);
            if fix.is_empty() {
                continue;
            }
            report.buckets_changed += 1;
            metrics::counter!(t::ROLLUP_BUCKETS_CHANGED).increment(1);
            for (cost, sign) in fix {
                rows.push(ExpenseRow {
                    cloud_account_id: key.0.clone(),
                    resource_id: key.1.clone(),
                    date,
                    cost,
                    sign,
                    k8s_namespace: Some(res.namespace.clone()),
                    k8s_node: None,
                    k8s_service: None,
                });
            }
        }
        Ok(rows)
    }

    async fn watermark(&self) -> Result<Option<u32>, RollupError> {
        let sql = format!(
            "SELECT name, watermark, version FROM {} FINAL WHERE name = {}",
            self.ch.state_table,
            quote(&self.state_name())
        );
        let rows: Vec<StateRow> = self
            .ch
            .timed(self.ch.client().query(&sql).fetch_all::<StateRow>())
            .await?;
        Ok(rows
            .into_iter()
            .max_by_key(|r| r.version)
            .map(|r| r.watermark))
    }

    async fn set_watermark(&self, watermark: u32) -> Result<(), RollupError> {
        let version = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        let row = StateRow {
            name: self.state_name(),
            watermark,
            version,
        };
        self.ch
            .insert::<StateRow>(&self.ch.state_table, &[row])
            .await?;
        Ok(())
    }
}

/// The rollup loop as a task of its own: `serve` starts it when
/// `rollup.enabled`, and `rwgate rollup` runs nothing else.
pub struct RollupTask {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl RollupTask {
    /// Starts the loop (after `migrate`, retried until it succeeds, when
    /// `clickhouse.migrate_on_start`). Fails only if the client cannot be
    /// configured.
    pub fn start(cfg: &Config) -> anyhow::Result<RollupTask> {
        let ch = ClickHouse::new(&cfg.clickhouse)?;
        let rollup = Rollup::new(ch.clone(), &cfg.rollup);
        let (stop, mut stop_rx) = watch::channel(false);
        let migrate = cfg.clickhouse.migrate_on_start;
        let retry = (cfg.spool.retry_backoff, cfg.spool.retry_max_backoff);
        let interval = cfg.rollup.interval;
        let task = tokio::spawn(async move {
            if migrate && !ch.migrate_until_done(retry, &mut stop_rx).await {
                return;
            }
            rollup.run(interval, stop_rx).await;
        });
        tracing::info!(interval = %HumanDuration(cfg.rollup.interval), "rollup started");
        Ok(RollupTask { stop, task })
    }

    /// Stops the loop within `limit` (a pass in flight is abandoned; the
    /// next one redoes it).
    pub async fn shutdown(self, limit: Duration) {
        let _ = self.stop.send(true);
        let abort = self.task.abort_handle();
        if tokio::time::timeout(limit, self.task).await.is_err() {
            abort.abort();
        }
        tracing::info!("rollup stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_is_skipped_after_repeated_data_errors_only() {
        let mut cfg = crate::config::Config::default();
        cfg.clickhouse.url = Some("http://127.0.0.1:1".into());
        let ch = ClickHouse::new(&cfg.clickhouse).unwrap();
        let r = Rollup::new(ch, &cfg.rollup);
        let e = RollupError::ClickHouse(ClickHouseError::Client {
            url: "http://127.0.0.1:1".into(),
            error: clickhouse::error::Error::BadResponse(
                "Code: 62, e.displayText() = DB::Exception: Max query size exceeded".into(),
            ),
        });
        assert!(e.is_data_error());
        for _ in 1..MAX_BUCKET_FAILURES {
            assert!(!r.failed(7, "a", &e));
        }
        // A success in between starts the count again.
        r.succeeded(7, &["a".to_string()]);
        for _ in 1..MAX_BUCKET_FAILURES {
            assert!(!r.failed(7, "a", &e));
        }
        assert!(r.failed(7, "a", &e), "skipped after {MAX_BUCKET_FAILURES}");
        assert!(!r.failed(7, "a", &e), "and counted afresh afterwards");
        let down = RollupError::ClickHouse(ClickHouseError::Timeout {
            url: "http://127.0.0.1:1".into(),
            after: Duration::from_secs(1),
        });
        assert!(!down.is_data_error());
    }
}
