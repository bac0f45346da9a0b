//! What is forwarded and what is teed are decided apart: a tenant's
//! allowlist picks the series forwarded to the upstream, the tee prefix
//! alone (`cloudtuner_kubecost_`) the series teed to ClickHouse. A tenant
//! whose allowlist omits the cost metrics still gets its expense rows.

mod common;

use std::time::Duration;

use common::clickhouse::*;
use common::*;

const TENANT: &str = "6c8d0a2f-1e3b-4f9c-8d4e-2b3c4d5e6f70";
/// 2024-03-02T00:00:00Z.
const DAY_S: i64 = 1_709_337_600;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_allowlist_without_the_cost_metrics_keeps_its_expense_rows() {
    let ch = ClickHouseServer::start();
    ch.migrate().await;
    let prom = Prometheus::start().await;
    let spool = tempfile::tempdir().expect("spool dir");
    let dir = tempfile::tempdir().expect("tenants dir");
    let mut cfg = tee_config(&prom.write_url(), &ch.url(), spool.path().into());
    static_auth(
        &mut cfg,
        dir.path(),
        &[(TENANT, &basic_credentials("u", "p"), Some("up|kube_.*"))],
    );
    let gw = Gateway::start(cfg).await;

    let samples: Vec<(i64, f64)> = (0..30).map(|k| ((DAY_S + k * 60) * 1000, 0.5)).collect();
    let cost = Series::new(
        NS_METRIC,
        &[("namespace", "shop"), ("cluster", "c")],
        samples.clone(),
    );
    let now = now_ms();
    let up = Series::new("up", &[("job", "node")], vec![(now, 1.0)]);
    let dropped = Series::new("go_goroutines", &[], vec![(now, 7.0)]);
    let resp = rw_post(
        &client(),
        &gw.write_url(),
        Some(TENANT),
        body(&[cost, up, dropped]),
    )
    .basic_auth("u", Some("p"))
    .send()
    .await
    .expect("post");
    assert_eq!(resp.status(), 204);

    // Forwarded: what the tenant's allowlist keeps, nothing else.
    assert_eq!(prom.series_names().await, ["up"]);

    // Teed: every cost sample, and the expense row derived from them.
    let raw = format!(
        "SELECT count() AS n FROM kubecost_samples FINAL WHERE account = '{TENANT}' \
         AND metric = '{NS_METRIC}'"
    );
    eventually(Duration::from_secs(30), "raw cost samples", || async {
        let n = int(&ch.rows(&raw).await[0]["n"]);
        if n == 30 {
            Ok(())
        } else {
            Err(format!("{n} raw samples"))
        }
    })
    .await;
    let want: f64 = reference_costs(&samples, 86_400, 300, 60).values().sum();
    let money =
        format!("SELECT SUM(cost * sign) AS c FROM expenses WHERE cloud_account_id = '{TENANT}'");
    eventually(Duration::from_secs(30), "the expense row", || async {
        let rows = ch.rows(&money).await;
        let got = rows.first().and_then(|r| r["c"].as_f64()).unwrap_or(0.0);
        if rel_close(got, want, 1e-9) {
            Ok(())
        } else {
            Err(format!("{got} USD, want {want}"))
        }
    })
    .await;
    gw.stop().await;
}
