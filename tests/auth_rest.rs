//! `rest` auth against a stand-in for the platform REST API (the only faked
//! server here; the upstream is a real Prometheus receiver): the diproxy
//! answers (422, 401), positive and negative caching, and REST outages.

mod common;

use std::time::Duration;

use common::*;
use rwgate::config::{AuthMode, Config};

const SECRET: &str = "cluster-secret-for-tests";
const UNKNOWN: &str = "0b7f4c8e-1a2b-4c3d-8e9f-0000000000ff";
const NO_CREDS: &str = "0b7f4c8e-1a2b-4c3d-8e9f-0000000000cc";

fn rest_config(dir: &std::path::Path, rest_url: &str, upstream: &str) -> Config {
    let secret = dir.join("cluster-secret");
    // A trailing newline, as `kubectl create secret --from-file` leaves it.
    std::fs::write(&secret, format!("{SECRET}\n")).expect("write secret file");
    let mut cfg = test_config(upstream);
    cfg.auth.mode = AuthMode::Rest;
    cfg.auth.rest_url = Some(rest_url.to_string());
    cfg.auth.cluster_secret_file = Some(secret);
    cfg.auth.rest_timeout = Duration::from_secs(2);
    cfg
}

async fn post(
    gw: &Gateway,
    account: &str,
    auth: Option<(&str, &str)>,
) -> (u16, String, reqwest::header::HeaderMap) {
    let body = write_body(vec![series("up", &[("job", "auth")], 1.0, now_ms())]);
    let mut req = rw_post(
        &client(),
        &gw.url("/storage/api/v2/write"),
        Some(account),
        body,
    );
    if let Some((u, p)) = auth {
        req = req.basic_auth(u, Some(p));
    }
    let resp = req.send().await.expect("POST write");
    let headers = resp.headers().clone();
    let (status, body) = status_body(resp).await;
    (status, body, headers)
}

/// The diproxy contract: 422 for an unknown account (remembered, so a
/// misconfigured sender cannot make rwgate hammer the REST API), 422 for an
/// account without credentials, 401 with `WWW-Authenticate: Basic` for wrong
/// or missing credentials, 204 for right ones with the answer cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_auth_answers_and_caches_like_diproxy_but_stricter() {
    let prom = Prometheus::start().await;
    let rest = RestApi::start(SECRET).await;
    rest.add(
        TENANT_A,
        Account::Credentials(basic_credentials("alice", "pw")),
    );
    rest.add(NO_CREDS, Account::NoCredentials);
    let dir = tempfile::tempdir().expect("tempdir");
    let gw = Gateway::start(rest_config(dir.path(), &rest.url(), &prom.write_url())).await;

    // Unknown account: 422, and the second request is answered from the
    // negative cache.
    let (status, body, _) = post(&gw, UNKNOWN, Some(("alice", "pw"))).await;
    assert_eq!(
        (status, body.as_str()),
        (422, "unknown Cloud-Account-Id: no such cloud account\n")
    );
    assert_eq!(rest.calls(), 1);
    let (status, _, _) = post(&gw, UNKNOWN, Some(("alice", "pw"))).await;
    assert_eq!(status, 422);
    assert_eq!(rest.calls(), 1, "unknown account is negatively cached");

    // Account without credentials: 422.
    let (status, body, _) = post(&gw, NO_CREDS, Some(("alice", "pw"))).await;
    assert_eq!(
        (status, body.as_str()),
        (
            422,
            "this cloud account has no remote-write credentials; set them in the platform\n"
        )
    );
    assert_eq!(rest.calls(), 2);

    // Wrong password, then no Authorization at all: 401 with a Basic challenge.
    for auth in [Some(("alice", "wrong")), None] {
        let (status, body, headers) = post(&gw, TENANT_A, auth).await;
        assert_eq!(
            (status, body.as_str()),
            (401, "invalid credentials for this Cloud-Account-Id\n"),
            "{auth:?}"
        );
        let challenge = headers
            .get("www-authenticate")
            .expect("WWW-Authenticate on 401")
            .to_str()
            .expect("ASCII header");
        assert!(challenge.starts_with("Basic"), "{challenge}");
    }
    assert_eq!(rest.calls(), 3, "the 401s share one lookup");

    // Right credentials: 204, still no new lookup (positive cache).
    let (status, body, _) = post(&gw, TENANT_A, Some(("alice", "pw"))).await;
    assert_eq!((status, body.as_str()), (204, ""));
    let (status, _, _) = post(&gw, TENANT_A, Some(("alice", "pw"))).await;
    assert_eq!(status, 204);
    assert_eq!(rest.calls(), 3, "known account is cached");

    // Every lookup carried the secret (trimmed) and diproxy's URL shape.
    assert_eq!(rest.bad_secret_calls(), 0);
    assert_eq!(
        rest.paths(),
        [
            format!("/restapi/v2/cloud_accounts/{UNKNOWN}?details=false"),
            format!("/restapi/v2/cloud_accounts/{NO_CREDS}?details=false"),
            format!("/restapi/v2/cloud_accounts/{TENANT_A}?details=false"),
        ]
    );
    let got = prom
        .wait_series("up{job=\"auth\"}", Duration::from_secs(5))
        .await;
    assert_eq!(
        got.into_iter().collect::<Vec<_>>(),
        [labels(&[
            ("__name__", "up"),
            ("job", "auth"),
            ("cloud_account_id", TENANT_A),
            ("tenant_id", TENANT_A),
        ])]
    );
    gw.stop().await;
}

/// A REST outage never turns into a 4xx: a tenant with a cached (even
/// expired) answer keeps writing; one without gets 503, which Prometheus
/// retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_outage_serves_stale_cache_else_503() {
    let prom = Prometheus::start().await;
    let rest = RestApi::start(SECRET).await;
    rest.add(TENANT_A, Account::Credentials(basic_credentials("a", "pw")));
    rest.add(TENANT_B, Account::Credentials(basic_credentials("b", "pw")));
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = rest_config(dir.path(), &rest.url(), &prom.write_url());
    cfg.auth.cache_ttl = Duration::from_millis(200);
    cfg.auth.outage_backoff = Duration::from_millis(300);
    let gw = Gateway::start(cfg).await;

    let (status, _, _) = post(&gw, TENANT_A, Some(("a", "pw"))).await;
    assert_eq!(status, 204);
    assert_eq!(rest.calls(), 1);

    rest.set_mode(RestMode::Down);
    // Once the entry has expired, rwgate asks again, gets 503 from the REST
    // API, and serves the stale entry: every answer meanwhile is 204.
    wait_for(
        "rwgate to re-check the expired entry against the REST API",
        Duration::from_secs(10),
        || async {
            let (status, body, _) = post(&gw, TENANT_A, Some(("a", "pw"))).await;
            assert_eq!(
                (status, body.as_str()),
                (204, ""),
                "cached tenant during outage"
            );
            (rest.calls() >= 2).then_some(())
        },
    )
    .await;

    // Nothing cached for B: 503 with a retry hint, never 4xx.
    let (status, body, _) = post(&gw, TENANT_B, Some(("b", "pw"))).await;
    assert_eq!(
        (status, body.as_str()),
        (503, "cannot verify credentials right now; retry later\n")
    );

    // The stale entry still checks the password.
    let (status, _, _) = post(&gw, TENANT_A, Some(("a", "bad"))).await;
    assert_eq!(status, 401);

    // Back up: B gets in, once `auth.outage_backoff` since the last failure
    // has passed (until then rwgate does not ask the REST API).
    rest.set_mode(RestMode::Up);
    wait_for(
        "B to get in once REST is back",
        Duration::from_secs(10),
        || async {
            let (status, _, _) = post(&gw, TENANT_B, Some(("b", "pw"))).await;
            assert!(status == 204 || status == 503, "{status}");
            (status == 204).then_some(())
        },
    )
    .await;

    let m = gw.metrics().await;
    assert!(
        metric_value(&m, "rwgate_auth_cache_total{result=\"stale\"}") >= 1.0,
        "{m}"
    );
    gw.stop().await;
}

/// A REST API that refuses connections (not deployed yet, wrong URL) is an
/// outage too: 503, not 4xx or 500.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_connection_refused_is_503() {
    let prom = Prometheus::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let dead = format!("http://127.0.0.1:{}", free_port());
    let gw = Gateway::start(rest_config(dir.path(), &dead, &prom.write_url())).await;
    let (status, body, _) = post(&gw, TENANT_A, Some(("a", "pw"))).await;
    assert_eq!(
        (status, body.as_str()),
        (503, "cannot verify credentials right now; retry later\n")
    );
    gw.stop().await;
}

/// A REST API that accepts connections but does not answer costs a burst
/// of concurrent requests one `rest_timeout` in all, not one each in turn
/// (Prometheus sends a tenant's batches on several shards at once): after
/// the failed lookup no lookup is sent for `auth.outage_backoff`, and
/// requests get the stale entry (204) or 503 at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_rest_api_costs_a_burst_one_timeout_not_one_each() {
    const BURST: usize = 6;
    let rest_timeout = Duration::from_secs(1);
    let up = FakeUpstream::start(Vec::new()).await;
    let rest = RestApi::start(SECRET).await;
    rest.add(TENANT_A, Account::Credentials(basic_credentials("a", "pw")));
    rest.add(TENANT_B, Account::Credentials(basic_credentials("b", "pw")));
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = rest_config(dir.path(), &rest.url(), &up.url());
    cfg.auth.rest_timeout = rest_timeout;
    cfg.auth.cache_ttl = Duration::from_millis(100);
    // Long enough that B's burst surely falls within it.
    cfg.auth.outage_backoff = Duration::from_secs(60);
    let gw = std::sync::Arc::new(Gateway::start(cfg).await);

    let (status, _, _) = post(&gw, TENANT_A, Some(("a", "pw"))).await;
    assert_eq!(status, 204);
    rest.set_mode(RestMode::Hang);
    // Let A's entry expire, so that every request below needs a lookup.
    tokio::time::sleep(Duration::from_millis(150)).await;

    // A is cached (stale): 204s. B never was: 503s. Never a 4xx.
    for (tenant, want) in [(TENANT_A, 204), (TENANT_B, 503)] {
        let calls_before = rest.calls();
        let burst: Vec<_> = (0..BURST)
            .map(|_| {
                let gw = gw.clone();
                let user = if tenant == TENANT_A { "a" } else { "b" };
                tokio::spawn(async move {
                    let started = std::time::Instant::now();
                    let (status, _, _) = post(&gw, tenant, Some((user, "pw"))).await;
                    (status, started.elapsed())
                })
            })
            .collect();
        for r in burst {
            let (status, took) = r.await.expect("burst request");
            assert_eq!(status, want, "{tenant}");
            assert!(
                took < rest_timeout * 5 / 2,
                "{tenant}: a request took {took:?}, more than one REST timeout plus slack"
            );
        }
        let calls = rest.calls() - calls_before;
        // A's burst sends the one lookup that hangs; B's comes within the
        // outage backoff and sends none.
        let want_calls = if tenant == TENANT_A { 1 } else { 0 };
        assert_eq!(
            calls, want_calls,
            "{tenant}: {calls} REST lookups for a burst of {BURST}"
        );
    }
}

/// The one log line of a write refused because the REST API is
/// unavailable: it names the API (without the password of its URL) and the
/// cause in words, once; nothing else is logged for the request.
async fn one_refusal_line(rest_url: &str, detail: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = dir.path().join("cluster-secret");
    std::fs::write(&secret, SECRET).expect("write secret file");
    let rw = RwgateProcess::start(&[
        "--auth",
        "rest",
        "--rest-url",
        rest_url,
        "--cluster-secret-file",
        secret.to_str().expect("utf-8 path"),
        "--upstream-url",
        "http://127.0.0.1:1/api/v1/receive",
        "--set",
        "auth.rest_timeout=300ms",
    ])
    .await;
    let body = write_body(vec![series("up", &[("job", "auth")], 1.0, now_ms())]);
    let req = rw_post(&client(), &rw.url("/api/v1/write"), Some(TENANT_A), body);
    let (status, _) =
        status_body(req.basic_auth("a", Some("pw")).send().await.expect("POST")).await;
    assert_eq!(status, 503);
    let log = wait_for("the refusal's log line", Duration::from_secs(10), || {
        let log = rw.child.log();
        async move { log.contains("reason=\"auth_unavailable\"").then_some(log) }
    })
    .await;
    let lines: Vec<&str> = log.lines().filter(|l| l.contains(TENANT_A)).collect();
    assert_eq!(lines.len(), 1, "{log}");
    let want = format!("detail=\"{detail}\"");
    assert!(lines[0].contains(&want), "{want}\n{}", lines[0]);
    assert!(!log.contains("pw-in-url"), "{log}");
    assert!(!log.contains("client error"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_rest_connection_is_one_log_line_naming_the_api() {
    let port = free_port();
    one_refusal_line(
        &format!("http://user:pw-in-url@127.0.0.1:{port}"),
        &format!(
            "cannot reach the REST API (auth.rest_url) at http://***@127.0.0.1:{port}: \
             connection refused"
        ),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rest_api_that_does_not_answer_is_one_log_line_naming_it() {
    let rest = RestApi::start(SECRET).await;
    rest.set_mode(RestMode::Hang);
    let url = rest.url().replacen("http://", "http://user:pw-in-url@", 1);
    let masked = rest.url().replacen("http://", "http://***@", 1);
    let detail = format!("the REST API (auth.rest_url) at {masked} did not answer within 300ms");
    one_refusal_line(&url, &detail).await;
}
