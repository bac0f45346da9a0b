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
//!    writer inserted since the watermark minus `overlap`, up to the pass
//!    start), or for `reconcile`, every bucket of a range. Each changed
//!    bucket also marks the next bucket, because a late sample changes the
//!    `dt` of the sample after it, which may sit in the next bucket.
//! 2. Per bucket: the samples of those accounts from `max_gap` before the
//!    bucket to its end, deduplicated by timestamp; for resources without a
//!    sample in that lead-in, whether any earlier sample exists at all (one
//!    `LIMIT 1 BY` query) decides between `max_gap` and `step`.
//! 3. The bucket's current value is read back (`SUM(cost*sign)`,
//!    `SUM(sign)`).
//! 4. With registration on ([`resources`]), the resources charged are
//!    registered with the platform where due; a resource's row waits until
//!    the platform knows it and shows it for that bucket. Where the value
//!    differs, `(old, -1)` and `(new, +1)` go into one insert with all other
//!    changes of the pass, so `SUM(cost*sign)` is right at every moment and
//!    merges collapse the pairs. Rows carry the platform's id
//!    (`resources.expense_ids = "platform"`, the default with registration)
//!    or the cloud resource id; under platform ids, live rows a resource
//!    still has under its cloud resource id (written before registration
//!    was on) are cancelled in the same insert.
//! 5. Buckets whose rows wait (or whose resource's window is still to be
//!    updated) are re-touched in the touched index for the minute their
//!    retry is due, so a later pass derives them again, also after a crash.
//! 6. The watermark (pass start) is stored in ClickHouse.
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
pub mod platform;
pub mod resources;
pub mod sql;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clickhouse::sql::Identifier;
use clickhouse::Row;
use serde::Deserialize;
use tokio::sync::watch;

use crate::clock::{unix_now, Day, HumanDuration, DAY_MS};
use crate::config::{Charge, Config, ExpenseIds, Grain, RollupConfig};
use crate::cost::clickhouse::{ClickHouse, ClickHouseError, ExpenseRow, StateRow, TouchedRow};
use crate::cost::names::{charged_metric, Resource};
use crate::health::{Component, Health, Supervised};
use crate::telemetry as t;

use money::{cancellation, correction, MoneyRule};
use resources::{Key, Registry, Resolution, Sighting};
use sql::{chunk_by_bytes, namespace_weight, InList, NamespaceCondition, IN_LIST_BUDGET};

/// Most rows in one expenses insert (a bucket's rows never straddle two).
const MAX_INSERT_ROWS: usize = 100_000;

/// Charged (resource, bucket)s derived before their rows are resolved and
/// written (bounds a pass's memory on a long catch-up).
const MAX_PENDING_CHARGES: usize = 50_000;

/// Touched-index rows up to this far past the pass start are read by it
/// (a writer's clock a little ahead); later ones are deferred retries,
/// read by the pass that reaches them.
const TOUCHED_AHEAD_S: u32 = 60;

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
    /// (resource, bucket)s whose rows wait for the resource's registration.
    pub buckets_waiting: usize,
}

/// What [`Rollup::move_ids`] did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct MoveReport {
    /// (resource, bucket)s whose rows moved to the platform id.
    pub buckets_moved: usize,
    pub rows_written: usize,
    /// (resource, bucket)s left under the cloud resource id: not registered
    /// (yet), or their resource could not be identified.
    pub buckets_waiting: usize,
}

/// Why a pass failed.
#[derive(Debug, thiserror::Error)]
pub enum RollupError {
    #[error(transparent)]
    ClickHouse(#[from] ClickHouseError),
    #[error("moving rows to platform ids needs registration on and resources.expense_ids = \"platform\"")]
    NoPlatformIds,
}

impl RollupError {
    /// Retrying the same work cannot help (see [`ClickHouseError::is_data_error`]).
    pub fn is_data_error(&self) -> bool {
        match self {
            RollupError::ClickHouse(e) => e.is_data_error(),
            RollupError::NoPlatformIds => false,
        }
    }
}

/// Whether charged resources are registered, and what rows carry.
enum Registration {
    /// Off: rows carry the cloud resource id at once.
    Off,
    /// On: a resource's rows wait for its registration, and carry `ids`.
    On {
        registry: Box<Registry>,
        ids: ExpenseIds,
    },
}

/// The rollup writer.
pub struct Rollup {
    ch: ClickHouse,
    rule: MoneyRule,
    charge: Charge,
    grain: Grain,
    overlap: Duration,
    registration: Registration,
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
    cluster: String,
}

#[derive(Debug, Row, Deserialize)]
struct KeyRow {
    account: String,
    namespace: String,
    #[serde(rename = "p")]
    pod: String,
}

impl From<KeyRow> for Resource {
    fn from(k: KeyRow) -> Resource {
        Resource {
            account: k.account,
            namespace: k.namespace,
            pod: k.pod,
        }
    }
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

#[derive(Debug, Row, Deserialize)]
struct OldFormRow {
    #[serde(rename = "cloud_account_id")]
    account: String,
    resource_id: String,
    #[serde(rename = "d")]
    date: u32,
    #[serde(rename = "ns")]
    namespace: Option<String>,
    #[serde(rename = "c")]
    cost: f64,
    #[serde(rename = "s")]
    signs: i64,
}

/// A resource's cost in one bucket.
struct Charged {
    resource: Resource,
    cost: f64,
    /// Its first and last sample in the bucket (ms), and one's cluster.
    first_ms: i64,
    last_ms: i64,
    cluster: String,
}

/// One bucket of some accounts, derived: costs and what the table holds.
struct BucketWork {
    bucket: i64,
    charged: Vec<Charged>,
    /// (account, resource_id) -> (SUM(cost*sign), SUM(sign)).
    existing: HashMap<(String, String), (f64, i64)>,
}

/// (account, bucket, ingest minute) to derive again.
type Retouch = BTreeSet<(String, i64, u32)>;

impl Rollup {
    /// A rollup without registration: rows carry cloud resource ids.
    pub fn new(ch: ClickHouse, cfg: &RollupConfig) -> Rollup {
        Rollup {
            ch,
            rule: MoneyRule::from_config(cfg),
            charge: cfg.charge,
            grain: cfg.grain,
            overlap: cfg.overlap,
            registration: Registration::Off,
            failures: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// Registers charged resources through `registry` before writing their
    /// rows, which carry `ids`.
    pub fn with_registry(mut self, registry: Registry, ids: ExpenseIds) -> Rollup {
        self.registration = Registration::On {
            registry: Box::new(registry),
            ids,
        };
        self
    }

    /// For a command that runs once (`reconcile`): registration failures
    /// are logged without a retry time, as nothing retries them.
    pub fn once(mut self) -> Rollup {
        if let Registration::On { registry, .. } = &mut self.registration {
            registry.run_once();
        }
        self
    }

    /// The rollup `cfg` describes, registration included (without a REST
    /// API configured, known resources only: see [`Registry::from_config`]).
    pub fn from_config(cfg: &Config) -> anyhow::Result<Rollup> {
        let ch = ClickHouse::new(&cfg.clickhouse)?;
        let rollup = Rollup::new(ch.clone(), &cfg.rollup);
        Ok(match Registry::from_config(cfg, ch)? {
            Some(registry) => rollup.with_registry(registry, cfg.expense_ids()),
            None => rollup,
        })
    }

    /// The registry, when registration is on.
    pub fn registry(&self) -> Option<&Registry> {
        match &self.registration {
            Registration::On { registry, .. } => Some(registry),
            Registration::Off => None,
        }
    }

    fn metric(&self) -> &'static str {
        charged_metric(self.charge)
    }

    fn bucket_s(&self) -> i64 {
        self.rule.bucket_ms / 1000
    }

    /// Whether rows carry platform ids (and old-form rows are moved).
    fn platform_ids(&self) -> bool {
        matches!(
            self.registration,
            Registration::On {
                ids: ExpenseIds::Platform,
                ..
            }
        )
    }

    /// The prefix of this charge's cloud resource ids.
    fn old_prefix(&self) -> &'static str {
        match self.charge {
            Charge::Namespace => "k8s-ns-",
            Charge::Pod => "k8s-pod-",
        }
    }

    /// The watermark's name: one per expenses table, charge and grain.
    fn state_name(&self) -> String {
        format!(
            "{}:{:?}:{:?}",
            self.ch.config.expenses_table, self.charge, self.grain
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
                    if r.buckets_changed > 0 || r.buckets_waiting > 0 {
                        tracing::debug!(
                            buckets_examined = r.buckets_examined,
                            buckets_changed = r.buckets_changed,
                            rows_written = r.rows_written,
                            buckets_skipped = r.buckets_skipped,
                            buckets_waiting = r.buckets_waiting,
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
        self.pass_at(unix_now()).await
    }

    /// A pass as if the wall clock read `now` (unix s): the watermark, the
    /// touched index and registration retries follow it (tests simulate
    /// hours of passes with it).
    pub async fn pass_at(&self, now: u64) -> Result<PassReport, RollupError> {
        let started = Instant::now();
        self.ch.check_server().await?;
        let pass_start = now as u32;
        let watermark = self.watermark().await?;
        let since = watermark.map_or(0, |w| w.saturating_sub(self.overlap.as_secs() as u32));
        let touched: Vec<BucketRow> = self
            .ch
            .timed(
                self.ch
                    .client()
                    .query(
                        "SELECT DISTINCT account, intDiv(toInt64(toUInt32(hour)), ?) AS bucket FROM ? \
                         WHERE metric = ? AND ingest_minute >= ? AND ingest_minute <= ?",
                    )
                    .bind(self.bucket_s())
                    .bind(Identifier(&self.ch.config.touched_table))
                    .bind(self.metric())
                    .bind(since - since % 60)
                    .bind(pass_start.saturating_add(TOUCHED_AHEAD_S))
                    .fetch_all::<BucketRow>(),
            )
            .await?;
        let report = self.derive(touched, None, now).await?;
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
        let sql = format!(
            "SELECT DISTINCT account, intDiv(ts, ?) AS bucket FROM ? \
             WHERE metric = ? AND ts >= ? AND ts < ?{}",
            if account.is_some() {
                " AND account = ?"
            } else {
                ""
            }
        );
        let mut q = self
            .ch
            .client()
            .query(&sql)
            .bind(self.rule.bucket_ms)
            .bind(Identifier(&self.ch.config.raw_table))
            .bind(self.metric())
            .bind(from_ms)
            .bind(to_ms);
        if let Some(a) = account {
            q = q.bind(a);
        }
        let touched: Vec<BucketRow> = self.ch.timed(q.fetch_all::<BucketRow>()).await?;
        let last = to_ms / self.rule.bucket_ms;
        self.derive(touched, Some(last), unix_now()).await
    }

    /// Re-derives the given (account, bucket)s and the bucket after each
    /// (not beyond `last_bucket` when given).
    async fn derive(
        &self,
        touched: Vec<BucketRow>,
        last_bucket: Option<i64>,
        now: u64,
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
        let mut works: Vec<BucketWork> = Vec::new();
        let mut charges = 0;
        let mut retouch = Retouch::new();
        // A data error of one (account, bucket) that has not yet failed
        // MAX_BUCKET_FAILURES times: the others are written, then the pass
        // fails (the watermark stays) and the next pass tries it again.
        let mut unresolved: Option<RollupError> = None;
        for (bucket, accounts) in by_bucket {
            let accounts: Vec<String> = accounts.into_iter().collect();
            for chunk in chunk_by_bytes(&accounts, IN_LIST_BUDGET, |a| a.len() + 3) {
                match self
                    .derive_into(bucket, chunk, &mut report, &mut works)
                    .await
                {
                    Ok(charged) => charges += charged,
                    Err(e) if !e.is_data_error() => return Err(e),
                    Err(e) => {
                        // Something in this data: isolate it account by
                        // account, so that the others still get their rows.
                        tracing::warn!(error = %e, bucket, accounts = chunk.len(), "rollup: a bucket failed; retrying it account by account");
                        for account in chunk {
                            let one = std::slice::from_ref(account);
                            match self.derive_into(bucket, one, &mut report, &mut works).await {
                                Ok(charged) => charges += charged,
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
                    }
                }
                if charges >= MAX_PENDING_CHARGES {
                    self.flush(&mut works, &mut report, &mut retouch, now)
                        .await?;
                    charges = 0;
                }
            }
        }
        self.flush(&mut works, &mut report, &mut retouch, now)
            .await?;
        self.retouch(retouch).await?;
        match unresolved {
            Some(e) => Err(e),
            None => Ok(report),
        }
    }

    /// Resolves the charges of `works` (registration, when on) and writes
    /// their rows; buckets to derive again go to `retouch`.
    async fn flush(
        &self,
        works: &mut Vec<BucketWork>,
        report: &mut PassReport,
        retouch: &mut Retouch,
        now: u64,
    ) -> Result<(), RollupError> {
        if works.is_empty() {
            return Ok(());
        }
        let resolution = match &self.registration {
            Registration::On { registry, .. } => {
                let bucket_s = self.bucket_s();
                let sightings: Vec<Sighting> = works
                    .iter()
                    .flat_map(|w| {
                        let start = w.bucket * bucket_s;
                        w.charged.iter().map(move |c| Sighting {
                            resource: c.resource.clone(),
                            cluster: c.cluster.clone(),
                            first_ms: c.first_ms,
                            last_ms: c.last_ms,
                            first_bucket_end: start + bucket_s,
                            last_bucket_start: start,
                        })
                    })
                    .collect();
                Some(registry.prepare(&sightings, now).await?)
            }
            Registration::Off => None,
        };
        let mut pending: Vec<ExpenseRow> = Vec::new();
        for work in works.drain(..) {
            let rows = self.rows(&work, resolution.as_ref(), report, retouch);
            if pending.len() + rows.len() > MAX_INSERT_ROWS && !pending.is_empty() {
                report.rows_written += pending.len();
                self.write(&mut pending).await?;
            }
            pending.extend(rows);
        }
        report.rows_written += pending.len();
        self.write(&mut pending).await
    }

    /// The correction rows of one derived bucket. With registration on, a
    /// resource's rows are written only once the platform shows them.
    fn rows(
        &self,
        work: &BucketWork,
        resolution: Option<&Resolution>,
        report: &mut PassReport,
        retouch: &mut Retouch,
    ) -> Vec<ExpenseRow> {
        let start = work.bucket * self.bucket_s();
        let date = start as u32;
        let mut rows = Vec::new();
        for c in &work.charged {
            let account = &c.resource.account;
            let crid = c.resource.cloud_resource_id(self.charge);
            let (target, old_form) = match (&self.registration, resolution) {
                (Registration::On { ids, .. }, Some(res)) => {
                    let key: Key = (account.clone(), crid);
                    if let Some(at) = res.followup(&key) {
                        retouch.insert((account.clone(), work.bucket, minute(at)));
                    }
                    let Some(id) = res.id_for(&key, start, start + self.bucket_s()) else {
                        report.buckets_waiting += 1;
                        continue;
                    };
                    match ids {
                        ExpenseIds::Platform => (id.to_string(), Some(key.1)),
                        ExpenseIds::CloudResourceId => (key.1, None),
                    }
                }
                _ => (crid, None),
            };
            let existing = |id: &String| work.existing.get(&(account.clone(), id.clone())).copied();
            let cancel = old_form
                .as_ref()
                .map(|old| cancellation(existing(old)))
                .unwrap_or_default();
            let fix = correction(existing(&target), c.cost);
            if fix.is_empty() && cancel.is_empty() {
                continue;
            }
            report.buckets_changed += 1;
            metrics::counter!(t::ROLLUP_BUCKETS_CHANGED).increment(1);
            let ids = old_form
                .iter()
                .map(|old| (old, &cancel))
                .chain([(&target, &fix)]);
            for (id, pairs) in ids {
                for &(cost, sign) in pairs {
                    rows.push(ExpenseRow {
                        cloud_account_id: account.clone(),
                        resource_id: id.clone(),
                        date,
                        cost,
                        sign,
                        k8s_namespace: Some(c.resource.namespace.clone()),
                        k8s_node: None,
                        k8s_service: None,
                    });
                }
            }
        }
        rows
    }

    /// Marks (account, bucket)s touched at a later minute, so that the pass
    /// reaching it derives them again.
    async fn retouch(&self, retouch: Retouch) -> Result<(), RollupError> {
        let metric = self.metric();
        let rows: Vec<TouchedRow> = retouch
            .into_iter()
            .map(|(account, bucket, ingest_minute)| TouchedRow {
                ingest_minute,
                metric: metric.to_string(),
                account,
                hour: (bucket * self.bucket_s()).clamp(0, u32::MAX as i64) as u32,
            })
            .collect();
        self.ch
            .insert::<TouchedRow>(&self.ch.config.touched_table, &rows)
            .await?;
        Ok(())
    }

    /// Derives one bucket for `accounts` ([`derive_bucket`](Self::derive_bucket))
    /// into `works`, forgetting their earlier failures; returns how many
    /// charges it added.
    async fn derive_into(
        &self,
        bucket: i64,
        accounts: &[String],
        report: &mut PassReport,
        works: &mut Vec<BucketWork>,
    ) -> Result<usize, RollupError> {
        let work = self.derive_bucket(bucket, accounts, report).await?;
        self.succeeded(bucket, accounts);
        let charged = work.charged.len();
        works.push(work);
        Ok(charged)
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
            .insert::<ExpenseRow>(&self.ch.config.expenses_table, rows)
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

    /// The costs of one bucket for some accounts, and what the expenses
    /// table holds for it now.
    async fn derive_bucket(
        &self,
        bucket: i64,
        accounts: &[String],
        report: &mut PassReport,
    ) -> Result<BucketWork, RollupError> {
        let start = bucket * self.rule.bucket_ms;
        let end = start + self.rule.bucket_ms;
        let lead_in = start - self.rule.max_gap_ms;
        let (pod_expr, pod_filter) = match self.charge {
            Charge::Namespace => ("''", ""),
            Charge::Pod => ("pod", " AND pod != ''"),
        };
        let sql = format!(
            "SELECT account, namespace, {pod_expr} AS p, ts, max(value) AS v, any(cluster) AS cluster \
             FROM ? WHERE metric = ? AND account IN ? \
             AND ts >= ? AND ts < ? AND isFinite(value) AND namespace != ''{pod_filter} \
             GROUP BY account, namespace, p, ts ORDER BY account, namespace, p, ts",
        );
        let samples: Vec<SampleRow> = self
            .ch
            .timed(
                self.ch
                    .client()
                    .query(&sql)
                    .bind(Identifier(&self.ch.config.raw_table))
                    .bind(self.metric())
                    .bind(InList(accounts))
                    .bind(lead_in)
                    .bind(end)
                    .fetch_all::<SampleRow>(),
            )
            .await?;
        let mut series: BTreeMap<Resource, (Vec<(i64, f64)>, String)> = BTreeMap::new();
        for s in samples {
            let entry = series
                .entry(Resource {
                    account: s.account,
                    namespace: s.namespace,
                    pod: s.pod,
                })
                .or_default();
            if entry.1.is_empty() && s.ts >= start {
                entry.1 = s.cluster;
            }
            entry.0.push((s.ts, s.value));
        }
        // Resources with a sample in the bucket but none in the lead-in:
        // does any earlier sample exist (max_gap) or none at all (step)?
        let need_history: Vec<&Resource> = series
            .iter()
            .filter(|(_, v)| v.0.first().is_some_and(|&(t, _)| t >= start))
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
            let cond = NamespaceCondition::new(nss);
            let sql = format!(
                "SELECT account, namespace, {pod_expr} AS p FROM ? \
                 WHERE metric = ? AND account IN ? AND {} \
                 AND ts < ? AND isFinite(value){pod_filter} LIMIT 1 BY account, namespace, p",
                cond.sql()
            );
            let q = self
                .ch
                .client()
                .query(&sql)
                .bind(Identifier(&self.ch.config.raw_table))
                .bind(self.metric())
                .bind(InList(accounts));
            let q = cond.bind(q).bind(lead_in);
            let rows: Vec<KeyRow> = self.ch.timed(q.fetch_all::<KeyRow>()).await?;
            // MD5 matches are re-checked by the exact key here.
            has_earlier.extend(rows.into_iter().map(Resource::from));
        }
        // What the expenses table holds now: rows under cloud resource ids,
        // and under platform ids the resources table knows.
        let date = (start / 1000) as u32;
        let mapped = if self.platform_ids() {
            " OR resource_id IN (SELECT resource_id FROM ? WHERE account IN ?)"
        } else {
            ""
        };
        let sql = format!(
            "SELECT cloud_account_id, resource_id, SUM(cost * sign) AS c, toInt64(SUM(sign)) AS s \
             FROM ? WHERE cloud_account_id IN ? AND date = toDateTime(?) \
             AND (startsWith(resource_id, ?){mapped}) GROUP BY cloud_account_id, resource_id"
        );
        let mut q = self
            .ch
            .client()
            .query(&sql)
            .bind(Identifier(&self.ch.config.expenses_table))
            .bind(InList(accounts))
            .bind(date)
            .bind(self.old_prefix());
        if self.platform_ids() {
            q = q
                .bind(Identifier(&self.ch.config.resources_table))
                .bind(InList(accounts));
        }
        let existing: Vec<ExistingRow> = self.ch.timed(q.fetch_all::<ExistingRow>()).await?;
        let existing = existing
            .into_iter()
            .map(|e| ((e.account, e.resource_id), (e.cost, e.signs)))
            .collect();

        let mut charged = Vec::new();
        for (resource, (samples, cluster)) in series {
            report.buckets_examined += 1;
            let earlier = has_earlier.contains(&resource);
            let Some(cost) = self.rule.bucket_cost(&samples, bucket, earlier) else {
                continue;
            };
            let inside = samples
                .iter()
                .filter(|&&(t, _)| t >= start)
                .map(|&(t, _)| t);
            let (first_ms, last_ms) =
                inside.fold((i64::MAX, i64::MIN), |(f, l), t| (f.min(t), l.max(t)));
            charged.push(Charged {
                resource,
                cost,
                first_ms,
                last_ms,
                cluster,
            });
        }
        Ok(BucketWork {
            bucket,
            charged,
            existing,
        })
    }

    /// Moves the live rows of the UTC days `from..=to` that still carry
    /// cloud resource ids (written before platform ids were on) to the
    /// platform ids of their resources, registering them where needed:
    /// one insert per day cancels the old-form rows and adds their value
    /// to the platform id's, so every (account, day) total, and every
    /// resource's, stays the same at every moment. Needs no raw samples
    /// (the old rows' dates and `k8s_namespace` identify the resources).
    pub async fn move_ids(
        &self,
        from: Day,
        to: Day,
        account: Option<&str>,
        now: u64,
    ) -> Result<MoveReport, RollupError> {
        let Registration::On {
            registry,
            ids: ExpenseIds::Platform,
        } = &self.registration
        else {
            return Err(RollupError::NoPlatformIds);
        };
        self.ch.check_server().await?;
        let mut report = MoveReport::default();
        for day in from.number()..=to.number() {
            self.move_day(registry, Day(day), account, now, &mut report)
                .await?;
        }
        Ok(report)
    }

    async fn move_day(
        &self,
        registry: &Registry,
        day: Day,
        account: Option<&str>,
        now: u64,
        report: &mut MoveReport,
    ) -> Result<(), RollupError> {
        let (from_s, to_s) = (day.start_ms() / 1000, day.start_ms() / 1000 + 86_400);
        let sql =
            format!(
            "SELECT cloud_account_id, resource_id, toUInt32(date) AS d, any(k8s_namespace) AS ns, \
             SUM(cost * sign) AS c, toInt64(SUM(sign)) AS s FROM ? \
             WHERE date >= toDateTime(?) AND date < toDateTime(?) AND startsWith(resource_id, ?){} \
             GROUP BY cloud_account_id, resource_id, d",
            if account.is_some() { " AND cloud_account_id = ?" } else { "" }
        );
        let mut q = self
            .ch
            .client()
            .query(&sql)
            .bind(Identifier(&self.ch.config.expenses_table))
            .bind(from_s)
            .bind(to_s)
            .bind(self.old_prefix());
        if let Some(a) = account {
            q = q.bind(a);
        }
        let old: Vec<OldFormRow> = self.ch.timed(q.fetch_all::<OldFormRow>()).await?;
        let old: Vec<OldFormRow> = old
            .into_iter()
            .filter(|r| !cancellation(Some((r.cost, r.signs))).is_empty())
            .collect();
        if old.is_empty() {
            return Ok(());
        }
        let resources = self.identify(&old).await?;
        let bucket_s = self.bucket_s();
        let sightings: Vec<Sighting> = old
            .iter()
            .filter_map(|r| {
                let res = resources.get(&(r.account.clone(), r.resource_id.clone()))?;
                let start = i64::from(r.date);
                Some(Sighting {
                    resource: res.clone(),
                    cluster: String::new(),
                    first_ms: start * 1000,
                    last_ms: (start + bucket_s - 1) * 1000,
                    first_bucket_end: start + bucket_s,
                    last_bucket_start: start,
                })
            })
            .collect();
        let resolution = registry.prepare(&sightings, now).await?;
        // What the platform ids hold already (normally nothing).
        let accounts: Vec<String> = old
            .iter()
            .map(|r| r.account.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut existing: HashMap<(String, String, u32), (f64, i64)> = HashMap::new();
        for chunk in chunk_by_bytes(&accounts, IN_LIST_BUDGET, |a| a.len() + 3) {
            let rows: Vec<OldFormRow> = self
                .ch
                .timed(
                    self.ch
                        .client()
                        .query(
                            "SELECT cloud_account_id, resource_id, toUInt32(date) AS d, any(k8s_namespace) AS ns, \
                             SUM(cost * sign) AS c, toInt64(SUM(sign)) AS s FROM ? \
                             WHERE cloud_account_id IN ? AND date >= toDateTime(?) AND date < toDateTime(?) \
                             AND resource_id IN (SELECT resource_id FROM ? WHERE account IN ?) \
                             GROUP BY cloud_account_id, resource_id, d",
                        )
                        .bind(Identifier(&self.ch.config.expenses_table))
                        .bind(InList(chunk))
                        .bind(from_s)
                        .bind(to_s)
                        .bind(Identifier(&self.ch.config.resources_table))
                        .bind(InList(chunk))
                        .fetch_all::<OldFormRow>(),
                )
                .await?;
            existing.extend(
                rows.into_iter()
                    .map(|r| ((r.account, r.resource_id, r.date), (r.cost, r.signs))),
            );
        }
        let mut rows = Vec::new();
        for r in &old {
            let key: Key = (r.account.clone(), r.resource_id.clone());
            let start = i64::from(r.date);
            let id = resolution.id_for(&key, start, start + bucket_s);
            let (Some(id), true) = (id, resources.contains_key(&key)) else {
                report.buckets_waiting += 1;
                continue;
            };
            let have = existing
                .get(&(r.account.clone(), id.to_string(), r.date))
                .copied();
            let moved = have.map_or(0.0, |h| h.0) + r.cost;
            let pairs = [
                (&r.resource_id, cancellation(Some((r.cost, r.signs)))),
                (&id.to_string(), correction(have, moved)),
            ];
            for (rid, fix) in pairs {
                for (cost, sign) in fix {
                    rows.push(ExpenseRow {
                        cloud_account_id: r.account.clone(),
                        resource_id: rid.clone(),
                        date: r.date,
                        cost,
                        sign,
                        k8s_namespace: r.namespace.clone(),
                        k8s_node: None,
                        k8s_service: None,
                    });
                }
            }
            report.buckets_moved += 1;
        }
        // One insert: one day is one partition, so one part, seen whole.
        report.rows_written += rows.len();
        self.write(&mut rows).await
    }

    /// The resources behind old-form rows: a namespace from the rows'
    /// `k8s_namespace`, a pod from the series table (its id hashes the pod
    /// name, which the rows do not carry). Checked against the id itself.
    async fn identify(&self, old: &[OldFormRow]) -> Result<HashMap<Key, Resource>, RollupError> {
        let mut out = HashMap::new();
        let mut namespaces: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for r in old {
            let Some(ns) = r.namespace.as_deref() else {
                continue;
            };
            match self.charge {
                Charge::Namespace => {
                    let res = Resource {
                        account: r.account.clone(),
                        namespace: ns.to_string(),
                        pod: String::new(),
                    };
                    if res.cloud_resource_id(self.charge) == r.resource_id {
                        out.insert((r.account.clone(), r.resource_id.clone()), res);
                    }
                }
                Charge::Pod => {
                    namespaces.entry(r.account.as_str()).or_default().insert(ns);
                }
            }
        }
        let wanted: BTreeSet<(&str, &str)> = old
            .iter()
            .map(|r| (r.account.as_str(), r.resource_id.as_str()))
            .collect();
        for (account, nss) in namespaces {
            let nss: Vec<&str> = nss.into_iter().collect();
            let pods: Vec<KeyRow> = self
                .ch
                .timed(
                    self.ch
                        .client()
                        .query(
                            "SELECT DISTINCT account, namespace, pod AS p FROM ? \
                             WHERE account = ? AND metric = ? AND namespace IN ? AND pod != ''",
                        )
                        .bind(Identifier(&self.ch.config.series_table))
                        .bind(account)
                        .bind(self.metric())
                        .bind(InList(&nss))
                        .fetch_all::<KeyRow>(),
                )
                .await?;
            for k in pods {
                let res = Resource::from(k);
                let crid = res.cloud_resource_id(self.charge);
                if wanted.contains(&(res.account.as_str(), crid.as_str())) {
                    out.insert((res.account.clone(), crid), res);
                }
            }
        }
        Ok(out)
    }

    async fn watermark(&self) -> Result<Option<u32>, RollupError> {
        let rows: Vec<StateRow> = self
            .ch
            .timed(
                self.ch
                    .client()
                    .query("SELECT name, watermark, version FROM ? FINAL WHERE name = ?")
                    .bind(Identifier(&self.ch.config.state_table))
                    .bind(self.state_name())
                    .fetch_all::<StateRow>(),
            )
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
            .insert::<StateRow>(&self.ch.config.state_table, &[row])
            .await?;
        Ok(())
    }
}

/// The ingest minute (a touched-index key) of a unix time.
fn minute(at: u64) -> u32 {
    let at = at.min(u64::from(u32::MAX)) as u32;
    at - at % 60
}

/// The rollup loop as a task of its own: `serve` starts it when
/// `rollup.enabled`, and `rwgate rollup` runs nothing else.
pub struct RollupTask {
    task: Supervised,
}

impl RollupTask {
    /// Starts the loop on `ch` (after `migrate`, retried until it
    /// succeeds, when `clickhouse.migrate_on_start`), reporting its death
    /// into `health`. Fails only if registration is on without a REST API
    /// to register with.
    pub fn start(cfg: &Config, ch: ClickHouse, health: &Arc<Health>) -> anyhow::Result<RollupTask> {
        cfg.validate_registration_source()?;
        let rollup = Rollup::from_config(cfg)?;
        let migrate = cfg.clickhouse.migrate_on_start;
        let retry = (cfg.spool.retry_backoff, cfg.spool.retry_max_backoff);
        let interval = cfg.rollup.interval;
        let task = health.spawn(Component::Rollup, move |mut stop| async move {
            if migrate && !ch.migrate_until_done(retry, &mut stop).await {
                return;
            }
            rollup.run(interval, stop).await;
        });
        tracing::info!(interval = %HumanDuration(cfg.rollup.interval), "rollup started");
        Ok(RollupTask { task })
    }

    /// Stops the loop by `deadline` (a pass in flight is abandoned; the
    /// next one redoes it).
    pub async fn shutdown(self, deadline: tokio::time::Instant) {
        self.task.stop(deadline).await;
        tracing::info!("rollup stopped");
    }

    /// Cancels the loop as a fault would (tests).
    #[cfg(test)]
    pub(crate) fn kill(&self) {
        self.task.kill();
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
