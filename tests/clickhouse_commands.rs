//! `rwgate migrate`, `reconcile` and `rollup` as an operator runs them,
//! against a real ClickHouse (18.16 and 26.9): they need the ClickHouse settings and
//! nothing of the serving path (no auth settings at all here, while
//! `auth.mode` defaults to `rest`); their output and errors are one line,
//! with no debug syntax and no colour codes.

mod common;

use std::time::{Duration, Instant};

use common::clickhouse::*;
use common::*;

const ACCOUNT: &str = "0b000000-0000-4000-8000-000000000001";
/// 2024-03-03T00:00:00Z.
const DAY: i64 = 1_709_424_000;

on_both_engines!(migrate_and_reconcile_need_only_the_clickhouse_settings);

async fn migrate_and_reconcile_need_only_the_clickhouse_settings(engine: Engine) {
    let ch = ClickHouseServer::start_engine(engine);
    // A database named like a number: the setting is a name, whatever it
    // looks like.
    ch.exec("CREATE DATABASE `2024`").await;
    let url = ch.url();
    let migrate = [
        "migrate",
        "--clickhouse-url",
        &url,
        "--set",
        "clickhouse.database=2024",
    ];
    let (code, out, err) = run_rwgate(&migrate, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with(&format!("clickhouse {}", engine.version_prefix()))
            && out.ends_with(": tables created: kubecost_samples, kubecost_series, expenses, rwgate_rollup_state, kubecost_touched, rwgate_resources; columns added: none\n"),
        "{out}"
    );
    assert_eq!(err, "", "nothing else is printed");
    let tables = ch
        .rows("SELECT name FROM system.tables WHERE database = '2024' ORDER BY name")
        .await;
    assert_eq!(tables.len(), 6, "{tables:?}");
    // Again: nothing to do, said without debug syntax.
    let (code, out, err) = run_rwgate(&migrate, &[("RWGATE_CLICKHOUSE_DATABASE", "ignored")]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.ends_with(": tables created: none; columns added: none\n"),
        "{out}"
    );

    // One day of a namespace at 2 USD/h, one sample a minute.
    let values: Vec<String> = (0..1440)
        .map(|m| {
            format!(
                "('{ACCOUNT}', '{NS_METRIC}', 'c', 'web', '', 1, {}, 2.0, now())",
                (DAY + m * 60) * 1000
            )
        })
        .collect();
    ch.exec(&format!(
        "INSERT INTO `2024`.kubecost_samples (account, metric, cluster, namespace, pod, series_id, ts, value, ingest_time) VALUES {}",
        values.join(",")
    ))
    .await;
    let (code, out, err) = run_rwgate(
        &[
            "reconcile",
            "--from",
            "2024-03-03",
            "--to",
            "2024-03-03",
            "--account",
            ACCOUNT,
            "--clickhouse-url",
            &url,
        ],
        // Rows under cloud resource ids: with registration on (auth.mode =
        // rest by default) and no REST API given, rows would wait for the
        // serving rollup to register their resources.
        &[
            ("RWGATE_CLICKHOUSE_DATABASE", "2024"),
            ("RWGATE_RESOURCES_ENABLED", "false"),
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        format!("reconciled 2024-03-03 to 2024-03-03 ({ACCOUNT}): 1 buckets examined, 1 changed, 1 rows written, 0 waiting for registration\n")
    );
    let cost = ch
        .rows("SELECT SUM(cost * sign) AS c FROM `2024`.expenses")
        .await;
    let cost = cost[0]["c"].as_f64().expect("a sum");
    assert!(rel_close(cost, 48.0, 1e-9), "{cost}");
}

#[test]
fn an_unreachable_clickhouse_is_one_line_naming_it() {
    let port = free_port();
    for (cmd, extra) in [
        ("migrate", &[][..]),
        (
            "reconcile",
            &["--from", "2024-03-01", "--to", "2024-03-02"][..],
        ),
    ] {
        let url = format!("http://user:secret@127.0.0.1:{port}");
        let mut args = vec![cmd, "--clickhouse-url", &url];
        args.extend_from_slice(extra);
        let (code, out, err) = run_rwgate(&args, &[]);
        assert_eq!(code, 1, "{cmd}: {err}");
        assert_eq!(out, "");
        let want = format!(
            "rwgate: cannot reach ClickHouse at http://***@127.0.0.1:{port}: connection refused\n"
        );
        assert_eq!(err, want, "{cmd}");
        assert_eq!(err.lines().count(), 1, "{cmd}: {err}");
        assert!(!err.contains("client error"), "{cmd}: {err}");
        assert!(!err.contains("secret"), "{cmd}: {err}");
    }
}

#[test]
fn reconcile_refuses_a_backward_range_and_an_account_that_is_not_a_uuid() {
    let cases: [(&[&str], &str); 4] = [
        (
            &["--from", "2026-11-21", "--to", "2026-11-01"],
            "rwgate: invalid --from: 2026-11-21 is after --to 2026-11-01\n",
        ),
        (
            &["--from", "2026-11-01", "--to", "2026-11-21", "--account", "acme"],
            "rwgate: invalid value 'acme' for '--account <UUID>': not a UUID (a Cloud-Account-Id)\n",
        ),
        (
            &["--from", "2026-02-30", "--to", "2026-03-01"],
            "rwgate: invalid value '2026-02-30' for '--from <DAY>': not a date: expected YYYY-MM-DD between 1970-01-01 and 2105-12-31\n",
        ),
        (
            &["--from", "2026-11-01"],
            "rwgate: the following required arguments were not provided: --to <DAY>\n",
        ),
    ];
    for (args, want) in cases {
        let mut all = vec!["reconcile", "--clickhouse-url", "http://127.0.0.1:1"];
        all.extend_from_slice(args);
        let (code, out, err) = run_rwgate(&all, &[]);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert_eq!(out, "");
        assert_eq!(err, want, "{args:?}");
    }
}

/// `rwgate rollup` is the one rollup writer, so it is the one that
/// registers resources: with registration on (the default with
/// `auth.mode = "rest"`) and no REST API to call, its rows would wait
/// forever; it refuses to start, saying what to set.
#[test]
fn rollup_needs_a_rest_api_to_register_with() {
    let (code, out, err) = run_rwgate(&["rollup", "--clickhouse-url", "http://127.0.0.1:1"], &[]);
    assert_eq!(code, 2, "{err}");
    assert_eq!(out, "");
    assert_eq!(
        err,
        "rwgate: invalid resources.rest_url: registration is on (resources.enabled, or auth.mode = \"rest\"): set resources.rest_url and resources.cluster_secret_file (or auth.rest_url and auth.cluster_secret_file), or resources.enabled = false\n"
    );
}

/// Log lines carry no colour codes when stderr is a file, and values are
/// written for people (`interval=1s`, not `1s` in debug syntax, nor a
/// jittered backoff's nanoseconds).
#[tokio::test]
async fn logs_have_no_colour_off_a_terminal_and_no_debug_syntax() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = rwgate_cmd();
    cmd.args([
        "rollup",
        "--clickhouse-url",
        &format!("http://127.0.0.1:{}", free_port()),
        "--rollup-interval",
        "1s",
        "--set",
        "spool.retry_backoff=10ms",
        "--set",
        "resources.enabled=false",
    ]);
    let mut child = ChildGuard::spawn("rwgate rollup", cmd, dir.path().join("rwgate.log"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !child.log().contains("clickhouse migrate failed") {
        assert!(
            Instant::now() < deadline,
            "no retry logged:\n{}",
            child.log_tail()
        );
        assert!(child.try_wait().is_none(), "exited:\n{}", child.log_tail());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.signal("TERM");
    let status = child.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "{status:?}:\n{}", child.log_tail());
    let log = child.log();
    assert!(!log.contains('\x1b'), "{log}");
    assert!(log.contains("rollup started interval=1s"), "{log}");
    let retry = log
        .lines()
        .find(|l| l.contains("clickhouse migrate failed"))
        .expect("a retry line");
    let wait = retry
        .split("retry_in=")
        .nth(1)
        .and_then(|w| w.split_whitespace().next())
        .expect("retry_in");
    assert!(
        wait.ends_with("ms") && humantime::parse_duration(wait).is_ok(),
        "{retry}"
    );
}
