//! kill -9 of the rwgate binary after the platform registered a resource
//! but before rwgate had its answer (so before any row could carry the
//! id): after a restart the resource is registered once and the totals are
//! exact. Then a restart with the registration endpoint down: rows of the
//! known resource come from the resources table, a new one waits.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::bulk::*;
use common::clickhouse::*;
use common::*;

/// 2024-03-04T00:00:00Z.
const D0: i64 = 1_709_510_400;

fn samples(i: usize, minutes: std::ops::Range<i64>) -> Vec<(i64, f64)> {
    let start = D0 + 10 * 3600;
    minutes
        .map(|k| {
            (
                (start + k * 60) * 1000,
                0.3 + i as f64 + (k % 7) as f64 * 0.01,
            )
        })
        .collect()
}

fn want(sent: &BTreeMap<String, Vec<(i64, f64)>>) -> BTreeMap<(String, i64), f64> {
    sent.iter()
        .flat_map(|(ns, s)| {
            reference_costs(s, 86_400, 300, 60)
                .into_iter()
                .map(move |(d, c)| ((ns.clone(), d), c))
        })
        .collect()
}

fn series(ns: &str, s: Vec<(i64, f64)>) -> Vec<Series> {
    vec![Series::new(
        NS_METRIC,
        &[("cluster", "c1"), ("namespace", ns)],
        s,
    )]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_between_registration_and_the_row_write() {
    let ch = ClickHouseServer::start();
    let rest = RestApi::start(SECRET).await;
    rest.add(TENANT_A, Account::Credentials(exporter_credentials()));
    let sink = Sink::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("rwgate.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[auth]
mode = "rest"
rest_url = "{rest}"
cluster_secret_file = "{secret}"
[resources]
timeout = "2min"
update_interval = "200ms"
retry_backoff = "100ms"
retry_max_backoff = "500ms"
[log]
level = "warn"
{tee}"#,
            rest = rest.url(),
            secret = secret_file(dir.path()).display(),
            tee = tee_toml(&sink.url(), &ch.url(), &dir.path().join("spool"), ""),
        ),
    )
    .unwrap();
    let args = ["--config", config.to_str().unwrap()];
    let mut sent: BTreeMap<String, Vec<(i64, f64)>> = BTreeMap::new();

    // The platform takes the registration, but answers only after a minute.
    rest.hold_bulk(Duration::from_secs(60));
    let mut gw = RwgateProcess::start(&args).await;
    let s = samples(0, 0..30);
    sent.insert("x".into(), s.clone());
    assert_eq!(
        send_as_exporter(&gw.url("/api/v1/write"), TENANT_A, &series("x", s)).await,
        204
    );
    wait_for(
        "the platform registered x",
        Duration::from_secs(30),
        || async { (rest.resources(TENANT_A).len() == 1).then_some(()) },
    )
    .await;
    gw.child.signal("KILL");
    gw.child.wait_exit(Duration::from_secs(10)).await;
    let rows = ch.rows("SELECT count() AS n FROM expenses").await;
    assert_eq!(int(&rows[0]["n"]), 0, "no row before the answer");
    let mapped = ch.rows("SELECT count() AS n FROM rwgate_resources").await;
    assert_eq!(int(&mapped[0]["n"]), 0);

    // Restart: the same resource (skip_existing answers its id), exact money.
    rest.hold_bulk(Duration::ZERO);
    let mut gw = RwgateProcess::start(&args).await;
    until_platform_shows(&ch, &rest, TENANT_A, &[D0], "k8s_namespace", &want(&sent)).await;
    let docs = rest.resources(TENANT_A);
    assert_eq!(docs.len(), 1, "registered once");
    let rows = ch
        .rows("SELECT DISTINCT resource_id AS r FROM expenses")
        .await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["r"], docs[0]["_id"]);

    // kill -9 again; the registration endpoint is down for the next run.
    gw.child.signal("KILL");
    gw.child.wait_exit(Duration::from_secs(10)).await;
    rest.fail_bulk(Some(503));
    let calls_before = rest.bulk_calls().len();
    let gw = RwgateProcess::start(&args).await;
    let (sx, sy) = (samples(0, 30..90), samples(1, 30..90));
    sent.get_mut("x").unwrap().extend(&sx);
    let mut s = series("x", sx);
    s.extend(series("y", sy.clone()));
    assert_eq!(
        send_as_exporter(&gw.url("/api/v1/write"), TENANT_A, &s).await,
        204
    );
    // x's rows come from the resources table; y waits for the platform.
    until_platform_shows(&ch, &rest, TENANT_A, &[D0], "k8s_namespace", &want(&sent)).await;
    let tried = rest.bulk_calls()[calls_before..].to_vec();
    assert!(tried.iter().all(|c| c.status == 503), "{tried:?}");
    let y = ch
        .rows("SELECT count() AS n FROM expenses WHERE k8s_namespace = 'y'")
        .await;
    assert_eq!(int(&y[0]["n"]), 0);
    // Why y waits is said in one line, with the platform's answer.
    let log = gw.child.log();
    let why: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("resource registration failed"))
        .collect();
    assert!(
        why.first().is_some_and(|l| l.contains(&format!(
            "the REST API (resources.rest_url) at {} answered 503 Service Unavailable",
            rest.url()
        )) && l.contains("retry_in=")),
        "{log}"
    );

    rest.fail_bulk(None);
    sent.insert("y".into(), sy);
    until_platform_shows(&ch, &rest, TENANT_A, &[D0], "k8s_namespace", &want(&sent)).await;
    assert_eq!(rest.resources(TENANT_A).len(), 2);
}
