//! The command line: `rwgate serve`, `rwgate check-config`, `rwgate migrate`
//! and `rwgate reconcile`. Every setting
//! can come from the config file, a flag, or an `RWGATE_<NAME>` environment
//! variable; flags and environment win over the file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::clock::Day;
use crate::config::{AuthMode, Charge, Config, ConfigError, Grain, LogFormat, Size};

#[derive(Debug, Parser)]
#[command(
    name = "rwgate",
    version,
    about = "Prometheus remote_write gateway: authenticate, enforce tenancy, filter, forward to Thanos receive"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve remote_write traffic.
    Serve(Settings),
    /// Validate the configuration and print the effective settings (secrets redacted).
    CheckConfig(Settings),
    /// Create the ClickHouse tables that are missing and add missing columns
    /// to `expenses`; never drops or rewrites data.
    Migrate(Settings),
    /// Re-derive the expense rows of a date range from the raw samples,
    /// writing only differences.
    Reconcile(ReconcileArgs),
    /// Run the expense rollup loop alone (the one rollup writer per
    /// ClickHouse); serves no traffic.
    Rollup(Settings),
}

/// `rwgate reconcile`.
#[derive(Debug, Clone, Args)]
pub struct ReconcileArgs {
    #[command(flatten)]
    pub settings: Settings,
    /// First UTC day to re-derive (YYYY-MM-DD).
    #[arg(long)]
    pub from: Day,
    /// Last UTC day to re-derive, inclusive (YYYY-MM-DD).
    #[arg(long)]
    pub to: Day,
    /// Only this account (Cloud-Account-Id).
    #[arg(long)]
    pub account: Option<String>,
}

/// Settings shared by every command: the config file and its overrides.
#[derive(Debug, Clone, Args)]
pub struct Settings {
    /// TOML config file; flags and environment override it.
    #[arg(long, short, env = "RWGATE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Any setting by its path in the config file, e.g.
    /// `--set limits.max_series_per_request=5000` (repeatable). Every setting
    /// can also be given as `RWGATE_<PATH>`, dots as underscores, upper case:
    /// `RWGATE_LIMITS_MAX_SERIES_PER_REQUEST=5000`.
    #[arg(long = "set", value_name = "PATH=VALUE")]
    pub set: Vec<String>,
    /// Address to listen on [default: 0.0.0.0:8935].
    #[arg(long, env = "RWGATE_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Remote-write URL of the upstream (Thanos receive).
    #[arg(long, env = "RWGATE_UPSTREAM_URL")]
    pub upstream_url: Option<String>,
    /// Header carrying the account id upstream [default: Cloud-Account-Id].
    #[arg(long, env = "RWGATE_UPSTREAM_TENANT_HEADER")]
    pub upstream_tenant_header: Option<String>,
    /// Timeout of one upstream attempt (e.g. 10s).
    #[arg(long, env = "RWGATE_UPSTREAM_TIMEOUT", value_parser = humantime::parse_duration)]
    pub upstream_timeout: Option<Duration>,
    /// Retries after a retryable upstream failure.
    #[arg(long, env = "RWGATE_UPSTREAM_MAX_RETRIES")]
    pub upstream_max_retries: Option<u32>,
    /// PEM CA certificates an https upstream must chain to, instead of the
    /// public roots.
    #[arg(long, env = "RWGATE_UPSTREAM_TLS_CA")]
    pub upstream_tls_ca: Option<PathBuf>,
    /// PEM client certificate chain for the upstream (mutual TLS); with
    /// --upstream-tls-key.
    #[arg(long, env = "RWGATE_UPSTREAM_TLS_CERT")]
    pub upstream_tls_cert: Option<PathBuf>,
    /// PEM private key of the upstream client certificate.
    #[arg(long, env = "RWGATE_UPSTREAM_TLS_KEY")]
    pub upstream_tls_key: Option<PathBuf>,
    /// Credential source.
    #[arg(long, env = "RWGATE_AUTH", value_enum)]
    pub auth: Option<AuthMode>,
    /// Platform REST API base URL (auth = rest).
    #[arg(long, env = "RWGATE_REST_URL")]
    pub rest_url: Option<String>,
    /// File holding the cluster secret for the REST API (auth = rest).
    #[arg(long, env = "RWGATE_CLUSTER_SECRET_FILE")]
    pub cluster_secret_file: Option<PathBuf>,
    /// Tenants file (auth = static).
    #[arg(long, env = "RWGATE_TENANTS_FILE")]
    pub tenants_file: Option<PathBuf>,
    /// How long REST credentials are cached (e.g. 60s).
    #[arg(long, env = "RWGATE_AUTH_CACHE_TTL", value_parser = humantime::parse_duration)]
    pub auth_cache_ttl: Option<Duration>,
    /// `__name__` allowlist regex (fully anchored).
    #[arg(long, env = "RWGATE_ALLOWLIST")]
    pub allowlist: Option<String>,
    /// Tenant label names, comma-separated [default: cloud_account_id,tenant_id].
    #[arg(long, env = "RWGATE_TENANT_LABELS", value_delimiter = ',')]
    pub tenant_labels: Option<Vec<String>>,
    /// PEM certificate chain; with --tls-key, serve HTTPS.
    #[arg(long, env = "RWGATE_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key.
    #[arg(long, env = "RWGATE_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Largest compressed body (e.g. 10MiB).
    #[arg(long, env = "RWGATE_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<Size>,
    /// Largest decompressed body (e.g. 64MiB).
    #[arg(long, env = "RWGATE_MAX_DECODED_BYTES")]
    pub max_decoded_bytes: Option<Size>,
    /// Write requests processed at once; more are shed with 503.
    #[arg(long, env = "RWGATE_MAX_CONCURRENT_REQUESTS")]
    pub max_concurrent_requests: Option<usize>,
    /// Samples per second one tenant may send (0 = no limit).
    #[arg(long, env = "RWGATE_TENANT_SAMPLES_PER_SEC")]
    pub tenant_samples_per_sec: Option<u32>,
    /// Grace period for in-flight requests on shutdown (e.g. 25s).
    #[arg(long, env = "RWGATE_SHUTDOWN_GRACE", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Option<Duration>,
    /// Log format.
    #[arg(long, env = "RWGATE_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Log filter (RUST_LOG syntax), e.g. info or rwgate=debug.
    #[arg(long, env = "RWGATE_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// ClickHouse HTTP URL; set to tee cost samples into ClickHouse.
    #[arg(long, env = "RWGATE_CLICKHOUSE_URL")]
    pub clickhouse_url: Option<String>,
    /// ClickHouse database [default: default].
    #[arg(long, env = "RWGATE_CLICKHOUSE_DATABASE")]
    pub clickhouse_database: Option<String>,
    /// ClickHouse user.
    #[arg(long, env = "RWGATE_CLICKHOUSE_USER")]
    pub clickhouse_user: Option<String>,
    /// File holding the ClickHouse password.
    #[arg(long, env = "RWGATE_CLICKHOUSE_PASSWORD_FILE")]
    pub clickhouse_password_file: Option<PathBuf>,
    /// Spool directory [default: /var/lib/rwgate/spool].
    #[arg(long, env = "RWGATE_SPOOL_DIR")]
    pub spool_dir: Option<PathBuf>,
    /// Run the expense rollup here (`--rollup=false` on all but one replica).
    #[arg(long, env = "RWGATE_ROLLUP", num_args = 0..=1, default_missing_value = "true")]
    pub rollup: Option<bool>,
    /// Time between rollup passes (e.g. 60s).
    #[arg(long, env = "RWGATE_ROLLUP_INTERVAL", value_parser = humantime::parse_duration)]
    pub rollup_interval: Option<Duration>,
    /// Expense row grain.
    #[arg(long, env = "RWGATE_EXPENSE_GRAIN", value_enum)]
    pub expense_grain: Option<Grain>,
    /// Which series are charged.
    #[arg(long, env = "RWGATE_CHARGE", value_enum)]
    pub charge: Option<Charge>,
}

impl Settings {
    /// The effective, validated config: the file (or defaults), then
    /// `RWGATE_<SETTING_PATH>` variables, then `--set`, then the named flags
    /// (and their variables).
    pub fn load(&self) -> Result<Config, ConfigError> {
        let (text, origin) = match &self.config {
            Some(path) => (
                std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?,
                path.display().to_string(),
            ),
            None => (String::new(), "defaults".to_string()),
        };
        let mut overrides: Vec<(String, String)> = Config::setting_paths()
            .into_iter()
            .filter_map(|p| std::env::var(env_name(&p)).ok().map(|v| (p, v)))
            .collect();
        for kv in &self.set {
            let (k, v) = kv.split_once('=').ok_or_else(|| ConfigError::Parse {
                path: "--set".into(),
                message: format!(
                    "{kv:?} is not PATH=VALUE, e.g. limits.max_series_per_request=5000"
                ),
            })?;
            overrides.push((k.trim().to_string(), v.trim().to_string()));
        }
        let mut c = Config::from_toml_with(&text, &origin, &overrides)?;
        self.apply(&mut c);
        c.validate()?;
        Ok(c)
    }

    fn apply(&self, c: &mut Config) {
        fn set<T: Clone>(dst: &mut T, src: &Option<T>) {
            if let Some(v) = src {
                *dst = v.clone();
            }
        }
        fn set_opt<T: Clone>(dst: &mut Option<T>, src: &Option<T>) {
            if src.is_some() {
                dst.clone_from(src);
            }
        }
        set(&mut c.listen, &self.listen);
        set(&mut c.upstream.url, &self.upstream_url);
        set(&mut c.upstream.tenant_header, &self.upstream_tenant_header);
        set(&mut c.upstream.timeout, &self.upstream_timeout);
        set(&mut c.upstream.max_retries, &self.upstream_max_retries);
        set_opt(&mut c.upstream.tls.ca, &self.upstream_tls_ca);
        set_opt(&mut c.upstream.tls.cert, &self.upstream_tls_cert);
        set_opt(&mut c.upstream.tls.key, &self.upstream_tls_key);
        set(&mut c.auth.mode, &self.auth);
        set_opt(&mut c.auth.rest_url, &self.rest_url);
        set_opt(&mut c.auth.cluster_secret_file, &self.cluster_secret_file);
        set_opt(&mut c.auth.tenants_file, &self.tenants_file);
        set(&mut c.auth.cache_ttl, &self.auth_cache_ttl);
        set(&mut c.filter.allowlist, &self.allowlist);
        set(&mut c.tenancy.labels, &self.tenant_labels);
        set_opt(&mut c.tls.cert, &self.tls_cert);
        set_opt(&mut c.tls.key, &self.tls_key);
        set(&mut c.limits.max_body_bytes, &self.max_body_bytes);
        set(&mut c.limits.max_decoded_bytes, &self.max_decoded_bytes);
        set(
            &mut c.limits.max_concurrent_requests,
            &self.max_concurrent_requests,
        );
        set(
            &mut c.limits.tenant_samples_per_sec,
            &self.tenant_samples_per_sec,
        );
        set(&mut c.limits.shutdown_grace, &self.shutdown_grace);
        set(&mut c.log.format, &self.log_format);
        set(&mut c.log.level, &self.log_level);
        set_opt(&mut c.clickhouse.url, &self.clickhouse_url);
        set(&mut c.clickhouse.database, &self.clickhouse_database);
        set_opt(&mut c.clickhouse.user, &self.clickhouse_user);
        set_opt(
            &mut c.clickhouse.password_file,
            &self.clickhouse_password_file,
        );
        set(&mut c.spool.dir, &self.spool_dir);
        set(&mut c.rollup.enabled, &self.rollup);
        set(&mut c.rollup.interval, &self.rollup_interval);
        set(&mut c.rollup.grain, &self.expense_grain);
        set(&mut c.rollup.charge, &self.charge);
    }
}

/// The environment variable of a setting path: `limits.max_body_bytes` ->
/// `RWGATE_LIMITS_MAX_BODY_BYTES`.
pub fn env_name(path: &str) -> String {
    format!("RWGATE_{}", path.replace('.', "_").to_ascii_uppercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_defaults() {
        let cli = Cli::try_parse_from([
            "rwgate",
            "serve",
            "--auth",
            "none",
            "--listen",
            "127.0.0.1:1",
            "--max-body-bytes",
            "1MiB",
            "--max-decoded-bytes",
            "8MiB",
            "--tenant-labels",
            "a,b",
        ])
        .unwrap();
        let Command::Serve(s) = cli.command else {
            panic!()
        };
        let c = s.load().unwrap();
        assert_eq!(c.listen.port(), 1);
        assert_eq!(c.limits.max_body_bytes, Size(1 << 20));
        assert_eq!(c.tenancy.labels, ["a", "b"]);
    }

    #[test]
    fn tee_flags_and_subcommands() {
        let cli = Cli::try_parse_from([
            "rwgate",
            "serve",
            "--auth",
            "none",
            "--clickhouse-url",
            "http://ch:8123",
            "--spool-dir",
            "/tmp/x",
            "--rollup=false",
            "--expense-grain",
            "hour",
            "--charge",
            "pod",
            "--rollup-interval",
            "10s",
        ])
        .unwrap();
        let Command::Serve(s) = cli.command else {
            panic!()
        };
        let c = s.load().unwrap();
        assert_eq!(c.clickhouse.url.as_deref(), Some("http://ch:8123"));
        assert!(!c.rollup.enabled);
        assert_eq!(c.rollup.grain, Grain::Hour);
        assert_eq!(c.rollup.charge, Charge::Pod);
        assert_eq!(c.rollup.interval, Duration::from_secs(10));
        let cli = Cli::try_parse_from([
            "rwgate",
            "reconcile",
            "--from",
            "2024-01-01",
            "--to",
            "2024-01-31",
            "--account",
            "a",
        ])
        .unwrap();
        assert!(matches!(cli.command, Command::Reconcile(r) if r.to.to_string() == "2024-01-31"));
        assert!(Cli::try_parse_from(["rwgate", "migrate"]).is_ok());
    }

    #[test]
    fn every_setting_can_be_set_by_path() {
        let cli = Cli::try_parse_from([
            "rwgate",
            "serve",
            "--auth",
            "none",
            "--set",
            "limits.max_series_per_request=5000",
            "--set",
            "auth.negative_cache_ttl=30s",
            "--set",
            "tenancy.labels=[\"a\", \"b\"]",
            "--set",
            "filter.allowlist=kube_.*|up",
        ])
        .unwrap();
        let Command::Serve(s) = cli.command else {
            panic!()
        };
        let c = s.load().unwrap();
        assert_eq!(c.limits.max_series_per_request, 5000);
        assert_eq!(c.auth.negative_cache_ttl, Duration::from_secs(30));
        assert_eq!(c.tenancy.labels, ["a", "b"]);
        assert_eq!(c.filter.allowlist, "kube_.*|up");

        let bad = Cli::try_parse_from([
            "rwgate",
            "serve",
            "--auth",
            "none",
            "--set",
            "limits.max_sries=1",
        ])
        .unwrap();
        let Command::Serve(s) = bad.command else {
            panic!()
        };
        let err = s.load().unwrap_err().to_string();
        assert!(err.contains("max_sries"), "{err}");
    }

    #[test]
    fn setting_paths_cover_the_tree() {
        let paths = Config::setting_paths();
        for p in [
            "listen",
            "limits.max_series_per_request",
            "spool.batch_max_rows",
            "rollup.max_gap",
        ] {
            assert!(paths.iter().any(|x| x == p), "{p} missing from {paths:?}");
        }
        assert_eq!(
            env_name("limits.max_body_bytes"),
            "RWGATE_LIMITS_MAX_BODY_BYTES"
        );
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(Cli::try_parse_from(["rwgate", "serve", "--max-body-bytes", "lots"]).is_err());
        assert!(Cli::try_parse_from(["rwgate", "serve", "--auth", "ldap"]).is_err());
    }
}
