//! A synthetic day of three namespaces through rwgate into a real
//! ClickHouse (18.16 and 26.9): exact money, every raw sample exactly once,
//! whole rows.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::clickhouse::*;
use common::*;

const ACCOUNT: &str = "6f1c1a8e-5b7e-4a51-9a3e-1f0c2d3e4b5a";
/// 2024-03-01T00:00:00Z.
const DAY_S: i64 = 1_709_251_200;
const NAMESPACES: [&str; 3] = ["default", "kube-system", "shop-o'brien"];

/// USD/h of namespace `i` at minute `k`: changing through the day.
fn rate(i: usize, k: i64) -> f64 {
    let base = [0.75, 0.125, 2.5][i];
    base * (1.0 + 0.5 * ((k as f64) * std::f64::consts::TAU / 1440.0).sin())
        + ((k / 37) % 5) as f64 * 0.01
}

on_both_engines!(synthetic_day_is_charged_exactly, multi_thread);
async fn synthetic_day_is_charged_exactly(engine: Engine) {
    let ch = ClickHouseServer::start_engine(engine);
    ch.migrate().await;
    let sink = Sink::start().await;
    let spool = tempfile::tempdir().unwrap();
    let gw = Gateway::start(tee_config(&sink.url(), &ch.url(), spool.path().into())).await;
    let client = reqwest::Client::new();

    // 24 requests of one hour each: the charged metric, a component metric
    // (raw only), an efficiency (raw only) and a non-tee metric (forwarded only).
    let mut expected_raw = Vec::new();
    for hour in 0..24i64 {
        let series = cost_hour(DAY_S, &NAMESPACES, rate, hour);
        for s in series.iter().filter(|s| s.labels[0].1 != "kube_pod_info") {
            let ns = &s
                .labels
                .iter()
                .find(|(n, _)| n == "namespace")
                .expect("namespace")
                .1;
            for &(t, v) in &s.samples {
                expected_raw.push((s.labels[0].1.clone(), ns.clone(), t, v));
            }
        }
        let status = post(&client, &gw.write_url(), ACCOUNT, body(&series)).await;
        assert_eq!(status, 204, "hour {hour}");
    }

    // The independent integral per namespace (60 s steps; the first sample
    // ever is charged the nominal 60 s step).
    let mut expected: BTreeMap<String, f64> = BTreeMap::new();
    for (i, ns) in NAMESPACES.iter().enumerate() {
        let total: f64 = (0..1440).map(|k| rate(i, k) * 60.0 / 3600.0).sum();
        expected.insert(ns_resource_id(ns), total);
    }

    // SUM(cost*sign) without FINAL, as the REST API reads it, converges.
    let sql = format!(
        "SELECT resource_id, toUInt32(date) AS d, SUM(cost * sign) AS cost, SUM(sign) AS signs \
         FROM expenses WHERE cloud_account_id = '{ACCOUNT}' GROUP BY resource_id, d \
         HAVING SUM(sign) > 0 ORDER BY resource_id"
    );
    eventually(Duration::from_secs(60), "expense totals", || async {
        let rows = ch.rows(&sql).await;
        let got: BTreeMap<String, f64> = rows
            .iter()
            .map(|r| {
                assert_eq!(int(&r["d"]), DAY_S, "{r}");
                assert_eq!(int(&r["signs"]), 1, "{r}");
                (
                    r["resource_id"].as_str().unwrap().to_string(),
                    r["cost"].as_f64().unwrap(),
                )
            })
            .collect();
        if got.len() == 3
            && got
                .iter()
                .all(|(k, v)| expected.get(k).is_some_and(|e| rel_close(*v, *e, 1e-9)))
        {
            Ok(())
        } else {
            Err(format!("got {got:?}, want {expected:?}"))
        }
    })
    .await;

    // Whole expense rows, collapsed: exactly one live row per namespace,
    // every column as the platform expects.
    let rows = ch
        .rows(&format!(
            "SELECT cloud_account_id, resource_id, toUInt32(date) AS d, cost, sign, \
             k8s_namespace, k8s_node, k8s_service FROM expenses FINAL \
             WHERE cloud_account_id = '{ACCOUNT}' ORDER BY k8s_namespace"
        ))
        .await;
    assert_eq!(rows.len(), 3, "{rows:?}");
    let mut sorted_ns = NAMESPACES.to_vec();
    sorted_ns.sort();
    for (row, ns) in rows.iter().zip(sorted_ns) {
        assert_eq!(row["cloud_account_id"], ACCOUNT);
        assert_eq!(row["resource_id"], ns_resource_id(ns).as_str());
        assert_eq!(int(&row["d"]), DAY_S);
        assert_eq!(int(&row["sign"]), 1);
        assert_eq!(row["k8s_namespace"], ns);
        assert!(
            row["k8s_node"].is_null() && row["k8s_service"].is_null(),
            "{row}"
        );
        let want = expected[&ns_resource_id(ns)];
        assert!(
            rel_close(row["cost"].as_f64().unwrap(), want, 1e-9),
            "{row} vs {want}"
        );
    }
    // Every stored row (pairs not yet merged included) is well-formed.
    let all = ch
        .rows(&format!(
            "SELECT resource_id, toUInt32(date) AS d, sign, k8s_namespace FROM expenses \
             WHERE cloud_account_id = '{ACCOUNT}'"
        ))
        .await;
    for r in &all {
        assert!(int(&r["sign"]).abs() == 1, "{r}");
        assert_eq!(int(&r["d"]), DAY_S);
        assert_eq!(
            r["resource_id"],
            ns_resource_id(r["k8s_namespace"].as_str().unwrap()).as_str()
        );
    }

    // The raw table: every teed sample exactly once, whole rows.
    let raw = ch
        .rows(&format!(
            "SELECT account, metric, cluster, namespace, pod, toString(series_id) AS sid, \
             ts, reinterpretAsUInt64(reinterpretAsString(value)) AS bits, \
             toUInt32(ingest_time) AS it FROM kubecost_samples FINAL \
             WHERE account = '{ACCOUNT}' ORDER BY metric, namespace, ts"
        ))
        .await;
    assert_eq!(raw.len(), expected_raw.len());
    expected_raw.sort_by(|a, b| (&a.0, &a.1, a.2).cmp(&(&b.0, &b.1, b.2)));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    for (row, (metric, ns, ts, v)) in raw.iter().zip(&expected_raw) {
        assert_eq!(row["account"], ACCOUNT);
        assert_eq!(row["metric"], metric.as_str());
        assert_eq!(row["cluster"], "prod-1");
        assert_eq!(row["namespace"], ns.as_str());
        assert_eq!(row["pod"], "");
        // 18.16 quotes 64-bit integers in JSON.
        assert_eq!(int(&row["ts"]), *ts);
        assert_eq!(int(&row["bits"]) as u64, v.to_bits(), "value bits survive");
        let it = int(&row["it"]) as u64;
        assert!(
            it <= now + 5 && it + 600 >= now,
            "ingest time {it} vs now {now}"
        );
    }
    // The series table: each series' labels exactly once (no FINAL: 24
    // requests re-sent every series, the writer wrote its row once), and
    // every sample joins its series.
    let series = ch
        .rows(&format!(
            "SELECT metric, namespace, cluster, pod, toString(series_id) AS sid, \
             label_names, label_values FROM kubecost_series \
             WHERE account = '{ACCOUNT}' ORDER BY metric, namespace"
        ))
        .await;
    let mut want_series: Vec<(&str, &str)> = expected_raw
        .iter()
        .map(|(m, ns, _, _)| (m.as_str(), ns.as_str()))
        .collect();
    want_series.dedup();
    let got_series: Vec<(&str, &str)> = series
        .iter()
        .map(|s| {
            (
                s["metric"].as_str().unwrap(),
                s["namespace"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(got_series, want_series);
    for s in &series {
        assert_eq!(
            (s["cluster"].as_str(), s["pod"].as_str()),
            (Some("prod-1"), Some(""))
        );
        // Tenant labels carry the authenticated account, whatever was sent.
        assert_eq!(
            s["label_names"],
            serde_json::json!(["cloud_account_id", "currency", "instance", "tenant_id"])
        );
        assert_eq!(
            s["label_values"],
            serde_json::json!([ACCOUNT, "USD", "exporter:9100", ACCOUNT])
        );
    }
    for row in &raw {
        let joins = |s: &&serde_json::Value| {
            (&s["metric"], &s["namespace"], &s["sid"])
                == (&row["metric"], &row["namespace"], &row["sid"])
        };
        assert_eq!(series.iter().filter(joins).count(), 1, "{row}");
    }
    // The join docs/TEE.md gives finds every sample's labels.
    let joined = ch
        .rows(&format!(
            "SELECT s.ts, l.label_names FROM kubecost_samples AS s \
             ANY LEFT JOIN (SELECT account, metric, series_id, label_names, label_values \
                            FROM kubecost_series FINAL) AS l USING (account, metric, series_id) \
             WHERE s.account = '{ACCOUNT}'"
        ))
        .await;
    assert!(joined.len() >= raw.len());
    assert!(joined
        .iter()
        .all(|j| j["label_names"].as_array().map(Vec::len) == Some(4)));
    let not_teed = ch
        .rows("SELECT count() AS n FROM kubecost_samples WHERE metric = 'kube_pod_info'")
        .await;
    assert_eq!(int(&not_teed[0]["n"]), 0);
    assert_eq!(sink.requests.load(std::sync::atomic::Ordering::Relaxed), 24);

    // `rwgate reconcile` over the day changes nothing: the rows are exact.
    let mut cfg = tee_config(&sink.url(), &ch.url(), spool.path().into());
    cfg.clickhouse.url = Some(ch.url());
    let rollup = rwgate::cost::rollup::Rollup::new(
        rwgate::cost::clickhouse::ClickHouse::new(&cfg.clickhouse).unwrap(),
        &cfg.rollup,
    );
    let r = rollup
        .reconcile(day("2024-03-01"), day("2024-03-01"), Some(ACCOUNT))
        .await
        .unwrap();
    assert_eq!(r.buckets_changed, 0, "{r:?}");
    assert_eq!(r.buckets_examined, 3, "{r:?}");

    gw.stop().await;
}
