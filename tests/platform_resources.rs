//! Expense rows the platform can see, end to end through rwgate (auth
//! against the REST stand-in, spool, writer, rollup, registration) into a
//! real ClickHouse, read back the way the platform's REST API reads them:
//! two accounts over two days; a REST outage at a namespace's first
//! appearance; 250 namespaces in one request.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::bulk::*;
use common::clickhouse::*;
use common::*;
use serde_json::json;

/// 2024-03-04T00:00:00Z.
const D0: i64 = 1_709_510_400;
const CLUSTER: &str = "prod-eu";

/// The tee config with auth against the stand-in and nothing under
/// `[resources]` but quick retries: registration is on by default.
fn config(
    ch: &ClickHouseServer,
    rest: &RestApi,
    sink: &Sink,
    dir: &std::path::Path,
) -> rwgate::config::Config {
    let mut c = tee_config(&sink.url(), &ch.url(), dir.join("spool"));
    c.auth.mode = rwgate::config::AuthMode::Rest;
    c.auth.rest_url = Some(rest.url());
    c.auth.cluster_secret_file = Some(secret_file(dir));
    // The tests replay hours in seconds: updates as often as passes.
    c.resources.update_interval = Duration::from_millis(200);
    c.resources.retry_backoff = Duration::from_millis(100);
    c.resources.retry_max_backoff = Duration::from_millis(500);
    c
}

/// The exporter's namespace total (charged) and a component (raw only).
fn exporter_series(ns: &str, samples: Vec<(i64, f64)>) -> Vec<Series> {
    let labels = [("cluster", CLUSTER), ("namespace", ns), ("currency", "USD")];
    let cpu: Vec<(i64, f64)> = samples.iter().map(|&(t, v)| (t, v / 3.0)).collect();
    vec![
        Series::new(NS_METRIC, &labels, samples),
        Series::new("cloudtuner_kubecost_namespace_cpu_cost", &labels, cpu),
    ]
}

fn rate(i: usize, k: i64) -> f64 {
    0.2 + i as f64 * 0.45 + ((k / 17) % 4) as f64 * 0.05
}

/// Every expense row's (account, resource_id) is a document of that
/// account on the platform.
async fn assert_no_unknown_ids(ch: &ClickHouseServer, rest: &RestApi, accounts: &[&str]) {
    let known: BTreeSet<(String, String)> = accounts
        .iter()
        .flat_map(|a| {
            rest.resources(a)
                .into_iter()
                .map(move |d| (a.to_string(), d["_id"].as_str().unwrap().to_string()))
        })
        .collect();
    let rows = ch
        .rows("SELECT DISTINCT cloud_account_id AS a, resource_id AS r FROM expenses")
        .await;
    for r in rows {
        let key = (
            r["a"].as_str().unwrap().to_string(),
            r["r"].as_str().unwrap().to_string(),
        );
        assert!(
            known.contains(&key),
            "row under an id the platform does not know: {key:?}"
        );
    }
}

/// Samples sent per namespace (or pod).
type Sent = BTreeMap<String, Vec<(i64, f64)>>;

fn want_by_day(samples: &Sent) -> BTreeMap<(String, i64), f64> {
    let mut out = BTreeMap::new();
    for (ns, s) in samples {
        for (day, cost) in reference_costs(s, 86_400, 300, 60) {
            out.insert((ns.clone(), day), cost);
        }
    }
    out
}

/// Waits until the platform shows the money of `sent` for [`TENANT_A`] on
/// [`D0`], per namespace.
async fn until_namespaces_show(ch: &ClickHouseServer, rest: &RestApi, sent: &Sent) {
    until_platform_shows(
        ch,
        rest,
        TENANT_A,
        &[D0],
        "k8s_namespace",
        &want_by_day(sent),
    )
    .await;
}

/// What each test runs against: ClickHouse with the schema, the REST
/// stand-in, a sink upstream and rwgate on [`config`]. Dropped rwgate
/// first, ClickHouse last.
struct Stack {
    gw: Gateway,
    _dir: tempfile::TempDir,
    _sink: Sink,
    rest: RestApi,
    ch: ClickHouseServer,
}

impl Stack {
    /// Starts the stand-in knowing `accounts` (with the exporter's
    /// credentials), the sink and rwgate on [`config`] as `tune` leaves
    /// it, then waits for the schema in `ch`.
    async fn start(
        ch: ClickHouseServer,
        accounts: &[&str],
        tune: impl FnOnce(&mut rwgate::config::Config),
    ) -> Stack {
        let rest = RestApi::start(SECRET).await;
        let sink = Sink::start().await;
        let dir = tempfile::tempdir().unwrap();
        for a in accounts {
            rest.add(a, Account::Credentials(exporter_credentials()));
        }
        let mut cfg = config(&ch, &rest, &sink, dir.path());
        tune(&mut cfg);
        let gw = Gateway::start(cfg).await;
        migrated(&ch).await;
        Stack {
            gw,
            _dir: dir,
            _sink: sink,
            rest,
            ch,
        }
    }
}

async fn two_accounts_over_two_days(engine: Engine) {
    let plan: [(&str, &[&str]); 2] = [
        (TENANT_A, &["web", "db", "kube-system"]),
        (TENANT_B, &["web", "batch-o'neil"]),
    ];
    let ch = ClickHouseServer::start_engine(engine);
    let p = Stack::start(ch, &plan.map(|(a, _)| a), |_| {}).await;

    // 20:00 on the first day to 04:00 on the second, a sample a minute,
    // in half-hour requests as a Prometheus sends them.
    let start = D0 + 20 * 3600;
    let mut sent: BTreeMap<&str, Sent> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    for chunk in 0..16i64 {
        for (ai, (a, nss)) in plan.iter().enumerate() {
            let mut series = Vec::new();
            for (i, ns) in nss.iter().enumerate() {
                let s: Vec<(i64, f64)> = (chunk * 30..chunk * 30 + 30)
                    .map(|k| ((start + k * 60) * 1000, rate(i + ai, k)))
                    .collect();
                sent.entry(a)
                    .or_default()
                    .entry(ns.to_string())
                    .or_default()
                    .extend(&s);
                series.extend(exporter_series(ns, s));
            }
            while !(200..300).contains(&send_as_exporter(&p.gw.write_url(), a, &series).await) {
                assert!(Instant::now() < deadline, "requests never succeeded");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    // The platform's own read, per (namespace, day), is the money rule's.
    let days = [D0, D0 + 86_400];
    for (a, _) in plan {
        until_platform_shows(
            &p.ch,
            &p.rest,
            a,
            &days,
            "k8s_namespace",
            &want_by_day(&sent[a]),
        )
        .await;
    }
    assert_no_unknown_ids(&p.ch, &p.rest, &[TENANT_A, TENANT_B]).await;

    // Each namespace registered once, under its own account, as the
    // platform expects a namespace; its window within an hour of its samples.
    let (first, last) = (start, start + 479 * 60);
    for (a, nss) in plan {
        let docs = p.rest.resources(a);
        let crids: BTreeSet<String> = docs
            .iter()
            .map(|d| d["cloud_resource_id"].as_str().unwrap().into())
            .collect();
        let want: BTreeSet<String> = nss.iter().map(|ns| ns_resource_id(ns)).collect();
        assert_eq!(crids, want, "{a}: one document per namespace");
        assert_eq!(docs.len(), nss.len());
        for d in &docs {
            let ns = d["k8s_namespace"].as_str().unwrap();
            assert_eq!(d["cloud_resource_id"], ns_resource_id(ns));
            assert_eq!(d["resource_type"], "K8s Namespace");
            assert_eq!(d["name"], format!("Namespace: {ns}"));
            assert_eq!(d["service_name"], "Kubernetes");
            assert_eq!(d["cloud_account_id"], a);
            let (f, l) = (
                d["first_seen"].as_i64().unwrap(),
                d["last_seen"].as_i64().unwrap(),
            );
            assert!(f <= first && f > first - 3600, "{d}");
            assert!(l >= last && l < last + 3600, "{d}");
        }
    }
    let calls = p.rest.bulk_calls();
    for c in &calls {
        assert_eq!(c.status, 200, "{c:?}");
        assert!(!c.oversized && !c.duplicates);
        for r in &c.resources {
            let ns = r["k8s_namespace"].as_str().unwrap();
            assert_eq!(
                r["meta"],
                json!({"namespace": ns, "cluster": CLUSTER}),
                "{r}"
            );
            let keys: BTreeSet<&str> = r.as_object().unwrap().keys().map(|k| k.as_str()).collect();
            let allowed: BTreeSet<&str> = [
                "cloud_resource_id",
                "resource_type",
                "name",
                "service_name",
                "meta",
                "first_seen",
                "last_seen",
                "k8s_namespace",
            ]
            .into();
            assert_eq!(keys, allowed, "{r}");
        }
    }
    println!(
        "{} bulk calls for 5 namespaces over 8 sample hours",
        calls.len()
    );
    p.gw.stop().await;
}

on_both_engines!(two_accounts_over_two_days, multi_thread);

async fn a_rest_outage_at_a_namespace_first_appearance(engine: Engine) {
    let p = Stack::start(ClickHouseServer::start_engine(engine), &[TENANT_A], |_| {}).await;
    let start = D0 + 10 * 3600;
    let samples = |i: usize, minutes: std::ops::Range<i64>| -> Vec<(i64, f64)> {
        minutes
            .map(|k| ((start + k * 60) * 1000, rate(i, k)))
            .collect()
    };
    let mut sent: BTreeMap<String, Vec<(i64, f64)>> = BTreeMap::new();

    // "old" is registered and charged before the outage.
    let s = samples(0, 0..30);
    sent.insert("old".into(), s.clone());
    assert_eq!(
        send_as_exporter(&p.gw.write_url(), TENANT_A, &exporter_series("old", s)).await,
        204
    );
    until_namespaces_show(&p.ch, &p.rest, &sent).await;

    // The REST API goes down (lookups and registration). "new" appears.
    p.rest.set_mode(RestMode::Down);
    let calls_before = p.rest.bulk_calls().len();
    let (s_old, s_new) = (samples(0, 30..60), samples(1, 30..60));
    sent.get_mut("old").unwrap().extend(&s_old);
    sent.insert("new".into(), s_new.clone());
    let mut series = exporter_series("old", s_old);
    series.extend(exporter_series("new", s_new));
    assert_eq!(
        send_as_exporter(&p.gw.write_url(), TENANT_A, &series).await,
        204,
        "ingestion does not wait for the platform"
    );

    // During the outage: "old" keeps being charged, "new" waits, and no row
    // ever carries an id the platform does not know.
    let old_only: BTreeMap<(String, i64), f64> = want_by_day(&sent)
        .into_iter()
        .filter(|((ns, _), _)| ns == "old")
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut old_done, mut waiting, mut polls) = (false, 0.0, 0);
    while !(old_done && waiting >= 1.0 && polls >= 20) {
        assert!(
            Instant::now() < deadline,
            "old_done {old_done}, waiting {waiting}"
        );
        assert_no_unknown_ids(&p.ch, &p.rest, &[TENANT_A]).await;
        old_done = same_money(
            &platform_view(&p.ch, &p.rest, TENANT_A, &[D0]).await,
            &old_only,
            1e-9,
        )
        .is_ok();
        waiting = p.gw.metric("rwgate_resources_waiting").await.unwrap_or(0.0);
        polls += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let new_rows =
        p.ch.rows("SELECT count() AS n FROM expenses WHERE k8s_namespace = 'new'")
            .await;
    assert_eq!(int(&new_rows[0]["n"]), 0);
    assert_eq!(p.rest.resources(TENANT_A).len(), 1);
    assert!(
        p.rest.bulk_calls().len() > calls_before,
        "registration was tried"
    );
    assert!(p
        .gw
        .metric("rwgate_resources_waiting_oldest_age_seconds")
        .await
        .is_some());

    // Recovery: "new" is registered, every total exact.
    p.rest.set_mode(RestMode::Up);
    eventually(
        Duration::from_secs(60),
        "new charged after recovery",
        || async {
            assert_no_unknown_ids(&p.ch, &p.rest, &[TENANT_A]).await;
            same_money(
                &platform_view(&p.ch, &p.rest, TENANT_A, &[D0]).await,
                &want_by_day(&sent),
                1e-9,
            )
        },
    )
    .await;
    eventually(Duration::from_secs(10), "nothing waits", || async {
        match p.gw.metric("rwgate_resources_waiting").await {
            Some(0.0) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    p.gw.stop().await;
}

on_both_engines!(a_rest_outage_at_a_namespace_first_appearance, multi_thread);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_fifty_namespaces_in_one_request() {
    let p = Stack::start(ClickHouseServer::start(), &[TENANT_A], |_| {}).await;
    let start = D0 + 6 * 3600;
    let mut sent: BTreeMap<String, Vec<(i64, f64)>> = BTreeMap::new();
    let mut series = Vec::new();
    for i in 0..250 {
        let ns = format!("tenant-{i:03}");
        let s: Vec<(i64, f64)> = (0..10)
            .map(|k| ((start + k * 60) * 1000, rate(i % 9, k)))
            .collect();
        sent.insert(ns.clone(), s.clone());
        series.push(Series::new(
            NS_METRIC,
            &[("cluster", CLUSTER), ("namespace", &ns)],
            s,
        ));
    }
    assert_eq!(
        send_as_exporter(&p.gw.write_url(), TENANT_A, &series).await,
        204
    );
    until_namespaces_show(&p.ch, &p.rest, &sent).await;
    assert_eq!(p.rest.resources(TENANT_A).len(), 250);
    let calls = p.rest.bulk_calls();
    let sizes: Vec<usize> = calls.iter().map(|c| c.resources.len()).collect();
    assert!(sizes.iter().all(|&n| n <= 200), "{sizes:?}");
    assert!(
        calls.iter().all(|c| c.status == 200 && !c.oversized),
        "{sizes:?}"
    );
    assert_eq!(
        sizes.iter().sum::<usize>(),
        250,
        "each registered in one call: {sizes:?}"
    );
    assert_no_unknown_ids(&p.ch, &p.rest, &[TENANT_A]).await;
    p.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_are_registered_as_the_platform_models_them() {
    let p = Stack::start(ClickHouseServer::start(), &[TENANT_A], |cfg| {
        cfg.rollup.charge = rwgate::config::Charge::Pod
    })
    .await;
    let start = D0 + 3 * 3600;
    let pods = [
        ("shop", "web-7d9f", Some("node-a")),
        ("shop", "worker-0", None),
    ];
    let mut sent: BTreeMap<String, Vec<(i64, f64)>> = BTreeMap::new();
    let mut series = Vec::new();
    for (i, (ns, pod, node)) in pods.iter().enumerate() {
        let s: Vec<(i64, f64)> = (0..20)
            .map(|k| ((start + k * 60) * 1000, rate(i, k)))
            .collect();
        sent.insert(pod.to_string(), s.clone());
        let mut labels = vec![("cluster", CLUSTER), ("namespace", *ns), ("pod", *pod)];
        labels.extend(node.map(|n| ("node", n)));
        series.push(Series::new(
            "cloudtuner_kubecost_pod_total_cost",
            &labels,
            s,
        ));
    }
    assert_eq!(
        send_as_exporter(&p.gw.write_url(), TENANT_A, &series).await,
        204
    );
    until_platform_shows(&p.ch, &p.rest, TENANT_A, &[D0], "name", &want_by_day(&sent)).await;
    let docs = p.rest.resources(TENANT_A);
    assert_eq!(docs.len(), 2);
    for (ns, pod, node) in pods {
        let d = docs.iter().find(|d| d["name"] == pod).unwrap();
        let hash = format!("{:x}", md5::compute(format!("pod-{ns}/{pod}")));
        assert_eq!(d["cloud_resource_id"], format!("k8s-pod-{}", &hash[..16]));
        assert_eq!(d["resource_type"], "K8s Pod");
        assert_eq!(d["k8s_namespace"], ns);
        assert_eq!(d.get("k8s_node").and_then(|v| v.as_str()), node, "{d}");
    }
    for c in p.rest.bulk_calls() {
        assert_eq!(c.status, 200, "{c:?}");
        for r in &c.resources {
            assert_eq!(r["meta"], json!({"k8s_cluster": CLUSTER}), "{r}");
        }
    }
    assert_no_unknown_ids(&p.ch, &p.rest, &[TENANT_A]).await;
    p.gw.stop().await;
}
