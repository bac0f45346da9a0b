//! Answers from the upstream and the REST API are read only up to a cap: a
//! misbehaving server answering hundreds of megabytes costs rwgate a few
//! KiB, not the whole body in memory. Checked as the bytes the server got
//! to hand over before rwgate closed the connection (the socket buffers
//! hold a few MiB of them); the peak RSS of the gateway process is printed
//! for the record.

mod common;

use common::*;

const MB: u64 = 1 << 20;
/// As large as the probe's answer.
const HUGE: u64 = 300 * MB;
/// Socket buffers on both ends (loopback autotuning) plus one chunk.
const READ_BOUND: u64 = 32 * MB;

/// The gateway process's peak resident set, in MiB.
fn peak_rss_mib(pid: u32) -> u64 {
    proc_status_bytes(pid, "VmHWM") / MB
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_upstream_refusal_is_read_only_up_to_a_cap() {
    let upstream = HugeAnswer::start(400, "out of order sample", HUGE).await;
    let url = format!("http://{}/api/v1/receive", upstream.addr);
    let gw = RwgateProcess::start(&["--auth", "none", "--upstream-url", &url]).await;
    let before = peak_rss_mib(gw.child.pid());
    let body = write_body(vec![series("up", &[("job", "caps")], 1.0, now_ms())]);
    let req = rw_post(&client(), &gw.url("/api/v1/write"), Some(TENANT_A), body);
    assert_eq!(
        send_status_body(req).await,
        (
            400,
            "upstream rejected the write: out of order sample\n".to_string()
        )
    );
    let sent = upstream.sent();
    eprintln!(
        "upstream handed over {} MiB of {} MiB; rwgate peak RSS {} MiB before, {} MiB after",
        sent / MB,
        HUGE / MB,
        before,
        peak_rss_mib(gw.child.pid())
    );
    assert!(
        sent < READ_BOUND,
        "rwgate read {} MiB of the upstream's answer",
        sent / MB
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_rest_api_answer_is_an_outage_read_only_up_to_a_cap() {
    let prom = Prometheus::start().await;
    let rest = HugeAnswer::start(200, "{\"config\": {", HUGE).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "s").expect("write secret");
    let mut cfg = test_config(&prom.write_url());
    cfg.auth.mode = rwgate::config::AuthMode::Rest;
    cfg.auth.rest_url = Some(format!("http://{}", rest.addr));
    cfg.auth.cluster_secret_file = Some(secret);
    let gw = Gateway::start(cfg).await;
    let body = write_body(vec![series("up", &[("job", "caps")], 1.0, now_ms())]);
    let req = rw_post(&client(), &gw.write_url(), Some(TENANT_A), body).basic_auth("a", Some("pw"));
    assert_eq!(
        send_status_body(req).await,
        (
            503,
            "cannot verify credentials right now; retry later\n".to_string()
        )
    );
    let sent = rest.sent();
    assert!(
        sent < READ_BOUND,
        "rwgate read {} MiB of the REST API's answer",
        sent / MB
    );
    gw.stop().await;
}
