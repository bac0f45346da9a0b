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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use clickhouse::Row;
use serde::Deserialize;
use tokio::sync::watch;

use crate::clickhouse::{ClickHouse, ClickHouseError, ExpenseRow, StateRow};
use crate::config::{Charge, Grain, RollupConfig};
use crate::tee::unix_now;
use crate::telemetry as t;

/// The namespace-total metric (charged by default).
pub const NAMESPACE_METRIC: &str = "cloudtuner_kubecost_namespace_total_cost";
/// The pod-total metric (charged with `charge = pod`).
pub const POD_METRIC: &str = "cloudtuner_kubecost_pod_total_cost";
/// Metrics that may be charged (the writer indexes these).
pub const CHARGED_METRICS: [&str; 2] = [NAMESPACE_METRIC, POD_METRIC];

/// Most rows in one expenses insert (a bucket's rows never straddle two).
const MAX_INSERT_ROWS: usize = 100_000;

/// Most bytes of string literals in the `IN` lists of one query. ClickHouse
/// refuses queries over `max_query_size` (256 KiB by default) with "Code:
/// 62"; a query holds at most two lists (accounts, namespaces), so it stays
/// well under that whatever the number or length of the keys.
pub const IN_LIST_BUDGET: usize = 64 << 10;

/// Namespace values longer than this are matched by their MD5 in queries
/// (`hex(MD5(namespace))`, 34 bytes of literal), so a tenant's long label
/// values cannot inflate a query.
const HASH_NAMESPACES_OVER: usize = 64;

/// Consecutive failed passes after which an (account, bucket) whose queries
/// fail because of their content (not availability) is skipped, so that it
/// cannot hold the watermark back for every other account.
pub const MAX_BUCKET_FAILURES: u32 = 3;

/// What the money rule needs.
#[derive(Debug, Clone, Copy)]
pub struct MoneyRule {
    pub bucket_ms: i64,
    pub max_gap_ms: i64,
    pub step_ms: i64,
}

impl MoneyRule {
    pub fn from_config(cfg: &RollupConfig) -> MoneyRule {
        MoneyRule {
            bucket_ms: match cfg.grain {
                Grain::Day => 86_400_000,
                Grain::Hour => 3_600_000,
            },
            max_gap_ms: cfg.max_gap.as_millis() as i64,
            step_ms: cfg.step.as_millis() as i64,
        }
    }

    /// The cost of bucket `b` (its start is `b * bucket_ms`), from the
    /// resource's samples sorted by time with unique timestamps, covering at
    /// least `[start - max_gap, end)`. `has_earlier`: a sample exists before
    /// the first one given. `None` if no sample falls in the bucket.
    pub fn bucket_cost(&self, samples: &[(i64, f64)], b: i64, has_earlier: bool) -> Option<f64> {
        let start = b * self.bucket_ms;
        let end = start + self.bucket_ms;
        let mut prev: Option<i64> = None;
        let mut cost = 0.0;
        let mut any = false;
        for &(t, r) in samples {
            if t >= end {
                break;
            }
            if t >= start {
                let dt = match prev {
                    Some(p) => (t - p).min(self.max_gap_ms),
                    None if has_earlier => self.max_gap_ms,
                    None => self.step_ms,
                };
                cost += r * dt as f64 / 3_600_000.0;
                any = true;
            }
            prev = Some(t);
        }
        any.then_some(cost)
    }
}

/// The expense resource of a sample's labels under a charge mode.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Resource {
    pub account: String,
    pub namespace: String,
    /// Empty under namespace charging.
    pub pod: String,
}

impl Resource {
    /// `k8s-ns-` + md5("namespace-" + ns)[..16], or `k8s-pod-` +
    /// md5("pod-" + ns + "/" + pod)[..16].
    pub fn resource_id(&self, charge: Charge) -> String {
        match charge {
            Charge::Namespace => {
                let d = md5::compute(format!("namespace-{}", self.namespace));
                format!("k8s-ns-{}", &format!("{d:x}")[..16])
            }
            Charge::Pod => {
                let d = md5::compute(format!("pod-{}/{}", self.namespace, self.pod));
                format!("k8s-pod-{}", &format!("{d:x}")[..16])
            }
        }
    }
}

/// Rows turning a bucket's current state (`SUM(cost*sign)`, `SUM(sign)`)
/// into exactly one live row worth `new`. Empty if it already is.
pub fn correction(existing: Option<(f64, i64)>, new: f64) -> Vec<(f64, i8)> {
    let (sum, signs) = existing.unwrap_or((0.0, 0));
    if signs == 1 && same(sum, new) {
        return Vec::new();
    }
    let mut rows = Vec::new();
    let cancel = signs != 0 || sum != 0.0;
    if cancel {
        rows.push((sum, -1));
    }
    // Pad with zero-cost rows so that the signs add up to exactly 1 (only
    // after something wrote this bucket twice; normally 0).
    let pad = i64::from(cancel) - signs;
    let pad = pad.clamp(-1000, 1000);
    for _ in 0..pad.abs() {
        rows.push((0.0, if pad > 0 { 1 } else { -1 }));
    }
    rows.push((new, 1));
    rows
}

/// Equal up to float noise of summing the same rows in another order.
fn same(a: f64, b: f64) -> bool {
    a == b || (a - b).abs() <= 1e-12 * a.abs().max(b.abs())
}

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
    #[error("invalid date {0:?}: expected YYYY-MM-DD")]
    Date(String),
}

impl RollupError {
    /// Retrying the same work cannot help (see [`ClickHouseError::is_data_error`]).
    pub fn is_data_error(&self) -> bool {
        match self {
            RollupError::ClickHouse(e) => e.is_data_error(),
            RollupError::Date(_) => true,
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

#[derive(Debug, Row, Deserialize)]
struct SampleRow {
    account: String,
    namespace: String,
    pod: String,
    ts: i64,
    value: f64,
}

#[derive(Debug, Row, Deserialize)]
struct KeyRow {
    account: String,
    namespace: String,
    pod: String,
}

#[derive(Debug, Row, Deserialize)]
struct ExistingRow {
    account: String,
    resource_id: String,
    cost: f64,
    signs: i64,
}

/// A ClickHouse string literal.
fn quote(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('\'');
    for c in s.chars() {
        match c {
            '\\' => q.push_str("\\\\"),
            '\'' => q.push_str("\\'"),
            _ => q.push(c),
        }
    }
    q.push('\'');
    q
}

fn in_list<'a>(items: impl IntoIterator<Item = &'a String>) -> String {
    let v: Vec<String> = items.into_iter().map(|s| quote(s)).collect();
    format!("({})", v.join(","))
}

/// Splits `items` into runs whose literals (`weight` bytes each) add up to at
/// most `budget` bytes; an item heavier than the budget gets a run of its own.
pub fn chunk_by_bytes<T>(items: &[T], budget: usize, weight: impl Fn(&T) -> usize) -> Vec<&[T]> {
    let mut out = Vec::new();
    let (mut start, mut used) = (0, 0);
    for (i, item) in items.iter().enumerate() {
        let w = weight(item);
        if i > start && used + w > budget {
            out.push(&items[start..i]);
            (start, used) = (i, 0);
        }
        used += w;
    }
    if start < items.len() {
        out.push(&items[start..]);
    }
    out
}

/// The literal bytes a namespace costs in [`namespace_condition`].
fn namespace_weight(ns: &&String) -> usize {
    if ns.len() > HASH_NAMESPACES_OVER {
        35
    } else {
        ns.len() + 3
    }
}

/// `namespace` is one of `nss`: short values as literals, long ones by MD5.
fn namespace_condition(nss: &[&String]) -> String {
    let (long, short): (Vec<&String>, Vec<&String>) =
        nss.iter().partition(|n| n.len() > HASH_NAMESPACES_OVER);
    let mut parts = Vec::new();
    if !short.is_empty() {
        parts.push(format!("namespace IN {}", in_list(short)));
    }
    if !long.is_empty() {
        let hashes: Vec<String> = long
            .iter()
            .map(|n| format!("'{:X}'", md5::compute(n.as_bytes())))
            .collect();
        parts.push(format!("hex(MD5(namespace)) IN ({})", hashes.join(",")));
    }
    format!("({})", parts.join(" OR "))
}

/// Days since the epoch of `YYYY-MM-DD`.
pub fn parse_day(s: &str) -> Result<i64, RollupError> {
    let bad = || RollupError::Date(s.to_string());
    let mut it = s.trim().splitn(3, '-');
    let y: i64 = it.next().and_then(|x| x.parse().ok()).ok_or_else(bad)?;
    let m: i64 = it.next().and_then(|x| x.parse().ok()).ok_or_else(bad)?;
    let d: i64 = it.next().and_then(|x| x.parse().ok()).ok_or_else(bad)?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || !(1970..=2105).contains(&y) {
        return Err(bad());
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Ok(era * 146_097 + doe - 719_468)
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
        match self.charge {
            Charge::Namespace => NAMESPACE_METRIC,
            Charge::Pod => POD_METRIC,
        }
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
                        tracing::debug!(?r, "rollup pass");
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
            .timed(self.ch.client.query(&sql).fetch_all::<BucketRow>())
            .await?;
        let report = self.derive(touched, None).await?;
        self.set_watermark(pass_start).await?;
        metrics::gauge!(t::ROLLUP_LAG).set(unix_now().saturating_sub(pass_start as u64) as f64);
        metrics::histogram!(t::ROLLUP_PASS_DURATION).record(started.elapsed().as_secs_f64());
        Ok(report)
    }

    /// Re-derives every bucket of the UTC days `from..=to` (YYYY-MM-DD),
    /// for one account or all.
    pub async fn reconcile(
        &self,
        from: &str,
        to: &str,
        account: Option<&str>,
    ) -> Result<PassReport, RollupError> {
        let from_ms = parse_day(from)? * 86_400_000;
        let to_ms = (parse_day(to)? + 1) * 86_400_000;
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
            .timed(self.ch.client.query(&sql).fetch_all::<BucketRow>())
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
            "SELECT account, namespace, {pod_expr} AS p, ts, max(value) \
             FROM {raw} WHERE metric = {m} AND account IN {accts} \
             AND ts >= {lead_in} AND ts < {end} AND isFinite(value) AND namespace != ''{pod_filter} \
             GROUP BY account, namespace, p, ts ORDER BY account, namespace, p, ts",
            raw = self.ch.raw_table,
            m = quote(self.metric()),
        );
        let samples: Vec<SampleRow> = self
            .ch
            .timed(self.ch.client.query(&sql).fetch_all::<SampleRow>())
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
                .timed(self.ch.client.query(&sql).fetch_all::<KeyRow>())
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
            .timed(self.ch.client.query(&sql).fetch_all::<ExistingRow>())
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
            let rid = res.resource_id(self.charge);
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
            .timed(self.ch.client.query(&sql).fetch_all::<StateRow>())
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

#[cfg(test)]
mod tests {
    use super::*;

    const RULE: MoneyRule = MoneyRule {
        bucket_ms: 3_600_000,
        max_gap_ms: 300_000,
        step_ms: 60_000,
    };

    #[test]
    fn first_sample_uses_step_then_time_since_previous() {
        // 2 USD/h at 0, 60 s, 180 s: 60 s (step) + 60 s + 120 s.
        let s = [(0, 2.0), (60_000, 2.0), (180_000, 2.0)];
        let c = RULE.bucket_cost(&s, 0, false).unwrap();
        assert!((c - 2.0 * 240.0 / 3600.0).abs() < 1e-15);
        // Something earlier exists (beyond the lead-in): first dt = max_gap.
        let c = RULE.bucket_cost(&s, 0, true).unwrap();
        assert!((c - 2.0 * 480.0 / 3600.0).abs() < 1e-15);
    }

    #[test]
    fn gaps_are_capped_and_lead_in_sets_dt_only() {
        // Previous bucket's last sample 30 s before this bucket.
        let s = [
            (3_570_000, 100.0),
            (3_600_000, 1.0),
            (3_600_000 + 7_200_000 - 1, 1.0),
        ];
        let c = RULE.bucket_cost(&s, 1, true).unwrap();
        assert!((c - 30.0 / 3600.0).abs() < 1e-15, "{c}");
        // Bucket 2's only sample comes 2 h after the previous one: max_gap.
        let c = RULE.bucket_cost(&s, 2, true).unwrap();
        assert!((c - 300.0 / 3600.0).abs() < 1e-15, "capped at max_gap: {c}");
        assert_eq!(RULE.bucket_cost(&s, 3, true), None, "nothing in bucket 3");
    }

    #[test]
    fn corrections_leave_exactly_one_live_row() {
        assert_eq!(correction(None, 5.0), vec![(5.0, 1)]);
        assert_eq!(correction(Some((5.0, 1)), 5.0), vec![]);
        assert_eq!(correction(Some((5.0, 1)), 7.0), vec![(5.0, -1), (7.0, 1)]);
        for (sum, signs) in [(10.0, 2), (0.0, 0), (3.0, 0), (-1.0, -1), (4.0, 3)] {
            let rows = correction(Some((sum, signs)), 7.0);
            let s: i64 = signs + rows.iter().map(|r| i64::from(r.1)).sum::<i64>();
            let c: f64 = sum + rows.iter().map(|r| r.0 * f64::from(r.1)).sum::<f64>();
            assert_eq!(s, 1, "{sum} {signs}");
            assert!((c - 7.0).abs() < 1e-12, "{sum} {signs}");
        }
    }

    #[test]
    fn resource_ids_match_the_platform() {
        let r = Resource {
            account: "a".into(),
            namespace: "kube-system".into(),
            pod: String::new(),
        };
        let want = format!("{:x}", md5::compute("namespace-kube-system"));
        assert_eq!(
            r.resource_id(Charge::Namespace),
            format!("k8s-ns-{}", &want[..16])
        );
        let p = Resource {
            pod: "web-1".into(),
            ..r
        };
        let want = format!("{:x}", md5::compute("pod-kube-system/web-1"));
        assert_eq!(
            p.resource_id(Charge::Pod),
            format!("k8s-pod-{}", &want[..16])
        );
    }

    #[test]
    fn in_lists_are_chunked_by_bytes_and_long_namespaces_hashed() {
        let items: Vec<String> = (0..1000).map(|i| format!("{i:0>100}")).collect();
        let chunks = chunk_by_bytes(&items, 1000, |s| s.len() + 3);
        assert!(
            chunks[..chunks.len() - 1].iter().all(|c| c.len() == 9),
            "9 * 103 <= 1000"
        );
        assert_eq!(chunks.iter().map(|c| c.len()).sum::<usize>(), 1000);
        // An item over the budget gets a run of its own; nothing is lost.
        let big = vec!["x".repeat(5000), "a".into(), "b".into()];
        let chunks = chunk_by_bytes(&big, 1000, |s| s.len());
        assert_eq!(chunks.len(), 2);
        assert!(chunk_by_bytes::<String>(&[], 10, |s| s.len()).is_empty());

        let long = "n".repeat(4000);
        let short = "web".to_string();
        let cond = namespace_condition(&[&short, &long]);
        assert!(cond.len() < 120, "{cond}");
        let want = format!("{:X}", md5::compute(long.as_bytes()));
        assert_eq!(
            cond,
            format!("(namespace IN ('web') OR hex(MD5(namespace)) IN ('{want}'))")
        );
    }

    #[test]
    fn a_bucket_is_skipped_after_repeated_data_errors_only() {
        let mut cfg = crate::config::Config::default();
        cfg.clickhouse.url = Some("http://127.0.0.1:1".into());
        let ch = ClickHouse::new(&cfg.clickhouse).unwrap();
        let r = Rollup::new(ch, &cfg.rollup);
        let e = RollupError::ClickHouse(ClickHouseError::Client(
            clickhouse::error::Error::BadResponse(
                "Code: 62, e.displayText() = DB::Exception: Max query size exceeded".into(),
            ),
        ));
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
        let down = RollupError::ClickHouse(ClickHouseError::Timeout(Duration::from_secs(1)));
        assert!(!down.is_data_error());
    }

    #[test]
    fn days_parse() {
        assert_eq!(parse_day("1970-01-01").unwrap(), 0);
        assert_eq!(parse_day("2024-03-01").unwrap(), 19_783);
        assert!(parse_day("2024-13-01").is_err());
        assert!(parse_day("yesterday").is_err());
        assert_eq!(quote("a'b\\c"), "'a\\'b\\\\c'");
    }
}
