//! The command line: `rwgate serve`, `check-config`, `migrate`, `reconcile`
//! and `rollup`. Each takes `--config`, `--set PATH=VALUE` and the named
//! flags of the settings it uses (a named flag is a shorthand:
//! `--rest-url X` is `--set auth.rest_url=X`), and validates only those
//! settings. How the values of the config file, the `RWGATE_<PATH>`
//! environment variables and the command line combine is `settings.rs`.

use std::marker::PhantomData;
use std::path::PathBuf;

use clap::{ArgMatches, Args, FromArgMatches, Parser, Subcommand};

use crate::clock::Day;
use crate::config::{AuthMode, Config, ConfigError};
use crate::settings::{self, Given, Kind};

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
    Serve(Settings<Serve>),
    /// Validate the configuration `serve` would run with and print it (secrets
    /// redacted).
    CheckConfig(Settings<Serve>),
    /// Create the ClickHouse tables that are missing and add missing columns
    /// to `expenses`; never drops or rewrites data.
    Migrate(Settings<Migrate>),
    /// Re-derive the expense rows of a date range from the raw samples,
    /// writing only differences.
    Reconcile(ReconcileArgs),
    /// Run the expense rollup loop alone (the one rollup writer per
    /// ClickHouse); serves no traffic.
    Rollup(Settings<Rollup>),
}

impl Command {
    /// The name users type.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Serve(_) => "serve",
            Command::CheckConfig(_) => "check-config",
            Command::Migrate(_) => "migrate",
            Command::Reconcile(_) => "reconcile",
            Command::Rollup(_) => "rollup",
        }
    }

    /// The effective config, with what this command uses validated, and
    /// the files it reads at start (secrets, certificates) read: so that
    /// `check-config` refuses what `serve` would, and every command fails
    /// before it starts anything.
    pub fn load(&self) -> Result<Config, ConfigError> {
        match self {
            Command::Serve(s) | Command::CheckConfig(s) => s.load_checked(|c| {
                c.validate()?;
                serving_files(c)?;
                cost_files(c, c.rollup.enabled)
            }),
            Command::Migrate(s) => s.load_checked(|c| {
                clickhouse_part(c, "migrate")?;
                cost_files(c, false)
            }),
            Command::Reconcile(r) => {
                r.check()?;
                r.settings.load_checked(|c| {
                    clickhouse_part(c, "reconcile")?;
                    c.validate_rollup()?;
                    cost_files(c, true)
                })
            }
            Command::Rollup(s) => s.load_checked(|c| {
                clickhouse_part(c, "rollup")?;
                c.validate_rollup()?;
                c.validate_registration_source()?;
                cost_files(c, true)
            }),
        }
    }
}

/// What `serve` reads for its traffic: the tenants file or cluster
/// secret, the TLS pair, and the upstream's CA and client pair.
fn serving_files(c: &Config) -> Result<(), ConfigError> {
    crate::auth::Authenticator::from_config(&c.auth).map_err(|e| ConfigError::Invalid {
        field: match c.auth.mode {
            AuthMode::Static => "auth.tenants_file",
            AuthMode::Rest | AuthMode::None => "auth.cluster_secret_file",
        },
        message: e.to_string(),
    })?;
    let unusable = |e: anyhow::Error| ConfigError::Unusable(one_line(&e));
    if c.tls.cert.is_some() {
        crate::tls::server_config(&c.tls).map_err(unusable)?;
    }
    crate::tls::client_config(&c.upstream.tls).map_err(unusable)?;
    Ok(())
}

/// What the tee and the rollup read when they start (with `clickhouse.url`
/// set): the ClickHouse password file and, for the rollup, the cluster
/// secret resource registration sends.
fn cost_files(c: &Config, rollup: bool) -> Result<(), ConfigError> {
    use crate::cost::clickhouse::{ClickHouse, ClickHouseError};
    if c.clickhouse.url.is_none() {
        return Ok(());
    }
    let ch = ClickHouse::new(&c.clickhouse).map_err(|e| match e {
        ClickHouseError::PasswordFile { path, source } => ConfigError::Invalid {
            field: "clickhouse.password_file",
            message: format!("cannot read {path}: {source}"),
        },
        other => ConfigError::Unusable(other.to_string()),
    })?;
    if rollup {
        crate::cost::rollup::resources::Registry::from_config(c, ch).map_err(|e| {
            ConfigError::Invalid {
                field: if c.resources.cluster_secret_file.is_some() {
                    "resources.cluster_secret_file"
                } else {
                    "auth.cluster_secret_file"
                },
                message: e.to_string(),
            }
        })?;
    }
    Ok(())
}

/// What every ClickHouse command uses: the log settings and a ClickHouse.
fn clickhouse_part(c: &Config, command: &str) -> Result<(), ConfigError> {
    c.validate_log()?;
    c.validate_clickhouse()?;
    if c.clickhouse.url.is_none() {
        return Err(ConfigError::Invalid {
            field: "clickhouse.url",
            message: format!("required by rwgate {command}"),
        });
    }
    Ok(())
}

/// `rwgate reconcile`.
#[derive(Debug, Clone, Args)]
pub struct ReconcileArgs {
    /// First UTC day to re-derive (YYYY-MM-DD).
    #[arg(long, value_name = "DAY")]
    pub from: Day,
    /// Last UTC day to re-derive, inclusive (YYYY-MM-DD).
    #[arg(long, value_name = "DAY")]
    pub to: Day,
    /// Only this account (its Cloud-Account-Id, a UUID).
    #[arg(long, value_name = "UUID", value_parser = parse_account)]
    pub account: Option<String>,
    /// First move the range's rows written under cloud resource ids
    /// (`k8s-ns-...`) to the platform ids of their resources (registering
    /// them where needed), keeping every total the same.
    #[arg(long)]
    pub move_ids: bool,
    #[command(flatten)]
    pub settings: Settings<Reconcile>,
}

impl ReconcileArgs {
    fn check(&self) -> Result<(), ConfigError> {
        if self.from > self.to {
            return Err(ConfigError::Invalid {
                field: "--from",
                message: format!("{} is after --to {}", self.from, self.to),
            });
        }
        Ok(())
    }
}

fn parse_account(s: &str) -> Result<String, String> {
    uuid::Uuid::parse_str(s)
        .map(|u| u.hyphenated().to_string())
        .map_err(|_| "not a UUID (a Cloud-Account-Id)".to_string())
}

/// The settings of a command: the config file, `--set`, and the named flags
/// of group `G`.
#[derive(Debug, Clone, Args)]
pub struct Settings<G: FlagGroup> {
    /// TOML config file; the environment and the command line override it.
    #[arg(
        long,
        short,
        env = "RWGATE_CONFIG",
        hide_env_values = true,
        value_name = "FILE"
    )]
    pub config: Option<PathBuf>,
    /// Any setting by its path in the config file (repeatable), e.g.
    /// `--set limits.max_series_per_request=5000`. Every setting can also be
    /// given as `RWGATE_<PATH>`, dots as underscores, in upper case:
    /// `RWGATE_LIMITS_MAX_SERIES_PER_REQUEST=5000`.
    #[arg(long = "set", value_name = "PATH=VALUE")]
    pub set: Vec<String>,
    #[command(flatten)]
    pub flags: Flags<G>,
}

impl<G: FlagGroup> Settings<G> {
    /// The config from every source (`settings.rs`), not validated.
    pub fn load(&self) -> Result<Config, ConfigError> {
        self.load_with(|name| std::env::var(name).ok())
    }

    /// [`load`](Self::load) with `env` standing for the environment.
    pub fn load_with(&self, env: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        self.load_checked_with(env, |_| Ok(()))
    }

    /// The config from every source, checked by `check`; an error of a
    /// setting some source gave names that source.
    pub fn load_checked(
        &self,
        check: impl FnOnce(&Config) -> Result<(), ConfigError>,
    ) -> Result<Config, ConfigError> {
        self.load_checked_with(|name| std::env::var(name).ok(), check)
    }

    fn load_checked_with(
        &self,
        env: impl Fn(&str) -> Option<String>,
        check: impl FnOnce(&Config) -> Result<(), ConfigError>,
    ) -> Result<Config, ConfigError> {
        let mut given = settings::from_env(env)?;
        for kv in &self.set {
            let (path, raw) = kv.split_once('=').ok_or_else(|| ConfigError::Setting {
                setting: kv.clone(),
                value: None,
                origin: "--set".into(),
                message: "expected PATH=VALUE, e.g. limits.max_series_per_request=5000".into(),
            })?;
            given.push(Given {
                path: path.trim().to_string(),
                raw: raw.to_string(),
                origin: "--set".into(),
            });
        }
        given.extend(self.flags.given.iter().map(|(flag, raw)| Given {
            path: flag.path.to_string(),
            raw: raw.clone(),
            origin: format!("--{}", flag.long),
        }));
        settings::load(self.config.as_deref(), &given, check)
    }
}

/// A named flag: the shorthand of one setting.
#[derive(Debug)]
pub struct Flag {
    pub long: &'static str,
    pub path: &'static str,
    pub value_name: &'static str,
    pub help: &'static str,
}

const fn flag(
    long: &'static str,
    path: &'static str,
    value_name: &'static str,
    help: &'static str,
) -> Flag {
    Flag {
        long,
        path,
        value_name,
        help,
    }
}

/// The flags of the serving path.
pub const SERVING: &[Flag] = &[
    flag("listen", "listen", "ADDR", "Address to listen on"),
    flag(
        "upstream-url",
        "upstream.url",
        "URL",
        "Remote-write URL of the upstream (Thanos receive)",
    ),
    flag(
        "upstream-tenant-header",
        "upstream.tenant_header",
        "NAME",
        "Header carrying the account id upstream",
    ),
    flag(
        "upstream-timeout",
        "upstream.timeout",
        "DURATION",
        "Timeout of one upstream attempt",
    ),
    flag(
        "upstream-max-retries",
        "upstream.max_retries",
        "N",
        "Retries after a retryable upstream failure",
    ),
    flag(
        "upstream-tls-ca",
        "upstream.tls.ca",
        "FILE",
        "PEM CA certificates an https upstream must chain to, instead of the public roots",
    ),
    flag(
        "upstream-tls-cert",
        "upstream.tls.cert",
        "FILE",
        "PEM client certificate chain for the upstream (mutual TLS); with --upstream-tls-key",
    ),
    flag(
        "upstream-tls-key",
        "upstream.tls.key",
        "FILE",
        "PEM private key of the upstream client certificate",
    ),
    flag(
        "tenants-file",
        "auth.tenants_file",
        "FILE",
        "Tenants file (auth static)",
    ),
    flag(
        "auth-cache-ttl",
        "auth.cache_ttl",
        "DURATION",
        "How long REST credentials are cached",
    ),
    flag(
        "allowlist",
        "filter.allowlist",
        "REGEX",
        "`__name__` allowlist regex (fully anchored)",
    ),
    flag(
        "tenant-labels",
        "tenancy.labels",
        "LABELS",
        "Tenant label names, comma-separated",
    ),
    flag(
        "tls-cert",
        "tls.cert",
        "FILE",
        "PEM certificate chain; with --tls-key, serve HTTPS",
    ),
    flag("tls-key", "tls.key", "FILE", "PEM private key"),
    flag(
        "tls-client-ca",
        "tls.client_ca",
        "FILE",
        "PEM CA certificates; set, clients must present a certificate signed by one (mutual TLS)",
    ),
    flag(
        "max-body-bytes",
        "limits.max_body_bytes",
        "SIZE",
        "Largest compressed body",
    ),
    flag(
        "max-decoded-bytes",
        "limits.max_decoded_bytes",
        "SIZE",
        "Largest decompressed body",
    ),
    flag(
        "max-concurrent-requests",
        "limits.max_concurrent_requests",
        "N",
        "Write requests processed at once; more are shed with 503",
    ),
    flag(
        "tenant-samples-per-sec",
        "limits.tenant_samples_per_sec",
        "N",
        "Samples per second one tenant may send (0: no limit)",
    ),
];

/// The platform's REST API: credentials (`auth rest`), and where the
/// rollup registers resources (`serve`, `rollup`, `reconcile --move-ids`).
pub const PLATFORM: &[Flag] = &[
    flag(
        "auth",
        "auth.mode",
        "MODE",
        "Credential source; rest also turns resource registration on by default",
    ),
    flag(
        "rest-url",
        "auth.rest_url",
        "URL",
        "Platform REST API base URL: credentials (auth rest) and resource registration",
    ),
    flag(
        "cluster-secret-file",
        "auth.cluster_secret_file",
        "FILE",
        "File holding the cluster secret sent to the platform REST API",
    ),
];

/// The flags of the ClickHouse connection.
pub const CLICKHOUSE: &[Flag] = &[
    flag(
        "clickhouse-url",
        "clickhouse.url",
        "URL",
        "ClickHouse HTTP URL (for serve: set to tee cost samples into ClickHouse)",
    ),
    flag(
        "clickhouse-database",
        "clickhouse.database",
        "NAME",
        "ClickHouse database",
    ),
    flag(
        "clickhouse-user",
        "clickhouse.user",
        "NAME",
        "ClickHouse user",
    ),
    flag(
        "clickhouse-password-file",
        "clickhouse.password_file",
        "FILE",
        "File holding the ClickHouse password",
    ),
];

/// Where the operator endpoints are served (`serve` and `rollup`).
pub const OPERATOR: &[Flag] = &[flag(
    "metrics-listen",
    "metrics_listen",
    "ADDR",
    "Serve /metrics and the health endpoints on this address (plain HTTP); for serve, instead of on the ingest port",
)];

/// The spool's flags.
pub const SPOOL: &[Flag] = &[flag("spool-dir", "spool.dir", "DIR", "Spool directory")];

/// The flags of the expense rule (reconcile and the rollup).
pub const EXPENSES: &[Flag] = &[
    flag(
        "expense-grain",
        "rollup.grain",
        "GRAIN",
        "Expense row grain",
    ),
    flag(
        "charge",
        "rollup.charge",
        "SERIES",
        "Which series are charged",
    ),
];

/// The rollup loop's flags.
pub const ROLLUP_LOOP: &[Flag] = &[flag(
    "rollup-interval",
    "rollup.interval",
    "DURATION",
    "Time between rollup passes",
)];

/// Whether `serve` runs the rollup.
pub const ROLLUP_IN_SERVE: &[Flag] = &[flag(
    "rollup",
    "rollup.enabled",
    "BOOL",
    "Run the expense rollup here (--rollup=false on all but one replica)",
)];

/// The flags of a long-running process.
pub const PROCESS: &[Flag] = &[flag(
    "shutdown-grace",
    "limits.shutdown_grace",
    "DURATION",
    "On SIGTERM, how long in-flight work may take to finish",
)];

/// Logging flags (every command).
pub const LOG: &[Flag] = &[
    flag(
        "log-format",
        "log.format",
        "FORMAT",
        "Log format: text to read, json for a log collector",
    ),
    flag(
        "log-level",
        "log.level",
        "FILTER",
        "Log filter (RUST_LOG syntax), e.g. info or rwgate=debug",
    ),
];

/// The named flags of a command, in groups.
pub trait FlagGroup: std::fmt::Debug + Clone + Send + Sync + 'static {
    const GROUPS: &'static [&'static [Flag]];
}

/// `serve` and `check-config`.
#[derive(Debug, Clone)]
pub struct Serve;
impl FlagGroup for Serve {
    const GROUPS: &'static [&'static [Flag]] = &[
        SERVING,
        PLATFORM,
        OPERATOR,
        PROCESS,
        CLICKHOUSE,
        SPOOL,
        ROLLUP_IN_SERVE,
        ROLLUP_LOOP,
        EXPENSES,
        LOG,
    ];
}

/// `migrate`.
#[derive(Debug, Clone)]
pub struct Migrate;
impl FlagGroup for Migrate {
    const GROUPS: &'static [&'static [Flag]] = &[CLICKHOUSE, LOG];
}

/// `reconcile`.
#[derive(Debug, Clone)]
pub struct Reconcile;
impl FlagGroup for Reconcile {
    const GROUPS: &'static [&'static [Flag]] = &[CLICKHOUSE, EXPENSES, PLATFORM, LOG];
}

/// `rollup`.
#[derive(Debug, Clone)]
pub struct Rollup;
impl FlagGroup for Rollup {
    const GROUPS: &'static [&'static [Flag]] = &[
        CLICKHOUSE,
        EXPENSES,
        ROLLUP_LOOP,
        PLATFORM,
        PROCESS,
        OPERATOR,
        LOG,
    ];
}

/// The named flags given, in the order of their group.
#[derive(Debug, Clone)]
pub struct Flags<G> {
    pub given: Vec<(&'static Flag, String)>,
    group: PhantomData<G>,
}

impl<G: FlagGroup> Flags<G> {
    fn all() -> impl Iterator<Item = &'static Flag> {
        G::GROUPS.iter().flat_map(|g| g.iter())
    }
}

/// The clap argument of a flag: its help names the setting's default and
/// its environment variable, and lists a choice's values; a boolean flag
/// alone means `true`.
fn arg(flag: &'static Flag) -> clap::Arg {
    let setting = settings::find(flag.path)
        .unwrap_or_else(|| panic!("flag --{} names no setting {}", flag.long, flag.path));
    let mut help = flag.help.to_string();
    if let Some(d) = default_text(flag.path) {
        help.push_str(&format!(" [default: {d}]"));
    }
    help.push_str(&format!(" [env: {}]", setting.env_name()));
    let mut a = clap::Arg::new(flag.long)
        .long(flag.long)
        .value_name(flag.value_name)
        .help(help)
        .action(clap::ArgAction::Set);
    match setting.kind {
        Kind::Bool => {
            a = a
                .num_args(0..=1)
                .default_missing_value("true")
                .value_parser(["true", "false"]);
        }
        Kind::Choice(names) => a = a.value_parser(names.to_vec()),
        // `-1` is a value to refuse by the setting's rule, not a flag.
        Kind::Integer { .. } | Kind::Float => a = a.allow_negative_numbers(true),
        _ => {}
    }
    a
}

/// A setting's default as text, if it has one.
fn default_text(path: &str) -> Option<String> {
    let tree = serde_json::to_value(Config::default()).ok()?;
    let v = tree.pointer(&format!("/{}", path.replace('.', "/")))?;
    match v {
        serde_json::Value::Null => None,
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(items) => Some(
            items
                .iter()
                .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_string))
                .collect::<Vec<_>>()
                .join(","),
        ),
        other => Some(other.to_string()),
    }
}

impl<G: FlagGroup> Args for Flags<G> {
    fn augment_args(mut cmd: clap::Command) -> clap::Command {
        for f in Self::all() {
            cmd = cmd.arg(arg(f));
        }
        cmd
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

impl<G: FlagGroup> FromArgMatches for Flags<G> {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        let mut flags = Flags {
            given: Vec::new(),
            group: PhantomData,
        };
        flags.update_from_arg_matches(m)?;
        Ok(flags)
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        for f in Self::all() {
            if let Some(v) = m.get_one::<String>(f.long) {
                self.given.push((f, v.clone()));
            }
        }
        Ok(())
    }
}

/// An error as one line: each cause once (error types that print their
/// source, and then also return it as `source()`, would repeat it).
pub fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        let text = text.trim();
        if text.is_empty() || line.contains(text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(text);
    }
    line.replace('\n', " ")
}

/// A clap error (other than --help and --version) as one line:
/// `invalid value 'x' for '--from <DAY>': ...`, without usage and tips.
pub fn clap_one_line(e: &clap::Error) -> String {
    let text = e.to_string();
    let message = text.split("\n\n").next().unwrap_or(&text);
    let message = message.strip_prefix("error: ").unwrap_or(message);
    message
        .lines()
        .filter(|l| !l.trim_start().starts_with("tip:"))
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Charge, Grain, Size};
    use std::time::Duration;

    fn parse(args: &[&str]) -> Command {
        let mut all = vec!["rwgate"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all)
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
            .command
    }

    fn load(args: &[&str], env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let lookup = |name: &str| {
            env.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        };
        match parse(args) {
            Command::Serve(s) | Command::CheckConfig(s) => s.load_with(lookup),
            Command::Migrate(s) => s.load_with(lookup),
            Command::Reconcile(r) => r.settings.load_with(lookup),
            Command::Rollup(s) => s.load_with(lookup),
        }
    }

    #[test]
    fn flags_are_shorthands_of_settings() {
        let c = load(
            &[
                "serve",
                "--auth",
                "none",
                "--listen",
                "127.0.0.1:1",
                "--max-body-bytes",
                "1MiB",
                "--tenant-labels",
                "a,b",
                "--clickhouse-url",
                "http://ch:8123",
                "--rollup=false",
                "--expense-grain",
                "hour",
                "--charge",
                "pod",
                "--rollup-interval",
                "10s",
            ],
            &[],
        )
        .unwrap();
        assert_eq!(c.listen.port(), 1);
        assert_eq!(c.limits.max_body_bytes, Size(1 << 20));
        assert_eq!(c.tenancy.labels, ["a", "b"]);
        assert_eq!(c.clickhouse.url.as_deref(), Some("http://ch:8123"));
        assert!(!c.rollup.enabled);
        assert_eq!(c.rollup.grain, Grain::Hour);
        assert_eq!(c.rollup.charge, Charge::Pod);
        assert_eq!(c.rollup.interval, Duration::from_secs(10));
        assert!(load(&["serve", "--rollup"], &[]).unwrap().rollup.enabled);
    }

    #[test]
    fn every_flag_names_a_setting_once() {
        let mut seen = std::collections::HashSet::new();
        for group in Serve::GROUPS {
            for f in *group {
                assert!(settings::find(f.path).is_some(), "--{}", f.long);
                assert!(seen.insert(f.path), "two flags for {}", f.path);
            }
        }
        // Every group is part of serve's.
        for groups in [Migrate::GROUPS, Reconcile::GROUPS, Rollup::GROUPS] {
            for g in groups {
                assert!(Serve::GROUPS.iter().any(|s| std::ptr::eq(*s, *g)));
            }
        }
    }

    /// The README's table names every flag, its setting, and the commands
    /// other than serve that take it.
    #[test]
    fn the_readme_lists_every_flag() {
        let readme = include_str!("../README.md");
        let others: [(&str, &[&[Flag]]); 3] = [
            ("migrate", Migrate::GROUPS),
            ("reconcile", Reconcile::GROUPS),
            ("rollup", Rollup::GROUPS),
        ];
        for group in Serve::GROUPS {
            for f in *group {
                let start = format!("| `--{}", f.long);
                let row = readme
                    .lines()
                    .find(|l| {
                        l.strip_prefix(start.as_str())
                            .is_some_and(|rest| rest.starts_with(['`', ' ', '[']))
                    })
                    .unwrap_or_else(|| panic!("README has no row for --{}", f.long));
                let columns: Vec<&str> = row.split(" | ").collect();
                assert!(columns[1].starts_with(&format!("`{}`", f.path)), "{row}");
                let want: Vec<&str> = others
                    .iter()
                    .filter(|(_, groups)| groups.iter().any(|g| std::ptr::eq(*g, *group)))
                    .map(|(name, _)| *name)
                    .collect();
                assert_eq!(
                    columns[2].trim_end_matches('|').trim(),
                    want.join(", "),
                    "{row}"
                );
            }
        }
    }

    #[test]
    fn the_command_line_beats_the_environment() {
        let env = [
            ("RWGATE_AUTH_REST_URL", "http://env"),
            ("RWGATE_AUTH_TENANTS_FILE", "/env/tenants.toml"),
            ("RWGATE_CLICKHOUSE_DATABASE", "from_env"),
        ];
        let c = load(
            &[
                "serve",
                "--set",
                "auth.rest_url=http://set",
                "--set",
                "clickhouse.database=set",
                "--clickhouse-database",
                "flag",
            ],
            &env,
        )
        .unwrap();
        assert_eq!(c.auth.rest_url.as_deref(), Some("http://set"));
        assert_eq!(
            c.auth.tenants_file,
            Some(PathBuf::from("/env/tenants.toml"))
        );
        assert_eq!(c.clickhouse.database, "flag", "a named flag beats --set");
    }

    #[test]
    fn each_command_takes_only_its_own_flags() {
        assert!(Cli::try_parse_from(["rwgate", "migrate", "--auth", "none"]).is_err());
        assert!(Cli::try_parse_from(["rwgate", "migrate", "--listen", "0.0.0.0:1"]).is_err());
        assert!(Cli::try_parse_from(["rwgate", "rollup", "--spool-dir", "/x"]).is_err());
        assert!(Cli::try_parse_from([
            "rwgate",
            "reconcile",
            "--rollup",
            "--from",
            "2024-01-01",
            "--to",
            "2024-01-02"
        ])
        .is_err());
        for args in [
            &[
                "migrate",
                "--clickhouse-url",
                "http://ch:8123",
                "--set",
                "clickhouse.database=2024",
            ][..],
            &[
                "rollup",
                "--clickhouse-url",
                "http://ch:8123",
                "--charge",
                "pod",
                "--rollup-interval",
                "5s",
                // It registers resources: without a REST API, only with this.
                "--set",
                "resources.enabled=false",
            ],
            &[
                "reconcile",
                "--from",
                "2024-01-01",
                "--to",
                "2024-01-31",
                "--account",
                "0B7F4C8E-1A2B-4C3D-8E9F-00000000000A",
                "--clickhouse-url",
                "http://ch:8123",
            ],
        ] {
            let cmd = parse(args);
            let c = cmd.load().unwrap_or_else(|e| panic!("{args:?}: {e}"));
            assert_eq!(c.clickhouse.url.as_deref(), Some("http://ch:8123"));
            if let Command::Reconcile(r) = cmd {
                assert_eq!(
                    r.account.as_deref(),
                    Some("0b7f4c8e-1a2b-4c3d-8e9f-00000000000a")
                );
            }
        }
    }

    #[test]
    fn clickhouse_commands_need_a_clickhouse_and_check_their_arguments() {
        let err = parse(&["migrate"]).load().unwrap_err().to_string();
        assert_eq!(err, "invalid clickhouse.url: required by rwgate migrate");
        let err = parse(&[
            "reconcile",
            "--from",
            "2026-11-21",
            "--to",
            "2026-11-01",
            "--clickhouse-url",
            "http://ch:8123",
        ])
        .load()
        .unwrap_err()
        .to_string();
        assert_eq!(err, "invalid --from: 2026-11-21 is after --to 2026-11-01");
        let e = Cli::try_parse_from([
            "rwgate",
            "reconcile",
            "--from",
            "2026-11-01",
            "--to",
            "2026-11-21",
            "--account",
            "acme",
        ])
        .unwrap_err();
        assert_eq!(
            clap_one_line(&e),
            "invalid value 'acme' for '--account <UUID>': not a UUID (a Cloud-Account-Id)"
        );
        // The value once, as typed.
        let e = Cli::try_parse_from([
            "rwgate",
            "reconcile",
            "--from",
            "x\"y",
            "--to",
            "2026-11-01",
        ])
        .unwrap_err();
        assert_eq!(
            clap_one_line(&e),
            "invalid value 'x\"y' for '--from <DAY>': not a date: expected YYYY-MM-DD between 1970-01-01 and 2105-12-31"
        );
        let e = Cli::try_parse_from(["rwgate", "reconcile"]).unwrap_err();
        assert_eq!(
            clap_one_line(&e),
            "the following required arguments were not provided: --from <DAY> --to <DAY>"
        );
    }

    #[test]
    fn reconcile_lists_its_own_flags_first() {
        use clap::CommandFactory;
        let mut cmd = Cli::command();
        let help = cmd
            .find_subcommand_mut("reconcile")
            .unwrap()
            .render_help()
            .to_string();
        let at = |s: &str| help.find(s).unwrap_or_else(|| panic!("{s} in {help}"));
        assert!(at("--from") < at("--to") && at("--to") < at("--account"));
        assert!(at("--account") < at("--config") && at("--config") < at("--clickhouse-url"));
        assert!(
            !help.contains("--tenants-file") && !help.contains("--listen"),
            "{help}"
        );
        assert!(help.contains("[env: RWGATE_CLICKHOUSE_URL]"), "{help}");
        assert!(help.contains("[default: day]"), "{help}");
    }

    #[test]
    fn one_line_prints_each_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer: {0}")]
        struct Outer(#[source] std::io::Error);
        let e = anyhow::Error::new(Outer(std::io::Error::other("inner"))).context("doing it");
        assert_eq!(one_line(&e), "doing it: outer: inner");
    }
}
