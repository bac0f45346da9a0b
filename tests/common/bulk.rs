//! The platform REST API's bulk resource endpoint, as strict as the real
//! one (OptScale `rest_api_server/handlers/v2/cloud_resources_bulk.py`,
//! `controllers/cloud_resource.py`, `utils.py`) and stricter where rwgate
//! must be careful:
//!
//! - 401 `OE0237` without a `Secret` header, 403 `OE0236` with a wrong one,
//!   404 `OE0002` for an account the stand-in does not know.
//! - The query must be exactly `behavior=skip_existing&return_resources=true
//!   &is_report_import=true` (400 `OE0217` otherwise: the only behaviour
//!   rwgate may use).
//! - The body must be a JSON object (`OE0426`) holding `resources` (`OE0216`)
//!   as a list (`OE0385`) and nothing else (`OE0212`).
//! - Each resource: only the keys the issue lists (`OE0212`; `id`, `_id`,
//!   `resource_id` and the platform's other immutable keys `OE0211`); no key
//!   may be null (`OE0212`: the real API would store the null); required
//!   `cloud_resource_id` (1-512 chars), `resource_type` (1-255), `name`
//!   (1-512) (`OE0216` missing, `OE0214` not a string, `OE0215` length,
//!   `OE0416` blank); other strings 1-255; `tags`, `meta` objects (`OE0344`),
//!   and for `K8s Pod` only the pod model's fields in `meta` (`OE0212`);
//!   `first_seen`, `last_seen` integers (`OE0223`) in 0..=2^31-1 (`OE0224`).
//! - `skip_existing`: a new (account, `cloud_resource_id`) gets a fresh id
//!   (`first_seen`/`last_seen` default to now when not sent, as the real
//!   one's `created_at`); an existing one keeps its id, `first_seen` the
//!   minimum and `last_seen` the maximum of stored and sent. `meta` is not
//!   stored (the real one keeps only a fixed list of cloud keys under
//!   `skip_existing`).
//! - 200 `{"resources": [...]}` lists every resource sent, once, formatted as
//!   the platform does (`id`, ...), in an order unrelated to the request's.
//! - More than 200 resources in one call are served (the real API has no
//!   limit) but flagged in the call record.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use serde_json::{json, Map, Value};

use super::{respond, RestState, Seen};

pub const BULK_SUFFIX: &str = "/cloud_resources/bulk";
pub const BULK_QUERY: &str = "behavior=skip_existing&return_resources=true&is_report_import=true";
/// Most resources the platform's own importers send in one call.
pub const MAX_PER_CALL: usize = 200;

const REQUIRED: [&str; 3] = ["cloud_resource_id", "resource_type", "name"];
const OPTIONAL_STRINGS: [&str; 5] = [
    "service_name",
    "region",
    "k8s_namespace",
    "k8s_node",
    "k8s_service",
];
const IMMUTABLE: [&str; 9] = [
    "created_at",
    "deleted_at",
    "id",
    "_id",
    "resource_id",
    "pool_name",
    "pool_purpose",
    "owner_name",
    "is_environment",
];
/// The fields of the platform's pod model (`tools/cloud_adapter/model.py`
/// `PodResource`, with `CloudResource`'s), less the required and immutable
/// ones: the only keys a `K8s Pod`'s `meta` may hold.
const POD_META: [&str; 24] = [
    "cloud_resource_id",
    "cloud_account_name",
    "region",
    "organization_id",
    "pool_id",
    "owner_id",
    "last_seen",
    "active",
    "tags",
    "cloud_console_link",
    "cluster_id",
    "cluster_type_id",
    "cloud_type",
    "meta",
    "name",
    "created_by_kind",
    "created_by_name",
    "host_ip",
    "instance_address",
    "k8s_node",
    "k8s_namespace",
    "pod_ip",
    "k8s_service",
    "k8s_cluster",
];

/// One bulk call as received, and how it was answered.
#[derive(Debug, Clone)]
pub struct BulkCall {
    pub account: String,
    pub status: u16,
    /// The resources sent (as JSON), whatever the answer.
    pub resources: Vec<Value>,
    /// The error code of a refusal (`OE0212`, ...).
    pub error_code: Option<String>,
    /// More than [`MAX_PER_CALL`] resources.
    pub oversized: bool,
    /// A `cloud_resource_id` sent twice in this call.
    pub duplicates: bool,
}

#[derive(Default)]
pub(super) struct BulkState {
    pub(super) calls: Mutex<Vec<BulkCall>>,
    /// (account, cloud_resource_id) -> stored document.
    pub(super) docs: Mutex<BTreeMap<(String, String), Value>>,
    pub(super) fail: Mutex<Option<u16>>,
    pub(super) fail_accounts: Mutex<BTreeMap<String, u16>>,
    pub(super) hold: Mutex<Duration>,
    /// Bulk calls being answered now, and the most at once.
    pub(super) in_flight: AtomicUsize,
    pub(super) max_in_flight: AtomicUsize,
}

/// Counts a bulk call in flight while it lives.
struct InFlight<'a>(&'a BulkState);

impl<'a> InFlight<'a> {
    fn enter(st: &'a BulkState) -> InFlight<'a> {
        let now = st.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        st.max_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(st)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

fn error(status: u16, code: &str, reason: String) -> (u16, String, String) {
    (status, code.to_string(), reason)
}

fn error_body(status: u16, code: &str, reason: &str) -> String {
    json!({"error": {"status_code": status, "error_code": code, "reason": reason, "params": []}})
        .to_string()
}

/// Answers a bulk call.
pub(super) async fn answer(st: &RestState, seen: Seen) -> http::Response<Full<Bytes>> {
    let _counted = InFlight::enter(&st.bulk);
    let account = seen
        .uri
        .path()
        .strip_prefix("/restapi/v2/cloud_accounts/")
        .and_then(|p| p.strip_suffix(BULK_SUFFIX))
        .unwrap_or("")
        .to_string();
    let sent: Vec<Value> = serde_json::from_slice::<Value>(&seen.body)
        .ok()
        .and_then(|v| v.get("resources").and_then(Value::as_array).cloned())
        .unwrap_or_default();
    let crids: Vec<&str> = sent
        .iter()
        .filter_map(|r| r.get("cloud_resource_id").and_then(Value::as_str))
        .collect();
    let duplicates = crids.iter().collect::<BTreeSet<_>>().len() != crids.len();
    let result = decide(st, &seen, &account);
    let (status, body, code) = match result {
        Ok(body) => (200, body, None),
        Err((status, code, reason)) => (status, error_body(status, &code, &reason), Some(code)),
    };
    st.bulk
        .calls
        .lock()
        .expect("bulk calls lock")
        .push(BulkCall {
            account,
            status,
            oversized: sent.len() > MAX_PER_CALL,
            duplicates,
            resources: sent,
            error_code: code,
        });
    let hold = *st.bulk.hold.lock().expect("hold lock");
    if status == 200 && !hold.is_zero() {
        tokio::time::sleep(hold).await;
    }
    let mut resp = respond(status, body);
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

fn decide(st: &RestState, seen: &Seen, account: &str) -> Result<String, (u16, String, String)> {
    if st.down.load(Ordering::SeqCst) {
        return Err(error(503, "OE0003", "service unavailable".into()));
    }
    if let Some(status) = *st.bulk.fail.lock().expect("fail lock") {
        return Err(error(status, "OE0003", "failure on demand".into()));
    }
    match seen.headers.get("secret").and_then(|v| v.to_str().ok()) {
        None => {
            return Err(error(
                401,
                "OE0237",
                "This resource requires authorization".into(),
            ))
        }
        Some(s) if s != st.secret => return Err(error(403, "OE0236", "Bad secret".into())),
        Some(_) => {}
    }
    if seen.method != http::Method::POST {
        return Err(error(405, "OE0002", "method not allowed".into()));
    }
    if seen.uri.query() != Some(BULK_QUERY) {
        return Err(error(
            400,
            "OE0217",
            format!("Invalid query parameter: {:?}", seen.uri.query()),
        ));
    }
    let body: Value = serde_json::from_slice(&seen.body).map_err(|_| {
        error(
            400,
            "OE0219",
            "Argument should be a string with valid JSON".into(),
        )
    })?;
    let Value::Object(mut top) = body else {
        return Err(error(
            400,
            "OE0426",
            "Request body should be a dictionary".into(),
        ));
    };
    let resources = match top.remove("resources") {
        None => return Err(error(400, "OE0216", "resources is not provided".into())),
        Some(Value::Array(r)) => r,
        Some(_) => return Err(error(400, "OE0385", "resources should be a list".into())),
    };
    if !top.is_empty() {
        let keys: Vec<&String> = top.keys().collect();
        return Err(error(
            400,
            "OE0212",
            format!("Unexpected parameters: {keys:?}"),
        ));
    }
    for r in &resources {
        check_resource(r)?;
    }
    if !st
        .accounts
        .lock()
        .expect("accounts lock")
        .contains_key(account)
    {
        return Err(error(
            404,
            "OE0002",
            format!("Cloud account {account} not found"),
        ));
    }
    if let Some(&status) = st
        .bulk
        .fail_accounts
        .lock()
        .expect("fail lock")
        .get(account)
    {
        return Err(error(
            status,
            "OE0003",
            "failure on demand for this account".into(),
        ));
    }
    Ok(apply(st, account, &resources))
}

fn check_resource(r: &Value) -> Result<(), (u16, String, String)> {
    let bad = |code: &str, reason: String| Err(error(400, code, reason));
    let Value::Object(r) = r else {
        return bad("OE0426", "a resource should be a dictionary".into());
    };
    for (k, v) in r {
        if IMMUTABLE.contains(&k.as_str()) {
            return bad("OE0211", format!("Parameter \"{k}\" is immutable"));
        }
        let known = REQUIRED.contains(&k.as_str())
            || OPTIONAL_STRINGS.contains(&k.as_str())
            || ["tags", "meta", "first_seen", "last_seen"].contains(&k.as_str());
        if !known {
            return bad("OE0212", format!("Unexpected parameters: {k}"));
        }
        if v.is_null() {
            return bad("OE0212", format!("Unexpected parameters: {k} (null)"));
        }
    }
    for k in REQUIRED {
        let max = if k == "resource_type" { 255 } else { 512 };
        match r.get(k) {
            None => return bad("OE0216", format!("{k} is not provided")),
            Some(v) => check_string(k, v, max)?,
        }
    }
    for k in OPTIONAL_STRINGS {
        if let Some(v) = r.get(k) {
            check_string(k, v, 255)?;
        }
    }
    for k in ["tags", "meta"] {
        if let Some(v) = r.get(k) {
            if !v.is_object() {
                return bad("OE0344", format!("{k} should be a dictionary"));
            }
        }
    }
    if r.get("resource_type").and_then(Value::as_str) == Some("K8s Pod") {
        if let Some(Value::Object(meta)) = r.get("meta") {
            if let Some(k) = meta.keys().find(|k| !POD_META.contains(&k.as_str())) {
                return bad("OE0212", format!("Unexpected parameters: {k}"));
            }
        }
    }
    for k in ["first_seen", "last_seen"] {
        if let Some(v) = r.get(k) {
            let Some(n) = v.as_i64().filter(|_| v.is_i64() || v.is_u64()) else {
                return bad("OE0223", format!("{k} should be integer"));
            };
            if !(0..=i64::from(i32::MAX)).contains(&n) {
                return bad(
                    "OE0224",
                    format!("{k} should be between 0 and {}", i32::MAX),
                );
            }
        }
    }
    Ok(())
}

fn check_string(k: &str, v: &Value, max: usize) -> Result<(), (u16, String, String)> {
    let Some(s) = v.as_str() else {
        return Err(error(400, "OE0214", format!("{k} should be a string")));
    };
    if s.trim().is_empty() && !s.is_empty() {
        return Err(error(
            400,
            "OE0416",
            format!("{k} should not contain only whitespaces"),
        ));
    }
    let n = s.chars().count();
    if !(1..=max).contains(&n) {
        return Err(error(
            400,
            "OE0215",
            format!("{k} should contain 1-{max} characters"),
        ));
    }
    Ok(())
}

/// Upserts on (account, cloud_resource_id) as `skip_existing` does.
fn apply(st: &RestState, account: &str, resources: &[Value]) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64;
    let mut docs = st.bulk.docs.lock().expect("docs lock");
    let mut answered = BTreeSet::new();
    for r in resources {
        let crid = r["cloud_resource_id"]
            .as_str()
            .expect("checked")
            .to_string();
        let key = (account.to_string(), crid.clone());
        let sent_first = r.get("first_seen").and_then(Value::as_i64);
        let sent_last = r.get("last_seen").and_then(Value::as_i64);
        match docs.get_mut(&key) {
            Some(doc) => {
                let d = doc.as_object_mut().expect("documents are objects");
                if let Some(f) = sent_first {
                    let stored = d["first_seen"].as_i64().unwrap_or(f);
                    d.insert("first_seen".into(), json!(stored.min(f)));
                }
                if let Some(l) = sent_last {
                    let stored = d["last_seen"].as_i64().unwrap_or(l);
                    d.insert("last_seen".into(), json!(stored.max(l)));
                }
                if let Some(s) = r.get("service_name") {
                    d.insert("service_name".into(), s.clone());
                }
            }
            None => {
                let mut d: Map<String, Value> = r
                    .as_object()
                    .expect("checked")
                    .iter()
                    .filter(|(k, _)| k.as_str() != "meta")
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                let id = uuid::Builder::from_random_bytes(rand::random())
                    .into_uuid()
                    .hyphenated()
                    .to_string();
                d.insert("_id".into(), json!(id));
                d.insert("cloud_account_id".into(), json!(account));
                d.insert("first_seen".into(), json!(sent_first.unwrap_or(now)));
                d.insert("last_seen".into(), json!(sent_last.unwrap_or(now)));
                d.insert("created_at".into(), json!(now));
                d.insert("deleted_at".into(), json!(0));
                docs.insert(key.clone(), Value::Object(d));
            }
        }
        answered.insert(crid);
    }
    // Formatted as the platform does (`_id` as `id`, defaults filled), in an
    // order of its own.
    let list: Vec<Value> = answered
        .iter()
        .rev()
        .map(|crid| {
            let mut d = docs[&(account.to_string(), crid.clone())]
                .as_object()
                .expect("documents are objects")
                .clone();
            let id = d.remove("_id").expect("stored with an id");
            d.insert("id".into(), id);
            d.entry("meta").or_insert(json!({}));
            d.entry("tags").or_insert(json!({}));
            Value::Object(d)
        })
        .collect();
    json!({ "resources": list }).to_string()
}

/// The cluster secret the tests' stand-in expects.
pub const SECRET: &str = "test-cluster-secret";

/// Writes [`SECRET`] to `dir/cluster-secret` and returns its path.
pub fn secret_file(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("cluster-secret");
    std::fs::write(&path, format!("{SECRET}\n")).expect("write the secret file");
    path
}

/// The Basic credentials of the tests' exporter, as the stand-in stores them.
pub fn exporter_credentials() -> String {
    super::basic_credentials("exporter", "s3cret")
}

/// POSTs `series` to `url` as the exporter of `account` would, with a
/// Prometheus's headers and [`exporter_credentials`]; returns the status
/// (0 when no answer came).
pub async fn send_as_exporter(
    url: &str,
    account: &str,
    series: &[super::clickhouse::Series],
) -> u16 {
    super::client()
        .post(url)
        .header("Cloud-Account-Id", account)
        .header("Authorization", format!("Basic {}", exporter_credentials()))
        .header("Content-Encoding", "snappy")
        .header("Content-Type", "application/x-protobuf")
        .header("X-Prometheus-Remote-Write-Version", "0.1.0")
        .body(super::clickhouse::body(series))
        .send()
        .await
        .map_or(0, |r| r.status().as_u16())
}

/// What the platform shows per (namespace, UTC day start) for `account`,
/// read the platform's way ([`platform_day_costs`](super::clickhouse::platform_day_costs))
/// from the documents the stand-in holds; documents are mapped back to
/// their namespace through `k8s_namespace`.
pub async fn platform_view(
    ch: &super::clickhouse::ClickHouseServer,
    rest: &super::RestApi,
    account: &str,
    days: &[i64],
) -> BTreeMap<(String, i64), f64> {
    platform_view_by(ch, &rest.resources(account), account, days, "k8s_namespace").await
}

/// [`platform_view`] from the resource documents `docs` of `account`, keyed
/// by the document field `field` (`name` for pods).
async fn platform_view_by(
    ch: &super::clickhouse::ClickHouseServer,
    docs: &[serde_json::Value],
    account: &str,
    days: &[i64],
    field: &str,
) -> BTreeMap<(String, i64), f64> {
    let key_of: BTreeMap<String, String> = docs
        .iter()
        .map(|d| {
            (
                d["_id"].as_str().expect("id").to_string(),
                d[field].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let mut out = BTreeMap::new();
    for &day in days {
        for (id, cost) in super::clickhouse::platform_day_costs(ch, docs, account, day).await {
            out.insert((key_of[&id].clone(), day), cost);
        }
    }
    out
}

/// Whether `got` holds exactly the keys of `want`, each within `tol`
/// (relative); the mismatches otherwise.
pub fn same_money<K: Ord + std::fmt::Debug>(
    got: &BTreeMap<K, f64>,
    want: &BTreeMap<K, f64>,
    tol: f64,
) -> Result<(), String> {
    let keys_got: Vec<&K> = got.keys().collect();
    let keys_want: Vec<&K> = want.keys().collect();
    if keys_got != keys_want {
        return Err(format!("keys differ: got {keys_got:?}, want {keys_want:?}"));
    }
    let off: Vec<String> = want
        .iter()
        .filter(|(k, w)| !super::clickhouse::rel_close(got[*k], **w, tol))
        .map(|(k, w)| format!("{k:?}: got {} want {w}", got[k]))
        .collect();
    if off.is_empty() {
        Ok(())
    } else {
        Err(off.join("; "))
    }
}

/// Waits (bounded) until rwgate's `migrate` has made the resources table,
/// the last it creates: the platform read needs `expenses`.
pub async fn migrated(ch: &super::clickhouse::ClickHouseServer) {
    let sql = "SELECT count() AS n FROM system.tables WHERE database = currentDatabase() \
               AND name = 'rwgate_resources'";
    super::wait_for("rwgate migrate", Duration::from_secs(60), || async {
        (super::clickhouse::int(&ch.rows(sql).await[0]["n"]) == 1).then_some(())
    })
    .await;
}

/// Waits (bounded, 60 s) until the platform shows exactly `want` for
/// `account` on `days` (within 1e-9), keyed by the document field `field`.
pub async fn until_platform_shows(
    ch: &super::clickhouse::ClickHouseServer,
    rest: &super::RestApi,
    account: &str,
    days: &[i64],
    field: &str,
    want: &BTreeMap<(String, i64), f64>,
) {
    super::eventually(
        Duration::from_secs(60),
        "the platform shows the money",
        || async {
            same_money(
                &platform_view_by(ch, &rest.resources(account), account, days, field).await,
                want,
                1e-9,
            )
        },
    )
    .await;
}
