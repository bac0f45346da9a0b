//! kill -9 of the rwgate binary during requests of a stream chosen by a
//! seeded RNG (`TEE_CRASH_SEED` repeats a run; the seed is printed), restart,
//! continue: nothing lost, money exact, the raw table's FINAL view holds
//! every sample exactly once. Raw copies without FINAL are not exactly one:
//! re-sends after a kill are legitimate (they collapse by design); their
//! number is printed and bounded (see the end of the test).

mod common;

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::clickhouse::*;
use common::*;
use rand::{rngs::StdRng, Rng, SeedableRng};

const ACCOUNT: &str = "0d000000-0000-4000-8000-000000000001";
/// 2024-03-04T00:00:00Z.
const DAY_S: i64 = 1_709_510_400;
const NAMESPACES: [&str; 3] = ["x", "y", "z"];
/// Requests in the stream (a day in 5-minute requests).
const REQUESTS: i64 = 288;
/// kill -9s in the stream.
const KILLS: usize = 4;
/// The default seed of the kill points.
const SEED: u64 = 14;

fn rate(i: usize, k: i64) -> f64 {
    [0.2, 1.1, 2.7][i] * (1.0 + (k % 11) as f64 / 11.0)
}

struct Rwgate {
    child: Child,
}

impl Rwgate {
    fn start(config: &std::path::Path) -> Rwgate {
        let child = Command::new(env!("CARGO_BIN_EXE_rwgate"))
            .arg("serve")
            .arg("--config")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("rwgate binary");
        Rwgate { child }
    }

    fn kill9(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }
}

impl Drop for Rwgate {
    fn drop(&mut self) {
        self.kill9();
    }
}

on_both_engines!(kill_9_mid_stream_loses_and_doubles_nothing, multi_thread);
async fn kill_9_mid_stream_loses_and_doubles_nothing(engine: Engine) {
    let ch = ClickHouseServer::start_engine(engine);
    ch.migrate().await;
    // No background merges of the raw table: its rows without FINAL are
    // then every copy inserted, so the re-sends counted below are exact
    // (merges would collapse them out of sight).
    ch.exec("SYSTEM STOP MERGES kubecost_samples").await;
    let sink = Sink::start().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = dir.path().join("rwgate.toml");
    std::fs::write(
        &config,
        format!(
            r#"
listen = "127.0.0.1:{port}"
[auth]
mode = "none"
[log]
level = "error"
{tee}"#,
            tee = tee_toml(
                &sink.url(),
                &ch.url(),
                &dir.path().join("spool"),
                "retry_backoff = \"50ms\"\nretry_max_backoff = \"200ms\"",
            ),
        ),
    )
    .unwrap();
    let mut gw = Rwgate::start(&config);
    let url = format!("http://127.0.0.1:{port}/api/v1/write");

    // The kill points: distinct requests of the stream, each killed 0-40 ms
    // after it was first sent (while rwgate decodes it, spools it, forwards
    // it or answers, or just after).
    let seed = std::env::var("TEE_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(SEED);
    eprintln!("kill points from seed {seed} (TEE_CRASH_SEED={seed} repeats them)");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut kills: BTreeMap<i64, u64> = BTreeMap::new();
    while kills.len() < KILLS {
        kills.insert(rng.gen_range(1..REQUESTS - 1), rng.gen_range(0..40));
    }
    eprintln!("kill -9 during requests (request: ms after it was sent) {kills:?}");

    // The stream: a day in 5-minute requests, each retried until 2xx as
    // Prometheus does.
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    for chunk in 0..REQUESTS {
        let series: Vec<Series> = NAMESPACES
            .iter()
            .enumerate()
            .map(|(i, ns)| {
                let samples = (chunk * 5..chunk * 5 + 5)
                    .map(|k| ((DAY_S + k * 60) * 1000, rate(i, k)))
                    .collect();
                Series::new(NS_METRIC, &[("namespace", ns)], samples)
            })
            .collect();
        let post = post_until_ok(&client, || url.clone(), ACCOUNT, body(&series), deadline);
        match kills.get(&chunk) {
            Some(&after_ms) => {
                let kill = async {
                    tokio::time::sleep(Duration::from_millis(after_ms)).await;
                    gw.kill9();
                    gw = Rwgate::start(&config);
                };
                tokio::join!(post, kill);
            }
            None => post.await,
        }
        if chunk % 4 == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    let want: BTreeMap<String, f64> = NAMESPACES
        .iter()
        .enumerate()
        .map(|(i, ns)| {
            let samples: Vec<(i64, f64)> = (0..1440)
                .map(|k| ((DAY_S + k * 60) * 1000, rate(i, k)))
                .collect();
            let costs = reference_costs(&samples, 86_400, 300, 60);
            (ns_resource_id(ns), costs[&DAY_S])
        })
        .collect();
    let sql = format!(
        "SELECT resource_id, SUM(cost * sign) AS c, SUM(sign) AS s FROM expenses \
         WHERE cloud_account_id = '{ACCOUNT}' GROUP BY resource_id HAVING SUM(sign) > 0"
    );
    eventually(Duration::from_secs(60), "money after crashes", || async {
        let rows = ch.rows(&sql).await;
        let got: BTreeMap<String, f64> = rows
            .iter()
            .map(|r| {
                (
                    r["resource_id"].as_str().unwrap().to_string(),
                    r["c"].as_f64().unwrap(),
                )
            })
            .collect();
        let ok = rows.iter().all(|r| int(&r["s"]) == 1)
            && got.len() == want.len()
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
    let rows = ch
        .rows(&format!(
            "SELECT namespace, ts, count() AS n FROM kubecost_samples FINAL \
             WHERE account = '{ACCOUNT}' GROUP BY namespace, ts HAVING n != 1"
        ))
        .await;
    assert!(rows.is_empty(), "doubled samples: {rows:?}");
    let total = ch
        .rows(&format!(
            "SELECT count() AS n FROM kubecost_samples FINAL WHERE account = '{ACCOUNT}'"
        ))
        .await;
    assert_eq!(int(&total[0]["n"]), 1440 * 3, "nothing lost");
    // Without FINAL: the copies actually inserted. Re-sends are legitimate
    // here and collapse by design: a request whose 2xx was lost to a kill is
    // retried (one request, 15 samples), and a kill between a ClickHouse
    // insert and the spool ack re-sends that batch (with batch_max_age =
    // 30 ms, a few requests). Bounded by 20 requests of 15 samples per
    // kill; without merges the count is what was re-sent.
    let raw = ch
        .rows(&format!(
            "SELECT count() AS n FROM kubecost_samples WHERE account = '{ACCOUNT}'"
        ))
        .await;
    let duplicates = int(&raw[0]["n"]) - 1440 * 3;
    eprintln!("raw duplicates after {KILLS} kills: {duplicates}");
    assert!(
        duplicates <= KILLS as i64 * 20 * 15,
        "{duplicates} re-sent rows after {KILLS} kills"
    );
}
