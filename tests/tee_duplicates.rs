//! Retries, HA exporter replicas, out-of-order arrival and a 2-hour gap:
//! expense totals stay exactly those of the money rule (hourly grain, so
//! that late samples cross bucket boundaries while rollup passes run).

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::clickhouse::*;
use common::*;

/// 2024-03-02T00:00:00Z.
const DAY_S: i64 = 1_709_337_600;
const NAMESPACES: [&str; 3] = ["default", "ingest", "batch"];

fn rate(i: usize, k: i64) -> f64 {
    [0.5, 1.25, 3.0][i] * (1.0 + ((k * 7 + i as i64 * 13) % 29) as f64 / 29.0)
}

struct Scenario {
    account: &'static str,
    /// Requests, in the order they are sent.
    requests: Vec<Vec<Series>>,
}

/// Half-hour requests of the day's samples for the given minutes, one or
/// two (HA) exporter replicas.
fn requests(minutes: &[i64], replicas: &[(&str, i64)]) -> Vec<Vec<Series>> {
    let mut out = Vec::new();
    for chunk in minutes.chunks(30) {
        let mut series = Vec::new();
        for (i, ns) in NAMESPACES.iter().enumerate() {
            for (instance, offset_s) in replicas {
                let samples = chunk
                    .iter()
                    .map(|&k| ((DAY_S + k * 60 + offset_s) * 1000, rate(i, k)))
                    .collect();
                series.push(Series::new(
                    NS_METRIC,
                    &[("namespace", ns), ("cluster", "c"), ("instance", instance)],
                    samples,
                ));
            }
        }
        out.push(series);
    }
    out
}

/// Deterministic shuffle (no RNG dependency for reproducible failures).
fn shuffle<T>(v: &mut [T], mut seed: u64) {
    for i in (1..v.len()).rev() {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        v.swap(i, (seed >> 33) as usize % (i + 1));
    }
}

/// The expected (resource, hour) -> cost of a scenario, from its requests.
fn expected(s: &Scenario) -> BTreeMap<(String, i64), f64> {
    let mut per_ns: BTreeMap<String, Vec<(i64, f64)>> = BTreeMap::new();
    for req in &s.requests {
        for series in req {
            let ns = &series.labels.iter().find(|l| l.0 == "namespace").unwrap().1;
            per_ns
                .entry(ns.clone())
                .or_default()
                .extend(&series.samples);
        }
    }
    let mut out = BTreeMap::new();
    for (ns, samples) in per_ns {
        for (hour, cost) in reference_costs(&samples, 3600, 300, 60) {
            out.insert((ns_resource_id(&ns), hour), cost);
        }
    }
    out
}

on_both_engines!(
    retries_replicas_disorder_and_gaps_do_not_change_money,
    multi_thread
);
async fn retries_replicas_disorder_and_gaps_do_not_change_money(engine: Engine) {
    let ch = ClickHouseServer::start_engine(engine);
    ch.migrate().await;
    let sink = Sink::start().await;
    let spool = tempfile::tempdir().unwrap();
    let mut cfg = tee_config(&sink.url(), &ch.url(), spool.path().into());
    cfg.rollup.grain = rwgate::config::Grain::Hour;
    cfg.rollup.interval = Duration::from_millis(50);
    cfg.spool.batch_max_age = Duration::from_millis(20);
    let gw = Gateway::start(cfg).await;
    let client = reqwest::Client::new();

    let day: Vec<i64> = (0..1440).collect();
    let one = [("exporter-0:9100", 0)];
    let baseline = Scenario {
        account: "0a000000-0000-4000-8000-000000000001",
        requests: requests(&day, &one),
    };
    // Every request twice in a row, then the whole day again.
    let mut twice = Vec::new();
    for r in requests(&day, &one) {
        twice.push(r.clone());
        twice.push(r);
    }
    twice.extend(requests(&day, &one));
    let retried = Scenario {
        account: "0a000000-0000-4000-8000-000000000002",
        requests: twice,
    };
    let ha = Scenario {
        account: "0a000000-0000-4000-8000-000000000003",
        requests: requests(&day, &[("exporter-0:9100", 0), ("exporter-1:9100", 20)]),
    };
    let mut shuffled = requests(&day, &one);
    shuffle(&mut shuffled, 42);
    let disorder = Scenario {
        account: "0a000000-0000-4000-8000-000000000004",
        requests: shuffled,
    };
    let gap_minutes: Vec<i64> = day
        .iter()
        .copied()
        .filter(|k| !(600..720).contains(k))
        .collect();
    let gap = Scenario {
        account: "0a000000-0000-4000-8000-000000000005",
        requests: requests(&gap_minutes, &one),
    };
    let scenarios = [baseline, retried, ha, disorder, gap];

    // Interleave the scenarios' requests, pausing so rollup passes run
    // between late arrivals.
    let deadline = Instant::now() + Duration::from_secs(120);
    let longest = scenarios.iter().map(|s| s.requests.len()).max().unwrap();
    for i in 0..longest {
        for s in &scenarios {
            if let Some(req) = s.requests.get(i) {
                post_until_ok(&client, || gw.write_url(), s.account, body(req), deadline).await;
            }
        }
        if i % 4 == 0 {
            tokio::time::sleep(Duration::from_millis(60)).await;
        }
    }

    for s in &scenarios {
        let want = expected(s);
        let sql = format!(
            "SELECT resource_id, toUInt32(date) AS h, SUM(cost * sign) AS cost, SUM(sign) AS signs \
             FROM expenses WHERE cloud_account_id = '{}' GROUP BY resource_id, h \
             HAVING SUM(sign) > 0",
            s.account
        );
        eventually(Duration::from_secs(60), s.account, || async {
            let rows = ch.rows(&sql).await;
            let got: BTreeMap<(String, i64), f64> = rows
                .iter()
                .map(|r| {
                    (
                        (r["resource_id"].as_str().unwrap().to_string(), int(&r["h"])),
                        r["cost"].as_f64().unwrap(),
                    )
                })
                .collect();
            let signs_ok = rows.iter().all(|r| int(&r["signs"]) == 1);
            let same = got.len() == want.len()
                && got
                    .iter()
                    .all(|(k, v)| want.get(k).is_some_and(|w| rel_close(*v, *w, 1e-9)));
            if same && signs_ok {
                Ok(())
            } else {
                let diff: Vec<_> = want
                    .iter()
                    .filter(|(k, w)| !got.get(*k).is_some_and(|v| rel_close(*v, **w, 1e-9)))
                    .take(5)
                    .map(|(k, w)| (k.clone(), *w, got.get(k).copied()))
                    .collect();
                Err(format!(
                    "{} buckets vs {}; first differences {diff:?}",
                    got.len(),
                    want.len()
                ))
            }
        })
        .await;
    }

    // Cross-checks between scenarios, on the totals ClickHouse holds (each
    // scenario was compared with the model above; these compare the
    // scenarios' stored money with each other).
    let mut totals = Vec::new();
    for s in &scenarios {
        let rows = ch
            .rows(&format!(
                "SELECT cloud_account_id, SUM(cost * sign) AS c, SUM(sign) AS s FROM expenses \
                 WHERE cloud_account_id = '{}' GROUP BY cloud_account_id",
                s.account
            ))
            .await;
        assert_eq!(rows.len(), 1, "{}", s.account);
        totals.push(rows[0]["c"].as_f64().unwrap());
    }
    let base = totals[0];
    assert!(rel_close(totals[1], base, 1e-9), "retries change nothing");
    assert!(rel_close(totals[3], base, 1e-9), "order changes nothing");
    // HA replicas: the second replica's first sample (20 s after the first
    // sample ever) is the only extra money; nothing is doubled.
    let first_extra: f64 = (0..3).map(|i| rate(i, 0) * 20.0 / 3600.0).sum();
    assert!(rel_close(totals[2], base + first_extra, 1e-9));
    // The gap: its two hours are not charged (only max_gap after it).
    let gap_money: f64 = (0..3)
        .map(|i| (600..720).map(|k| rate(i, k) * 60.0).sum::<f64>() / 3600.0)
        .sum();
    let after_gap: f64 = (0..3).map(|i| rate(i, 720) * 240.0 / 3600.0).sum();
    assert!(rel_close(totals[4], base - gap_money + after_gap, 1e-9));

    // Raw. With FINAL: every distinct sample exactly once (re-sent copies
    // collapse). Without FINAL (what was actually inserted, less whatever
    // background merges already collapsed): a scenario sent once holds each
    // sample exactly once, so the spool re-sent nothing; the retried one
    // holds at most as many copies as were sent.
    let count = |account: &str, fin: &str| {
        format!("SELECT count() AS n FROM kubecost_samples {fin} WHERE account = '{account}'")
    };
    for (s, distinct, sent_max) in [
        (&scenarios[0], 1440 * 3, 1440 * 3),
        (&scenarios[1], 1440 * 3, 1440 * 3 * 3),
        (&scenarios[2], 1440 * 3 * 2, 1440 * 3 * 2),
    ] {
        let fin = int(&ch.rows(&count(s.account, "FINAL")).await[0]["n"]);
        assert_eq!(fin, distinct, "FINAL {}", s.account);
        let raw = int(&ch.rows(&count(s.account, "")).await[0]["n"]);
        assert!(
            (distinct..=sent_max).contains(&raw),
            "raw {} = {raw}, want {distinct}..={sent_max}",
            s.account
        );
    }
    gw.stop().await;
}
