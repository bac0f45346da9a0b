//! ClickHouse down while samples keep arriving: forwarding to a real
//! Prometheus and 2xx continue, the spool grows; ClickHouse back: the spool
//! drains to empty and the money converges to the exact values. Samples the
//! upstream refuses as too old are still kept by the tee.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::clickhouse::*;
use common::*;

const ACCOUNT: &str = "0c000000-0000-4000-8000-000000000001";
const LATE_ACCOUNT: &str = "0c000000-0000-4000-8000-000000000002";
const NAMESPACES: [&str; 3] = ["a", "b", "c"];

fn rate(i: usize, k: i64) -> f64 {
    [0.3, 0.7, 1.9][i] + (k % 7) as f64 * 0.05
}

on_both_engines!(
    clickhouse_outage_loses_nothing_and_blocks_nothing,
    multi_thread
);
async fn clickhouse_outage_loses_nothing_and_blocks_nothing(engine: Engine) {
    let mut ch = ClickHouseServer::start_engine(engine);
    ch.migrate().await;
    let prom = Prometheus::start().await;
    let spool = tempfile::tempdir().unwrap();
    let gw = Gateway::start(tee_config(
        &prom.write_url(),
        &ch.url(),
        spool.path().into(),
    ))
    .await;
    let client = reqwest::Client::new();

    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let base = (now_s / 60) * 60 - 45 * 60;
    let minute = |k: i64| -> Vec<Series> {
        NAMESPACES
            .iter()
            .enumerate()
            .map(|(i, ns)| {
                Series::new(
                    NS_METRIC,
                    &[("namespace", ns), ("cluster", "c")],
                    vec![((base + k * 60) * 1000, rate(i, k))],
                )
            })
            .collect()
    };
    /// Rows as inserted, without FINAL: a re-sent sample would show here
    /// (FINAL would collapse it). Each request below reaches the spool once
    /// (204 at the first try) and ClickHouse is killed while the writer is
    /// idle, so nothing may be re-sent.
    async fn raw_count(ch: &ClickHouseServer, account: &str) -> i64 {
        let r = ch
            .rows(&format!(
                "SELECT count() AS n FROM kubecost_samples WHERE account = '{account}'"
            ))
            .await;
        int(&r[0]["n"])
    }

    // Phase 1: ClickHouse up.
    for k in 0..10 {
        assert_eq!(
            post(&client, &gw.write_url(), ACCOUNT, body(&minute(k))).await,
            204
        );
    }
    eventually(
        Duration::from_secs(30),
        "first samples in clickhouse",
        || async {
            let n = raw_count(&ch, ACCOUNT).await;
            if n == 30 {
                Ok(())
            } else {
                Err(format!("{n} rows"))
            }
        },
    )
    .await;

    // Phase 2: ClickHouse down. Requests still succeed and reach Prometheus;
    // the spool grows.
    ch.stop();
    let mut spool_sizes = Vec::new();
    for k in 10..25 {
        assert_eq!(
            post(&client, &gw.write_url(), ACCOUNT, body(&minute(k))).await,
            204,
            "minute {k}"
        );
        spool_sizes.push(
            eventually(Duration::from_secs(10), "spool gauge", || async {
                gw.metric(rwgate::telemetry::SPOOL_BYTES)
                    .await
                    .ok_or("no gauge".to_string())
            })
            .await,
        );
        tokio::time::sleep(Duration::from_millis(1100)).await; // the gauge refreshes each second
    }
    assert!(
        spool_sizes.last().unwrap() > spool_sizes.first().unwrap(),
        "{spool_sizes:?}"
    );
    let forwarded = prom
        .scalar("sum(count_over_time(cloudtuner_kubecost_namespace_total_cost[2h]))")
        .await;
    assert_eq!(forwarded, 75.0, "Prometheus has every sample so far");

    // Samples Prometheus refuses as too old: the sender gets Prometheus'
    // 400, but the tee has kept them (step 9 of the design).
    let old = vec![Series::new(
        NS_METRIC,
        &[("namespace", "late"), ("cluster", "c")],
        vec![((now_s - 3 * 3600) * 1000, 4.0)],
    )];
    let status = post(&client, &gw.write_url(), LATE_ACCOUNT, body(&old)).await;
    assert_eq!(status, 400, "Prometheus refuses samples 3 h old");

    // Phase 3: ClickHouse back; more samples.
    ch.restart();
    let deadline = Instant::now() + Duration::from_secs(60);
    for k in 25..45 {
        post_until_ok(
            &client,
            || gw.write_url(),
            ACCOUNT,
            body(&minute(k)),
            deadline,
        )
        .await;
    }

    // Everything arrives exactly once and the money is exact.
    let mut per_ns: BTreeMap<String, Vec<(i64, f64)>> = BTreeMap::new();
    for k in 0..45 {
        for (i, ns) in NAMESPACES.iter().enumerate() {
            per_ns
                .entry(ns_resource_id(ns))
                .or_default()
                .push(((base + k * 60) * 1000, rate(i, k)));
        }
    }
    let mut want: BTreeMap<(String, i64), f64> = BTreeMap::new();
    for (rid, samples) in per_ns {
        for (day, cost) in reference_costs(&samples, 86_400, 300, 60) {
            want.insert((rid.clone(), day), cost);
        }
    }
    let sql = format!(
        "SELECT resource_id, toUInt32(date) AS d, SUM(cost * sign) AS c FROM expenses \
         WHERE cloud_account_id = '{ACCOUNT}' GROUP BY resource_id, d HAVING SUM(sign) > 0"
    );
    eventually(Duration::from_secs(60), "totals converge", || async {
        let got: BTreeMap<(String, i64), f64> = ch
            .rows(&sql)
            .await
            .iter()
            .map(|r| {
                (
                    (r["resource_id"].as_str().unwrap().to_string(), int(&r["d"])),
                    r["c"].as_f64().unwrap(),
                )
            })
            .collect();
        let ok = got.len() == want.len()
            && got
                .iter()
                .all(|(k, v)| want.get(k).is_some_and(|w| rel_close(*v, *w, 1e-9)));
        if ok {
            Ok(())
        } else {
            Err(format!("got {got:?} want {want:?}"))
        }
    })
    .await;
    assert_eq!(raw_count(&ch, ACCOUNT).await, 45 * 3);
    assert_eq!(
        raw_count(&ch, LATE_ACCOUNT).await,
        1,
        "the refused sample is kept"
    );
    eventually(Duration::from_secs(30), "spool drains to empty", || async {
        match gw.metric(rwgate::telemetry::SPOOL_BYTES).await {
            Some(0.0) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let failed = gw
        .metric(rwgate::telemetry::BATCHES_FAILED)
        .await
        .unwrap_or(0.0);
    assert!(
        failed > 0.0,
        "inserts failed during the outage and were retried"
    );
    gw.stop().await;
}
