//! Measures the tee (release build; starts its own ClickHouse 18.16):
//!
//! ```text
//! cargo run --release --example tee_bench
//! ```
//!
//! 1. spool append latency p50/p99 with 64 concurrent appenders (group commit),
//! 2. tee throughput: samples/s from the spool into ClickHouse,
//! 3. rollup pass time for a day of 1,000 namespaces (first pass, then an
//!    incremental pass after one more minute of samples).
//!
//! The figures are written into docs/TEE.md by hand.

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use rwgate::config::Config;
use rwgate::cost::clickhouse::{ClickHouse, RawRow, TouchedRow};
use rwgate::cost::names::NAMESPACE_METRIC;
use rwgate::cost::record::{Accepted, RecordBuilder, TeeRecord};
use rwgate::cost::rollup::Rollup;
use rwgate::cost::tee::Tee;

/// One request's worth of cost samples: 40 series of one sample (a cluster
/// scrape of namespace and component gauges), as the request path writes
/// them.
fn request_samples(k: i64) -> TeeRecord {
    const ACCOUNT: &str = "0e000000-0000-4000-8000-000000000001";
    let mut b = RecordBuilder::new(Accepted::ANY);
    for i in 0..40 {
        let ns = format!("ns-{i}");
        let labels: [(&[u8], &[u8]); 6] = [
            (b"cloud_account_id", ACCOUNT.as_bytes()),
            (b"cluster", b"prod"),
            (b"currency", b"USD"),
            (b"instance", b"exporter:9100"),
            (b"namespace", ns.as_bytes()),
            (b"tenant_id", ACCOUNT.as_bytes()),
        ];
        // A component gauge: raw only, so the rollup timing below sees
        // only its own day.
        b.begin_series(ACCOUNT, b"cloudtuner_kubecost_namespace_cpu_cost", &labels);
        b.sample(1_709_251_200_000 + k * 60_000, 0.5 + i as f64);
        b.end_series();
    }
    b.finish()
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p) as usize]
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let ch_server = common::clickhouse::ClickHouseServer::start();
    let spool_dir = tempfile::tempdir()?;
    let mut cfg = Config::default();
    cfg.clickhouse.url = Some(ch_server.url());
    cfg.spool.dir = spool_dir.path().into();
    cfg.spool.batch_max_age = Duration::from_millis(200);
    cfg.spool.max_sample_age = Duration::from_secs(20 * 365 * 86_400);
    cfg.rollup.enabled = false;

    // 1 + 2: appends under load while the writer drains into ClickHouse.
    let health = Arc::new(rwgate::health::Health::default());
    let tee = Arc::new(Tee::start(&cfg, ClickHouse::new(&cfg.clickhouse)?, &health).await?);
    let tasks = 64;
    let per_task = 400;
    let started = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let tee = tee.clone();
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(per_task);
                for i in 0..per_task {
                    let samples = request_samples((t * per_task + i) as i64);
                    let s = Instant::now();
                    tee.append(samples).await.expect("append");
                    lat.push(s.elapsed());
                }
                lat
            })
        })
        .collect();
    let mut lat = Vec::new();
    for h in handles {
        lat.extend(h.await?);
    }
    let append_secs = started.elapsed().as_secs_f64();
    lat.sort();
    let samples = (tasks * per_task * 40) as f64;
    println!(
        "spool append: {} appends of 40 samples by {tasks} tasks in {append_secs:.2}s \
         ({:.0} appends/s): p50 {:?}, p99 {:?}, max {:?}",
        lat.len(),
        lat.len() as f64 / append_secs,
        pct(&lat, 0.5),
        pct(&lat, 0.99),
        lat.last().copied().unwrap_or_default()
    );
    while tee.pending_bytes() > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drain_secs = started.elapsed().as_secs_f64();
    println!(
        "tee throughput: {samples} samples appended and in ClickHouse after {drain_secs:.2}s \
         = {:.0} samples/s end to end",
        samples / drain_secs
    );
    tee.shutdown(tokio::time::Instant::now() + Duration::from_secs(5))
        .await;

    // 3: rollup of a day of 1,000 namespaces (1.44 M samples).
    let ch = ClickHouse::new(&cfg.clickhouse)?;
    let account = "0e000000-0000-4000-8000-000000000002";
    let day_ms = 1_709_337_600_000i64;
    let namespaces: Vec<String> = (0..1000).map(|ns| format!("ns-{ns}")).collect();
    let mut rows = Vec::with_capacity(1_440_000);
    for (ns, namespace) in namespaces.iter().enumerate() {
        for k in 0..1440 {
            rows.push(RawRow {
                account,
                metric: NAMESPACE_METRIC,
                cluster: "prod",
                namespace,
                pod: "",
                series_id: ns as u64,
                ts: day_ms + k * 60_000,
                value: 0.01 * (ns % 17) as f64 + 0.001 * (k % 13) as f64,
                ingest_time: 0,
            });
        }
    }
    let t = Instant::now();
    for chunk in rows.chunks(200_000) {
        ch.insert::<RawRow>(&ch.config.raw_table, chunk).await?;
    }
    println!(
        "raw insert: 1.44 M rows in {:.2}s = {:.0} rows/s (ClickHouse::insert, 200k batches)",
        t.elapsed().as_secs_f64(),
        1_440_000.0 / t.elapsed().as_secs_f64()
    );
    let now = rwgate_now();
    let touched: Vec<TouchedRow> = (0..24)
        .map(|h| TouchedRow {
            ingest_minute: now - now % 60,
            metric: NAMESPACE_METRIC.into(),
            account: account.into(),
            hour: (day_ms / 1000 + h * 3600) as u32,
        })
        .collect();
    ch.insert::<TouchedRow>(&ch.config.touched_table, &touched)
        .await?;
    let rollup = Rollup::new(ch.clone(), &cfg.rollup);
    let t = Instant::now();
    let r = rollup.pass().await?;
    println!(
        "rollup first pass (day of 1,000 namespaces): {:.2}s, {r:?}",
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    let r = rollup.pass().await?;
    println!(
        "rollup pass with nothing new: {:.3}s, {r:?}",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

fn rwgate_now() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as u32)
        .unwrap_or(0)
}
