//! The configuration tree: one serde struct, filled from an optional TOML file,
//! `RWGATE_<PATH>` environment variables and the command line (the loader is
//! `settings.rs`). Every field is documented here; `rwgate check-config`
//! prints the effective tree with secrets redacted.
//!
//! Durations are written as people write them (`500ms`, `30s`, `1h 30m`,
//! `365d`), sizes as `16MiB` or plain bytes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::display::shown;

/// Default listen address: diproxy's port, so existing remote_write URLs keep working.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8935";
/// Default upstream: the platform's Thanos receive.
pub const DEFAULT_UPSTREAM_URL: &str = "http://thanos-receive:19291/api/v1/receive";
/// Default tenant header, as the platform's Thanos receive is configured.
pub const DEFAULT_TENANT_HEADER: &str = "Cloud-Account-Id";
/// Default `__name__` allowlist, from the customer Helm chart.
pub const DEFAULT_ALLOWLIST: &str =
    "kubecost_.*|cloudtuner_kubecost_.*|container_.*|kube_.*|node_.*|pod_pvc_.*|pv_.*|up";
/// Labels set to the authenticated account id on every series.
pub const DEFAULT_TENANT_LABELS: [&str; 2] = ["cloud_account_id", "tenant_id"];

/// The whole configuration of one rwgate process.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address to listen on (`host:port`).
    pub listen: SocketAddr,
    /// A second address (`host:port`, plain HTTP) for the operator
    /// endpoints: `/metrics`, `/-/healthy` and `/-/ready`. When set, `/metrics`
    /// is served only there (the ingest port answers it 404) while the health
    /// endpoints stay on both; unset, the ingest port serves all three.
    /// `rwgate rollup` serves the three here too (it serves nothing else).
    pub metrics_listen: Option<SocketAddr>,
    /// TLS termination. Both `cert` and `key` set: serve HTTPS (ALPN h2 and
    /// http/1.1); neither set: plain HTTP (a TLS ingress terminates in front).
    pub tls: TlsConfig,
    /// Limits applied to every request before any work is done.
    pub limits: LimitsConfig,
    /// How the `Cloud-Account-Id` of a request is authenticated.
    pub auth: AuthConfig,
    /// Labels that carry the tenant on every series.
    pub tenancy: TenancyConfig,
    /// Which series are kept.
    pub filter: FilterConfig,
    /// Where kept series are forwarded (Thanos receive).
    pub upstream: UpstreamConfig,
    /// Logging.
    pub log: LogConfig,
    /// The ClickHouse the tee writes to; the tee is on when `url` is set.
    pub clickhouse: ClickHouseConfig,
    /// The local durable spool between requests and ClickHouse.
    pub spool: SpoolConfig,
    /// The expense rollup (raw samples -> `expenses` rows).
    pub rollup: RollupConfig,
    /// Registration of charged resources with the platform REST API, so
    /// that the platform's API and UI see the expense rows.
    pub resources: ResourcesConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: DEFAULT_LISTEN
                .parse()
                .expect("valid default listen address"),
            metrics_listen: None,
            tls: TlsConfig::default(),
            limits: LimitsConfig::default(),
            auth: AuthConfig::default(),
            tenancy: TenancyConfig::default(),
            filter: FilterConfig::default(),
            upstream: UpstreamConfig::default(),
            log: LogConfig::default(),
            clickhouse: ClickHouseConfig::default(),
            spool: SpoolConfig::default(),
            rollup: RollupConfig::default(),
            resources: ResourcesConfig::default(),
        }
    }
}

/// Default time between checks of the TLS certificate and key files.
pub const DEFAULT_TLS_RELOAD_INTERVAL: Duration = Duration::from_secs(5);

/// TLS certificate and key (PEM files), and client certificates.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
    /// How often `cert` and `key` are read again: when their contents
    /// changed (an in-place write, a rename, or cert-manager swapping the
    /// symlinked directory of a Secret volume), new handshakes present the
    /// new pair; established connections keep theirs. A pair that does not
    /// load is logged once and the current one kept. `0s` never reloads.
    #[serde(with = "human_duration")]
    pub reload_interval: Duration,
    /// PEM CA certificates. Set, every client must present a certificate
    /// signed by one of them (mutual TLS); a handshake without one is
    /// refused. Needs `cert` and `key`; read once at start.
    pub client_ca: Option<PathBuf>,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            cert: None,
            key: None,
            reload_interval: DEFAULT_TLS_RELOAD_INTERVAL,
            client_ca: None,
        }
    }
}

/// Request limits. Exceeding a size limit answers 413, the series limit
/// 400, a per-series limit refuses that series (400 once the rest of the
/// request is written), the concurrency limit 503.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest accepted request body as sent (snappy-compressed).
    pub max_body_bytes: Size,
    /// Largest accepted decompressed body; checked against the snappy length
    /// header before anything is decompressed.
    pub max_decoded_bytes: Size,
    /// Most series in one request.
    pub max_series_per_request: usize,
    /// Most labels on one series, counted as sent (before tenant labels are
    /// set); a series with more is refused. At most 65536 less the number of
    /// `tenancy.labels`, what the tee's spool record holds.
    pub max_labels_per_series: usize,
    /// Longest label name, in bytes.
    pub max_label_name_bytes: usize,
    /// Longest label value, in bytes.
    pub max_label_value_bytes: usize,
    /// Requests processed at once, from the moment their headers are read
    /// (body reading counts); more are shed with 503 so that memory stays
    /// bounded under overload.
    pub max_concurrent_requests: usize,
    /// Share of `max_concurrent_requests` one tenant may hold at once
    /// (at least one request); beyond it, that tenant's requests are shed
    /// with 503, so one tenant's slow bodies cannot turn everyone away.
    pub tenant_max_concurrent_share: f64,
    /// Decompressed bytes all requests may hold at once (each request counts
    /// its declared size before decompressing); beyond it, 503. Bounds memory
    /// under many concurrent large requests.
    pub max_decoded_bytes_in_flight: Size,
    /// Open connections at once; beyond it, new ones wait in the listen backlog.
    pub max_connections: usize,
    /// Samples per second one tenant may send, across all its requests and
    /// this replica (a token bucket); beyond it, 429 with `Retry-After`.
    /// 0 turns the limit off. Prometheus drops a batch answered 429 unless its
    /// `queue_config.retry_on_http_429` is set (off by default), so leave headroom.
    pub tenant_samples_per_sec: u32,
    /// Samples a tenant may send at once above its rate (the bucket size);
    /// keep it above the senders' largest request (`max_samples_per_send`):
    /// a request with more samples than this can never pass and is answered
    /// 413 naming this setting.
    pub tenant_burst_samples: u32,
    /// Time allowed to receive a request's headers.
    #[serde(with = "human_duration")]
    pub header_read_timeout: Duration,
    /// Time allowed to receive a request's body (within `request_timeout`).
    #[serde(with = "human_duration")]
    pub body_read_timeout: Duration,
    /// The one deadline of a write request, from its headers to its answer:
    /// body read, auth, upstream attempts and their backoff all fit inside
    /// it (beyond it, 504). Keep it below the senders' `remote_timeout`
    /// (Prometheus: 30s), so that they get an answer rather than time out.
    #[serde(with = "human_duration")]
    pub request_timeout: Duration,
    /// On SIGTERM/SIGINT, the one deadline of the whole shutdown, counted
    /// from the signal: finishing in-flight requests, stopping the rollup
    /// and the drain, and flushing the spool each get what the stages
    /// before them left. Kubernetes kills the pod
    /// `terminationGracePeriodSeconds` after it starts the preStop hook, so
    /// keep preStop sleep + `shutdown_grace` below that (deploy/: 5s + 25s
    /// against 60s).
    #[serde(with = "human_duration")]
    pub shutdown_grace: Duration,
}

/// Default of `limits.request_timeout`: below Prometheus' default 30s
/// `remote_timeout`.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(25);
/// Default of `limits.tenant_max_concurrent_share`.
pub const DEFAULT_TENANT_MAX_CONCURRENT_SHARE: f64 = 0.5;
/// Default of `upstream.max_retry_after`.
pub const DEFAULT_MAX_RETRY_AFTER: Duration = Duration::from_secs(30);

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_body_bytes: Size(10 << 20),
            max_decoded_bytes: Size(64 << 20),
            max_series_per_request: 100_000,
            max_labels_per_series: 64,
            max_label_name_bytes: 1024,
            max_label_value_bytes: 4096,
            max_concurrent_requests: 256,
            tenant_max_concurrent_share: DEFAULT_TENANT_MAX_CONCURRENT_SHARE,
            max_decoded_bytes_in_flight: Size(256 << 20),
            max_connections: 10_000,
            tenant_samples_per_sec: 0,
            tenant_burst_samples: 200_000,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            shutdown_grace: Duration::from_secs(25),
        }
    }
}

/// Where credentials come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// The platform REST API, as diproxy did.
    Rest,
    /// A TOML file of `[[tenant]]` tables.
    Static,
    /// The header alone identifies the tenant (trusted networks only).
    None,
}

/// Tenant authentication.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// `rest`, `static` or `none`.
    pub mode: AuthMode,
    /// Base URL of the platform REST API (`rest` mode), e.g. `http://restapi:8999`.
    pub rest_url: Option<String>,
    /// File holding the cluster secret sent as the `Secret` header (`rest` mode).
    pub cluster_secret_file: Option<PathBuf>,
    /// Timeout of one REST lookup.
    #[serde(with = "human_duration")]
    pub rest_timeout: Duration,
    /// How long a known account's credentials are trusted without a new lookup.
    #[serde(with = "human_duration")]
    pub cache_ttl: Duration,
    /// How long an unknown account is remembered as unknown (stops retry storms).
    #[serde(with = "human_duration")]
    pub negative_cache_ttl: Duration,
    /// During a REST outage, how long past `cache_ttl` a cached answer is still used.
    #[serde(with = "human_duration")]
    pub stale_ttl: Duration,
    /// After a failed REST lookup, how long no new lookup is sent: cached
    /// answers are served (even stale), other accounts get 503. Keeps a
    /// hanging REST API from holding every request for `rest_timeout`.
    #[serde(with = "human_duration")]
    pub outage_backoff: Duration,
    /// Most accounts kept in the cache; known and unknown accounts are counted
    /// (and evicted) separately, so made-up ids cannot evict real tenants.
    pub cache_capacity: usize,
    /// Tenants file (`static` mode): `[[tenant]]` tables with `id`,
    /// `credentials` (base64 of `user:password`) and an optional `allowlist`.
    pub tenants_file: Option<PathBuf>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            mode: AuthMode::Rest,
            rest_url: None,
            cluster_secret_file: None,
            rest_timeout: Duration::from_secs(5),
            cache_ttl: Duration::from_secs(60),
            negative_cache_ttl: Duration::from_secs(60),
            stale_ttl: Duration::from_secs(3600),
            outage_backoff: Duration::from_secs(2),
            cache_capacity: 100_000,
            tenants_file: None,
        }
    }
}

/// Tenant labels.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TenancyConfig {
    /// Label names set to the authenticated account id on every series,
    /// replacing whatever the client sent.
    pub labels: Vec<String>,
}

impl Default for TenancyConfig {
    fn default() -> Self {
        TenancyConfig {
            labels: DEFAULT_TENANT_LABELS
                .iter()
                .map(|s| s.to_string())
                .collect(),
        }
    }
}

/// Series filter.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FilterConfig {
    /// Regex on `__name__`, fully anchored as Prometheus relabel regexes are.
    /// Series that do not match are dropped (and counted). A tenant's own
    /// allowlist (static tenants file) replaces this one for that tenant.
    pub allowlist: String,
}

impl Default for FilterConfig {
    fn default() -> Self {
        FilterConfig {
            allowlist: DEFAULT_ALLOWLIST.to_string(),
        }
    }
}

/// The remote-write upstream (Thanos receive).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// Remote-write URL kept series are POSTed to (http or https).
    pub url: String,
    /// Header carrying the account id to the upstream.
    pub tenant_header: String,
    /// Timeout of one upstream attempt.
    #[serde(with = "human_duration")]
    pub timeout: Duration,
    /// Retries after a retryable failure (5xx, 429, timeout, connection error).
    pub max_retries: u32,
    /// Backoff before the first retry; doubles each time, with jitter (each
    /// wait is up to twice its nominal value, never above `retry_max_backoff`).
    #[serde(with = "human_duration")]
    pub retry_backoff: Duration,
    /// Largest backoff between retries.
    #[serde(with = "human_duration")]
    pub retry_max_backoff: Duration,
    /// Longest `Retry-After` passed back to the sender when the upstream
    /// asks for a pause (429 or 5xx). rwgate itself waits as long as the
    /// upstream asks before retrying, when that fits within
    /// `limits.request_timeout`; otherwise it answers at once.
    #[serde(with = "human_duration")]
    pub max_retry_after: Duration,
    /// Idle pooled connections kept per upstream host.
    pub pool_max_idle: usize,
    /// TLS towards an `https` upstream.
    pub tls: UpstreamTlsConfig,
    /// The newest remote-write protocol the upstream takes: `"1.0"` (every
    /// released Thanos): Remote-Write 2.0 requests are converted to 1.0;
    /// `"2.0"` (Mimir, Prometheus 3.8 and later): they are forwarded as 2.0,
    /// with the tenant labels set. 1.0 requests are forwarded as 1.0 either
    /// way.
    pub protocol: RemoteWriteVersion,
}

/// A remote-write protocol version, written `"1.0"` or `"2.0"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum RemoteWriteVersion {
    /// `prometheus.WriteRequest`.
    #[default]
    #[serde(rename = "1.0")]
    V1,
    /// `io.prometheus.write.v2.Request`.
    #[serde(rename = "2.0")]
    V2,
}

/// TLS towards the upstream (PEM files). Unset, an `https` upstream's
/// certificate must chain to a public (webpki) root and no client
/// certificate is sent.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamTlsConfig {
    /// CA certificates the upstream's certificate must chain to, instead of
    /// the public roots (e.g. the cluster's internal CA).
    pub ca: Option<PathBuf>,
    /// Client certificate chain presented to the upstream (mutual TLS, e.g.
    /// Thanos receive's `--remote-write.server-tls-client-ca`); needs `key`.
    pub cert: Option<PathBuf>,
    /// The client certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            url: DEFAULT_UPSTREAM_URL.to_string(),
            tenant_header: DEFAULT_TENANT_HEADER.to_string(),
            timeout: Duration::from_secs(10),
            max_retries: 2,
            retry_backoff: Duration::from_millis(100),
            retry_max_backoff: Duration::from_secs(2),
            max_retry_after: DEFAULT_MAX_RETRY_AFTER,
            pool_max_idle: 64,
            tls: UpstreamTlsConfig::default(),
            protocol: RemoteWriteVersion::V1,
        }
    }
}

/// Log output.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `json` (one object per line) or `text`.
    pub format: LogFormat,
    /// Filter in `RUST_LOG` syntax, e.g. `info` or `rwgate=debug,info`.
    pub level: String,
    /// Most "rejected request" warnings logged per second; the rest are counted.
    pub max_rejections_per_sec: u32,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".to_string(),
            max_rejections_per_sec: 10,
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Text,
}

/// Default ClickHouse database.
pub const DEFAULT_CLICKHOUSE_DATABASE: &str = "default";
/// Default table of raw teed samples.
pub const DEFAULT_RAW_TABLE: &str = "kubecost_samples";
/// Default table of teed series' labels.
pub const DEFAULT_SERIES_TABLE: &str = "kubecost_series";
/// Default table of expense rows (the platform's).
pub const DEFAULT_EXPENSES_TABLE: &str = "expenses";
/// Default table holding the rollup watermark.
pub const DEFAULT_STATE_TABLE: &str = "rwgate_rollup_state";
/// Default table of touched (account, hour) per ingest minute.
pub const DEFAULT_TOUCHED_TABLE: &str = "kubecost_touched";
/// Default table mapping charged resources to their platform ids.
pub const DEFAULT_RESOURCES_TABLE: &str = "rwgate_resources";
/// Default timeout of one ClickHouse request.
pub const DEFAULT_CLICKHOUSE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default spool directory.
pub const DEFAULT_SPOOL_DIR: &str = "/var/lib/rwgate/spool";
/// Default bound on unsent spool bytes (beyond it, teed requests get 503).
pub const DEFAULT_SPOOL_MAX_BYTES: u64 = 1 << 30;
/// Default spool segment file size.
pub const DEFAULT_SPOOL_SEGMENT_BYTES: u64 = 64 << 20;
/// Default most samples in one ClickHouse insert.
pub const DEFAULT_BATCH_MAX_ROWS: usize = 200_000;
/// Default most estimated bytes of rows in one ClickHouse insert.
pub const DEFAULT_BATCH_MAX_BYTES: u64 = 64 << 20;
/// Default oldest sample timestamp the tee accepts (older: not teed, counted).
pub const DEFAULT_MAX_SAMPLE_AGE: Duration = Duration::from_secs(365 * 86_400);
/// Default furthest-ahead sample timestamp the tee accepts.
pub const DEFAULT_MAX_SAMPLE_FUTURE: Duration = Duration::from_secs(86_400);
/// Default wait for more appends before a group commit.
pub const DEFAULT_COMMIT_DELAY: Duration = Duration::from_millis(1);
pub const DEFAULT_COMMIT_INTERVAL: Duration = Duration::from_millis(4);
/// Default longest a sample waits in the spool for its batch to fill.
pub const DEFAULT_BATCH_MAX_AGE: Duration = Duration::from_secs(1);
/// Default first backoff after a failed insert (doubles, with jitter).
pub const DEFAULT_RETRY_BACKOFF: Duration = Duration::from_millis(200);
/// Default largest backoff between failed inserts.
pub const DEFAULT_RETRY_MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Default rollup pass interval.
pub const DEFAULT_ROLLUP_INTERVAL: Duration = Duration::from_secs(60);
/// Default re-read overlap behind the rollup watermark.
pub const DEFAULT_ROLLUP_OVERLAP: Duration = Duration::from_secs(300);
/// Default cap on the time one sample is charged for.
pub const DEFAULT_MAX_GAP: Duration = Duration::from_secs(300);
/// Default nominal scrape step (what the first sample ever is charged for).
pub const DEFAULT_STEP: Duration = Duration::from_secs(60);

/// ClickHouse connection and table names. The tee (spool, writer, rollup)
/// runs when `url` is set.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClickHouseConfig {
    /// HTTP interface URL, e.g. `http://clickhouse:8123` (plain http: the
    /// client has no TLS; put a TLS proxy in between if needed). Unset: no tee.
    pub url: Option<String>,
    /// Database holding the tables.
    pub database: String,
    /// User name (sent as `X-ClickHouse-User`).
    pub user: Option<String>,
    /// File holding the password (trailing newline ignored).
    pub password_file: Option<PathBuf>,
    /// Table of raw samples (ReplacingMergeTree).
    pub raw_table: String,
    /// Table of the teed series' labels, one row per series and month
    /// (ReplacingMergeTree); raw samples refer to it by `series_id`.
    pub series_table: String,
    /// Table of expense rows the platform REST API reads (CollapsingMergeTree).
    pub expenses_table: String,
    /// Small table holding the rollup watermark.
    pub state_table: String,
    /// Small table of (ingest minute, account, hour) the writer touched, so
    /// that a rollup pass reads only what changed since its last pass.
    pub touched_table: String,
    /// Small table mapping each registered resource (account, cloud resource
    /// id) to the platform's id for it and the `first_seen`/`last_seen` the
    /// platform holds, so that a restart writes rows without the REST API.
    pub resources_table: String,
    /// Run `migrate` when the tee starts (needs DDL rights; failures are
    /// logged and retried, ingestion is not held up).
    pub migrate_on_start: bool,
    /// LZ4-compress inserts (`decompress=1`; every ClickHouse since 1.1 reads it).
    pub compress: bool,
    /// Timeout of one ClickHouse request.
    #[serde(with = "human_duration")]
    pub timeout: Duration,
}

impl Default for ClickHouseConfig {
    fn default() -> Self {
        ClickHouseConfig {
            url: None,
            database: DEFAULT_CLICKHOUSE_DATABASE.to_string(),
            user: None,
            password_file: None,
            raw_table: DEFAULT_RAW_TABLE.to_string(),
            series_table: DEFAULT_SERIES_TABLE.to_string(),
            expenses_table: DEFAULT_EXPENSES_TABLE.to_string(),
            state_table: DEFAULT_STATE_TABLE.to_string(),
            touched_table: DEFAULT_TOUCHED_TABLE.to_string(),
            resources_table: DEFAULT_RESOURCES_TABLE.to_string(),
            migrate_on_start: true,
            compress: true,
            timeout: DEFAULT_CLICKHOUSE_TIMEOUT,
        }
    }
}

/// The durable spool: teed samples are made durable here before a request is
/// acknowledged, and sent to ClickHouse from here.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolConfig {
    /// Directory of segment files (one per replica; keep it on a persistent volume).
    pub dir: PathBuf,
    /// Most bytes not yet acknowledged by ClickHouse; beyond it, requests with
    /// cost samples are refused with 503 (the sender retries). Disk use can
    /// exceed it by up to one segment.
    pub max_bytes: Size,
    /// Size at which a new segment file is started.
    pub segment_bytes: Size,
    /// How long the spool writer waits for more appends after the first
    /// one of a group before it writes and fsyncs the group: each teed
    /// request waits up to this much longer, and concurrent requests share
    /// fewer fsyncs (an fsync costs ~100-200 µs of CPU on a VM disk). `0s`
    /// commits at once (still grouping whatever queued meanwhile).
    #[serde(with = "human_duration")]
    pub commit_delay: Duration,
    /// Least time between the starts of two group commits. Under load
    /// (teed requests closer together than this) a group stays open until
    /// the interval since the last one has passed: at most 1/interval
    /// fsyncs a second (250 at the default 4ms), each shared by more
    /// requests, for up to this much more wait on teed requests. A lone
    /// request after a quiet spell waits only `commit_delay`. Requests
    /// that each wait for their commit then go through at most
    /// (requests in flight)/interval a second: 64,000 teed requests/s at
    /// the defaults (256 in flight, 4ms). `0s` turns it off.
    #[serde(with = "human_duration")]
    pub commit_interval: Duration,
    /// Most samples in one ClickHouse insert.
    pub batch_max_rows: usize,
    /// Most estimated bytes of rows in one ClickHouse insert (default 64 MiB):
    /// a record whose rows expand large (long labels, many samples) is
    /// inserted in several parts, so writer memory stays bounded.
    pub batch_max_bytes: Size,
    /// Samples older than this (by their timestamp) are not teed, only
    /// counted (`rwgate_tee_samples_rejected_total`). Default 365 days.
    #[serde(with = "human_duration")]
    pub max_sample_age: Duration,
    /// Samples further ahead than this are not teed, only counted. Default 1 day.
    #[serde(with = "human_duration")]
    pub max_sample_future: Duration,
    /// Longest the writer waits for a batch to fill before inserting it.
    #[serde(with = "human_duration")]
    pub batch_max_age: Duration,
    /// Backoff after the first failed insert; doubles each time, with jitter
    /// (each wait is up to twice its nominal value, never above
    /// `retry_max_backoff`).
    #[serde(with = "human_duration")]
    pub retry_backoff: Duration,
    /// Largest backoff between failed inserts.
    #[serde(with = "human_duration")]
    pub retry_max_backoff: Duration,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            dir: PathBuf::from(DEFAULT_SPOOL_DIR),
            max_bytes: Size(DEFAULT_SPOOL_MAX_BYTES),
            segment_bytes: Size(DEFAULT_SPOOL_SEGMENT_BYTES),
            commit_delay: DEFAULT_COMMIT_DELAY,
            commit_interval: DEFAULT_COMMIT_INTERVAL,
            batch_max_rows: DEFAULT_BATCH_MAX_ROWS,
            batch_max_bytes: Size(DEFAULT_BATCH_MAX_BYTES),
            max_sample_age: DEFAULT_MAX_SAMPLE_AGE,
            max_sample_future: DEFAULT_MAX_SAMPLE_FUTURE,
            batch_max_age: DEFAULT_BATCH_MAX_AGE,
            retry_backoff: DEFAULT_RETRY_BACKOFF,
            retry_max_backoff: DEFAULT_RETRY_MAX_BACKOFF,
        }
    }
}

/// Expense row grain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Grain {
    /// One row per resource and UTC day (`date` at midnight), as every importer writes.
    Day,
    /// One row per resource and UTC hour.
    Hour,
}

/// Which series are charged (exactly one, so money is never counted twice).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Charge {
    /// `cloudtuner_kubecost_namespace_total_cost`, resource `k8s-ns-<md5>`.
    Namespace,
    /// `cloudtuner_kubecost_pod_total_cost`, resource `k8s-pod-<md5>`.
    Pod,
}

/// The rollup loop deriving expense rows from raw samples.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RollupConfig {
    /// Run the rollup in `serve`. Exactly one process per ClickHouse may
    /// (on by default for a single node; off on all but one replica, or on
    /// every replica when a `rwgate rollup` role runs it, which it always
    /// does, whatever this says).
    pub enabled: bool,
    /// Time between passes.
    #[serde(with = "human_duration")]
    pub interval: Duration,
    /// How far behind its watermark a pass re-reads (covers inserts in flight
    /// and clock skew between replicas).
    #[serde(with = "human_duration")]
    pub overlap: Duration,
    /// `day` or `hour`.
    pub grain: Grain,
    /// `namespace` or `pod`.
    pub charge: Charge,
    /// Longest time one sample is charged for (no money across outages).
    #[serde(with = "human_duration")]
    pub max_gap: Duration,
    /// Nominal scrape step: what the first sample ever of a resource is charged for.
    #[serde(with = "human_duration")]
    pub step: Duration,
}

impl Default for RollupConfig {
    fn default() -> Self {
        RollupConfig {
            enabled: true,
            interval: DEFAULT_ROLLUP_INTERVAL,
            overlap: DEFAULT_ROLLUP_OVERLAP,
            grain: Grain::Day,
            charge: Charge::Namespace,
            max_gap: DEFAULT_MAX_GAP,
            step: DEFAULT_STEP,
        }
    }
}

/// Durations in the tree: read as `humantime` reads them (`500ms`, `1h 30m`,
/// `365days`), written the way people write them (`365d`, not humantime's
/// `11months 30days 3h 50m 24s`), so `check-config` output reads back.
/// Read as a newtype named [`DURATION_MARKER`], by which the settings probe
/// (`settings::all`) knows a duration.
mod human_duration {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&crate::clock::HumanDuration(*d))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        struct Human;
        impl<'de> serde::de::Visitor<'de> for Human {
            type Value = Duration;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(super::DURATION_EXPECTED)
            }
            fn visit_newtype_struct<D: serde::Deserializer<'de>>(
                self,
                d: D,
            ) -> Result<Duration, D::Error> {
                humantime_serde::deserialize(d)
            }
        }
        d.deserialize_newtype_struct(super::DURATION_MARKER, Human)
    }
}

/// The newtype name durations of the tree are read as.
pub const DURATION_MARKER: &str = "rwgate::Duration";
/// What a duration looks like, for messages.
pub const DURATION_EXPECTED: &str = "a duration such as 30s, 500ms or 1h 30m";

/// Most resources the platform's importers send in one bulk call (and
/// the most `resources.batch_size` may be).
pub const MAX_BULK_RESOURCES: usize = 200;
/// Default timeout of one bulk registration call.
pub const DEFAULT_RESOURCES_TIMEOUT: Duration = Duration::from_secs(10);
/// Default bulk calls in flight at once.
pub const DEFAULT_RESOURCES_CONCURRENCY: usize = 4;
/// Default first wait after a failed registration (doubles, with jitter).
pub const DEFAULT_RESOURCES_RETRY_BACKOFF: Duration = Duration::from_secs(2);
/// Default longest wait between registration attempts.
pub const DEFAULT_RESOURCES_RETRY_MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Default least time between two updates of one resource's `first_seen`/`last_seen`.
pub const DEFAULT_RESOURCES_UPDATE_INTERVAL: Duration = Duration::from_secs(20 * 60);

/// What the `resource_id` of an expense row is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum ExpenseIds {
    /// The platform's id of the registered resource (the `id` the bulk call
    /// returns), which is what the platform's REST API joins on.
    Platform,
    /// The cloud resource id (`k8s-ns-...`, `k8s-pod-...`), for platforms
    /// that join expenses on it.
    CloudResourceId,
}

/// Registration of charged resources (`POST
/// {rest_url}/restapi/v2/cloud_accounts/{account}/cloud_resources/bulk`):
/// the rollup registers each resource before writing its first expense
/// row, and keeps its `first_seen`/`last_seen` covering its samples. A
/// failed registration delays only the rows of the resources concerned.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResourcesConfig {
    /// Register resources. Unset: on when `auth.mode = "rest"`.
    pub enabled: Option<bool>,
    /// Base URL of the platform REST API. Unset: `auth.rest_url`.
    pub rest_url: Option<String>,
    /// File holding the cluster secret sent as the `Secret` header. Unset:
    /// `auth.cluster_secret_file`.
    pub cluster_secret_file: Option<PathBuf>,
    /// `platform` or `cloud_resource_id`. Unset: `platform` when
    /// registration is on, else `cloud_resource_id`.
    pub expense_ids: Option<ExpenseIds>,
    /// Timeout of one bulk call.
    #[serde(with = "human_duration")]
    pub timeout: Duration,
    /// Most resources in one bulk call (at most 200, as the platform's
    /// own importers send).
    pub batch_size: usize,
    /// Bulk calls in flight at once.
    pub concurrency: usize,
    /// Wait after the first failed call; doubles each time, with jitter.
    /// An outage (5xx, timeout, 401/403) holds every account; a 404 or 400
    /// holds only the account concerned.
    #[serde(with = "human_duration")]
    pub retry_backoff: Duration,
    /// Longest wait between attempts.
    #[serde(with = "human_duration")]
    pub retry_max_backoff: Duration,
    /// Least time between two updates of one resource's `first_seen` and
    /// `last_seen` (they move forward an hour at a time, so a steady stream
    /// costs one update per resource per hour, and a sender catching up on
    /// a week costs a few).
    #[serde(with = "human_duration")]
    pub update_interval: Duration,
}

impl Default for ResourcesConfig {
    fn default() -> Self {
        ResourcesConfig {
            enabled: None,
            rest_url: None,
            cluster_secret_file: None,
            expense_ids: None,
            timeout: DEFAULT_RESOURCES_TIMEOUT,
            batch_size: MAX_BULK_RESOURCES,
            concurrency: DEFAULT_RESOURCES_CONCURRENCY,
            retry_backoff: DEFAULT_RESOURCES_RETRY_BACKOFF,
            retry_max_backoff: DEFAULT_RESOURCES_RETRY_MAX_BACKOFF,
            update_interval: DEFAULT_RESOURCES_UPDATE_INTERVAL,
        }
    }
}

impl Config {
    /// Whether charged resources are registered (`resources.enabled`, by
    /// default on with `auth.mode = "rest"`).
    pub fn registers_resources(&self) -> bool {
        self.resources
            .enabled
            .unwrap_or(self.auth.mode == AuthMode::Rest)
    }

    /// The `resource_id` expense rows carry.
    pub fn expense_ids(&self) -> ExpenseIds {
        self.resources
            .expense_ids
            .unwrap_or(if self.registers_resources() {
                ExpenseIds::Platform
            } else {
                ExpenseIds::CloudResourceId
            })
    }

    /// The REST API registration talks to: `resources.rest_url`, else `auth.rest_url`.
    pub fn resources_rest_url(&self) -> Option<&str> {
        self.resources
            .rest_url
            .as_deref()
            .or(self.auth.rest_url.as_deref())
    }

    /// The cluster secret file registration sends: `resources.cluster_secret_file`,
    /// else `auth.cluster_secret_file`.
    pub fn resources_secret_file(&self) -> Option<&std::path::Path> {
        self.resources
            .cluster_secret_file
            .as_deref()
            .or(self.auth.cluster_secret_file.as_deref())
    }
}

/// The serde names of the choice settings, for log lines and messages.
macro_rules! display_as_serde_name {
    ($($ty:ident { $($variant:ident => $name:literal),+ $(,)? })+) => {$(
        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(match self { $($ty::$variant => $name),+ })
            }
        }
    )+};
}

display_as_serde_name! {
    AuthMode { Rest => "rest", Static => "static", None => "none" }
    LogFormat { Json => "json", Text => "text" }
    Grain { Day => "day", Hour => "hour" }
    Charge { Namespace => "namespace", Pod => "pod" }
    ExpenseIds { Platform => "platform", CloudResourceId => "cloud_resource_id" }
}

/// What a size looks like, for messages.
pub const SIZE_EXPECTED: &str = "a size such as 16MiB, or a number of bytes";

/// A byte size, written as a plain number of bytes or as `16MiB`, `512KiB`, `1GB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl Size {
    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl std::str::FromStr for Size {
    type Err = String;
    /// The messages do not repeat the value: the error naming the setting
    /// shows it.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        if num.is_empty() {
            return Err(format!("expected {SIZE_EXPECTED}"));
        }
        if unit.starts_with(['.', ',']) {
            return Err("a size is a whole number of its unit: write 512MiB, not 0.5GiB".into());
        }
        let too_large = || "too large: at most 18446744073709551615 bytes (16EiB)".to_string();
        let n: u64 = num.parse().map_err(|_| too_large())?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            other => {
                return Err(format!(
                    "unknown unit {}: use B, KiB, MiB, GiB, KB, MB or GB",
                    shown(other)
                ))
            }
        };
        n.checked_mul(mult).map(Size).ok_or_else(too_large)
    }
}

impl std::fmt::Display for Size {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0;
        for (unit, mult) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
            if n >= mult && n % mult == 0 {
                return write!(f, "{}{unit}", n / mult);
            }
        }
        write!(f, "{n}")
    }
}

impl Serialize for Size {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// The newtype name sizes are read as, by which the settings probe
/// (`settings::all`) knows a size.
pub const SIZE_MARKER: &str = "rwgate::Size";

/// A number of bytes or text (`16MiB`).
impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{Error, Unexpected};
        struct Bytes;
        impl<'de> serde::de::Visitor<'de> for Bytes {
            type Value = Size;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(SIZE_EXPECTED)
            }
            fn visit_newtype_struct<D: serde::Deserializer<'de>>(
                self,
                d: D,
            ) -> Result<Size, D::Error> {
                d.deserialize_any(self)
            }
            fn visit_u64<E: Error>(self, n: u64) -> Result<Size, E> {
                Ok(Size(n))
            }
            fn visit_i64<E: Error>(self, n: i64) -> Result<Size, E> {
                u64::try_from(n)
                    .map(Size)
                    .map_err(|_| E::invalid_value(Unexpected::Signed(n), &self))
            }
            fn visit_str<E: Error>(self, s: &str) -> Result<Size, E> {
                s.parse().map_err(E::custom)
            }
        }
        d.deserialize_newtype_struct(SIZE_MARKER, Bytes)
    }
}

/// A configuration problem, naming the setting at fault (and, for a value
/// that does not fit, where the value came from).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The config file is not TOML.
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    /// A value that breaks a rule of its setting.
    #[error("invalid {field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    /// A value that does not fit its setting, or a setting that does not
    /// exist; `origin` is the config file, the environment variable or the
    /// flag it came from.
    #[error("invalid {setting}{} (from {origin}): {message}", value.as_deref().map(|v| format!(" = {}", shown(v))).unwrap_or_default())]
    Setting {
        setting: String,
        value: Option<String>,
        origin: String,
        message: String,
    },
    /// A file a setting names cannot be used (the message names the setting).
    #[error("{0}")]
    Unusable(String),
    /// An environment variable of an earlier release, no longer read.
    #[error("{old} is no longer read: set {new} instead")]
    Renamed { old: &'static str, new: String },
}

fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        message: message.into(),
    }
}

impl Config {
    /// Checks what serde cannot (cross-field rules, regexes, URLs) in the
    /// whole tree, as `serve` uses it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_serving()?;
        self.validate_log()?;
        self.validate_clickhouse()?;
        self.validate_spool()?;
        self.validate_rollup()
    }

    /// Listening, TLS, limits, auth, tenancy, filter and upstream.
    pub fn validate_serving(&self) -> Result<(), ConfigError> {
        if let Some(m) = self.metrics_listen {
            let l = self.listen;
            let overlap = m.ip() == l.ip() || m.ip().is_unspecified() || l.ip().is_unspecified();
            if m.port() != 0 && m.port() == l.port() && overlap {
                return Err(invalid(
                    "metrics_listen",
                    format!("{m} is the ingest address {l}; use another port"),
                ));
            }
        }
        match (&self.tls.cert, &self.tls.key) {
            (Some(_), None) => {
                return Err(invalid("tls.key", "tls.cert is set but tls.key is not"))
            }
            (None, Some(_)) => {
                return Err(invalid("tls.cert", "tls.key is set but tls.cert is not"))
            }
            _ => {}
        }
        if self.tls.client_ca.is_some() && self.tls.cert.is_none() {
            return Err(invalid(
                "tls.client_ca",
                "needs tls.cert and tls.key (client certificates are checked over TLS only)",
            ));
        }
        let l = &self.limits;
        if l.max_body_bytes.0 == 0 {
            return Err(invalid("limits.max_body_bytes", "must be greater than 0"));
        }
        if l.max_decoded_bytes.0 < l.max_body_bytes.0 {
            return Err(invalid(
                "limits.max_decoded_bytes",
                "must be at least limits.max_body_bytes",
            ));
        }
        if l.tenant_samples_per_sec > 0 && l.tenant_burst_samples == 0 {
            return Err(invalid(
                "limits.tenant_burst_samples",
                "must be greater than 0 when limits.tenant_samples_per_sec is set",
            ));
        }
        if l.max_decoded_bytes_in_flight.0 < l.max_decoded_bytes.0 {
            return Err(invalid(
                "limits.max_decoded_bytes_in_flight",
                "must be at least limits.max_decoded_bytes, or no large request could pass",
            ));
        }
        if l.max_connections == 0 {
            return Err(invalid("limits.max_connections", "must be greater than 0"));
        }
        if l.max_concurrent_requests == 0 {
            return Err(invalid(
                "limits.max_concurrent_requests",
                "must be greater than 0",
            ));
        }
        if !(l.tenant_max_concurrent_share > 0.0 && l.tenant_max_concurrent_share <= 1.0) {
            return Err(invalid(
                "limits.tenant_max_concurrent_share",
                "must be greater than 0 and at most 1",
            ));
        }
        if l.request_timeout.is_zero() {
            return Err(invalid("limits.request_timeout", "must be greater than 0"));
        }
        match self.auth.mode {
            AuthMode::Rest => {
                let url =
                    self.auth.rest_url.as_deref().ok_or_else(|| {
                        invalid("auth.rest_url", "required when auth.mode is rest")
                    })?;
                check_http_url("auth.rest_url", url)?;
                if self.auth.cluster_secret_file.is_none() {
                    return Err(invalid(
                        "auth.cluster_secret_file",
                        "required when auth.mode is rest",
                    ));
                }
            }
            AuthMode::Static => {
                if self.auth.tenants_file.is_none() {
                    return Err(invalid(
                        "auth.tenants_file",
                        "required when auth.mode is static",
                    ));
                }
            }
            AuthMode::None => {}
        }
        if self.tenancy.labels.is_empty() {
            return Err(invalid(
                "tenancy.labels",
                "at least one label is needed to enforce tenancy",
            ));
        }
        for name in &self.tenancy.labels {
            if !crate::wire::is_valid_label_name(name) || name == "__name__" {
                return Err(invalid(
                    "tenancy.labels",
                    format!("{} is not a usable label name", shown(name)),
                ));
            }
        }
        crate::filter::Allowlist::new(&self.filter.allowlist)
            .map_err(|e| invalid("filter.allowlist", e.to_string()))?;
        check_http_url("upstream.url", &self.upstream.url)?;
        if http::HeaderName::from_bytes(self.upstream.tenant_header.as_bytes()).is_err() {
            return Err(invalid(
                "upstream.tenant_header",
                "not a valid HTTP header name",
            ));
        }
        if self.upstream.timeout.is_zero() {
            return Err(invalid("upstream.timeout", "must be greater than 0"));
        }
        let utls = &self.upstream.tls;
        match (&utls.cert, &utls.key) {
            (Some(_), None) => {
                return Err(invalid(
                    "upstream.tls.key",
                    "upstream.tls.cert is set but upstream.tls.key is not",
                ))
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "upstream.tls.cert",
                    "upstream.tls.key is set but upstream.tls.cert is not",
                ))
            }
            _ => {}
        }
        let https = self.upstream.url.parse::<http::Uri>().ok().and_then(|u| {
            u.scheme_str()
                .map(|scheme| scheme.eq_ignore_ascii_case("https"))
        });
        if https != Some(true) {
            if utls.ca.is_some() {
                return Err(invalid("upstream.tls.ca", "needs an https:// upstream.url"));
            }
            if utls.cert.is_some() {
                return Err(invalid(
                    "upstream.tls.cert",
                    "needs an https:// upstream.url",
                ));
            }
        }
        // A teed series' spool record holds its labels but `__name__`, plus
        // the tenant labels, and counts them in 16 bits
        // (`cost::record::MAX_LABELS`, not imported: the record depends on
        // this module).
        let most = (usize::from(u16::MAX) + 1).saturating_sub(self.tenancy.labels.len());
        if self.limits.max_labels_per_series > most {
            return Err(invalid(
                "limits.max_labels_per_series",
                format!(
                    "must be at most {most} (65536 less the {} tenancy.labels: the tee's spool record counts a series' labels in 16 bits)",
                    self.tenancy.labels.len()
                ),
            ));
        }
        Ok(())
    }

    /// `[log]`.
    pub fn validate_log(&self) -> Result<(), ConfigError> {
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| invalid("log.level", e.to_string()))?;
        Ok(())
    }

    /// `[clickhouse]` (`url` may be unset: no tee).
    pub fn validate_clickhouse(&self) -> Result<(), ConfigError> {
        let ch = &self.clickhouse;
        if let Some(url) = &ch.url {
            check_http_url("clickhouse.url", url)?;
            if url
                .get(..8)
                .is_some_and(|s| s.eq_ignore_ascii_case("https://"))
            {
                return Err(invalid(
                    "clickhouse.url",
                    format!(
                        "{} is https, and rwgate talks to ClickHouse over plain http only: use http:// (through a TLS proxy if the link must be encrypted)",
                        shown(url)
                    ),
                ));
            }
        }
        // The database is only sent as the HTTP `database` parameter, so any
        // name ClickHouse has is fine; table names go into SQL unquoted.
        if ch.database.is_empty() || ch.database.chars().any(char::is_control) {
            return Err(invalid(
                "clickhouse.database",
                "must be a non-empty name without control characters",
            ));
        }
        for (field, name) in [
            ("clickhouse.raw_table", &ch.raw_table),
            ("clickhouse.series_table", &ch.series_table),
            ("clickhouse.expenses_table", &ch.expenses_table),
            ("clickhouse.state_table", &ch.state_table),
            ("clickhouse.touched_table", &ch.touched_table),
            ("clickhouse.resources_table", &ch.resources_table),
        ] {
            if name.is_empty()
                || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                || name.as_bytes()[0].is_ascii_digit()
            {
                return Err(invalid(
                    field,
                    format!(
                        "{} must be a plain identifier ([A-Za-z_][A-Za-z0-9_]*)",
                        shown(name)
                    ),
                ));
            }
        }
        if ch.timeout.is_zero() {
            return Err(invalid("clickhouse.timeout", "must be greater than 0"));
        }
        Ok(())
    }

    /// `[spool]`.
    pub fn validate_spool(&self) -> Result<(), ConfigError> {
        let sp = &self.spool;
        if sp.commit_delay > Duration::from_secs(1) {
            return Err(invalid("spool.commit_delay", "must be at most 1s"));
        }
        if sp.commit_interval > Duration::from_secs(1) {
            return Err(invalid("spool.commit_interval", "must be at most 1s"));
        }
        if sp.segment_bytes.0 < 4096 {
            return Err(invalid("spool.segment_bytes", "must be at least 4096"));
        }
        if sp.max_bytes.0 < sp.segment_bytes.0 {
            return Err(invalid(
                "spool.max_bytes",
                "must be at least spool.segment_bytes",
            ));
        }
        if sp.batch_max_rows == 0 {
            return Err(invalid("spool.batch_max_rows", "must be greater than 0"));
        }
        if sp.batch_max_bytes.0 == 0 {
            return Err(invalid("spool.batch_max_bytes", "must be greater than 0"));
        }
        if sp.retry_backoff.is_zero() || sp.retry_max_backoff < sp.retry_backoff {
            return Err(invalid(
                "spool.retry_max_backoff",
                "retry_backoff must be > 0 and retry_max_backoff >= retry_backoff",
            ));
        }
        Ok(())
    }

    /// `[rollup]`.
    pub fn validate_rollup(&self) -> Result<(), ConfigError> {
        let r = &self.rollup;
        if r.interval.is_zero() {
            return Err(invalid("rollup.interval", "must be greater than 0"));
        }
        if r.step.is_zero() {
            return Err(invalid("rollup.step", "must be greater than 0"));
        }
        if r.max_gap < r.step {
            return Err(invalid("rollup.max_gap", "must be at least rollup.step"));
        }
        self.validate_resources()
    }

    /// For the rollup loop (`serve` with `rollup.enabled`, `rwgate rollup`):
    /// with registration on, a REST API to register with. (`reconcile` runs
    /// without one: known resources get rows, the others wait.)
    pub fn validate_registration_source(&self) -> Result<(), ConfigError> {
        if self.registers_resources()
            && (self.resources_rest_url().is_none() || self.resources_secret_file().is_none())
        {
            return Err(invalid(
                "resources.rest_url",
                "registration is on (resources.enabled, or auth.mode = \"rest\"): set resources.rest_url and resources.cluster_secret_file (or auth.rest_url and auth.cluster_secret_file), or resources.enabled = false",
            ));
        }
        Ok(())
    }

    /// The `[resources]` rules.
    fn validate_resources(&self) -> Result<(), ConfigError> {
        let rs = &self.resources;
        if let Some(url) = &rs.rest_url {
            check_http_url("resources.rest_url", url)?;
        }
        if rs.enabled == Some(true) {
            if self.resources_rest_url().is_none() {
                return Err(invalid(
                    "resources.rest_url",
                    "required when resources.enabled is true (or set auth.rest_url)",
                ));
            }
            if self.resources_secret_file().is_none() {
                return Err(invalid(
                    "resources.cluster_secret_file",
                    "required when resources.enabled is true (or set auth.cluster_secret_file)",
                ));
            }
        }
        if rs.expense_ids == Some(ExpenseIds::Platform) && !self.registers_resources() {
            return Err(invalid(
                "resources.expense_ids",
                "platform ids come from registration: set resources.enabled = true or use cloud_resource_id",
            ));
        }
        if rs.timeout.is_zero() {
            return Err(invalid("resources.timeout", "must be greater than 0"));
        }
        if !(1..=MAX_BULK_RESOURCES).contains(&rs.batch_size) {
            return Err(invalid(
                "resources.batch_size",
                format!("must be between 1 and {MAX_BULK_RESOURCES}"),
            ));
        }
        if rs.concurrency == 0 {
            return Err(invalid("resources.concurrency", "must be greater than 0"));
        }
        if rs.retry_backoff.is_zero() || rs.retry_max_backoff < rs.retry_backoff {
            return Err(invalid(
                "resources.retry_max_backoff",
                "retry_backoff must be > 0 and retry_max_backoff >= retry_backoff",
            ));
        }
        Ok(())
    }

    /// The config as TOML with secrets redacted (`check-config`). The config
    /// holds secrets only by file path, so nothing here is secret itself, but
    /// URLs may carry `user:password@`, which is masked.
    pub fn to_redacted_toml(&self) -> String {
        let mut c = self.clone();
        c.upstream.url = redact_url(&c.upstream.url);
        c.auth.rest_url = c.auth.rest_url.as_deref().map(redact_url);
        c.clickhouse.url = c.clickhouse.url.as_deref().map(redact_url);
        c.resources.rest_url = c.resources.rest_url.as_deref().map(redact_url);
        toml::to_string_pretty(&c).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

fn check_http_url(field: &'static str, written: &str) -> Result<(), ConfigError> {
    // Named without its credentials: the message goes to a terminal or a log.
    let url = &redact_url(written);
    let uri: http::Uri = written
        .parse()
        .map_err(|e| invalid(field, format!("{} is not a URL: {e}", shown(url))))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => {
            return Err(invalid(
                field,
                format!("{} must start with http:// or https://", shown(url)),
            ))
        }
    }
    if uri.host().is_none() {
        return Err(invalid(field, format!("{} has no host", shown(url))));
    }
    Ok(())
}

/// `url` with any `user:password@` masked. Only the authority (up to the
/// first `/`, `?` or `#` after the scheme) holds credentials: an `@` in the
/// path or query stays, and a password with an unescaped `@` is masked
/// whole.
pub fn redact_url(url: &str) -> String {
    let Some(start) = url.find("://").map(|s| s + 3) else {
        return url.to_string();
    };
    let rest = &url[start..];
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    match authority.rfind('@') {
        Some(at) => format!("{}***@{}", &url[..start], &rest[at + 1..]),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_protocol_is_1_0_or_2_0() {
        for (text, want) in [
            ("\"1.0\"", RemoteWriteVersion::V1),
            ("\"2.0\"", RemoteWriteVersion::V2),
        ] {
            let c = crate::settings::from_toml(&format!("[upstream]\nprotocol = {text}\n"), "test")
                .unwrap();
            assert_eq!(c.upstream.protocol, want, "{text}");
        }
        assert_eq!(Config::default().upstream.protocol, RemoteWriteVersion::V1);
        let err = crate::settings::from_toml("[upstream]\nprotocol = \"3.0\"\n", "test")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "invalid upstream.protocol = `3.0` (from config file test): expected \"1.0\" or \"2.0\""
        );
    }

    #[test]
    fn defaults_match_diproxy() {
        let c = Config::default();
        assert_eq!(c.listen.port(), 8935);
        assert_eq!(c.upstream.tenant_header, "Cloud-Account-Id");
        assert_eq!(c.upstream.url, "http://thanos-receive:19291/api/v1/receive");
    }

    #[test]
    fn parses_human_units_and_rejects_unknown_fields() {
        let c = crate::settings::from_toml(
            r#"
            listen = "127.0.0.1:9000"
            [limits]
            max_body_bytes = "4MiB"
            max_decoded_bytes = 33554432
            body_read_timeout = "1500ms"
            [auth]
            mode = "none"
            "#,
            "test",
        )
        .unwrap();
        assert_eq!(c.limits.max_body_bytes, Size(4 << 20));
        assert_eq!(c.limits.max_decoded_bytes, Size(32 << 20));
        assert_eq!(c.limits.body_read_timeout, Duration::from_millis(1500));
        c.validate().unwrap();

        let err = crate::settings::from_toml("[limits]\nmax_bdy_bytes = 1\n", "test").unwrap_err();
        assert!(err.to_string().contains("max_bdy_bytes"), "{err}");
    }

    #[test]
    fn listener_and_tls_rules() {
        let mut c = Config::default();
        c.auth.mode = AuthMode::None;
        c.tls.client_ca = Some("/ca.pem".into());
        let err = c.validate().unwrap_err().to_string();
        assert!(err.starts_with("invalid tls.client_ca"), "{err}");
        c.tls.cert = Some("/tls.crt".into());
        c.tls.key = Some("/tls.key".into());
        c.validate().unwrap();
        c.metrics_listen = Some("127.0.0.1:8935".parse().unwrap());
        let err = c.validate().unwrap_err().to_string();
        assert!(err.starts_with("invalid metrics_listen"), "{err}");
        c.metrics_listen = Some("0.0.0.0:9090".parse().unwrap());
        c.validate().unwrap();
    }

    #[test]
    fn validation_names_the_field() {
        let mut c = Config::default();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.starts_with("invalid auth.rest_url"), "{err}");
        c.auth.mode = AuthMode::None;
        c.filter.allowlist = "kube_(".into();
        let err = c.validate().unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid filter.allowlist: `kube_(` is not a valid regex: unclosed group"
        );
        c.filter.allowlist = "up".into();
        c.upstream.url = "ftp://x/".into();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.starts_with("invalid upstream.url"), "{err}");
        // Values as written, not in Rust's escaping.
        c.upstream.url = DEFAULT_UPSTREAM_URL.into();
        let refused = |change: fn(&mut Config)| {
            let mut c = c.clone();
            change(&mut c);
            c.validate().unwrap_err().to_string()
        };
        for (got, want) in [
            (
                refused(|c| c.upstream.url = "ftp://C:\\x\"q/".into()),
                "invalid upstream.url: `ftp://C:\\x\"q/` is not a URL: invalid uri character",
            ),
            (
                refused(|c| c.clickhouse.raw_table = "a\\b".into()),
                "invalid clickhouse.raw_table: `a\\b` must be a plain identifier ([A-Za-z_][A-Za-z0-9_]*)",
            ),
            (
                refused(|c| c.tenancy.labels = vec!["a\"b".into()]),
                "invalid tenancy.labels: `a\"b` is not a usable label name",
            ),
        ] {
            assert_eq!(got, want);
        }
    }

    #[test]
    fn tee_sections_parse_and_validate() {
        let mut c = crate::settings::from_toml(
            r#"
            [auth]
            mode = "none"
            [clickhouse]
            url = "http://ch:8123"
            [spool]
            dir = "/tmp/s"
            max_bytes = "2GiB"
            [rollup]
            grain = "hour"
            charge = "pod"
            interval = "30s"
            "#,
            "test",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.rollup.grain, Grain::Hour);
        assert_eq!(c.spool.max_bytes, Size(2 << 30));
        c.rollup.max_gap = Duration::from_secs(1);
        let err = c.validate().unwrap_err().to_string();
        assert!(err.starts_with("invalid rollup.max_gap"), "{err}");
        c.rollup.max_gap = DEFAULT_MAX_GAP;
        c.clickhouse.raw_table = "x; DROP".into();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.starts_with("invalid clickhouse.raw_table"), "{err}");
        c.clickhouse.raw_table = DEFAULT_RAW_TABLE.into();
        c.spool.commit_delay = Duration::from_secs(2);
        let err = c.validate().unwrap_err().to_string();
        assert!(err.starts_with("invalid spool.commit_delay"), "{err}");
        c.spool.commit_delay = DEFAULT_COMMIT_DELAY;
        c.limits.max_labels_per_series = 70_000;
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.starts_with("invalid limits.max_labels_per_series"),
            "{err}"
        );
    }

    #[test]
    fn registration_follows_auth_unless_set() {
        let mut c = Config::default();
        assert!(c.registers_resources(), "on with auth.mode = rest");
        assert_eq!(c.expense_ids(), ExpenseIds::Platform);
        c.auth.rest_url = Some("http://restapi:8999".into());
        c.auth.cluster_secret_file = Some("/etc/rwgate/secret".into());
        assert_eq!(c.resources_rest_url(), Some("http://restapi:8999"));
        c.validate().unwrap();
        c.resources.rest_url = Some("http://elsewhere:1".into());
        assert_eq!(c.resources_rest_url(), Some("http://elsewhere:1"));
        c.auth.mode = AuthMode::None;
        assert!(!c.registers_resources());
        assert_eq!(c.expense_ids(), ExpenseIds::CloudResourceId);
        c.resources.expense_ids = Some(ExpenseIds::Platform);
        let err = c.validate().unwrap_err().to_string();
        assert!(err.starts_with("invalid resources.expense_ids"), "{err}");
        c.resources.enabled = Some(true);
        c.validate().unwrap();
        c.resources.batch_size = 201;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.starts_with("invalid resources.batch_size"), "{err}");
        c.resources.batch_size = 200;
        c.auth.cluster_secret_file = None;
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.starts_with("invalid resources.cluster_secret_file"),
            "{err}"
        );

        let c = crate::settings::from_toml(
            "[auth]\nmode = \"none\"\n[resources]\nenabled = false\nexpense_ids = \"cloud_resource_id\"\nupdate_interval = \"5m\"\n",
            "test",
        )
        .unwrap();
        c.validate().unwrap();
        assert!(!c.registers_resources());
        assert_eq!(c.resources.update_interval, Duration::from_secs(300));
        let err = crate::settings::from_toml("[resources]\nexpense_id = \"platform\"\n", "test")
            .unwrap_err();
        assert!(err.to_string().contains("expense_id"), "{err}");
    }

    #[test]
    fn sizes_round_trip() {
        for s in ["16MiB", "512KiB", "1GiB", "1000"] {
            assert_eq!(s.parse::<Size>().unwrap().to_string(), s);
        }
        assert_eq!("1MB".parse::<Size>().unwrap(), Size(1_000_000));
        assert_eq!(
            "12XB".parse::<Size>().unwrap_err(),
            "unknown unit `XB`: use B, KiB, MiB, GiB, KB, MB or GB"
        );
        assert_eq!(
            "0.5GiB".parse::<Size>().unwrap_err(),
            "a size is a whole number of its unit: write 512MiB, not 0.5GiB"
        );
        assert!("99999999999999999999".parse::<Size>().is_err());
        assert!("16EiB".parse::<Size>().is_err());
    }

    #[test]
    fn redacts_userinfo() {
        assert_eq!(redact_url("https://u:p@host/x"), "https://***@host/x");
        assert_eq!(redact_url("http://host/x"), "http://host/x");
        assert_eq!(redact_url("http://u:p@ss@host:1/x"), "http://***@host:1/x");
        assert_eq!(
            redact_url("http://host/api?to=a@b#c@d"),
            "http://host/api?to=a@b#c@d"
        );
        assert_eq!(redact_url("http://u@host?x@y"), "http://***@host?x@y");
        assert_eq!(redact_url("not a url"), "not a url");
    }

    /// A URL refused at start-up is named without its password.
    #[test]
    fn refused_urls_hide_their_password() {
        for bad in ["ftp://u:s3cret@host/", "http://u:s3cret@/x"] {
            let e = check_http_url("upstream.url", bad).unwrap_err().to_string();
            assert!(!e.contains("s3cret"), "{e}");
            assert!(e.contains("***@"), "{e}");
        }
    }
}

#[cfg(test)]
mod deploy_tests {

    /// The config shipped in deploy/ stays loadable as the tree changes.
    #[test]
    fn deploy_config_is_valid() {
        let c = crate::settings::from_toml(
            include_str!("../deploy/kubernetes/rwgate.toml"),
            "deploy/kubernetes/rwgate.toml",
        )
        .unwrap();
        c.validate().unwrap();
        assert!(c.clickhouse.url.is_some() && !c.rollup.enabled);
    }
}
