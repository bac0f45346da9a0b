//! The tee from Remote-Write 2.0 input, into a real ClickHouse (18.16 and
//! 26.9): the same cost series sent as 1.0 for one account and as 2.0 for
//! another give the same raw samples, the same series rows and the same
//! expense rows, to the last bit, and the money is the independent integral.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::clickhouse::*;
use common::*;

const V1_ACCOUNT: &str = "6f1c1a8e-5b7e-4a51-9a3e-000000000001";
const V2_ACCOUNT: &str = "6f1c1a8e-5b7e-4a51-9a3e-000000000002";
/// 2024-03-01T00:00:00Z.
const DAY_S: i64 = 1_709_251_200;
const NAMESPACES: [&str; 2] = ["default", "shop-o'brien"];
const HOURS: i64 = 6;

/// USD/h of namespace `i` at minute `k`.
fn rate(i: usize, k: i64) -> f64 {
    [0.75, 2.5][i] * (1.0 + 0.25 * ((k as f64) / 50.0).sin()) + ((k / 17) % 3) as f64 * 0.01
}

on_both_engines!(money_from_2_0_is_the_money_from_1_0, multi_thread);
async fn money_from_2_0_is_the_money_from_1_0(engine: Engine) {
    let ch = ClickHouseServer::start_engine(engine);
    ch.migrate().await;
    let sink = Sink::start().await;
    let spool = tempfile::tempdir().expect("spool dir");
    let gw = Gateway::start(tee_config(&sink.url(), &ch.url(), spool.path().into())).await;
    let http = reqwest::Client::new();

    for h in 0..HOURS {
        let series = cost_hour(DAY_S, &NAMESPACES, rate, h);
        let status = post(&http, &gw.write_url(), V1_ACCOUNT, body(&series)).await;
        assert_eq!(status, 204, "1.0 hour {h}");
        let resp = common::v2::post(
            &http,
            &gw.write_url(),
            V2_ACCOUNT,
            common::v2::body_of(&series),
        )
        .send()
        .await
        .expect("POST 2.0");
        let samples: u64 = series.iter().map(|s| s.samples.len() as u64).sum();
        assert_eq!(common::v2::written(resp.headers()), (samples, 0, 0));
        assert_eq!(resp.status(), 204, "2.0 hour {h}");
    }

    // The independent integral, per namespace (60 s steps, the first
    // sample charged the nominal 60 s step).
    let mut expected: BTreeMap<String, f64> = BTreeMap::new();
    for (i, ns) in NAMESPACES.iter().enumerate() {
        let total: f64 = (0..HOURS * 60).map(|k| rate(i, k) * 60.0 / 3600.0).sum();
        expected.insert(ns_resource_id(ns), total);
    }
    let costs = |account: &'static str| {
        let ch = &ch;
        async move {
            ch.rows(&format!(
                "SELECT resource_id, toUInt32(date) AS d, SUM(cost * sign) AS cost, \
                 SUM(sign) AS signs FROM expenses WHERE cloud_account_id = '{account}' \
                 GROUP BY resource_id, d HAVING SUM(sign) > 0 ORDER BY resource_id"
            ))
            .await
            .iter()
            .map(|r| {
                assert_eq!((int(&r["d"]), int(&r["signs"])), (DAY_S, 1), "{r}");
                (
                    r["resource_id"].as_str().expect("resource id").to_string(),
                    r["cost"].as_f64().expect("cost"),
                )
            })
            .collect::<BTreeMap<String, f64>>()
        }
    };
    let converged = |got: &BTreeMap<String, f64>| {
        got.len() == expected.len()
            && got
                .iter()
                .all(|(k, v)| expected.get(k).is_some_and(|e| rel_close(*v, *e, 1e-9)))
    };
    let (from_v1, from_v2) = eventually(Duration::from_secs(60), "expense rows", || async {
        let (a, b) = (costs(V1_ACCOUNT).await, costs(V2_ACCOUNT).await);
        if converged(&a) && converged(&b) {
            Ok((a, b))
        } else {
            Err(format!("1.0 {a:?}, 2.0 {b:?}, want {expected:?}"))
        }
    })
    .await;
    // Not close: equal.
    let bits = |m: &BTreeMap<String, f64>| -> Vec<(String, u64)> {
        m.iter().map(|(k, v)| (k.clone(), v.to_bits())).collect()
    };
    assert_eq!(bits(&from_v2), bits(&from_v1));

    // The raw samples, value bits included, and the series rows.
    let raw = |account: &str| {
        format!(
            "SELECT metric, cluster, namespace, pod, toString(series_id) AS sid, ts, \
             reinterpretAsUInt64(reinterpretAsString(value)) AS bits FROM kubecost_samples \
             FINAL WHERE account = '{account}' ORDER BY metric, namespace, ts"
        )
    };
    let raw_v1 = ch.rows(&raw(V1_ACCOUNT)).await;
    let raw_v2 = ch.rows(&raw(V2_ACCOUNT)).await;
    assert_eq!(raw_v1.len() as i64, HOURS * 60 * 4);
    let strip = |rows: &[serde_json::Value]| -> Vec<serde_json::Value> {
        rows.iter()
            .map(|r| {
                let mut r = r.clone();
                // The series id hashes the account's labels: compare the rest.
                r.as_object_mut().expect("row").remove("sid");
                r
            })
            .collect()
    };
    assert_eq!(strip(&raw_v2), strip(&raw_v1));
    let series = |account: &str| {
        format!(
            "SELECT metric, namespace, label_names, label_values FROM kubecost_series \
             WHERE account = '{account}' ORDER BY metric, namespace"
        )
    };
    let series_v1 = ch.rows(&series(V1_ACCOUNT)).await;
    let series_v2 = ch.rows(&series(V2_ACCOUNT)).await;
    assert_eq!(series_v1.len(), 4);
    for (a, b) in series_v1.iter().zip(&series_v2) {
        assert_eq!(
            (&a["metric"], &a["namespace"], &a["label_names"]),
            (&b["metric"], &b["namespace"], &b["label_names"])
        );
        assert_eq!(
            b["label_values"],
            serde_json::json!([V2_ACCOUNT, "USD", "exporter:9100", V2_ACCOUNT]),
            "tenant labels are the account's: {b}"
        );
    }
    assert_eq!(
        series_v1[0]["label_names"],
        serde_json::json!(["cloud_account_id", "currency", "instance", "tenant_id"])
    );
    assert_eq!(
        sink.requests.load(std::sync::atomic::Ordering::Relaxed),
        2 * HOURS as u64
    );
    gw.stop().await;
}
