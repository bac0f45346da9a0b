//! Round trip through rwgate into a real Prometheus remote-write receiver (the
//! stand-in for Thanos receive): what arrives, for which tenant, with which
//! labels; and vmagent as a real client in front.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use rwgate::server::WRITE_PATHS;

/// Two tenants of a static tenants file write on all three paths, each
/// spoofing the other's tenant labels and sending series the allowlists drop.
/// The receiver holds exactly the allowed series, each stamped with the
/// writer's own account id, nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tenants_on_every_path_get_exactly_their_own_allowed_series() {
    let prom = Prometheus::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let creds_a = basic_credentials("alice", "a-secret");
    let creds_b = basic_credentials("bob", "b-secret");
    let mut cfg = test_config(&prom.write_url());
    // Tenant B has its own, narrower allowlist: kube_* is dropped for B only.
    static_auth(
        &mut cfg,
        dir.path(),
        &[
            (TENANT_A, &creds_a, None),
            (TENANT_B, &creds_b, Some("node_.*|up")),
        ],
    );
    let gw = Gateway::start(cfg).await;
    let http = client();
    let ts = now_ms();

    let mut expected = BTreeSet::new();
    for path in WRITE_PATHS {
        // Tenant A: labels deliberately unsorted and spoofing tenant B.
        let body_a = write_body(vec![
            series("up", &[("job", "rt"), ("path", path)], 1.0, ts),
            series(
                "kube_pod_info",
                &[
                    ("tenant_id", TENANT_B),
                    ("pod", "p1"),
                    ("cloud_account_id", TENANT_B),
                    ("path", path),
                ],
                2.0,
                ts,
            ),
            // Dropped: not in the default allowlist, and the anchoring means
            // `x_kube_*` is not `kube_*`.
            series("go_goroutines", &[("path", path)], 3.0, ts),
            series("x_kube_pod_info", &[("path", path)], 4.0, ts),
        ]);
        // Tenant B: spoofs A, and sends a kube_* series its allowlist drops.
        let body_b = write_body(vec![
            series(
                "node_cpu_seconds_total",
                &[("cpu", "0"), ("cloud_account_id", TENANT_A), ("path", path)],
                5.0,
                ts,
            ),
            series("kube_pod_info", &[("pod", "p2"), ("path", path)], 6.0, ts),
            series("prometheus_http_requests_total", &[("path", path)], 7.0, ts),
        ]);
        for (tenant, user, pass, body) in [
            (TENANT_A, "alice", "a-secret", &body_a),
            (TENANT_B, "bob", "b-secret", &body_b),
        ] {
            let req = rw_post(&http, &gw.url(path), Some(tenant), body.clone());
            assert_eq!(
                send_status_body(req.basic_auth(user, Some(pass))).await,
                (204, String::new()),
                "{path} {tenant}"
            );
        }

        expected.insert(labels(&[
            ("__name__", "up"),
            ("job", "rt"),
            ("path", path),
            ("cloud_account_id", TENANT_A),
            ("tenant_id", TENANT_A),
        ]));
        expected.insert(labels(&[
            ("__name__", "kube_pod_info"),
            ("pod", "p1"),
            ("path", path),
            ("cloud_account_id", TENANT_A),
            ("tenant_id", TENANT_A),
        ]));
        expected.insert(labels(&[
            ("__name__", "node_cpu_seconds_total"),
            ("cpu", "0"),
            ("path", path),
            ("cloud_account_id", TENANT_B),
            ("tenant_id", TENANT_B),
        ]));
    }

    assert_eq!(prom.all_series().await, expected);

    // The values are the ones sent, at the timestamps sent.
    let got = prom.query("kube_pod_info").await;
    assert_eq!(got.len(), 3, "{got:?}");
    assert!(got.iter().all(|(_, v)| *v == 2.0), "{got:?}");

    // Re-sending a request (Prometheus does after a non-2xx) changes nothing:
    // rwgate forwards it again, unchanged (same timestamp, same value), so
    // the receiver still holds one sample per series. Comparing series sets
    // would not tell: a re-stamped copy is a second sample of the same series.
    let samples = "sum(count_over_time({path=~\".+\"}[1h]))";
    assert_eq!(prom.scalar(samples).await, expected.len() as f64);
    let forwarded = gw
        .metric("rwgate_samples_forwarded_total")
        .await
        .expect("forwarded counter");
    let again = write_body(vec![series(
        "up",
        &[("job", "rt"), ("path", WRITE_PATHS[0])],
        1.0,
        ts,
    )]);
    let resp = rw_post(&http, &gw.url(WRITE_PATHS[0]), Some(TENANT_A), again)
        .basic_auth("alice", Some("a-secret"))
        .send()
        .await
        .expect("POST write again");
    assert_eq!(status_body(resp).await, (204, String::new()));
    assert_eq!(
        gw.metric("rwgate_samples_forwarded_total").await,
        Some(forwarded + 1.0),
        "the re-sent sample went upstream"
    );
    assert_eq!(prom.scalar(samples).await, expected.len() as f64);
    assert_eq!(prom.all_series().await, expected);

    // A's account id with B's credentials is refused.
    let resp = rw_post(
        &http,
        &gw.url(WRITE_PATHS[0]),
        Some(TENANT_A),
        write_body(vec![series("up", &[], 1.0, ts)]),
    )
    .basic_auth("bob", Some("b-secret"))
    .send()
    .await
    .expect("POST with the wrong tenant's credentials");
    assert_eq!(resp.status(), 401);
    assert_eq!(
        resp.text().await.expect("body"),
        "invalid credentials for this Cloud-Account-Id\n"
    );
    assert_eq!(prom.all_series().await, expected);
    gw.stop().await;
}

/// vmagent, a real remote-write client, scrapes a target and writes through
/// rwgate with `Cloud-Account-Id` and basic auth; the scraped `up` series
/// arrives stamped with the tenant, and the rest of the scrape (vmagent's
/// `scrape_*` series) is dropped by the allowlist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmagent_writes_through_rwgate_with_header_and_basic_auth() {
    let prom = Prometheus::start().await;
    let (gw, _tenants) = gateway_for_tenant_a(test_config(&prom.write_url()), "vm", "pa55").await;

    // A spoofed tenant label set by the sender, as an external label would be.
    let agent = VmAgent::start(
        &gw.url("/storage/api/v2/write"),
        &[("Cloud-Account-Id", TENANT_A)],
        Some(("vm", "pa55")),
        "vmagent-e2e",
        &format!("127.0.0.1:{}", prom.port),
    )
    .await;

    let got = wait_for(
        "up{job=\"vmagent-e2e\"} from vmagent in prometheus",
        Duration::from_secs(60),
        || async {
            let s = prom.series("up{job=\"vmagent-e2e\"}").await;
            (!s.is_empty()).then_some(s)
        },
    )
    .await;
    let instance = format!("127.0.0.1:{}", prom.port);
    assert_eq!(
        got,
        BTreeSet::from([labels(&[
            ("__name__", "up"),
            ("job", "vmagent-e2e"),
            ("instance", &instance),
            ("cloud_account_id", TENANT_A),
            ("tenant_id", TENANT_A),
        ])]),
        "vmagent log:\n{}",
        agent.log_tail()
    );
    // Nothing but `up` passes the default allowlist from such a scrape.
    let names: BTreeSet<String> = prom.series_names().await.into_iter().collect();
    assert_eq!(names, BTreeSet::from(["up".to_string()]));
    let m = gw.metrics().await;
    assert!(
        metric_value(
            &m,
            "rwgate_requests_total{route=\"storage_write\",status=\"204\"}"
        ) >= 1.0,
        "{m}"
    );
    drop(agent);
    gw.stop().await;
}
