//! The rollup and `migrate` against real ClickHouse (18.16 and 26.9), driven
//! through the library: a late sample re-derives the following bucket; a pass
//! examines only what changed; migrate adds columns without touching data,
//! and the writer's rows fit a raw table made before the series table.

mod common;

use std::time::Duration;

use common::clickhouse::*;

use rwgate::config::{Config, Grain};
use rwgate::cost::clickhouse::{ClickHouse, RawRow, TouchedRow};
use rwgate::cost::rollup::Rollup;

const ACCOUNT: &str = "0b000000-0000-4000-8000-000000000001";
/// 2024-03-03T10:00:00Z.
const T10: i64 = 1_709_460_000;

fn config(ch: &ClickHouseServer) -> Config {
    let mut c = Config::default();
    c.clickhouse.url = Some(ch.url());
    c.rollup.grain = Grain::Hour;
    c.rollup.overlap = Duration::ZERO;
    c
}

fn raw(ts_s: i64, value: f64) -> RawRow<'static> {
    RawRow {
        account: ACCOUNT,
        metric: NS_METRIC,
        cluster: "c",
        namespace: "web",
        pod: "",
        series_id: 1,
        ts: ts_s * 1000,
        value,
        ingest_time: 0,
    }
}

fn now() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as u32
}

async fn hour_costs(ch: &ClickHouseServer) -> Vec<(i64, f64, i64)> {
    ch.rows(&format!(
        "SELECT toUInt32(date) AS h, SUM(cost * sign) AS c, SUM(sign) AS s FROM expenses \
         WHERE cloud_account_id = '{ACCOUNT}' GROUP BY h ORDER BY h"
    ))
    .await
    .iter()
    .map(|r| (int(&r["h"]), r["c"].as_f64().unwrap(), int(&r["s"])))
    .collect()
}

on_both_engines!(a_late_sample_rederives_the_next_bucket_and_passes_stay_small);
async fn a_late_sample_rederives_the_next_bucket_and_passes_stay_small(engine: Engine) {
    let ch_server = ClickHouseServer::start_engine(engine);
    let cfg = config(&ch_server);
    let ch = ClickHouse::new(&cfg.clickhouse).unwrap();
    ch.migrate().await.unwrap();
    let rollup = Rollup::new(ch.clone(), &cfg.rollup);

    // 10:00..10:58 and 11:00..11:59 at 1 USD/h; 10:59 is missing for now.
    let mut rows: Vec<RawRow> = (0..120)
        .filter(|&k| k != 59)
        .map(|k| raw(T10 + k * 60, 1.0))
        .collect();
    ch.insert::<RawRow>(&ch.config.raw_table, &rows)
        .await
        .unwrap();
    let old_minute = now() - 3600;
    let touched = |minute: u32, hour: i64| TouchedRow {
        ingest_minute: minute - minute % 60,
        metric: NS_METRIC.into(),
        account: ACCOUNT.into(),
        hour: hour as u32,
    };
    ch.insert::<TouchedRow>(
        &ch.config.touched_table,
        &[touched(old_minute, T10), touched(old_minute, T10 + 3600)],
    )
    .await
    .unwrap();
    let r = rollup.pass().await.unwrap();
    assert_eq!(r.buckets_changed, 2, "{r:?}");
    // Hour 10: first sample ever = 60 s step, then 58 x 60 s. Hour 11: the
    // 11:00 sample comes 120 s after 10:58, then 59 x 60 s.
    let h = hour_costs(&ch_server).await;
    assert_eq!(h.len(), 2);
    assert!(rel_close(h[0].1, 59.0 / 60.0, 1e-12), "{h:?}");
    assert!(rel_close(h[1].1, 61.0 / 60.0, 1e-12), "{h:?}");

    // A pass with nothing new examines nothing and writes nothing.
    let r = rollup.pass().await.unwrap();
    assert_eq!((r.buckets_examined, r.rows_written), (0, 0), "{r:?}");

    // The late 10:59 sample arrives, touching only hour 10. Hour 11 changes
    // too (its 11:00 sample now has dt = 60 s), and the pass examines only
    // hours 10 and 11 of this one resource.
    rows = vec![raw(T10 + 59 * 60, 1.0)];
    ch.insert::<RawRow>(&ch.config.raw_table, &rows)
        .await
        .unwrap();
    ch.insert::<TouchedRow>(&ch.config.touched_table, &[touched(now() + 60, T10)])
        .await
        .unwrap();
    let r = rollup.pass().await.unwrap();
    assert_eq!(r.buckets_changed, 2, "{r:?}");
    assert_eq!(r.buckets_examined, 2, "{r:?}");
    let h = hour_costs(&ch_server).await;
    assert!(rel_close(h[0].1, 1.0, 1e-12), "{h:?}");
    assert!(rel_close(h[1].1, 1.0, 1e-12), "{h:?}");
    assert!(h.iter().all(|x| x.2 == 1), "{h:?}");

    // Each change was written as an (old, -1), (new, +1) pair.
    let pairs = ch_server
        .rows(&format!(
            "SELECT toUInt32(date) AS h, cost, sign FROM expenses \
             WHERE cloud_account_id = '{ACCOUNT}' AND toUInt32(date) = {} ORDER BY sign, cost",
            T10 + 3600
        ))
        .await;
    let got: Vec<(f64, i64)> = pairs
        .iter()
        .map(|r| (r["cost"].as_f64().unwrap(), int(&r["sign"])))
        .collect();
    assert_eq!(got.len(), 3, "{got:?}");
    assert_eq!(got[0].1, -1);
    assert!(rel_close(got[0].0, 61.0 / 60.0, 1e-12));

    // Reconcile of the day finds everything right.
    let r = rollup
        .reconcile(day("2024-03-03"), day("2024-03-03"), None)
        .await
        .unwrap();
    assert_eq!(r.buckets_changed, 0, "{r:?}");
}

on_both_engines!(migrate_adds_missing_columns_and_keeps_data);
async fn migrate_adds_missing_columns_and_keeps_data(engine: Engine) {
    let server = ClickHouseServer::start_engine(engine);
    // The platform's older table, without the k8s columns, holding a row.
    server
        .exec(
            "CREATE TABLE expenses (cloud_account_id String, resource_id String, date DateTime, \
             cost Float64, sign Int8) ENGINE = CollapsingMergeTree(sign) \
             PARTITION BY toYYYYMM(date) ORDER BY (cloud_account_id, date, resource_id)",
        )
        .await;
    server
        .exec("INSERT INTO expenses VALUES ('acc', 'vm-1', toDateTime(1709251200), 12.5, 1)")
        .await;
    // A raw table as rwgate made it before labels moved to the series table.
    server
        .exec(
            "CREATE TABLE kubecost_samples (account String, metric String, cluster String, \
             namespace String, pod String, label_names Array(String), label_values Array(String), \
             series_id UInt64, ts Int64, value Float64, ingest_time DateTime) \
             ENGINE = ReplacingMergeTree(ingest_time) \
             PARTITION BY toYYYYMM(toDateTime(intDiv(ts, 1000))) ORDER BY (account, metric, series_id, ts)",
        )
        .await;
    let cfg = config(&server);
    let ch = ClickHouse::new(&cfg.clickhouse).unwrap();
    let r = ch.migrate().await.unwrap();
    assert!(
        r.server_version.starts_with(engine.version_prefix()),
        "{r:?}"
    );
    assert_eq!(
        r.created,
        [
            "kubecost_series",
            "rwgate_rollup_state",
            "kubecost_touched",
            "rwgate_resources"
        ]
    );
    // Where rows are validated, an insert must name every column without a
    // default: the legacy label columns get one (metadata only).
    let modern = engine == Engine::Modern;
    assert_eq!(r.validation, modern, "{r:?}");
    let defaults: &[&str] = if modern {
        &[
            "kubecost_samples.label_names",
            "kubecost_samples.label_values",
        ]
    } else {
        &[]
    };
    assert_eq!(r.defaults_added, defaults);
    // Today's rows go into the older raw table (label columns left empty).
    ch.insert::<RawRow>(&ch.config.raw_table, &[raw(T10, 2.5)])
        .await
        .unwrap();
    let old = server
        .rows("SELECT namespace, ts, value, label_names FROM kubecost_samples")
        .await;
    assert_eq!(old.len(), 1);
    assert_eq!(
        (
            &old[0]["namespace"],
            int(&old[0]["ts"]),
            old[0]["value"].as_f64()
        ),
        (&serde_json::json!("web"), T10 * 1000, Some(2.5))
    );
    assert_eq!(old[0]["label_names"], serde_json::json!([]));
    assert_eq!(
        r.columns_added,
        [
            "expenses.k8s_namespace",
            "expenses.k8s_node",
            "expenses.k8s_service"
        ]
    );
    let rows = server
        .rows("SELECT cloud_account_id, resource_id, toUInt32(date) AS d, cost, sign, k8s_namespace FROM expenses")
        .await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["resource_id"], "vm-1");
    assert_eq!(rows[0]["cost"].as_f64(), Some(12.5));
    assert_eq!(int(&rows[0]["d"]), 1_709_251_200);
    assert!(rows[0]["k8s_namespace"].is_null());
    // Idempotent.
    let again = ch.migrate().await.unwrap();
    assert!(
        again.created.is_empty()
            && again.columns_added.is_empty()
            && again.defaults_added.is_empty(),
        "{again:?}"
    );
}
