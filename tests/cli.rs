//! The CLI contract operators script against: `check-config` prints the
//! effective config (secrets redacted, loadable again), flags and
//! `RWGATE_*` variables override, and a bad config exits non-zero naming the
//! bad field — for `check-config` and `serve` alike.

mod common;

use common::*;
use rwgate::config::{AuthMode, Config, Size};
use rwgate::settings::{Kind, Setting};
use std::path::Path;
use std::time::Duration;

/// The stdout of `rwgate` with `args` and `env`, which it must accept
/// (exit 0).
fn accepted(args: &[&str], env: &[(&str, &str)]) -> String {
    let (code, out, err) = run_rwgate(args, env);
    assert_eq!(code, 0, "{args:?} {env:?}: stderr {err}");
    out
}

/// The stderr of `rwgate` with `args` and `env`, which it must refuse
/// (exit 2).
fn refused(args: &[&str], env: &[(&str, &str)]) -> String {
    let (code, out, err) = run_rwgate(args, env);
    assert_eq!(code, 2, "{args:?} {env:?}: stdout {out} stderr {err}");
    err
}

/// That `rwgate` with `args` and `env` refuses to run, saying `line` and
/// nothing else.
fn assert_refused(args: &[&str], env: &[(&str, &str)], line: &str) {
    let err = refused(args, env);
    assert_eq!(err, format!("rwgate: {line}\n"), "{args:?} {env:?}");
}

/// Writes `text` to `rwgate.toml` in `dir` and returns its path, for
/// `--config`.
fn config_file(dir: &Path, text: &str) -> String {
    let file = dir.join("rwgate.toml");
    std::fs::write(&file, text).expect("write the config file");
    file.to_str().expect("utf-8 path").to_string()
}

/// A config file holding `text`, in a directory of its own that is
/// removed when the first value is dropped.
fn temp_config(text: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = config_file(dir.path(), text);
    (dir, file)
}

#[test]
fn check_config_prints_the_effective_config_redacted_and_reloadable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tenants = tenant_a_file(dir.path(), "a", "pw");
    let file = config_file(
        dir.path(),
        &format!("[limits]\nmax_body_bytes = \"2MiB\"\n[upstream]\nurl = \"https://user:hunter2@thanos:19291/api/v1/receive\"\n[auth]\nmode = \"static\"\ntenants_file = {:?}\n", tenants.to_str().expect("utf-8 path")),
    );
    let out = accepted(
        &[
            "check-config",
            "--config",
            &file,
            "--max-decoded-bytes",
            "32MiB",
        ],
        &[("RWGATE_LISTEN", "127.0.0.1:18935")],
    );
    assert!(!out.contains("hunter2"), "password printed:\n{out}");
    assert!(
        out.contains("url = \"https://***@thanos:19291/api/v1/receive\""),
        "{out}"
    );
    // The printed config is itself a valid config file with the merged values.
    let printed = rwgate::settings::from_toml(&out, "check-config output").expect("output parses");
    assert_eq!(printed.listen, "127.0.0.1:18935".parse().expect("addr"));
    assert_eq!(printed.limits.max_body_bytes, Size(2 << 20));
    assert_eq!(printed.limits.max_decoded_bytes, Size(32 << 20));
    assert_eq!(printed.auth.mode, AuthMode::Static);
    assert_eq!(
        printed.filter.allowlist,
        rwgate::config::DEFAULT_ALLOWLIST,
        "defaults are printed too"
    );
}

#[test]
fn check_config_reads_the_files_serve_would_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("missing.toml");
    let err = refused(
        &[
            "check-config",
            "--auth",
            "static",
            "--tenants-file",
            missing.to_str().expect("utf-8"),
        ],
        &[],
    );
    assert!(
        err.starts_with(&format!(
            "rwgate: invalid auth.tenants_file (from --tenants-file): cannot read {}: ",
            missing.display()
        )),
        "{err}"
    );
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[[tenant]]\nid = \"nope\"\ncredentials = \"x\"\n").expect("write");
    let err = refused(
        &[
            "check-config",
            "--auth",
            "static",
            "--tenants-file",
            bad.to_str().expect("utf-8"),
        ],
        &[],
    );
    assert!(err.contains("tenant[0].id \"nope\" is not a UUID"), "{err}");

    // The upstream's CA missing, then a PEM file without a certificate; then
    // CA, client certificate and key all usable.
    let pki = TestPki::new();
    let https = [
        "check-config",
        "--auth",
        "none",
        "--upstream-url",
        "https://thanos:19291/api/v1/receive",
    ];
    let err = refused(
        &[
            &https[..],
            &["--upstream-tls-ca", missing.to_str().expect("utf-8")],
        ]
        .concat(),
        &[],
    );
    assert!(err.starts_with("rwgate: upstream.tls.ca "), "{err}");
    let err = refused(
        &[
            &https[..],
            &["--upstream-tls-ca", pki.client_key.to_str().expect("utf-8")],
        ]
        .concat(),
        &[],
    );
    assert!(err.ends_with("no certificate found\n"), "{err}");
    let ok = [
        "--upstream-tls-ca",
        pki.ca.to_str().expect("utf-8"),
        "--upstream-tls-cert",
        pki.client_cert.to_str().expect("utf-8"),
        "--upstream-tls-key",
        pki.client_key.to_str().expect("utf-8"),
    ];
    let out = accepted(&[&https[..], &ok[..]].concat(), &[]);
    assert!(out.contains("[upstream.tls]"), "{out}");
}

#[test]
fn check_config_with_defaults_only_needs_an_auth_source() {
    let out = accepted(&["check-config", "--auth", "none"], &[]);
    assert!(out.contains("listen = \"0.0.0.0:8935\""), "{out}");
    assert!(
        out.contains("url = \"http://thanos-receive:19291/api/v1/receive\""),
        "{out}"
    );
    assert!(
        out.contains("tenant_header = \"Cloud-Account-Id\""),
        "{out}"
    );
}

#[test]
fn bad_config_exits_2_naming_the_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let typo = dir.path().join("typo.toml");
    std::fs::write(&typo, "[limits]\nmax_bdy_bytes = 1\n").expect("write");
    let typo = typo.to_str().expect("utf-8 path");
    let cases: &[(&[&str], &str)] = &[
        (
            &[],
            "rwgate: invalid auth.rest_url: required when auth.mode is rest",
        ),
        (
            &["--auth", "rest", "--rest-url", "http://restapi:8999"],
            "rwgate: invalid auth.cluster_secret_file: required when auth.mode is rest",
        ),
        (
            &["--auth", "static"],
            "rwgate: invalid auth.tenants_file: required when auth.mode is static",
        ),
        (
            &["--auth", "none", "--allowlist", "kube_("],
            "rwgate: invalid filter.allowlist (from --allowlist): `kube_(` is not a valid regex: unclosed group",
        ),
        (
            &["--auth", "none", "--upstream-url", "ftp://thanos/"],
            "rwgate: invalid upstream.url (from --upstream-url): `ftp://thanos/` ",
        ),
        (
            &["--auth", "none", "--tls-cert", "/x.pem"],
            "rwgate: invalid tls.key: tls.cert is set but tls.key is not",
        ),
        (
            &[
                "--auth",
                "none",
                "--upstream-url",
                "https://thanos/",
                "--upstream-tls-cert",
                "/x.pem",
            ],
            "rwgate: invalid upstream.tls.key: upstream.tls.cert is set but upstream.tls.key is not",
        ),
        (
            &["--auth", "none", "--upstream-tls-ca", "/ca.pem"],
            "rwgate: invalid upstream.tls.ca (from --upstream-tls-ca): needs an https:// upstream.url",
        ),
        (
            &[
                "--auth",
                "none",
                "--max-body-bytes",
                "2MiB",
                "--max-decoded-bytes",
                "1MiB",
            ],
            "rwgate: invalid limits.max_decoded_bytes (from --max-decoded-bytes): must be at least limits.max_body_bytes",
        ),
        (
            &["--auth", "none", "--tenant-labels", "tenant-id"],
            "rwgate: invalid tenancy.labels (from --tenant-labels): `tenant-id` is not a usable label name",
        ),
        (&["--auth", "none", "--config", typo], "max_bdy_bytes"),
        (
            &["--auth", "none", "--config", "/nonexistent/rwgate.toml"],
            "rwgate: cannot read config file /nonexistent/rwgate.toml",
        ),
    ];
    for command in ["check-config", "serve"] {
        for (args, want) in cases {
            let mut all = vec![command];
            all.extend_from_slice(args);
            let (code, out, err) = run_rwgate(&all, &[]);
            assert_eq!(code, 2, "{all:?}: stdout {out} stderr {err}");
            assert!(
                err.contains(want),
                "{all:?}: want {want:?} in stderr:\n{err}"
            );
            assert!(out.is_empty(), "{all:?}: nothing on stdout, got {out}");
        }
    }

    // Flag values of the wrong type are refused by the parser, naming the flag.
    let err = refused(&["check-config", "--max-body-bytes", "lots"], &[]);
    assert!(err.contains("--max-body-bytes"), "{err}");
    let err = refused(&["check-config", "--auth", "ldap"], &[]);
    assert!(err.contains("--auth"), "{err}");
    // ... and so are bad environment values, naming the variable.
    assert_refused(
        &["check-config"],
        &[("RWGATE_AUTH_MODE", "ldap")],
        "invalid auth.mode = `ldap` (from RWGATE_AUTH_MODE): expected one of \"rest\", \"static\", \"none\"",
    );
}

/// A value that does not fit its setting is refused in one line: the
/// setting, the value once and as written (no Rust escaping), where it came
/// from, and what the setting takes in words (no Rust type names).
#[test]
fn setting_errors_are_one_line_in_words_with_the_value_as_written() {
    let (_dir, file) =
        temp_config("[limits]\nmax_label_name_bytes = -3\n[upstream]\ntls = \"yes\"\n");
    /// Arguments, environment, the error line.
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case] = &[
        (
            &["--set", "limits.max_label_value_bytes=-2"],
            &[],
            "invalid limits.max_label_value_bytes = `-2` (from --set): expected a whole number from 0 to 18446744073709551615",
        ),
        (
            &["--set", "log.max_rejections_per_sec=5000000000"],
            &[],
            "invalid log.max_rejections_per_sec = `5000000000` (from --set): expected a whole number from 0 to 4294967295",
        ),
        (
            &[],
            &[("RWGATE_SPOOL_MAX_BYTES", "-7")],
            "invalid spool.max_bytes = `-7` (from RWGATE_SPOOL_MAX_BYTES): expected a size such as 16MiB, or a number of bytes",
        ),
        (
            &[],
            &[("RWGATE_UPSTREAM_TIMEOUT", "D:\\t\"o")],
            "invalid upstream.timeout = `D:\\t\"o` (from RWGATE_UPSTREAM_TIMEOUT): expected a duration such as 30s, 500ms or 1h 30m",
        ),
        (
            &["--set", "rollup.grain=week"],
            &[],
            "invalid rollup.grain = `week` (from --set): expected \"day\" or \"hour\"",
        ),
        (
            &["--config", &file],
            &[],
            &format!("invalid limits.max_label_name_bytes = `-3` (from config file {file}): expected a whole number from 0 to 18446744073709551615"),
        ),
        (
            &["--config", &file, "--set", "limits.max_label_name_bytes=9"],
            &[],
            &format!("invalid upstream.tls = `yes` (from config file {file}): expected a section [upstream.tls]"),
        ),
        (
            &["--set", "filter.allowlist=kube_(|up"],
            &[],
            "invalid filter.allowlist (from --set): `kube_(|up` is not a valid regex: unclosed group",
        ),
        (
            &["--set", "clickhouse.series_table=a\\b"],
            &[],
            "invalid clickhouse.series_table (from --set): `a\\b` must be a plain identifier ([A-Za-z_][A-Za-z0-9_]*)",
        ),
        (
            &["--set", "spool.segment_bytes=1.5MiB"],
            &[],
            "invalid spool.segment_bytes = `1.5MiB` (from --set): a size is a whole number of its unit: write 512MiB, not 0.5GiB",
        ),
        (
            &["--metrics-listen", "localhost"],
            &[],
            "invalid metrics_listen = `localhost` (from --metrics-listen): invalid socket address syntax",
        ),
    ];
    for (args, env, want) in cases {
        let all = [&["check-config", "--auth", "none"][..], args].concat();
        let err = refused(&all, env);
        assert_eq!(err, format!("rwgate: {want}\n"), "{all:?} {env:?}");
    }
}

/// An empty value means nothing for a setting that must have one: it is
/// refused (`RWGATE_LOG_LEVEL=` would silence every log line, errors
/// included), while it unsets a setting that may be unset.
#[test]
fn empty_values_of_required_settings_are_refused() {
    for (name, want) in [
        ("RWGATE_LOG_LEVEL", "log.level"),
        ("RWGATE_FILTER_ALLOWLIST", "filter.allowlist"),
        ("RWGATE_SPOOL_DIR", "spool.dir"),
    ] {
        let err = refused(&["check-config", "--auth", "none"], &[(name, "")]);
        assert_eq!(
            err,
            format!("rwgate: invalid {want} = \"\" (from {name}): must not be empty\n")
        );
    }
    let (_dir, file) = temp_config("[log]\nlevel = \"\"\n");
    let err = refused(&["serve", "--auth", "none", "--config", &file], &[]);
    assert_eq!(
        err,
        format!("rwgate: invalid log.level = \"\" (from config file {file}): must not be empty\n")
    );
    // Optional: unset.
    let out = accepted(
        &["check-config", "--auth", "none"],
        &[("RWGATE_CLICKHOUSE_URL", ""), ("RWGATE_METRICS_LISTEN", "")],
    );
    assert!(!out.contains("metrics_listen"), "{out}");
}

/// `check-config` refuses what `serve` refuses at start, and both in the
/// same line naming the setting: the files they read (the ClickHouse
/// password, the cluster secret registration sends, the auth files) and a
/// ClickHouse URL the client cannot speak to.
#[test]
fn check_config_refuses_what_serve_refuses() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("missing");
    let missing = missing.to_str().expect("utf-8");
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "\n").expect("write");
    let empty = empty.to_str().expect("utf-8");
    let dir_path = dir.path().to_str().expect("utf-8");
    // A ClickHouse nothing listens on: nothing may get as far as connecting.
    let tee = ["--clickhouse-url", "http://127.0.0.1:1"];
    let missing_secret = format!("resources.cluster_secret_file={missing}");
    let empty_secret = format!("resources.cluster_secret_file={empty}");
    let registering = [
        "--set",
        "resources.enabled=true",
        "--set",
        "resources.rest_url=http://127.0.0.1:4",
    ];
    let cases: Vec<(Vec<&str>, String)> = vec![
        (
            [&tee[..], &["--clickhouse-password-file", missing]].concat(),
            format!("invalid clickhouse.password_file (from --clickhouse-password-file): cannot read {missing}: No such file or directory (os error 2)"),
        ),
        (
            [
                &tee[..],
                &registering[..],
                &["--set", &missing_secret],
            ]
            .concat(),
            format!("invalid resources.cluster_secret_file (from --set): cannot read the cluster secret file {missing}: No such file or directory (os error 2)"),
        ),
        (
            [
                &tee[..],
                &registering[..],
                &["--set", &empty_secret],
            ]
            .concat(),
            format!("invalid resources.cluster_secret_file (from --set): the cluster secret file {empty} is empty"),
        ),
        (
            vec!["--clickhouse-url", "https://clickhouse:8443"],
            "invalid clickhouse.url (from --clickhouse-url): `https://clickhouse:8443` is https, and rwgate talks to ClickHouse over plain http only: use http:// (through a TLS proxy if the link must be encrypted)".into(),
        ),
    ];
    for (args, want) in &cases {
        for command in ["check-config", "serve"] {
            let all = [
                &[command, "--auth", "none", "--listen", "127.0.0.1:0"][..],
                &args[..],
            ]
            .concat();
            let err = refused(&all, &[]);
            assert_eq!(err, format!("rwgate: {want}\n"), "{all:?}");
        }
    }
    // The auth files name their setting.
    let err = refused(
        &[
            "check-config",
            "--auth",
            "rest",
            "--rest-url",
            "http://127.0.0.1:4",
            "--cluster-secret-file",
            dir_path,
        ],
        &[],
    );
    assert!(
        err.starts_with(&format!(
            "rwgate: invalid auth.cluster_secret_file (from --cluster-secret-file): cannot read {dir_path}: "
        )),
        "{err}"
    );
    // Registration off, or no rollup: the secret is not read, by either.
    let out = accepted(
        &[
            &["check-config", "--auth", "none", "--rollup", "false"][..],
            &tee[..],
            &registering[..],
            &["--set", &missing_secret],
        ]
        .concat(),
        &[],
    );
    assert!(out.contains("[resources]"), "{out}");
}

/// What only `serve` can find out (files it must read, the port) also ends
/// the process non-zero with the reason.
#[test]
fn serve_fails_fast_on_unusable_files_and_ports() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tenants = tenants_file(dir.path(), &[("nope", "x", None)]);
    let (code, _, err) = run_rwgate(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--auth",
            "static",
            "--tenants-file",
            tenants.to_str().expect("utf-8"),
        ],
        &[],
    );
    assert_ne!(code, 0);
    assert!(err.contains("tenant[0].id"), "{err}");

    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let (code, _, err) = run_rwgate(&["serve", "--listen", &addr, "--auth", "none"], &[]);
    assert_ne!(code, 0);
    assert!(err.contains(&format!("cannot listen on {addr}")), "{err}");
}

/// A value for `setting` other than its default (`default`, as JSON), of
/// the right type.
fn other_value(setting: &Setting, default: &serde_json::Value) -> String {
    use serde_json::Value as J;
    match (setting.kind, default) {
        (Kind::Bool, J::Bool(b)) => (!b).to_string(),
        // Unset: follows another setting (`resources.enabled`).
        (Kind::Bool, J::Null) => "false".into(),
        (Kind::Choice(names), J::Null) => names[0].to_string(),
        (Kind::Integer { .. }, J::Number(n)) => (n.as_u64().expect("unsigned") + 1).to_string(),
        (Kind::Float, J::Number(n)) => (n.as_f64().expect("a number") / 2.0).to_string(),
        (Kind::Size, J::String(size)) => {
            (size.parse::<Size>().expect("a size").bytes() + 4096).to_string()
        }
        (Kind::Choice(names), J::String(d)) => names
            .iter()
            .find(|n| *n != d)
            .expect("another choice")
            .to_string(),
        (Kind::List, _) => "a,b".into(),
        (Kind::Duration, J::String(d)) => format!("{d} 1ms"),
        (Kind::Text, J::String(d)) if d.parse::<std::net::SocketAddr>().is_ok() => {
            "127.0.0.1:9".into()
        }
        (Kind::Text, J::String(d)) => format!("{d}2"),
        (Kind::Text, J::Null) => "2024".into(),
        other => panic!("no test value for {}: {other:?}", setting.path),
    }
}

/// Every setting of the tree (the list is read off the serde tree, so new
/// settings are covered without touching this test) is read from its
/// `RWGATE_<PATH>` variable and from `--set` by the binary: either
/// `check-config` prints the new value, or it refuses it naming the setting
/// (a value can be valid for its type and still break a rule, such as
/// `tls.cert` without `tls.key`).
#[test]
fn every_setting_is_read_from_its_environment_variable_and_from_set() {
    let defaults = serde_json::to_value(Config::default()).expect("json");
    let at = |tree: &serde_json::Value, path: &str| {
        tree.pointer(&format!("/{}", path.replace('.', "/")))
            .cloned()
            .unwrap_or_else(|| panic!("{path} in {tree}"))
    };
    let all = rwgate::settings::all();
    // One variable per setting, and no variable for two settings (as
    // `a.b_c` and `a_b.c` would share RWGATE_A_B_C).
    let names: std::collections::BTreeSet<String> = all.iter().map(|s| s.env_name()).collect();
    assert_eq!(names.len(), all.len(), "two settings share a variable");
    for s in &all {
        let raw = other_value(s, &at(&defaults, &s.path));
        let set = format!("{}={raw}", s.path);
        let env = s.env_name();
        // `auth.mode=none` spares every other setting the REST settings;
        // auth.mode itself is left to its own value.
        let base: Vec<&str> = if s.path == "auth.mode" {
            vec!["check-config"]
        } else {
            vec!["check-config", "--set", "auth.mode=none"]
        };
        let with_set = [&base[..], &["--set", &set]].concat();
        let runs = [
            (base.clone(), vec![(env.as_str(), raw.as_str())]),
            (with_set, vec![]),
        ];
        for (args, env) in runs {
            let (code, out, err) = run_rwgate(&args, &env);
            if code == 0 {
                let printed: toml::Value = toml::from_str(&out).expect("check-config prints TOML");
                let printed = serde_json::to_value(printed).expect("json");
                let got = printed.pointer(&format!("/{}", s.path.replace('.', "/")));
                assert!(
                    got.is_some() && got != Some(&at(&defaults, &s.path)),
                    "{args:?} {env:?}: {} unchanged in\n{out}",
                    s.path
                );
            } else {
                assert_eq!(code, 2, "{args:?} {env:?}: {err}");
                assert!(err.contains(&s.path), "{args:?} {env:?}: {err}");
            }
        }
    }
}

#[test]
fn environment_variables_of_settings_unset_by_default_are_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tenants = tenant_a_file(dir.path(), "a", "pw");
    let tenants = tenants.to_str().expect("utf-8");
    let out = accepted(
        &["check-config"],
        &[
            ("RWGATE_AUTH_MODE", "static"),
            ("RWGATE_AUTH_TENANTS_FILE", tenants),
            ("RWGATE_AUTH_REST_URL", "http://restapi:8999"),
            ("RWGATE_AUTH_CLUSTER_SECRET_FILE", "/secret"),
            ("RWGATE_CLICKHOUSE_DATABASE", "2024"),
            ("RWGATE_CLICKHOUSE_USER", "1"),
        ],
    );
    let c = rwgate::settings::from_toml(&out, "check-config output").expect("output parses");
    assert_eq!(c.auth.mode, AuthMode::Static);
    assert_eq!(
        c.auth.tenants_file.as_deref(),
        Some(std::path::Path::new(tenants))
    );
    assert_eq!(c.auth.rest_url.as_deref(), Some("http://restapi:8999"));
    assert_eq!(
        c.auth.cluster_secret_file.as_deref(),
        Some(std::path::Path::new("/secret"))
    );
    assert_eq!(c.clickhouse.database, "2024", "a name, not a number");
    assert_eq!(c.clickhouse.user.as_deref(), Some("1"));

    assert_refused(
        &["check-config", "--auth", "none"],
        &[("RWGATE_LIMITS_MAX_SERIES_PER_REQUEST", "many")],
        "invalid limits.max_series_per_request = `many` (from RWGATE_LIMITS_MAX_SERIES_PER_REQUEST): expected a whole number from 0 to 18446744073709551615",
    );
    // The names of an earlier release are refused, not ignored.
    assert_refused(
        &["check-config", "--auth", "none"],
        &[("RWGATE_TENANTS_FILE", tenants)],
        "RWGATE_TENANTS_FILE is no longer read: set RWGATE_AUTH_TENANTS_FILE instead",
    );
}

/// File, then environment, then `--set`, then the named flags.
#[test]
fn one_precedence_for_every_source() {
    let (_dir, file) = temp_config("[auth]\nmode = \"none\"\n[upstream]\nmax_retries = 1\ntimeout = \"1s\"\nurl = \"http://file/\"\npool_max_idle = 1\n");
    let out = accepted(
        &[
            "check-config",
            "--config",
            &file,
            "--set",
            "upstream.timeout=3s",
            "--set",
            "upstream.url=http://set/",
            "--upstream-url",
            "http://flag/",
        ],
        &[
            ("RWGATE_UPSTREAM_MAX_RETRIES", "2"),
            ("RWGATE_UPSTREAM_TIMEOUT", "2s"),
            ("RWGATE_UPSTREAM_URL", "http://env/"),
        ],
    );
    let c = rwgate::settings::from_toml(&out, "check-config output").expect("output parses");
    assert_eq!(c.upstream.pool_max_idle, 1, "file");
    assert_eq!(c.upstream.max_retries, 2, "environment over file");
    assert_eq!(
        c.upstream.timeout,
        std::time::Duration::from_secs(3),
        "--set over environment"
    );
    assert_eq!(c.upstream.url, "http://flag/", "flag over --set");
}

/// What check-config prints reads back as the same config, durations
/// written as people write them.
#[test]
fn check_config_prints_durations_as_written_and_nothing_in_debug_syntax() {
    let out = accepted(
        &[
            "check-config",
            "--auth",
            "none",
            "--set",
            "upstream.timeout=90m",
        ],
        &[],
    );
    assert!(out.contains("max_sample_age = \"365d\"\n"), "{out}");
    assert!(out.contains("timeout = \"1h 30m\"\n"), "{out}");
    assert!(out.contains("commit_delay = \"1ms\"\n"), "{out}");
    assert!(
        !out.contains("months") && !out.contains("None") && !out.contains("Some("),
        "{out}"
    );
    let c = rwgate::settings::from_toml(&out, "check-config output").expect("output parses");
    assert_eq!(
        c.spool.max_sample_age,
        std::time::Duration::from_secs(365 * 86_400)
    );
    let again = c.to_redacted_toml();
    assert_eq!(again, out, "printing the printed config changes nothing");
}

/// Each subcommand offers only the flags of the settings it uses.
#[test]
fn subcommands_take_only_their_own_flags() {
    let help = |cmd: &str| accepted(&[cmd, "--help"], &[]);
    let flags = |text: &str| -> Vec<String> {
        text.split_whitespace()
            .filter(|w| w.starts_with("--"))
            .map(|w| {
                w.trim_end_matches([',', '.'])
                    .split(['=', '['])
                    .next()
                    .unwrap_or(w)
                    .to_string()
            })
            .collect()
    };
    let serve = flags(&help("serve"));
    for f in [
        "--listen",
        "--auth",
        "--rest-url",
        "--clickhouse-url",
        "--spool-dir",
        "--rollup",
        "--config",
        "--set",
    ] {
        assert!(serve.iter().any(|x| x == f), "serve lacks {f}");
    }
    for (cmd, own, foreign) in [
        (
            "migrate",
            &["--clickhouse-url", "--clickhouse-database", "--log-level"][..],
            &[
                "--auth",
                "--listen",
                "--spool-dir",
                "--charge",
                "--upstream-url",
                "--rollup",
            ][..],
        ),
        (
            "reconcile",
            &[
                "--from",
                "--to",
                "--account",
                "--clickhouse-url",
                "--charge",
                "--expense-grain",
                "--rest-url",
            ],
            &[
                "--tenants-file",
                "--listen",
                "--spool-dir",
                "--rollup",
                "--rollup-interval",
                "--max-body-bytes",
            ],
        ),
        (
            "rollup",
            &[
                "--clickhouse-url",
                "--charge",
                "--rollup-interval",
                "--shutdown-grace",
                "--auth",
                "--rest-url",
                "--cluster-secret-file",
            ],
            &[
                "--listen",
                "--spool-dir",
                "--tenants-file",
                "--auth-cache-ttl",
            ],
        ),
    ] {
        let text = help(cmd);
        let listed = flags(&text);
        for f in own.iter().chain(["--config", "--set"].iter()) {
            assert!(listed.iter().any(|x| x == f), "{cmd} lacks {f}:\n{text}");
        }
        for f in foreign {
            assert!(!listed.iter().any(|x| x == f), "{cmd} offers {f}:\n{text}");
            let err = refused(&[cmd, f, "x"], &[]);
            assert_eq!(err, format!("rwgate: unexpected argument '{f}' found\n"));
        }
    }
}

/// `serve`'s start-up line names where it serves, with or without
/// `metrics_listen`, in words and addresses: no `None`, no `Some(..)`, no
/// colour codes in a log file.
#[tokio::test]
async fn serve_logs_its_addresses_without_debug_syntax() {
    let metrics = format!("127.0.0.1:{}", free_port());
    for extra in [vec![], vec!["--metrics-listen", metrics.as_str()]] {
        let mut args = vec!["--auth", "none"];
        args.extend_from_slice(&extra);
        let rw = RwgateProcess::start(&args).await;
        let line = wait_for("the start-up line", Duration::from_secs(10), || {
            let log = rw.child.log();
            async move {
                log.lines()
                    .find(|l| l.contains("rwgate serving"))
                    .map(String::from)
            }
        })
        .await;
        let listen = rw.addr().to_string();
        let operator = if extra.is_empty() { &listen } else { &metrics };
        assert!(line.contains(&format!("listen={listen} ")), "{line}");
        assert!(line.contains(&format!("metrics={operator} ")), "{line}");
        for debug in ["None", "Some(", "\x1b"] {
            assert!(!line.contains(debug), "{debug:?} in {line}");
        }
    }
}

/// A negative number after a numeric flag is its value, refused by the
/// setting's rule, not taken for an unknown flag.
#[test]
fn a_negative_number_is_a_flags_value() {
    let err = refused(&["check-config", "--upstream-max-retries", "-1"], &[]);
    assert_eq!(
        err,
        "rwgate: invalid upstream.max_retries = `-1` (from --upstream-max-retries): expected a whole number from 0 to 4294967295\n"
    );
}

/// `--config`'s help names its variable as every flag's help does, not the
/// variable's current value.
#[test]
fn the_config_variable_shows_in_help_like_the_others() {
    let help = accepted(&["migrate", "--help"], &[("RWGATE_CONFIG", "/x.toml")]);
    assert!(help.contains("[env: RWGATE_CONFIG]"), "{help}");
    assert!(!help.contains("/x.toml"), "{help}");
}
