//! Shutdown runs under one deadline, `limits.shutdown_grace`, counted from
//! the signal: finishing in-flight requests, stopping the rollup and the
//! drain, and flushing the spool all fit inside it. Each stage used to get
//! the whole grace, so a stuck request, a stuck rollup pass and a stuck
//! drain took three graces (75 s by default, against the pod's 60 s
//! `terminationGracePeriodSeconds`). On paused time: the waits are rwgate's
//! timers, and the elapsed time is tokio's clock, not the wall's.

mod common;

use std::time::Duration;

use common::clickhouse::*;
use common::*;
use tokio::time::Instant;

const GRACE: Duration = Duration::from_secs(3);

/// A ClickHouse that accepts connections and never answers: the drain's
/// migrate and the rollup's pass each hang on it.
struct Silent {
    addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Silent {
    async fn start() -> Silent {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the silent server");
        let addr = listener.local_addr().expect("silent addr");
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        Silent { addr, task }
    }
}

impl Drop for Silent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(start_paused = true)]
async fn every_shutdown_stage_fits_in_one_grace() {
    let upstream = FakeUpstream::start(Vec::new()).await;
    upstream.set_delay(Duration::from_secs(3600));
    let clickhouse = Silent::start().await;
    let spool = tempfile::tempdir().expect("temp dir");
    let mut cfg = tee_config(
        &upstream.url(),
        &format!("http://{}", clickhouse.addr),
        spool.path().into(),
    );
    cfg.upstream.timeout = Duration::from_secs(3600);
    cfg.limits.request_timeout = Duration::from_secs(3600);
    cfg.clickhouse.timeout = Duration::from_secs(3600);
    cfg.clickhouse.migrate_on_start = true;
    cfg.rollup.enabled = true;
    cfg.limits.shutdown_grace = GRACE;
    let gw = Gateway::start(cfg).await;

    // A request stuck at the upstream, and the rollup's first pass stuck at
    // ClickHouse (the drain's migrate is, from the start).
    let _stuck = upstream
        .hold_a_write(gw.write_url(), Duration::from_secs(60))
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let signalled = Instant::now();
    gw.stop().await;
    let took = signalled.elapsed();
    assert!(
        took <= GRACE + Duration::from_millis(500),
        "shutdown took {took:?} with a grace of {GRACE:?}"
    );
}
