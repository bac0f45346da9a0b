//! Registration of charged resources with the platform ([`platform`](super::platform)), so
//! that the platform's REST API and UI see their expense rows: it selects
//! an account's resource documents whose `first_seen`/`last_seen` overlap
//! the requested range and joins `expenses.resource_id` to their ids.
//!
//! # What the rollup asks
//!
//! For the resources charged in a pass ([`Sighting`]s: the span of their
//! samples), [`Registry::prepare`] makes the calls that are due and answers
//! with a [`Resolution`]: each resource's platform id, and whether its
//! registered window makes a bucket's row visible (`first_seen` before the
//! bucket's end, `last_seen` at or after its start). Rows of a bucket that
//! is not visible yet are not written: no row ever carries an id the
//! platform does not know, or money it would not show. The rollup
//! re-touches those buckets for [`Resolution::followup`] (durably, in the
//! touched index), so they are derived again when a retry is due, after a
//! restart too.
//!
//! # The window and the number of calls
//!
//! A new resource is registered with `first_seen` = its first sample's
//! hour and `last_seen` = the end of its last sample's hour, so both are
//! within an hour of the samples and a day's money is always inside the
//! window. The window is updated when a sample falls outside it, at most
//! once per `resources.update_interval` per resource, sending the latest
//! span seen: a steady stream costs one update per resource per hour (the
//! hour boundary), and a sender replaying a week of history costs a few
//! calls, its rows waiting for the next update meanwhile. Calls go per
//! account in batches of at most `resources.batch_size` (200), at most
//! `resources.concurrency` at once.
//!
//! # Failures
//!
//! 5xx, 429, timeouts and 401/403 are outages: no account is called again
//! until the backoff has passed. A 404 (unknown account) holds that account
//! only; a 400 is bisected down to the resource the platform refuses, which
//! alone waits. Each failure is logged in one line with its reason; the
//! gauges count the resources waiting and the age of the oldest.
//!
//! # Durability
//!
//! Every successful answer is written to the resources table
//! (`clickhouse.resources_table`) before any row uses it, and the table is
//! read at start: a restart writes rows for known resources without the
//! REST API. A crash after the platform registered a resource but before
//! the table has it costs one more call (`skip_existing` answers the same id).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clickhouse::sql::Identifier;
use clickhouse::Row;
use serde::Deserialize;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::platform::{
    field, name, BulkError, NewResource, PlatformApi, Registered, Scope, MAX_FIELD_CHARS,
    MAX_NAME_CHARS, MAX_SEEN,
};
use super::sql::InList;
use crate::clock::{Backoff, HumanDuration};
use crate::config::{Charge, Config};
use crate::cost::clickhouse::{ClickHouse, ClickHouseError, ResourceRow};
use crate::cost::names::{charged_metric, Resource};
use crate::telemetry as t;

/// `resource_type` of a namespace charge.
pub const NAMESPACE_TYPE: &str = "K8s Namespace";
/// `resource_type` of a pod charge (the platform's own Kubernetes importer
/// registers this type too, keyed by pod UID: do not charge pods on
/// accounts where it runs).
pub const POD_TYPE: &str = "K8s Pod";
/// `service_name` of every charged resource.
pub const SERVICE_NAME: &str = "Kubernetes";
/// The series label whose value becomes a pod's `k8s_node`.
pub const NODE_LABEL: &str = "node";

/// (account, cloud resource id).
pub type Key = (String, String);

/// A charged resource as one pass sees it.
#[derive(Debug, Clone)]
pub struct Sighting {
    pub resource: Resource,
    /// The `cluster` label of one of its samples (for `meta`).
    pub cluster: String,
    /// Its first and last sample in the buckets derived (ms).
    pub first_ms: i64,
    pub last_ms: i64,
    /// The earliest end and the latest start of those buckets (s): the
    /// window must reach both for all of its rows to be visible.
    pub first_bucket_end: i64,
    pub last_bucket_start: i64,
}

/// Why the registry could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot read the cluster secret file {path}: {source}")]
    Secret {
        path: String,
        source: std::io::Error,
    },
    #[error("the cluster secret file {0} is empty")]
    EmptySecret(String),
}

/// What the platform holds for a resource, as far as this process knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Known {
    pub id: String,
    pub first_seen: i64,
    pub last_seen: i64,
    /// When it was last sent (unix s).
    sent_at: u64,
}

impl Known {
    /// Whether the platform shows a row of the bucket `[start, end)` (s).
    pub fn shows(&self, start: i64, end: i64) -> bool {
        self.first_seen < end && self.last_seen >= start
    }
}

/// A retry schedule: no call before `next_try` (unix s).
struct Gate {
    next_try: u64,
    backoff: Backoff,
}

struct State {
    loaded: bool,
    known: HashMap<Key, Known>,
    /// Resources whose rows wait, since when (unix s).
    waiting: HashMap<Key, u64>,
    /// Outages: nobody is called before this.
    everyone: Option<Gate>,
    /// 404s and unusable answers, per account.
    accounts: HashMap<String, Gate>,
    /// Single resources the platform refused (400).
    refused: HashMap<Key, Gate>,
}

/// What [`Registry::prepare`] found: ids and windows, and when to look again.
#[derive(Debug, Default)]
pub struct Resolution {
    known: HashMap<Key, Known>,
    followups: HashMap<Key, u64>,
}

impl Resolution {
    /// The platform id of `key` if its row of the bucket `[start, end)` (s)
    /// may be written now.
    pub fn id_for(&self, key: &Key, start: i64, end: i64) -> Option<&str> {
        self.known
            .get(key)
            .filter(|k| k.shows(start, end))
            .map(|k| k.id.as_str())
    }

    /// When the buckets of `key` derived in this pass should be derived
    /// again (unix s): its rows wait, or its window is still to be updated.
    pub fn followup(&self, key: &Key) -> Option<u64> {
        self.followups.get(key).copied()
    }
}

/// The registry client with its durable mapping; one per rollup.
pub struct Registry {
    api: Option<PlatformApi>,
    ch: ClickHouse,
    charge: Charge,
    batch_size: usize,
    concurrency: usize,
    update_interval: u64,
    retry: (Duration, Duration),
    /// Whether failed calls are tried again (the rollup loop), or the
    /// command runs once (`reconcile`) and its failure logs say no retry
    /// time.
    retries: bool,
    state: Mutex<State>,
}

#[derive(Debug, Row, Deserialize)]
struct NodeRow {
    account: String,
    namespace: String,
    pod: String,
    node: String,
}

/// One resource of a planned call.
#[derive(Clone)]
struct Planned {
    key: Key,
    doc: NewResource,
}

type CallResult = (String, Vec<(Planned, Result<Registered, BulkError>)>);

impl Registry {
    /// The registry `cfg` asks for, or `None` when registration is off.
    /// Without a REST URL or secret (commands run with ClickHouse settings
    /// alone) it uses the resources table only: known resources get rows,
    /// the others wait for the rollup of `serve`.
    pub fn from_config(cfg: &Config, ch: ClickHouse) -> Result<Option<Registry>, RegistryError> {
        if !cfg.registers_resources() {
            return Ok(None);
        }
        let api = match (cfg.resources_rest_url(), cfg.resources_secret_file()) {
            (Some(url), Some(path)) => Some(PlatformApi::new(
                url,
                read_secret(path)?,
                cfg.resources.timeout,
            )),
            _ => None,
        };
        Ok(Some(Registry::new(ch, api, cfg)))
    }

    pub fn new(ch: ClickHouse, api: Option<PlatformApi>, cfg: &Config) -> Registry {
        let r = &cfg.resources;
        Registry {
            api,
            ch,
            charge: cfg.rollup.charge,
            batch_size: r.batch_size.max(1),
            concurrency: r.concurrency.max(1),
            update_interval: r.update_interval.as_secs(),
            retry: (r.retry_backoff, r.retry_max_backoff),
            retries: true,
            state: Mutex::new(State {
                loaded: false,
                known: HashMap::new(),
                waiting: HashMap::new(),
                everyone: None,
                accounts: HashMap::new(),
                refused: HashMap::new(),
            }),
        }
    }

    /// For a command that runs once: nothing tries a failed call again.
    pub(super) fn run_once(&mut self) {
        self.retries = false;
    }

    /// Whether it can register (a REST API is configured).
    pub fn can_register(&self) -> bool {
        self.api.is_some()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding it cannot leave it half-updated in a way
        // that matters (every update is one insert or remove).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads the resources table once.
    async fn load(&self) -> Result<(), ClickHouseError> {
        if self.state().loaded {
            return Ok(());
        }
        let rows: Vec<ResourceRow> = self
            .ch
            .timed(
                self.ch
                    .client()
                    .query(
                        "SELECT account, cloud_resource_id, resource_id, first_seen, last_seen, version \
                         FROM ? ORDER BY version DESC LIMIT 1 BY account, cloud_resource_id",
                    )
                    .bind(Identifier(&self.ch.config.resources_table))
                    .fetch_all::<ResourceRow>(),
            )
            .await?;
        let mut st = self.state();
        if !st.loaded {
            for r in rows {
                st.known.insert(
                    (r.account, r.cloud_resource_id),
                    Known {
                        id: r.resource_id,
                        first_seen: r.first_seen,
                        last_seen: r.last_seen,
                        sent_at: r.version / 1_000_000,
                    },
                );
            }
            st.loaded = true;
            tracing::info!(resources = st.known.len(), "registered resources loaded");
        }
        Ok(())
    }

    /// What is registered for `key` (tests, reports).
    pub fn known(&self, key: &Key) -> Option<Known> {
        self.state().known.get(key).cloned()
    }

    /// Registers what `sightings` need and is due (calls go out here),
    /// records every answer in the resources table, and says what may be
    /// written. Fails only if ClickHouse does (nothing is written then).
    pub async fn prepare(
        &self,
        sightings: &[Sighting],
        now: u64,
    ) -> Result<Resolution, ClickHouseError> {
        self.load().await?;
        let merged = merge(sightings, self.charge);
        let nodes = self.pod_nodes(&merged).await?;
        let (plan, mut followups) = self.plan(&merged, &nodes, now);
        let results = match &self.api {
            Some(api) if !plan.is_empty() => self.call(api, plan).await,
            _ => Vec::new(),
        };
        // Durable before any row uses it.
        let version = version_now();
        let rows: Vec<ResourceRow> = results
            .iter()
            .flat_map(|(account, rs)| {
                rs.iter().filter_map(move |(p, r)| {
                    let got = r.as_ref().ok()?;
                    Some(ResourceRow {
                        account: account.clone(),
                        cloud_resource_id: p.key.1.clone(),
                        resource_id: got.id.clone(),
                        first_seen: got.first_seen.or(p.doc.first_seen).unwrap_or(0),
                        last_seen: got.last_seen.or(p.doc.last_seen).unwrap_or(0),
                        version,
                    })
                })
            })
            .collect();
        self.ch
            .insert::<ResourceRow>(&self.ch.config.resources_table, &rows)
            .await?;
        let mut st = self.state();
        self.apply(&mut st, results, now, &mut followups);
        // What may be written, and what is still due.
        let mut resolution = Resolution::default();
        for (key, s) in &merged {
            let known = st.known.get(key).cloned();
            let all_shown = known
                .as_ref()
                .is_some_and(|k| k.shows(s.last_bucket_start, s.first_bucket_end));
            if all_shown {
                st.waiting.remove(key);
            } else {
                st.waiting.entry(key.clone()).or_insert(now);
                if !followups.contains_key(key) {
                    // Nothing scheduled it (no REST API here): look again
                    // at the next pass, when the table may have it.
                    followups.insert(key.clone(), now);
                }
            }
            if let Some(k) = known {
                resolution.known.insert(key.clone(), k);
            }
        }
        let oldest = st
            .waiting
            .values()
            .min()
            .map_or(0, |&s| now.saturating_sub(s));
        metrics::gauge!(t::RESOURCES_WAITING).set(st.waiting.len() as f64);
        metrics::gauge!(t::RESOURCES_WAITING_OLDEST_AGE).set(oldest as f64);
        resolution.followups = followups;
        Ok(resolution)
    }

    /// The calls due now, and the followups of what is due but held back.
    fn plan(
        &self,
        merged: &BTreeMap<Key, Sighting>,
        nodes: &HashMap<Key, String>,
        now: u64,
    ) -> (BTreeMap<String, Vec<Planned>>, HashMap<Key, u64>) {
        let mut st = self.state();
        let mut plan: BTreeMap<String, Vec<Planned>> = BTreeMap::new();
        let mut followups = HashMap::new();
        let everyone = st.everyone.as_ref().map_or(0, |g| g.next_try);
        for (key, s) in merged {
            let first = (s.first_ms.div_euclid(1000)).clamp(0, MAX_SEEN);
            let last = (s.last_ms.div_euclid(1000)).clamp(0, MAX_SEEN);
            let (want_first, want_last) = (floor_hour(first), ceil_hour(last));
            let (window, not_before) = match st.known.get(key) {
                Some(k) if k.first_seen <= first && k.last_seen >= last => continue,
                Some(k) => (
                    (k.first_seen.min(want_first), k.last_seen.max(want_last)),
                    k.sent_at.saturating_add(self.update_interval),
                ),
                None => ((want_first, want_last), 0),
            };
            let gate = [
                everyone,
                st.accounts.get(&key.0).map_or(0, |g| g.next_try),
                st.refused.get(key).map_or(0, |g| g.next_try),
                not_before,
            ]
            .into_iter()
            .max()
            .unwrap_or(0);
            if gate > now || self.api.is_none() {
                followups.insert(key.clone(), gate.max(now));
                continue;
            }
            let doc = self.document(s, window, nodes.get(key));
            plan.entry(key.0.clone()).or_default().push(Planned {
                key: key.clone(),
                doc,
            });
        }
        // Forget refusals and holds long past (bounded memory).
        st.refused.retain(|_, g| g.next_try + 86_400 > now);
        (plan, followups)
    }

    /// The resource document sent for a sighting.
    fn document(&self, s: &Sighting, window: (i64, i64), node: Option<&String>) -> NewResource {
        let r = &s.resource;
        let mut meta = serde_json::Map::new();
        let (resource_type, name, node) = match self.charge {
            Charge::Namespace => {
                meta.insert("namespace".into(), r.namespace.clone().into());
                if !s.cluster.is_empty() {
                    meta.insert("cluster".into(), s.cluster.clone().into());
                }
                (NAMESPACE_TYPE, name("Namespace: ", &r.namespace), None)
            }
            Charge::Pod => {
                // The platform allows only its pod model's fields in the
                // meta of a `K8s Pod`.
                if !s.cluster.is_empty() {
                    meta.insert("k8s_cluster".into(), s.cluster.clone().into());
                }
                let pod = field(&r.pod, MAX_NAME_CHARS).unwrap_or_else(|| name("Pod: ", &r.pod));
                (
                    POD_TYPE,
                    name("", &pod),
                    node.and_then(|n| field(n, MAX_FIELD_CHARS)),
                )
            }
        };
        NewResource {
            cloud_resource_id: r.cloud_resource_id(self.charge),
            resource_type,
            name,
            service_name: Some(SERVICE_NAME),
            meta: (!meta.is_empty()).then_some(meta),
            first_seen: Some(window.0),
            last_seen: Some(window.1),
            k8s_namespace: field(&r.namespace, MAX_FIELD_CHARS),
            k8s_node: node,
        }
    }

    /// The `node` label of pods about to be registered (pod charge only).
    async fn pod_nodes(
        &self,
        merged: &BTreeMap<Key, Sighting>,
    ) -> Result<HashMap<Key, String>, ClickHouseError> {
        if self.charge != Charge::Pod || self.api.is_none() {
            return Ok(HashMap::new());
        }
        let new: Vec<&Sighting> = {
            let st = self.state();
            merged
                .iter()
                .filter(|(k, _)| !st.known.contains_key(*k))
                .map(|(_, s)| s)
                .collect()
        };
        let mut out = HashMap::new();
        for chunk in new.chunks(1000) {
            let accounts: Vec<&str> = chunk.iter().map(|s| s.resource.account.as_str()).collect();
            let pods: Vec<&str> = chunk.iter().map(|s| s.resource.pod.as_str()).collect();
            let rows: Vec<NodeRow> = self
                .ch
                .timed(
                    self.ch
                        .client()
                        .query(
                            "SELECT account, namespace, pod, label_values[indexOf(label_names, ?)] AS node \
                             FROM ? WHERE metric = ? AND account IN ? AND pod IN ? AND has(label_names, ?) \
                             LIMIT 1 BY account, namespace, pod",
                        )
                        .bind(NODE_LABEL)
                        .bind(Identifier(&self.ch.config.series_table))
                        .bind(charged_metric(self.charge))
                        .bind(InList(&accounts))
                        .bind(InList(&pods))
                        .bind(NODE_LABEL)
                        .fetch_all::<NodeRow>(),
                )
                .await?;
            for r in rows {
                let res = Resource {
                    account: r.account,
                    namespace: r.namespace,
                    pod: r.pod,
                };
                let key = (res.account.clone(), res.cloud_resource_id(self.charge));
                out.insert(key, r.node);
            }
        }
        Ok(out)
    }

    /// Sends the plan: per account in batches, `concurrency` at once. After
    /// an outage answer, the calls not yet sent are not sent.
    async fn call(
        &self,
        api: &PlatformApi,
        plan: BTreeMap<String, Vec<Planned>>,
    ) -> Vec<CallResult> {
        let permits = Arc::new(Semaphore::new(self.concurrency));
        let tripped: Arc<Mutex<Option<BulkError>>> = Arc::new(Mutex::new(None));
        let mut tasks = JoinSet::new();
        for (account, planned) in plan {
            for batch in planned.chunks(self.batch_size) {
                let (api, permits, tripped) = (api.clone(), permits.clone(), tripped.clone());
                let (account, batch) = (account.clone(), batch.to_vec());
                tasks.spawn(async move {
                    let _permit = permits.acquire_owned().await;
                    let results = send(&api, &account, batch, &tripped).await;
                    (account, results)
                });
            }
        }
        let mut out = Vec::new();
        while let Some(done) = tasks.join_next().await {
            match done {
                Ok(r) => out.push(r),
                Err(e) => tracing::error!(error = %e, "a bulk registration task failed"),
            }
        }
        out
    }

    /// Applies answers: ids and windows learnt, gates opened or closed.
    fn apply(
        &self,
        st: &mut State,
        results: Vec<CallResult>,
        now: u64,
        followups: &mut HashMap<Key, u64>,
    ) {
        let new_gate = || Gate::new(self.retry, now);
        // The wait until a gate's next try, as ClickHouse's retries log it;
        // none when nothing will try again.
        let retry_in = |at: u64| {
            self.retries
                .then(|| tracing::field::display(HumanDuration(Duration::from_secs(at - now))))
        };
        let mut outage: Option<(BulkError, usize)> = None;
        for (account, rs) in results {
            let mut account_error: Option<(BulkError, usize)> = None;
            let mut ok = 0;
            for (p, r) in rs {
                let e = match r {
                    Ok(got) => {
                        ok += 1;
                        st.refused.remove(&p.key);
                        let known = Known {
                            id: got.id,
                            first_seen: got.first_seen.or(p.doc.first_seen).unwrap_or(0),
                            last_seen: got.last_seen.or(p.doc.last_seen).unwrap_or(0),
                            sent_at: now,
                        };
                        // Still short of what was sent: update again when allowed.
                        let sent = (p.doc.first_seen.unwrap_or(0), p.doc.last_seen.unwrap_or(0));
                        if known.first_seen > sent.0 || known.last_seen < sent.1 {
                            followups.insert(p.key.clone(), now + self.update_interval);
                        }
                        st.known.insert(p.key, known);
                        continue;
                    }
                    Err(e) => e,
                };
                let at = match e.scope() {
                    Scope::Everyone => {
                        outage.get_or_insert((e.clone(), 0)).1 += 1;
                        st.everyone.get_or_insert_with(new_gate).hold(now)
                    }
                    Scope::Account => {
                        account_error.get_or_insert((e.clone(), 0)).1 += 1;
                        st.accounts
                            .entry(account.clone())
                            .or_insert_with(new_gate)
                            .hold(now)
                    }
                    Scope::Content => {
                        let at = st
                            .refused
                            .entry(p.key.clone())
                            .or_insert_with(new_gate)
                            .hold(now);
                        tracing::warn!(account, cloud_resource_id = %p.key.1, error = %e, retry_in = retry_in(at), "resource registration refused; its expense rows wait");
                        at
                    }
                };
                followups.insert(p.key, at);
            }
            if ok > 0 {
                st.accounts.remove(&account);
                if outage.is_none() {
                    st.everyone = None;
                }
                metrics::counter!(t::RESOURCES_REGISTERED).increment(ok);
            }
            if let Some((e, n)) = account_error {
                let at = st.accounts.get(&account).map_or(now, |g| g.next_try);
                tracing::warn!(account, resources = n, error = %e, retry_in = retry_in(at), "resource registration failed for this account; its expense rows wait");
            }
        }
        if let Some((e, n)) = outage {
            let at = st.everyone.as_ref().map_or(now, |g| g.next_try);
            tracing::warn!(resources = n, error = %e, retry_in = retry_in(at), "resource registration failed (REST API unavailable); expense rows of new resources wait");
        }
    }
}

impl Gate {
    fn new(retry: (Duration, Duration), now: u64) -> Gate {
        Gate {
            next_try: now,
            backoff: Backoff::new(retry.0, retry.1),
        }
    }

    /// Closes the gate after a failure (longer each time); its next try.
    /// Several calls of one pass failing together count once.
    fn hold(&mut self, now: u64) -> u64 {
        if self.next_try <= now {
            self.next_try = now + self.backoff.next_delay().as_secs().max(1);
        }
        self.next_try
    }
}

/// Sends one batch; a 400 is bisected to the resources refused.
async fn send(
    api: &PlatformApi,
    account: &str,
    batch: Vec<Planned>,
    tripped: &Mutex<Option<BulkError>>,
) -> Vec<(Planned, Result<Registered, BulkError>)> {
    let mut out = Vec::with_capacity(batch.len());
    let mut todo: Vec<Vec<Planned>> = vec![batch];
    while let Some(part) = todo.pop() {
        let held = tripped.lock().ok().and_then(|t| t.clone());
        if let Some(e) = held {
            out.extend(part.into_iter().map(|p| (p, Err(e.clone()))));
            continue;
        }
        let docs: Vec<NewResource> = part.iter().map(|p| p.doc.clone()).collect();
        match api.bulk(account, &docs).await {
            Ok(got) => {
                metrics::counter!(t::RESOURCES_BULK_CALLS, "result" => "ok").increment(1);
                out.extend(part.into_iter().zip(got).map(|(p, g)| (p, Ok(g))));
            }
            Err(e) => {
                metrics::counter!(t::RESOURCES_BULK_CALLS, "result" => e.kind()).increment(1);
                match e.scope() {
                    Scope::Content if part.len() > 1 => {
                        let mut left = part;
                        let right = left.split_off(left.len() / 2);
                        todo.push(right);
                        todo.push(left);
                    }
                    Scope::Everyone => {
                        if let Ok(mut t) = tripped.lock() {
                            t.get_or_insert(e.clone());
                        }
                        out.extend(part.into_iter().map(|p| (p, Err(e.clone()))));
                    }
                    _ => out.extend(part.into_iter().map(|p| (p, Err(e.clone())))),
                }
            }
        }
    }
    out
}

/// One sighting per resource: the widest span, the first cluster seen.
fn merge(sightings: &[Sighting], charge: Charge) -> BTreeMap<Key, Sighting> {
    let mut out: BTreeMap<Key, Sighting> = BTreeMap::new();
    for s in sightings {
        let key = (
            s.resource.account.clone(),
            s.resource.cloud_resource_id(charge),
        );
        match out.get_mut(&key) {
            Some(m) => {
                m.first_ms = m.first_ms.min(s.first_ms);
                m.last_ms = m.last_ms.max(s.last_ms);
                m.first_bucket_end = m.first_bucket_end.min(s.first_bucket_end);
                m.last_bucket_start = m.last_bucket_start.max(s.last_bucket_start);
                if m.cluster.is_empty() {
                    m.cluster.clone_from(&s.cluster);
                }
            }
            None => {
                out.insert(key, s.clone());
            }
        }
    }
    out
}

fn floor_hour(s: i64) -> i64 {
    s - s.rem_euclid(3600)
}

/// The end of the hour holding `s` (`s` itself on an hour boundary).
fn ceil_hour(s: i64) -> i64 {
    let f = floor_hour(s);
    if f == s {
        s
    } else {
        (f + 3600).min(MAX_SEEN)
    }
}

/// A version for the resources table: microseconds of the wall clock.
fn version_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The cluster secret: the file's text without surrounding whitespace.
fn read_secret(path: &Path) -> Result<String, RegistryError> {
    let text = std::fs::read_to_string(path).map_err(|source| RegistryError::Secret {
        path: path.display().to_string(),
        source,
    })?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(RegistryError::EmptySecret(path.display().to_string()));
    }
    Ok(secret.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_whole_hours_around_the_samples() {
        assert_eq!(floor_hour(7200 + 59), 7200);
        assert_eq!(ceil_hour(7200 + 59), 10_800);
        assert_eq!(ceil_hour(7200), 7200);
        assert_eq!(ceil_hour(MAX_SEEN), MAX_SEEN);
        let k = Known {
            id: "x".into(),
            first_seen: 3600,
            last_seen: 7200,
            sent_at: 0,
        };
        // Bucket [0, 3600) ends at first_seen: not shown; [7200, ...) is.
        assert!(!k.shows(0, 3600));
        assert!(k.shows(3599, 7199));
        assert!(k.shows(7200, 10_800));
        assert!(!k.shows(7201, 10_800));
    }

    #[test]
    fn sightings_merge_per_resource() {
        let res = |ns: &str| Resource {
            account: "a".into(),
            namespace: ns.into(),
            pod: String::new(),
        };
        let s = |ns: &str, f: i64, l: i64| Sighting {
            resource: res(ns),
            cluster: String::new(),
            first_ms: f,
            last_ms: l,
            first_bucket_end: f + 10,
            last_bucket_start: l - 10,
        };
        let m = merge(
            &[s("x", 100, 200), s("y", 5, 6), s("x", 50, 150)],
            Charge::Namespace,
        );
        assert_eq!(m.len(), 2);
        let x = &m[&(
            "a".to_string(),
            res("x").cloud_resource_id(Charge::Namespace),
        )];
        assert_eq!((x.first_ms, x.last_ms), (50, 200));
        assert_eq!((x.first_bucket_end, x.last_bucket_start), (60, 190));
    }

    /// What `apply` logs for the failures of one pass, as text lines.
    fn failure_log(once: bool) -> String {
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut cfg = Config::default();
        cfg.clickhouse.url = Some("http://127.0.0.1:1".into());
        cfg.resources.retry_backoff = Duration::from_secs(3);
        cfg.resources.retry_max_backoff = Duration::from_secs(3);
        let mut registry = Registry::new(ClickHouse::new(&cfg.clickhouse).unwrap(), None, &cfg);
        if once {
            registry.run_once();
        }
        let planned = |id: &str| Planned {
            key: ("acc".into(), id.into()),
            doc: NewResource {
                cloud_resource_id: id.into(),
                resource_type: "K8s Namespace",
                name: name("Namespace: ", id),
                service_name: None,
                meta: None,
                first_seen: None,
                last_seen: None,
                k8s_namespace: None,
                k8s_node: None,
            },
        };
        let at = crate::client::Endpoint::new("the REST API", "http://u:pw@rest:1");
        let results = vec![(
            "acc".to_string(),
            vec![
                (
                    planned("a"),
                    Err(BulkError::Timeout {
                        at: at.clone(),
                        after: Duration::from_millis(1500),
                    }),
                ),
                (
                    planned("b"),
                    Err(BulkError::Status {
                        at,
                        status: 400,
                        detail: "OE0212".into(),
                    }),
                ),
            ],
        )];
        let buf = Buf::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer({
                let buf = buf.clone();
                move || buf.clone()
            })
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let mut st = registry.state();
            registry.apply(&mut st, results, 1_000, &mut HashMap::new());
        });
        let bytes = buf.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    /// A failure's wait is logged as `retry_in=` in the format of
    /// ClickHouse's retries, and the failure names the API without its
    /// password; a command that runs once logs no wait at all.
    #[test]
    fn failures_log_when_they_are_retried() {
        let log = failure_log(false);
        assert_eq!(log.lines().count(), 2, "{log}");
        for want in [
            "error=the REST API at http://***@rest:1 did not answer within 1s 500ms retry_in=3s",
            "error=the REST API at http://***@rest:1 answered 400 Bad Request: OE0212 retry_in=3s",
        ] {
            assert!(log.lines().any(|l| l.ends_with(want)), "{want}\n{log}");
        }
        let log = failure_log(true);
        assert_eq!(log.lines().count(), 2, "{log}");
        assert!(!log.contains("retry_in"), "{log}");
        assert!(!log.contains("pw"), "{log}");
    }
}
