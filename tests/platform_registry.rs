//! Resource registration driven through the library against a real
//! ClickHouse and the strict REST stand-in: the stand-in's contract; bulk
//! calls per resource per hour under steady load and under a week of
//! catch-up (simulated wall clock, `Rollup::pass_at`); one account's 404 or
//! 400 holding only that account; and moving rows written under cloud
//! resource ids to platform ids with every total unchanged.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::bulk::*;
use common::clickhouse::*;
use common::*;
use serde_json::{json, Value};

use rwgate::config::{AuthMode, Config};
use rwgate::cost::clickhouse::{ClickHouse, RawRow, TouchedRow};
use rwgate::cost::rollup::platform::{NewResource, PlatformApi};
use rwgate::cost::rollup::Rollup;

/// 2024-03-04T00:00:00Z.
const D0: i64 = 1_709_510_400;

/// A library-level config: no request path, registration on against `rest`.
fn config(ch: &ClickHouseServer, rest: &RestApi, dir: &std::path::Path) -> Config {
    let mut c = Config::default();
    c.auth.mode = AuthMode::None;
    c.clickhouse.url = Some(ch.url());
    c.resources.enabled = Some(true);
    c.resources.rest_url = Some(rest.url());
    c.resources.cluster_secret_file = Some(secret_file(dir));
    c.resources.retry_backoff = Duration::from_secs(1);
    c.resources.retry_max_backoff = Duration::from_secs(4);
    c.validate().expect("valid config");
    c
}

/// A ClickHouse with the schema, the stand-in, and a registering rollup.
struct Setup {
    ch_server: ClickHouseServer,
    rest: RestApi,
    cfg: Config,
    ch: ClickHouse,
    rollup: Rollup,
    _dir: tempfile::TempDir,
}

impl Setup {
    async fn start(engine: Engine) -> Setup {
        let ch_server = ClickHouseServer::start_engine(engine);
        let rest = RestApi::start(SECRET).await;
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(&ch_server, &rest, dir.path());
        let ch = ClickHouse::new(&cfg.clickhouse).unwrap();
        ch.migrate().await.unwrap();
        let rollup = Rollup::from_config(&cfg).unwrap();
        Setup {
            ch_server,
            rest,
            cfg,
            ch,
            rollup,
            _dir: dir,
        }
    }

    /// The servers, the client and the rollup, for the tests that need
    /// neither the config nor the directory after the start.
    fn parts(self) -> (ClickHouseServer, RestApi, ClickHouse, Rollup) {
        (self.ch_server, self.rest, self.ch, self.rollup)
    }
}

/// One sample: (account, namespace, ts ms, USD/h).
type Sample = (&'static str, String, i64, f64);

/// Inserts samples as the writer would, in one insert: raw rows, and the
/// touched index at `ingest_minute` (simulated wall clock).
async fn insert(ch: &ClickHouse, samples: &[Sample], ingest_minute: i64) {
    let rows: Vec<RawRow> = samples
        .iter()
        .map(|(account, ns, ts, value)| RawRow {
            account,
            metric: NS_METRIC,
            cluster: "prod-eu",
            namespace: ns,
            pod: "",
            series_id: u64::from_le_bytes(
                md5::compute(format!("{account}/{ns}")).0[..8]
                    .try_into()
                    .unwrap(),
            ),
            ts: *ts,
            value: *value,
            ingest_time: 0,
        })
        .collect();
    ch.insert::<RawRow>(&ch.config.raw_table, &rows)
        .await
        .unwrap();
    let hours: BTreeSet<(&str, i64)> = samples
        .iter()
        .map(|s| (s.0, s.2 / 3_600_000 * 3600))
        .collect();
    let touched: Vec<TouchedRow> = hours
        .into_iter()
        .map(|(account, hour)| TouchedRow {
            ingest_minute: (ingest_minute - ingest_minute % 60) as u32,
            metric: NS_METRIC.into(),
            account: account.into(),
            hour: hour as u32,
        })
        .collect();
    ch.insert::<TouchedRow>(&ch.config.touched_table, &touched)
        .await
        .unwrap();
}

/// The samples of one account, by namespace.
fn of(samples: &[Sample], account: &str) -> BTreeMap<String, Vec<(i64, f64)>> {
    let mut out: BTreeMap<String, Vec<(i64, f64)>> = BTreeMap::new();
    for (a, ns, ts, v) in samples {
        if *a == account {
            out.entry(ns.clone()).or_default().push((*ts, *v));
        }
    }
    out
}

fn rate(i: usize, k: i64) -> f64 {
    0.1 + (i % 7) as f64 * 0.35 + ((k / 13) % 5) as f64 * 0.02
}

/// How many bulk calls each (account, cloud resource id) appeared in.
fn appearances(rest: &RestApi) -> BTreeMap<(String, String), usize> {
    let mut out = BTreeMap::new();
    for call in rest.bulk_calls() {
        assert_eq!(call.status, 200, "{call:?}");
        assert!(!call.oversized && !call.duplicates, "{call:?}");
        for r in &call.resources {
            let crid = r["cloud_resource_id"].as_str().unwrap().to_string();
            *out.entry((call.account.clone(), crid)).or_default() += 1;
        }
    }
    out
}

/// The money rule's answer per (namespace, day) for `samples`.
fn want_by_day(samples: &BTreeMap<String, Vec<(i64, f64)>>) -> BTreeMap<(String, i64), f64> {
    let mut out = BTreeMap::new();
    for (ns, s) in samples {
        for (day, cost) in reference_costs(s, 86_400, 300, 60) {
            out.insert((ns.clone(), day), cost);
        }
    }
    out
}

#[tokio::test]
async fn the_stand_in_enforces_the_bulk_contract() {
    let rest = RestApi::start(SECRET).await;
    rest.add(TENANT_A, Account::NoCredentials);
    let http = client();
    let url = |account: &str, query: &str| {
        format!(
            "{}/restapi/v2/cloud_accounts/{account}/cloud_resources/bulk?{query}",
            rest.url()
        )
    };
    let post = |url: String, secret: Option<&'static str>, body: Value| {
        let mut req = http
            .post(url)
            .header("Content-Type", "application/json")
            .body(body.to_string());
        if let Some(s) = secret {
            req = req.header("Secret", s);
        }
        async move {
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            let text = resp.text().await.unwrap_or_default();
            (
                status,
                serde_json::from_str::<Value>(&text).unwrap_or(Value::Null),
            )
        }
    };
    let ns = |name: &str| {
        json!({"cloud_resource_id": ns_resource_id(name), "resource_type": "K8s Namespace",
               "name": format!("Namespace: {name}"), "first_seen": 7200, "last_seen": 10_800})
    };
    let ok = url(TENANT_A, BULK_QUERY);
    let code = |v: &Value| v["error"]["error_code"].as_str().unwrap_or("").to_string();

    // Secret and account.
    let (s, v) = post(ok.clone(), None, json!({"resources": [ns("a")]})).await;
    assert_eq!((s, code(&v)), (401, "OE0237".into()));
    let (s, v) = post(ok.clone(), Some("wrong"), json!({"resources": [ns("a")]})).await;
    assert_eq!((s, code(&v)), (403, "OE0236".into()));
    let (s, v) = post(
        url(TENANT_B, BULK_QUERY),
        Some(SECRET),
        json!({"resources": [ns("a")]}),
    )
    .await;
    assert_eq!((s, code(&v)), (404, "OE0002".into()));
    let (s, v) = post(
        url(TENANT_A, "behavior=error_existing"),
        Some(SECRET),
        json!({"resources": []}),
    )
    .await;
    assert_eq!((s, code(&v)), (400, "OE0217".into()));

    // The body: exactly {"resources": [...]}, each with the allowed keys only.
    let refused = [
        (json!({"resources": [ns("a")], "extra": 1}), "OE0212"),
        (json!({"resource": []}), "OE0216"),
        (json!({"resources": {}}), "OE0385"),
        (json!([ns("a")]), "OE0426"),
    ];
    for (body, want) in refused {
        let (s, v) = post(ok.clone(), Some(SECRET), body.clone()).await;
        assert_eq!((s, code(&v)), (400, want.into()), "{body}");
    }
    let with = |k: &str, val: Value| {
        let mut r = ns("a");
        r[k] = val;
        json!({ "resources": [r] })
    };
    let without = |k: &str| {
        let mut r = ns("a");
        r.as_object_mut().unwrap().remove(k);
        json!({ "resources": [r] })
    };
    let refused = [
        (with("pool_id", json!("p")), "OE0212"),
        (with("cluster", json!("c")), "OE0212"),
        (with("id", json!("x")), "OE0211"),
        (with("resource_id", json!("x")), "OE0211"),
        (with("k8s_node", Value::Null), "OE0212"),
        (with("first_seen", json!(1.5)), "OE0223"),
        (with("last_seen", json!(true)), "OE0223"),
        (with("last_seen", json!(1i64 << 31)), "OE0224"),
        (with("first_seen", json!(-1)), "OE0224"),
        (with("k8s_namespace", json!("n".repeat(256))), "OE0215"),
        (with("k8s_namespace", json!("")), "OE0215"),
        (with("name", json!("x".repeat(513))), "OE0215"),
        (with("name", json!("   ")), "OE0416"),
        (with("service_name", json!(5)), "OE0214"),
        (with("meta", json!("m")), "OE0344"),
        (without("name"), "OE0216"),
        (without("resource_type"), "OE0216"),
    ];
    for (body, want) in refused {
        let (s, v) = post(ok.clone(), Some(SECRET), body.clone()).await;
        assert_eq!((s, code(&v)), (400, want.into()), "{body}");
    }
    // A pod's meta may hold only the platform's pod model fields.
    let pod = |meta: Value| {
        json!({"resources": [{"cloud_resource_id": "k8s-pod-0123456789abcdef",
            "resource_type": "K8s Pod", "name": "web-1", "meta": meta}]})
    };
    let (s, v) = post(ok.clone(), Some(SECRET), pod(json!({"namespace": "x"}))).await;
    assert_eq!((s, code(&v)), (400, "OE0212".into()));
    let (s, _) = post(ok.clone(), Some(SECRET), pod(json!({"k8s_cluster": "c"}))).await;
    assert_eq!(s, 200);
    assert!(
        rest.resources(TENANT_A).len() == 1,
        "refused calls change nothing"
    );

    // Ids assigned once; first_seen keeps the minimum, last_seen the maximum.
    let (s, v) = post(
        ok.clone(),
        Some(SECRET),
        json!({"resources": [ns("a"), ns("b")]}),
    )
    .await;
    assert_eq!(s, 200);
    let listed: Vec<&Value> = v["resources"].as_array().unwrap().iter().collect();
    assert_eq!(listed.len(), 2);
    let id_a = listed
        .iter()
        .find(|r| r["cloud_resource_id"] == ns_resource_id("a"))
        .unwrap()["id"]
        .clone();
    let mut later = ns("a");
    later["first_seen"] = json!(3600);
    later["last_seen"] = json!(7200);
    let (s, v) = post(ok.clone(), Some(SECRET), json!({"resources": [later]})).await;
    assert_eq!(s, 200);
    let r = &v["resources"][0];
    assert_eq!(r["id"], id_a, "skip_existing keeps the id");
    assert_eq!(
        (r["first_seen"].as_i64(), r["last_seen"].as_i64()),
        (Some(3600), Some(10_800))
    );
    assert_eq!(rest.resources(TENANT_A).len(), 3);

    // More than 200 in one call is served, and flagged.
    let many: Vec<Value> = (0..201).map(|i| ns(&format!("n{i}"))).collect();
    let (s, _) = post(ok.clone(), Some(SECRET), json!({ "resources": many })).await;
    assert_eq!(s, 200);
    assert!(rest.bulk_calls().last().unwrap().oversized);

    // Failure on demand, for everyone or one account.
    rest.fail_bulk(Some(503));
    assert_eq!(
        post(ok.clone(), Some(SECRET), json!({"resources": []}))
            .await
            .0,
        503
    );
    rest.fail_bulk(None);
    rest.fail_bulk_for(TENANT_A, Some(500));
    assert_eq!(
        post(ok.clone(), Some(SECRET), json!({"resources": []}))
            .await
            .0,
        500
    );
    rest.fail_bulk_for(TENANT_A, None);

    // rwgate's client sends what the stand-in accepts and maps the answer
    // (listed in another order) back to what it sent.
    let api = PlatformApi::new(&rest.url(), SECRET.into(), Duration::from_secs(5));
    let doc = |name: &str| NewResource {
        cloud_resource_id: ns_resource_id(name),
        resource_type: "K8s Namespace",
        name: format!("Namespace: {name}"),
        service_name: Some("Kubernetes"),
        meta: None,
        first_seen: Some(0),
        last_seen: Some(60),
        k8s_namespace: Some(name.into()),
        k8s_node: None,
    };
    let got = api.bulk(TENANT_A, &[doc("a"), doc("z")]).await.unwrap();
    assert_eq!(got[0].id, id_a.as_str().unwrap());
    assert_eq!(got[1].cloud_resource_id, ns_resource_id("z"));
    let e = api.bulk(TENANT_B, &[doc("a")]).await.unwrap_err();
    assert!(
        e.to_string().contains("404") && e.to_string().contains("OE0002"),
        "{e}"
    );
}

#[tokio::test]
async fn bulk_calls_per_resource_per_hour_stay_bounded_under_steady_load() {
    let (ch_server, rest, ch, rollup) = Setup::start(Engine::ClickHouse18).await.parts();
    let accounts = [TENANT_A, TENANT_B];
    for a in accounts {
        rest.add(a, Account::NoCredentials);
    }
    let nss: Vec<String> = (0..20).map(|i| format!("team-{i}")).collect();

    // Three simulated hours from 09:10: a sample a minute per namespace,
    // a rollup pass every two minutes (reading what came meanwhile).
    let start = D0 + 9 * 3600 + 600;
    let mut all: Vec<Sample> = Vec::new();
    let mut batch: Vec<Sample> = Vec::new();
    for m in 0..180i64 {
        let now = start + m * 60;
        for (ai, a) in accounts.iter().enumerate() {
            for (i, ns) in nss.iter().enumerate() {
                batch.push((a, ns.clone(), now * 1000, rate(i + ai, m)));
            }
        }
        if m % 2 == 1 {
            insert(&ch, &batch, now).await;
            all.append(&mut batch);
            rollup.pass_at((now + 30) as u64).await.unwrap();
        }
    }
    let counts = appearances(&rest);
    let resources = accounts.len() * nss.len();
    assert_eq!(counts.len(), resources, "every namespace registered");
    let total: usize = counts.values().sum();
    let calls = rest.bulk_calls().len();
    println!(
        "steady load: {resources} resources, 3 simulated hours, rollup pass every 2 min: \
         {calls} bulk calls carrying {total} resources = {:.2} per resource per hour \
         (registration included), {:.2} updates per resource per hour",
        total as f64 / resources as f64 / 3.0,
        (total - resources) as f64 / resources as f64 / 3.0,
    );
    // Registration, then one update per hour boundary the samples cross
    // (10:00, 11:00, 12:00), not one per pass (90) or per sample (180).
    for (k, n) in &counts {
        assert_eq!(*n, 4, "{k:?}");
    }
    let sizes: Vec<(String, usize)> = rest
        .bulk_calls()
        .iter()
        .map(|c| (c.account.clone(), c.resources.len()))
        .collect();
    assert_eq!(
        calls,
        accounts.len() * 4,
        "one call per account at a time: {sizes:?}"
    );

    // And the platform shows the money.
    for a in accounts {
        let got = platform_view(&ch_server, &rest, a, &[D0]).await;
        same_money(&got, &want_by_day(&of(&all, a)), 1e-9).unwrap();
    }
}

#[tokio::test]
async fn a_week_of_catch_up_costs_a_few_calls_and_shows_every_day() {
    let (ch_server, rest, ch, rollup) = Setup::start(Engine::ClickHouse18).await.parts();
    rest.add(TENANT_A, Account::NoCredentials);
    let nss: Vec<String> = (0..10).map(|i| format!("svc-{i}")).collect();

    // A week of 5-minute samples (2016 per namespace), sent in ten
    // minutes of wall clock a day after it ended; a pass every minute,
    // then 40 more minutes of passes.
    let clock0 = D0 + 8 * 86_400 + 1800;
    let week: Vec<i64> = (0..2016).map(|k| (D0 + k * 300) * 1000).collect();
    let mut all: Vec<Sample> = Vec::new();
    for m in 0..50i64 {
        let now = clock0 + m * 60;
        if m < 10 {
            let part = &week[(m as usize) * 202..((m as usize + 1) * 202).min(week.len())];
            let batch: Vec<Sample> = nss
                .iter()
                .enumerate()
                .flat_map(|(i, ns)| {
                    part.iter()
                        .map(move |&t| (TENANT_A, ns.clone(), t, rate(i, t / 300_000)))
                })
                .collect();
            insert(&ch, &batch, now).await;
            all.extend(batch);
        }
        rollup.pass_at((now + 30) as u64).await.unwrap();
    }
    let counts = appearances(&rest);
    assert_eq!(counts.len(), nss.len());
    let calls = rest.bulk_calls().len();
    println!(
        "a week of catch-up in 10 minutes: {} resources, {calls} bulk calls, per resource {:?}",
        nss.len(),
        counts.values().collect::<BTreeSet<_>>()
    );
    // Registration and one update (the week's remainder, after
    // resources.update_interval), not one per pass or per sample hour.
    for (k, n) in &counts {
        assert!(*n <= 3, "{k:?} in {n} calls");
    }
    assert!(calls <= 3, "{calls} calls");
    // Every day's money is visible, and the window is within an hour of
    // the first and last sample.
    let days: Vec<i64> = (0..7).map(|d| D0 + d * 86_400).collect();
    let got = platform_view(&ch_server, &rest, TENANT_A, &days).await;
    same_money(&got, &want_by_day(&of(&all, TENANT_A)), 1e-9).unwrap();
    let (first, last) = (D0, (D0 + 2015 * 300));
    for d in rest.resources(TENANT_A) {
        let (f, l) = (
            d["first_seen"].as_i64().unwrap(),
            d["last_seen"].as_i64().unwrap(),
        );
        assert!(f <= first && f > first - 3600, "{d}");
        assert!(l >= last && l < last + 3600, "{d}");
    }
}

#[tokio::test]
async fn one_accounts_404_or_400_holds_only_that_account() {
    let (ch_server, rest, ch, rollup) = Setup::start(Engine::ClickHouse18).await.parts();
    // The recorder the gauges go to (the server installs it at start).
    rwgate::telemetry::metrics_handle();
    let (ok, unknown, refused) = (TENANT_A, TENANT_B, "0b7f4c8e-1a2b-4c3d-8e9f-00000000000c");
    rest.add(ok, Account::NoCredentials);
    rest.add(refused, Account::NoCredentials);
    rest.fail_bulk_for(refused, Some(400));
    let nss = ["web", "db", "cache"];
    let now = D0 + 86_400 + 600;
    let mut all: Vec<Sample> = Vec::new();
    for a in [ok, unknown, refused] {
        for (i, ns) in nss.iter().enumerate() {
            all.extend(
                (0..60).map(|k| (a, ns.to_string(), (D0 + 3600 + k * 60) * 1000, rate(i, k))),
            );
        }
    }
    insert(&ch, &all, now).await;
    let r = rollup.pass_at(now as u64).await.unwrap();
    assert_eq!(r.buckets_waiting, 6, "{r:?}");
    let rows = ch_server
        .rows("SELECT DISTINCT cloud_account_id AS a FROM expenses")
        .await;
    assert_eq!(
        rows,
        [json!({"a": ok})],
        "only the account the platform took"
    );
    same_money(
        &platform_view(&ch_server, &rest, ok, &[D0]).await,
        &want_by_day(&of(&all, ok)),
        1e-9,
    )
    .unwrap();
    // The 400 was bisected down to single resources (3, then 1 + 2, then
    // 1 + 1): the platform refused each, so each waits on its own.
    let refused_calls: Vec<usize> = rest
        .bulk_calls()
        .iter()
        .filter(|c| c.account == refused)
        .map(|c| c.resources.len())
        .collect();
    assert_eq!(refused_calls, [3, 1, 2, 1, 1]);
    let metrics = rwgate::telemetry::metrics_handle().render();
    assert_eq!(
        metric_value(&metrics, "rwgate_resources_waiting"),
        6.0,
        "{metrics}"
    );

    // Fixed on the platform's side: after the backoff, both get their rows.
    rest.add(unknown, Account::NoCredentials);
    rest.fail_bulk_for(refused, None);
    let r = rollup.pass_at((now + 90) as u64).await.unwrap();
    assert_eq!(r.buckets_waiting, 0, "{r:?}");
    for a in [ok, unknown, refused] {
        let got = platform_view(&ch_server, &rest, a, &[D0]).await;
        same_money(&got, &want_by_day(&of(&all, a)), 1e-9).unwrap();
    }
    let metrics = rwgate::telemetry::metrics_handle().render();
    assert_eq!(metric_value(&metrics, "rwgate_resources_waiting"), 0.0);
}

async fn moving_rows_to_platform_ids_keeps_every_total(engine: Engine) {
    let Setup {
        ch_server,
        rest,
        cfg,
        ch,
        rollup,
        ..
    } = Setup::start(engine).await;
    for a in [TENANT_A, TENANT_B] {
        rest.add(a, Account::NoCredentials);
    }
    // Rows written before registration existed: cloud resource ids.
    let old = Rollup::new(ch.clone(), &cfg.rollup);
    let now = D0 + 3 * 86_400;
    let mut all: Vec<Sample> = Vec::new();
    for a in [TENANT_A, TENANT_B] {
        for (i, ns) in ["web", "batch"].iter().enumerate() {
            // 20:00 to 04:00 across the two days.
            all.extend((0..480).map(|k| {
                (
                    a,
                    ns.to_string(),
                    (D0 + 20 * 3600 + k * 60) * 1000,
                    rate(i, k),
                )
            }));
        }
    }
    insert(&ch, &all, now).await;
    old.pass_at(now as u64).await.unwrap();
    let before = totals(&ch_server).await;
    assert_eq!(before.len(), 4, "{before:?}");
    assert!(rest.bulk_calls().is_empty());

    // Registration on: account A moved by `reconcile --move-ids`, account B
    // by a plain reconcile (the re-derive moves the rows of the buckets it
    // touches).
    let (d1, d2) = (day("2024-03-04"), day("2024-03-05"));
    let m = rollup
        .move_ids(d1, d2, Some(TENANT_A), now as u64)
        .await
        .unwrap();
    assert_eq!((m.buckets_moved, m.buckets_waiting), (4, 0), "{m:?}");
    assert_eq!(
        m.rows_written, 8,
        "a cancel and a new row per bucket: {m:?}"
    );
    let r = rollup.reconcile(d1, d2, Some(TENANT_B)).await.unwrap();
    assert_eq!(r.buckets_changed, 4, "{r:?}");
    let after = totals(&ch_server).await;
    same_money(&after, &before, 1e-12).unwrap();
    // Nothing is left under the cloud resource ids; the platform sees it all.
    let left = ch_server
        .rows(
            "SELECT cloud_account_id, resource_id, SUM(sign) AS s, SUM(cost * sign) AS c \
             FROM expenses WHERE startsWith(resource_id, 'k8s-ns-') \
             GROUP BY cloud_account_id, resource_id",
        )
        .await;
    assert_eq!(left.len(), 4, "{left:?}");
    for r in &left {
        assert_eq!(int(&r["s"]), 0, "{r}");
        assert!(r["c"].as_f64().unwrap().abs() < 1e-9, "{r}");
    }
    for a in [TENANT_A, TENANT_B] {
        let got = platform_view(&ch_server, &rest, a, &[D0, D0 + 86_400]).await;
        same_money(&got, &want_by_day(&of(&all, a)), 1e-9).unwrap();
    }
    // Done once: a second move and a re-derive change nothing.
    let m = rollup.move_ids(d1, d2, None, now as u64).await.unwrap();
    assert_eq!(m, Default::default());
    let r = rollup.reconcile(d1, d2, None).await.unwrap();
    assert_eq!((r.buckets_changed, r.rows_written), (0, 0), "{r:?}");
}

on_both_engines!(moving_rows_to_platform_ids_keeps_every_total);

/// SUM(cost * sign) per (account, date) over every row of `expenses`.
async fn totals(server: &ClickHouseServer) -> BTreeMap<(String, i64), f64> {
    let sql = "SELECT cloud_account_id AS a, toUInt32(date) AS d, SUM(cost * sign) AS c \
               FROM expenses GROUP BY a, d ORDER BY a, d";
    server
        .rows(sql)
        .await
        .iter()
        .map(|r| {
            (
                (r["a"].as_str().unwrap().to_string(), int(&r["d"])),
                r["c"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// 250 namespaces of one account, batches of 40 and two calls at once:
/// seven calls of at most 40, never more than two in flight (each call is
/// held a while so that they would overlap if nothing bounded them), and
/// every namespace registered once and charged.
#[tokio::test]
async fn batches_are_bounded_and_so_are_calls_in_flight() {
    let Setup {
        ch_server,
        rest,
        mut cfg,
        ch,
        _dir,
        ..
    } = Setup::start(Engine::ClickHouse18).await;
    rest.add(TENANT_A, Account::NoCredentials);
    cfg.resources.batch_size = 40;
    cfg.resources.concurrency = 2;
    let rollup = Rollup::from_config(&cfg).unwrap();
    rest.hold_bulk(Duration::from_millis(300));
    let start = D0 + 6 * 3600;
    let samples: Vec<Sample> = (0..250)
        .flat_map(|i| {
            (0..5i64).map(move |k| {
                (
                    TENANT_A,
                    format!("ns-{i:03}"),
                    (start + k * 60) * 1000,
                    rate(i, k),
                )
            })
        })
        .collect();
    insert(&ch, &samples, start + 300).await;
    let r = rollup.pass_at((start + 330) as u64).await.unwrap();
    assert_eq!(r.buckets_waiting, 0, "{r:?}");
    let sizes: Vec<usize> = rest
        .bulk_calls()
        .iter()
        .map(|c| c.resources.len())
        .collect();
    assert_eq!(sizes.len(), 7, "{sizes:?}");
    assert!(sizes.iter().all(|&n| n <= 40), "{sizes:?}");
    assert_eq!(appearances(&rest).len(), 250);
    assert!(appearances(&rest).values().all(|&n| n == 1));
    assert_eq!(rest.max_bulk_in_flight(), 2, "{sizes:?}");
    let got = platform_view(&ch_server, &rest, TENANT_A, &[D0]).await;
    same_money(&got, &want_by_day(&of(&samples, TENANT_A)), 1e-9).unwrap();
}
