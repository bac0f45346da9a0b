//! A request cancelled while its credentials are being looked up (the
//! sender hung up, or its deadline passed) leaves nothing behind. The
//! hand-made single-flight map kept an entry for every account id whose
//! lookup was cancelled, so random ids and disconnects grew it without
//! bound. Measured as the resident set of the test process (nextest runs
//! each test in its own process).

mod common;

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Wake, Waker};

use rwgate::auth::Authenticator;
use rwgate::config::{AuthConfig, AuthMode};

fn rss() -> u64 {
    common::proc_status_bytes(std::process::id(), "VmRSS")
}

struct Noop;

impl Wake for Noop {
    fn wake(self: Arc<Self>) {}
}

#[tokio::test(flavor = "current_thread")]
async fn cancelled_lookups_leave_nothing_behind() {
    // A REST API whose connections wait in the listen backlog, never
    // answered: every lookup is still in flight when it is cancelled.
    let rest = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "s").expect("write secret");
    let cfg = AuthConfig {
        mode: AuthMode::Rest,
        rest_url: Some(format!("http://{}", rest.local_addr().expect("addr"))),
        cluster_secret_file: Some(secret),
        ..AuthConfig::default()
    };
    let auth = Authenticator::from_config(&cfg).expect("authenticator");

    // Each request polls its lookup once (it starts the REST call) and is
    // then dropped, as hyper drops a handler whose client went away. The
    // runtime gets a turn now and then, to release the closed sockets.
    let waker = Waker::from(Arc::new(Noop));
    let cancel_lookups = |from: u64, n: u64| {
        let auth = &auth;
        let waker = &waker;
        async move {
            let mut cx = Context::from_waker(waker);
            for i in from..from + n {
                let account = uuid::Uuid::from_u64_pair(0x0c00_0000_0000_4000, i)
                    .hyphenated()
                    .to_string();
                let lookup = std::pin::pin!(auth.authenticate(&account, Some(b"Basic eDp5")));
                assert!(
                    lookup.poll(&mut cx).is_pending(),
                    "the lookup waits for the REST API"
                );
                if i % 64 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    };
    cancel_lookups(0, 2_000).await;
    let before = rss();
    const N: u64 = 20_000;
    cancel_lookups(2_000, N).await;
    // An entry left per account id is well over 100 bytes (the id, a lock,
    // the map's slot): 20,000 of them are megabytes.
    let grown = rss().saturating_sub(before);
    let per_lookup = grown / N;
    assert!(
        per_lookup < 64,
        "resident set grew by {grown} bytes over {N} cancelled lookups ({per_lookup} bytes each)"
    );
}
