//! The writer never retries forever what can never succeed: a row that
//! ClickHouse refuses for its content is isolated by splitting the batch and
//! goes to the dead-letter file (counted), the rest is inserted exactly once
//! and the spool drains. Samples with absurd timestamps are not teed.
//! Real ClickHouse, 18.16 and 26.9.

mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::clickhouse::*;
use common::*;

const ACCOUNT: &str = "0f000000-0000-4000-8000-000000000001";

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64
}

on_both_engines!(
    a_poison_row_is_dead_lettered_and_the_rest_goes_through,
    multi_thread
);
async fn a_poison_row_is_dead_lettered_and_the_rest_goes_through(engine: Engine) {
    let ch = ClickHouseServer::start_engine(engine);
    let sink = Sink::start().await;
    let spool = tempfile::tempdir().expect("temp dir");
    let mut cfg = tee_config(&sink.url(), &ch.url(), spool.path().into());
    cfg.rollup.enabled = false;
    cfg.spool.max_sample_age = rwgate::config::DEFAULT_MAX_SAMPLE_AGE;
    cfg.spool.max_sample_future = rwgate::config::DEFAULT_MAX_SAMPLE_FUTURE;
    cfg.spool.batch_max_age = Duration::from_millis(300);
    let chcfg = cfg.clickhouse.clone();
    rwgate::cost::clickhouse::ClickHouse::new(&chcfg)
        .expect("client")
        .migrate()
        .await
        .expect("migrate");
    // ClickHouse refuses any block holding namespace 'poison' (Code: 395),
    // whatever else is in it, every time.
    ch.exec(
        "ALTER TABLE kubecost_samples ADD COLUMN chk UInt8 \
         MATERIALIZED throwIf(namespace = 'poison')",
    )
    .await;
    let gw = Gateway::start(cfg).await;
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let t = now_ms() - 3_600_000;
    let mut series: Vec<Series> = (0..50)
        .map(|i| {
            Series::new(
                NS_METRIC,
                &[("namespace", format!("ns-{i:02}").as_str())],
                vec![(t + i, 0.5)],
            )
        })
        .collect();
    series.insert(
        17,
        Series::new(NS_METRIC, &[("namespace", "poison")], vec![(t, 9.0)]),
    );
    // Absurd timestamps: not teed (still forwarded).
    series.push(Series::new(
        NS_METRIC,
        &[("namespace", "ancient")],
        vec![(t - 2 * 365 * 86_400_000, 1.0)],
    ));
    series.push(Series::new(
        NS_METRIC,
        &[("namespace", "future")],
        vec![(now_ms() + 2 * 86_400_000, 1.0)],
    ));
    post_until_ok(&client, || gw.write_url(), ACCOUNT, body(&series), deadline).await;

    let dead = spool.path().join(rwgate::cost::drain::DEAD_LETTER_FILE);
    loop {
        let lines = std::fs::read_to_string(&dead).unwrap_or_default();
        if lines.lines().count() >= 1 {
            break;
        }
        assert!(Instant::now() < deadline, "no dead letter written");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A later request is inserted too: the writer moved on.
    let later = vec![Series::new(
        NS_METRIC,
        &[("namespace", "later")],
        vec![(t, 1.0)],
    )];
    post_until_ok(&client, || gw.write_url(), ACCOUNT, body(&later), deadline).await;
    let rows = loop {
        let rows = ch
            .rows(
                "SELECT account, metric, cluster, namespace, pod, \
                 toString(series_id) AS sid, ts, value, toUInt32(ingest_time) AS it \
                 FROM kubecost_samples ORDER BY namespace, ts",
            )
            .await;
        if rows.iter().any(|r| r["namespace"] == "later") {
            break rows;
        }
        assert!(Instant::now() < deadline, "the later request never arrived");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Without FINAL: every good sample exactly once, nothing else.
    let got: Vec<(String, i64)> = rows
        .iter()
        .map(|r| {
            (
                r["namespace"].as_str().expect("ns").to_string(),
                int(&r["ts"]),
            )
        })
        .collect();
    let mut want: Vec<(String, i64)> = (0..50).map(|i| (format!("ns-{i:02}"), t + i)).collect();
    want.push(("later".into(), t));
    want.sort();
    assert_eq!(got, want);
    for r in &rows {
        assert_eq!(r["account"], ACCOUNT);
        assert_eq!(r["metric"], NS_METRIC);
        assert_eq!(r["pod"], "");
        assert!(int(&r["it"]) > 0);
    }

    // Every sample's series has its labels in the series table (rows
    // re-sent by the split retries collapse: read with FINAL).
    let series = ch
        .rows(
            "SELECT namespace, toString(series_id) AS sid, label_names FROM kubecost_series FINAL \
             WHERE namespace != 'poison' ORDER BY namespace",
        )
        .await;
    let got_series: Vec<(&str, &str)> = series
        .iter()
        .map(|s| (s["namespace"].as_str().unwrap(), s["sid"].as_str().unwrap()))
        .collect();
    let mut want_series: Vec<(&str, &str)> = rows
        .iter()
        .map(|r| (r["namespace"].as_str().unwrap(), r["sid"].as_str().unwrap()))
        .collect();
    want_series.sort();
    assert_eq!(got_series, want_series);
    assert!(series.iter().all(|s| s["label_names"]
        .as_array()
        .is_some_and(|names| names.iter().any(|n| n == "cloud_account_id"))));

    let text = std::fs::read_to_string(&dead).expect("dead letters");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(lines.len(), 1, "{text}");
    assert_eq!(lines[0]["row"]["namespace"], "poison");
    assert_eq!(lines[0]["row"]["ts"], t);
    assert_eq!(lines[0]["row"]["value"], 9.0);
    assert_eq!(lines[0]["series"]["namespace"], "poison");
    assert_eq!(
        lines[0]["series"]["series_id"],
        lines[0]["row"]["series_id"]
    );
    assert!(
        lines[0]["error"]
            .as_str()
            .expect("error")
            .contains("Code: 395"),
        "{}",
        lines[0]["error"]
    );
    assert_eq!(
        gw.metric("rwgate_tee_rows_dead_lettered_total").await,
        Some(1.0)
    );
    // Two requests acknowledged one after the other: two group commits
    // at least.
    let syncs = gw.metric("rwgate_tee_spool_syncs_total").await;
    assert!(syncs >= Some(2.0), "{syncs:?}");
    let rejected = |reason: &'static str| {
        let gw = &gw;
        async move {
            let text = reqwest::get(format!("http://{}/metrics", gw.addr))
                .await
                .expect("metrics")
                .text()
                .await
                .expect("metrics text");
            text.lines()
                .find(|l| {
                    l.starts_with("rwgate_tee_samples_rejected_total{")
                        && l.contains(&format!("reason=\"{reason}\""))
                })
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse::<f64>().ok())
        }
    };
    assert_eq!(rejected("too_old").await, Some(1.0));
    assert_eq!(rejected("too_far_in_future").await, Some(1.0));
    // The spool drained (everything acknowledged).
    let drained = Instant::now() + Duration::from_secs(10);
    while gw.metric("rwgate_tee_spool_bytes").await != Some(0.0) {
        assert!(Instant::now() < drained, "spool did not drain");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    gw.stop().await;
}
