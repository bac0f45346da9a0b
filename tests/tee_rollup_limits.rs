//! The rollup's queries stay under ClickHouse's `max_query_size` (256 KiB)
//! whatever the keys: one tenant sending 80 namespaces of 4,000 bytes, or
//! 7,000 active accounts, used to make every pass fail with "Code: 62" —
//! the watermark never advanced and no account got expense rows any more.
//! Real ClickHouse, 18.16 and 26.9.

mod common;

use std::time::{Duration, Instant};

use common::clickhouse::*;
use common::*;
use rwgate::cost::clickhouse::ClickHouse;
use rwgate::cost::rollup::Rollup;

const VICTIM: &str = "0a000000-0000-4000-8000-000000000001";
const ATTACKER: &str = "0a000000-0000-4000-8000-000000000002";
/// 2024-03-04T00:00:00Z.
const T0: i64 = 1_709_510_400_000;

/// Every expense row, whole, as the REST API would aggregate them.
async fn expense_rows(ch: &ClickHouseServer) -> Vec<serde_json::Value> {
    ch.rows(
        "SELECT cloud_account_id, resource_id, toUInt32(date) AS d, cost, sign, \
         k8s_namespace, k8s_node, k8s_service FROM expenses \
         ORDER BY cloud_account_id, resource_id, d, sign",
    )
    .await
}

on_both_engines!(
    long_namespace_values_do_not_wedge_the_rollup_for_everyone,
    multi_thread
);
async fn long_namespace_values_do_not_wedge_the_rollup_for_everyone(engine: Engine) {
    let ch = ClickHouseServer::start_engine(engine);
    let sink = Sink::start().await;
    let spool = tempfile::tempdir().expect("temp dir");
    let mut cfg = tee_config(&sink.url(), &ch.url(), spool.path().into());
    cfg.rollup.enabled = false; // passes driven by hand
    let rcfg = cfg.rollup.clone();
    let chcfg = cfg.clickhouse.clone();
    ch.migrate().await;
    let gw = Gateway::start(cfg).await;
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);

    let good = vec![Series::new(
        NS_METRIC,
        &[("namespace", "web")],
        vec![(T0, 1.0), (T0 + 60_000, 1.0)],
    )];
    post_until_ok(&client, || gw.write_url(), VICTIM, body(&good), deadline).await;
    // 80 namespaces of 4,000 bytes: 320 KB of literals if listed verbatim.
    let names: Vec<String> = (0..80)
        .map(|i| format!("{i:04}{}", "x".repeat(3996)))
        .collect();
    let bad: Vec<Series> = names
        .iter()
        .map(|n| Series::new(NS_METRIC, &[("namespace", n.as_str())], vec![(T0, 1.0)]))
        .collect();
    post_until_ok(&client, || gw.write_url(), ATTACKER, body(&bad), deadline).await;
    // Wait until the writer has inserted all 82 samples.
    loop {
        let n = ch
            .rows("SELECT account, namespace, ts, value FROM kubecost_samples")
            .await
            .len();
        if n == 82 {
            break;
        }
        assert!(Instant::now() < deadline, "only {n} raw rows arrived");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let rollup = Rollup::new(ClickHouse::new(&chcfg).expect("client"), &rcfg);
    let report = rollup.pass().await.expect("the pass succeeds");
    assert_eq!(report.rows_written, 81);
    let rows = expense_rows(&ch).await;
    assert_eq!(rows.len(), 81, "one row per namespace: {}", rows.len());
    let victim: Vec<_> = rows
        .iter()
        .filter(|r| r["cloud_account_id"] == VICTIM)
        .collect();
    assert_eq!(victim.len(), 1);
    let v = victim[0];
    assert_eq!(v["resource_id"], ns_resource_id("web").as_str());
    assert_eq!(int(&v["d"]), T0 / 1000);
    // First sample: step (60 s); second: 60 s later. 1 USD/h * 120 s.
    assert!(rel_close(
        v["cost"].as_f64().expect("cost"),
        120.0 / 3600.0,
        1e-12
    ));
    assert_eq!(int(&v["sign"]), 1);
    assert_eq!(v["k8s_namespace"], "web");
    assert!(v["k8s_node"].is_null() && v["k8s_service"].is_null());
    for n in &names {
        let r: Vec<_> = rows
            .iter()
            .filter(|r| r["k8s_namespace"] == n.as_str())
            .collect();
        assert_eq!(r.len(), 1, "attacker namespace {}", &n[..4]);
        assert_eq!(r[0]["cloud_account_id"], ATTACKER);
        assert_eq!(r[0]["resource_id"], ns_resource_id(n).as_str());
        assert!(rel_close(
            r[0]["cost"].as_f64().expect("cost"),
            60.0 / 3600.0,
            1e-12
        ));
    }
    // The next pass goes through as well, and changes nothing.
    let again = rollup.pass().await.expect("the next pass succeeds");
    assert_eq!(again.buckets_changed, 0);
    assert_eq!(expense_rows(&ch).await.len(), 81);
    gw.stop().await;
}

on_both_engines!(thousands_of_active_accounts_fit_in_bounded_queries);
async fn thousands_of_active_accounts_fit_in_bounded_queries(engine: Engine) {
    let ch = ClickHouseServer::start_engine(engine);
    let mut cfg = rwgate::config::Config::default();
    cfg.clickhouse.url = Some(ch.url());
    let client = ClickHouse::new(&cfg.clickhouse).expect("client");
    client.migrate().await.expect("migrate");
    // 7,000 accounts of 40 characters (~300 KB of account literals), one
    // namespace each, two samples a minute apart, in today's touched index.
    const N: u64 = 7_000;
    let account = format!(
        "concat('acct-', substring(concat(toString(number), '{}'), 1, 35))",
        "x".repeat(35)
    );
    ch.exec(&format!(
        "INSERT INTO kubecost_samples SELECT {account}, '{NS_METRIC}', 'c', 'web', '', \
         toUInt64(1), {T0} + 60000 * k, 1.0, now() \
         FROM numbers({N}) ARRAY JOIN [0, 1] AS k"
    ))
    .await;
    ch.exec(&format!(
        "INSERT INTO kubecost_touched SELECT toStartOfMinute(now()), '{NS_METRIC}', {account}, \
         toDateTime(intDiv({T0}, 1000)) FROM numbers({N})"
    ))
    .await;
    let rollup = Rollup::new(client, &cfg.rollup);
    let report = rollup.pass().await.expect("the pass succeeds");
    assert_eq!(report.buckets_changed, N as usize);
    let rows = expense_rows(&ch).await;
    assert_eq!(rows.len(), N as usize);
    for r in &rows {
        let a = r["cloud_account_id"].as_str().expect("account");
        assert_eq!(a.len(), 40, "{a}");
        assert_eq!(r["resource_id"], ns_resource_id("web").as_str());
        assert_eq!(int(&r["d"]), T0 / 1000);
        assert!(rel_close(
            r["cost"].as_f64().expect("cost"),
            120.0 / 3600.0,
            1e-12
        ));
        assert_eq!(int(&r["sign"]), 1);
        assert_eq!(r["k8s_namespace"], "web");
    }
}

on_both_engines!(a_poisoned_bucket_is_isolated_then_skipped);
/// A bucket whose queries fail because of its own data (here an account id
/// longer than `max_query_size` by itself, so no chunking helps) does not
/// hold back the others: they get their rows in the same pass; the pass
/// fails (watermark kept) for `MAX_BUCKET_FAILURES - 1` passes, then the
/// bucket is skipped and the watermark advances.
async fn a_poisoned_bucket_is_isolated_then_skipped(engine: Engine) {
    let ch = ClickHouseServer::start_engine(engine);
    let mut cfg = rwgate::config::Config::default();
    cfg.clickhouse.url = Some(ch.url());
    let client = ClickHouse::new(&cfg.clickhouse).expect("client");
    client.migrate().await.expect("migrate");
    // 300 KiB of 'p', built server-side (the literal could not be sent).
    let poison = "arrayStringConcat(arrayMap(x -> 'p', range(307200)))";
    for account in [format!("'{VICTIM}'"), poison.to_string()] {
        ch.exec(&format!(
            "INSERT INTO kubecost_samples SELECT {account}, '{NS_METRIC}', 'c', 'web', '', \
             toUInt64(1), {T0} + 60000 * number, 1.0, now() FROM numbers(2)"
        ))
        .await;
        ch.exec(&format!(
            "INSERT INTO kubecost_touched SELECT toStartOfMinute(now()), '{NS_METRIC}', {account}, \
             toDateTime(intDiv({T0}, 1000))"
        ))
        .await;
    }
    let rollup = Rollup::new(client, &cfg.rollup);
    for pass in 1..rwgate::cost::rollup::MAX_BUCKET_FAILURES {
        let e = rollup
            .pass()
            .await
            .expect_err("the poisoned bucket fails the pass");
        assert!(e.is_data_error(), "pass {pass}: {e}");
        let rows = expense_rows(&ch).await;
        assert_eq!(rows.len(), 1, "pass {pass}: the victim's row only");
        assert_eq!(rows[0]["cloud_account_id"], VICTIM);
        assert!(rel_close(
            rows[0]["cost"].as_f64().expect("cost"),
            120.0 / 3600.0,
            1e-12
        ));
        assert_eq!(int(&rows[0]["sign"]), 1);
        let wm = ch
            .rows("SELECT name, watermark, version FROM rwgate_rollup_state")
            .await;
        assert!(wm.is_empty(), "pass {pass}: watermark not advanced: {wm:?}");
    }
    let report = rollup.pass().await.expect("the bucket is skipped now");
    assert_eq!(report.buckets_skipped, 2, "the poisoned day and the next");
    assert_eq!(report.buckets_changed, 0);
    let wm = ch
        .rows("SELECT name, watermark, version FROM rwgate_rollup_state")
        .await;
    assert_eq!(wm.len(), 1, "watermark advanced: {wm:?}");
    assert_eq!(expense_rows(&ch).await.len(), 1);
}
