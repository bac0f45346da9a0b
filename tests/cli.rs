//! The CLI contract operators script against: `check-config` prints the
//! effective config (secrets redacted, loadable again), flags and
//! `RWGATE_*` variables override, and a bad config exits non-zero naming the
//! bad field — for `check-config` and `serve` alike.

mod common;

use common::*;
use rwgate::config::{AuthMode, Config, Size};

#[test]
fn check_config_prints_the_effective_config_redacted_and_reloadable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("rwgate.toml");
    let tenants = tenants_file(
        dir.path(),
        &[(TENANT_A, &basic_credentials("a", "pw"), None)],
    );
    std::fs::write(
        &file,
        format!("[limits]\nmax_body_bytes = \"2MiB\"\n[upstream]\nurl = \"https://user:hunter2@thanos:19291/api/v1/receive\"\n[auth]\nmode = \"static\"\ntenants_file = {:?}\n", tenants.to_str().expect("utf-8 path")),
    )
    .expect("write config");
    let (code, out, err) = run_rwgate(
        &[
            "check-config",
            "--config",
            file.to_str().expect("utf-8 path"),
            "--max-decoded-bytes",
            "32MiB",
        ],
        &[("RWGATE_LISTEN", "127.0.0.1:18935")],
    );
    assert_eq!(code, 0, "stderr: {err}");
    assert!(!out.contains("hunter2"), "password printed:\n{out}");
    assert!(
        out.contains("url = \"https://***@thanos:19291/api/v1/receive\""),
        "{out}"
    );
    // The printed config is itself a valid config file with the merged values.
    let printed = Config::from_toml(&out, "check-config output").expect("output parses");
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
    let (code, _, err) = run_rwgate(
        &[
            "check-config",
            "--auth",
            "static",
            "--tenants-file",
            missing.to_str().expect("utf-8"),
        ],
        &[],
    );
    assert_eq!(code, 2);
    assert!(
        err.starts_with("rwgate: invalid auth: cannot read "),
        "{err}"
    );
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[[tenant]]\nid = \"nope\"\ncredentials = \"x\"\n").expect("write");
    let (code, _, err) = run_rwgate(
        &[
            "check-config",
            "--auth",
            "static",
            "--tenants-file",
            bad.to_str().expect("utf-8"),
        ],
        &[],
    );
    assert_eq!(code, 2);
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
    let (code, _, err) = run_rwgate(
        &[
            &https[..],
            &["--upstream-tls-ca", missing.to_str().expect("utf-8")],
        ]
        .concat(),
        &[],
    );
    assert_eq!(code, 2);
    assert!(err.starts_with("rwgate: upstream.tls.ca "), "{err}");
    let (code, _, err) = run_rwgate(
        &[
            &https[..],
            &["--upstream-tls-ca", pki.client_key.to_str().expect("utf-8")],
        ]
        .concat(),
        &[],
    );
    assert_eq!(code, 2);
    assert!(err.ends_with("no certificate found\n"), "{err}");
    let ok = [
        "--upstream-tls-ca",
        pki.ca.to_str().expect("utf-8"),
        "--upstream-tls-cert",
        pki.client_cert.to_str().expect("utf-8"),
        "--upstream-tls-key",
        pki.client_key.to_str().expect("utf-8"),
    ];
    let (code, out, err) = run_rwgate(&[&https[..], &ok[..]].concat(), &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("[upstream.tls]"), "{out}");
}

#[test]
fn check_config_with_defaults_only_needs_an_auth_source() {
    let (code, out, err) = run_rwgate(&["check-config", "--auth", "none"], &[]);
    assert_eq!(code, 0, "{err}");
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
            "rwgate: invalid filter.allowlist:",
        ),
        (
            &["--auth", "none", "--upstream-url", "ftp://thanos/"],
            "rwgate: invalid upstream.url:",
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
            "rwgate: invalid upstream.tls: needs an https:// upstream.url",
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
            "rwgate: invalid limits.max_decoded_bytes: must be at least limits.max_body_bytes",
        ),
        (
            &["--auth", "none", "--tenant-labels", "tenant-id"],
            "rwgate: invalid tenancy.labels:",
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
    let (code, _, err) = run_rwgate(&["check-config", "--max-body-bytes", "lots"], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("--max-body-bytes"), "{err}");
    let (code, _, err) = run_rwgate(&["check-config", "--auth", "ldap"], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("--auth"), "{err}");
    // ... and so are bad environment values.
    let (code, _, err) = run_rwgate(&["check-config"], &[("RWGATE_AUTH", "ldap")]);
    assert_eq!(code, 2);
    assert!(err.contains("ldap"), "{err}");
}

/// What only `serve` can find out (files it must read, the port) also ends
/// the process non-zero with the reason.
#[test]
fn serve_fails_fast_on_unusable_files_and_ports() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tenants = dir.path().join("tenants.toml");
    std::fs::write(&tenants, "[[tenant]]\nid = \"nope\"\ncredentials = \"x\"\n").expect("write");
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

#[test]
fn every_setting_has_an_environment_variable() {
    let (code, out, err) = run_rwgate(
        &["check-config", "--auth", "none"],
        &[
            ("RWGATE_LIMITS_MAX_SERIES_PER_REQUEST", "777"),
            ("RWGATE_ROLLUP_MAX_GAP", "2m"),
        ],
    );
    assert_eq!(code, 0, "{err}");
    let c = Config::from_toml(&out, "check-config output").expect("output parses");
    assert_eq!(c.limits.max_series_per_request, 777);
    assert_eq!(c.rollup.max_gap, std::time::Duration::from_secs(120));

    let (code, _, err) = run_rwgate(
        &["check-config", "--auth", "none"],
        &[("RWGATE_LIMITS_MAX_SERIES_PER_REQUEST", "many")],
    );
    assert_eq!(code, 2);
    assert!(err.contains("max_series_per_request"), "{err}");
}
