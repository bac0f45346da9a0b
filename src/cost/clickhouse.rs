//! ClickHouse: the client, the schema (`rwgate migrate`) and the row types.
//!
//! Everything here works on ClickHouse 18.16 (Debian's) and on modern
//! servers (the tests run 18.16 and 26.9; the platform runs 24.12, older
//! installs 21.10): only `String`, `Float64`, `Int8`, `Int64`, `UInt64`,
//! `DateTime`, `Nullable` and `Array` columns; no `DateTime64`, `Map`, JSON,
//! `async_insert` or server-side query parameters.
//!
//! # Row validation
//!
//! The `clickhouse` crate can check every row against the server's schema
//! (`RowBinaryWithNamesAndTypes`, and `DESCRIBE TABLE` before an insert): a
//! Rust field of the wrong type or name is then an error instead of a
//! silently corrupted column. 18.16 has neither that format nor the
//! `describe_include_subcolumns` setting the crate sends, so validation is
//! decided per server, once, by [`ClickHouse::check_server`] (run by
//! `migrate`, by every insert and by each rollup pass before its queries):
//! it asks for `DESCRIBE TABLE system.one` exactly as the crate does before
//! a validated insert. Answered, rows are validated from then on; refused as
//! an unknown format or setting (18.16), plain `RowBinary` it is. Until it
//! has run, and on servers without it, [`ClickHouse::client`] is the plain
//! client, so the row structs below still mirror their DDL field by field,
//! and the integration tests read whole rows back as JSON (independently of
//! these structs) on both engines.
//!
//! With validation, column names must match field names: a query's columns
//! are named (aliases, or `#[serde(rename)]` on the field) like the struct
//! it is read into, and an insert's struct must name every column that has
//! no default (see `migrate` for tables made by older versions). A schema
//! mismatch is not a data error (retrying the same rows elsewhere cannot
//! help, dropping them would lose them): it is retried and logged.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use clickhouse::{Client, Compression, Row, RowWrite};
use serde::{Deserialize, Serialize, Serializer};

use crate::clock::{human_wait, Backoff, HumanDuration};
use crate::config::{redact_url, ClickHouseConfig};

/// Why a ClickHouse operation failed. The messages name the server (its URL
/// without credentials) and say each cause once.
#[derive(Debug, thiserror::Error)]
pub enum ClickHouseError {
    #[error("{}", describe(url, error))]
    Client {
        url: Arc<str>,
        error: clickhouse::error::Error,
    },
    #[error("ClickHouse at {url} did not answer within {}", HumanDuration(*after))]
    Timeout { url: Arc<str>, after: Duration },
    #[error("cannot read clickhouse.password_file {path}: {source}")]
    PasswordFile {
        path: String,
        source: std::io::Error,
    },
    #[error("clickhouse.url is not set")]
    NoUrl,
}

/// A client error in one line. The crate's network errors wrap hyper's,
/// which wrap the connector's, each printing the next again ("network
/// error: client error (Connect): client error (Connect): tcp connect
/// error: ..."): say what happened, then the causes below the wrappers
/// ([`crate::client::cause`], as for every outbound call).
fn describe(url: &str, error: &clickhouse::error::Error) -> String {
    use clickhouse::error::Error as E;
    match error {
        E::Network(inner) => format!(
            "cannot reach ClickHouse at {url}: {}",
            crate::client::cause(inner.as_ref())
        ),
        E::BadResponse(message) => format!("ClickHouse at {url} answered: {}", message.trim()),
        E::TimedOut => format!("ClickHouse at {url} did not answer in time"),
        other => format!("ClickHouse at {url}: {other}"),
    }
}

impl ClickHouseError {
    /// The ClickHouse exception code (`Code: 62`), when the server sent one.
    pub fn code(&self) -> Option<u32> {
        let ClickHouseError::Client {
            error: clickhouse::error::Error::BadResponse(msg),
            ..
        } = self
        else {
            return None;
        };
        let at = msg.find("Code: ")? + "Code: ".len();
        let digits: String = msg[at..].chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    }

    /// The failure is about what was sent (the query text or the rows), so
    /// sending the same thing again will fail the same way: a syntax error
    /// or an over-long query (62), unparsable or out-of-range data, "too many
    /// partitions for single INSERT block" (252 with that message; plain 252
    /// "too many parts" is an availability problem), or a row the client
    /// could not serialise. Everything else (no answer, timeouts, memory,
    /// overload, missing tables, authentication, unknown codes) is treated
    /// as availability: retrying later may succeed, and nothing is dropped.
    pub fn is_data_error(&self) -> bool {
        use clickhouse::error::Error as E;
        match self {
            ClickHouseError::Client {
                error: E::BadResponse(msg),
                ..
            } => match self.code() {
                Some(252) => msg.contains("partitions for single INSERT"),
                Some(c) => DATA_ERROR_CODES.contains(&c),
                None => false,
            },
            ClickHouseError::Client {
                error: E::Custom(_) | E::SequenceMustHaveLength | E::InvalidUtf8Encoding(_),
                ..
            } => true,
            _ => false,
        }
    }

    /// The request timed out (a smaller one may not).
    pub fn is_timeout(&self) -> bool {
        matches!(
            self,
            ClickHouseError::Timeout { .. }
                | ClickHouseError::Client {
                    error: clickhouse::error::Error::TimedOut,
                    ..
                }
        ) || matches!(self.code(), Some(159 | 209))
    }
}

/// ClickHouse exception codes about the query or the data sent, not the
/// server's availability (ClickHouse `src/Common/ErrorCodes.cpp`).
const DATA_ERROR_CODES: &[u32] = &[
    6,   // CANNOT_PARSE_TEXT
    26,  // CANNOT_PARSE_QUOTED_STRING
    27,  // CANNOT_PARSE_INPUT_ASSERTION_FAILED
    32,  // ATTEMPT_TO_READ_AFTER_EOF
    33,  // CANNOT_READ_ALL_DATA
    36,  // BAD_ARGUMENTS
    38,  // CANNOT_PARSE_DATE
    41,  // CANNOT_PARSE_DATETIME
    43,  // ILLEGAL_TYPE_OF_ARGUMENT
    53,  // TYPE_MISMATCH
    62,  // SYNTAX_ERROR (also "Max query size exceeded")
    69,  // ARGUMENT_OUT_OF_BOUND
    70,  // CANNOT_CONVERT_TYPE
    72,  // CANNOT_PARSE_NUMBER
    117, // INCORRECT_DATA
    128, // TOO_LARGE_ARRAY_SIZE
    131, // TOO_LARGE_STRING_SIZE
    190, // SIZES_OF_ARRAYS_DOESNT_MATCH
    306, // TOO_DEEP_RECURSION
    349, // CANNOT_INSERT_NULL_IN_ORDINARY_COLUMN
    395, // FUNCTION_THROW_IF_VALUE_IS_NON_ZERO
];

/// A configured client plus its configuration (the table names, the
/// timeout).
#[derive(Clone)]
pub struct ClickHouse {
    /// Validation off: what every server reads.
    plain: Client,
    /// The client [`check_server`](Self::check_server) chose and whether
    /// it validates (where the server supports it), shared by clones.
    checked: Arc<OnceLock<(Client, bool)>>,
    /// Set once [`migrate_until_done`](Self::migrate_until_done) succeeded,
    /// shared by clones: the tasks of one process that each need the
    /// schema migrate it once, the first to ask, the others waiting.
    migrated: Arc<tokio::sync::OnceCell<()>>,
    /// The server's URL without credentials, for messages.
    pub url: Arc<str>,
    pub config: ClickHouseConfig,
}

impl ClickHouse {
    /// Builds the client (no I/O but reading the password file).
    pub fn new(cfg: &ClickHouseConfig) -> Result<ClickHouse, ClickHouseError> {
        let url = cfg.url.as_deref().ok_or(ClickHouseError::NoUrl)?;
        let mut client = Client::default()
            .with_url(url)
            .with_database(&cfg.database)
            // Until check_server has seen the server; see the module doc.
            .with_validation(false)
            .with_compression(if cfg.compress {
                Compression::Lz4
            } else {
                Compression::None
            });
        if let Some(user) = &cfg.user {
            client = client.with_user(user);
        }
        if let Some(path) = &cfg.password_file {
            let pw =
                std::fs::read_to_string(path).map_err(|source| ClickHouseError::PasswordFile {
                    path: path.display().to_string(),
                    source,
                })?;
            client = client.with_password(pw.trim_end_matches(['\r', '\n']));
        }
        Ok(ClickHouse {
            plain: client,
            checked: Arc::new(OnceLock::new()),
            migrated: Arc::default(),
            url: redact_url(url).into(),
            config: cfg.clone(),
        })
    }

    /// Runs `fut` under the configured timeout.
    pub async fn timed<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, clickhouse::error::Error>>,
    ) -> Result<T, ClickHouseError> {
        match tokio::time::timeout(self.config.timeout, fut).await {
            Ok(r) => r.map_err(|error| self.error(error)),
            Err(_) => Err(ClickHouseError::Timeout {
                url: self.url.clone(),
                after: self.config.timeout,
            }),
        }
    }

    /// A client error of this server.
    pub fn error(&self, error: clickhouse::error::Error) -> ClickHouseError {
        ClickHouseError::Client {
            url: self.url.clone(),
            error,
        }
    }

    /// The client for queries and inserts: validating rows once
    /// [`check_server`](Self::check_server) found the server able to.
    pub fn client(&self) -> &Client {
        self.checked.get().map_or(&self.plain, |(c, _)| c)
    }

    /// Whether rows are validated: `None` until
    /// [`check_server`](Self::check_server) has run.
    pub fn validates(&self) -> Option<bool> {
        self.checked.get().map(|&(_, v)| v)
    }

    /// Decides, once, whether rows are validated (see the module doc).
    /// Fails only if the server did not answer, so that the caller retries.
    pub async fn check_server(&self) -> Result<(), ClickHouseError> {
        if self.checked.get().is_some() {
            return Ok(());
        }
        /// `DESCRIBE TABLE`'s columns, as the crate reads them.
        #[derive(Row, Deserialize)]
        #[allow(dead_code)] // read to be checked, not used
        struct Describe {
            name: String,
            r#type: String,
            default_type: String,
            default_expression: String,
            comment: String,
            codec_expression: String,
            ttl_expression: String,
        }
        let validating = self.plain.clone().with_validation(true);
        let probe = validating
            .query("DESCRIBE TABLE system.one")
            .with_setting("describe_include_subcolumns", "0")
            .fetch_all::<Describe>();
        use clickhouse::error::Error as E;
        let chosen = match self.timed(probe).await {
            Ok(_) => (validating, true),
            // UNKNOWN_FORMAT, UNKNOWN_SETTING (18.16), or an answer the
            // crate cannot read as a schema.
            Err(e) if matches!(e.code(), Some(73 | 115)) => (self.plain.clone(), false),
            Err(ClickHouseError::Client {
                error: E::SchemaMismatch(_) | E::InvalidColumnsHeader(_) | E::Unsupported(_),
                ..
            }) => (self.plain.clone(), false),
            Err(e) => return Err(e),
        };
        let _ = self.checked.set(chosen);
        Ok(())
    }

    /// The server version, e.g. `18.16.1`.
    pub async fn version(&self) -> Result<String, ClickHouseError> {
        self.timed(self.plain.query("SELECT version()").fetch_one::<String>())
            .await
    }

    /// Inserts rows in one INSERT statement (`T` names the row type; rows
    /// may borrow, as [`RawRow`] does).
    pub async fn insert<T: Row + RowWrite>(
        &self,
        table: &str,
        rows: &[T::Value<'_>],
    ) -> Result<(), ClickHouseError> {
        if rows.is_empty() {
            return Ok(());
        }
        self.check_server().await?;
        let work = async {
            let mut insert = self
                .client()
                .insert::<T>(table)
                .await?
                .with_timeouts(Some(self.config.timeout), Some(self.config.timeout));
            for row in rows {
                insert.write(row).await?;
            }
            insert.end().await
        };
        self.timed(work).await
    }

    /// Runs [`migrate`](Self::migrate) until it succeeds, backing off
    /// between `retry.0` and `retry.1`, once for this client and its
    /// clones (a second caller waits for the first); false if `stop`
    /// turned true first.
    pub async fn migrate_until_done(
        &self,
        retry: (Duration, Duration),
        stop: &mut tokio::sync::watch::Receiver<bool>,
    ) -> bool {
        let mut waiting = stop.clone();
        let first = self.migrated.get_or_try_init(|| async {
            let mut backoff = Backoff::new(retry.0, retry.1);
            loop {
                match self.migrate().await {
                    Ok(r) => {
                        tracing::info!(rows_validated = r.validation, "{r}");
                        return Ok(());
                    }
                    Err(e) => {
                        let wait = backoff.next_delay();
                        tracing::warn!(error = %e, retry_in = %human_wait(wait), "clickhouse migrate failed; retrying");
                        if *stop.borrow() {
                            return Err(());
                        }
                        tokio::select! {
                            () = tokio::time::sleep(wait) => {}
                            _ = stop.changed() => return Err(()),
                        }
                    }
                }
            }
        });
        // A task waiting on another's migration still stops when told.
        tokio::select! {
            done = first => done.is_ok(),
            _ = waiting.wait_for(|stop| *stop) => false,
        }
    }

    /// Creates what is missing; adds missing `k8s_*` columns to an existing
    /// expenses table; where rows are validated, gives the label columns of
    /// a raw table made before the series table a default (`[]`, what the
    /// server fills in anyway; metadata only), since a validated insert must
    /// otherwise name them. Never drops or rewrites anything. Idempotent.
    pub async fn migrate(&self) -> Result<MigrateReport, ClickHouseError> {
        let version = self.version().await?;
        self.check_server().await?;
        let mut report = MigrateReport {
            server_version: version,
            validation: self.validates() == Some(true),
            ..MigrateReport::default()
        };
        let existing: Vec<String> = self
            .timed(
                self.client()
                    .query("SELECT name FROM system.tables WHERE database = currentDatabase()")
                    .fetch_all::<String>(),
            )
            .await?;
        let cfg = &self.config;
        for (name, ddl) in [
            (&cfg.raw_table, RawRow::ddl(&cfg.raw_table)),
            (&cfg.series_table, SeriesRow::ddl(&cfg.series_table)),
            (&cfg.expenses_table, ExpenseRow::ddl(&cfg.expenses_table)),
            (&cfg.state_table, StateRow::ddl(&cfg.state_table)),
            (&cfg.touched_table, TouchedRow::ddl(&cfg.touched_table)),
            (&cfg.resources_table, ResourceRow::ddl(&cfg.resources_table)),
        ] {
            if !existing.contains(name) {
                self.timed(self.client().query(&ddl).execute()).await?;
                report.created.push(name.clone());
            }
        }
        let columns = self.column_names(&cfg.expenses_table, "").await?;
        for col in EXPENSE_K8S_COLUMNS {
            if !columns.iter().any(|c| c == col) {
                let change = format!("ADD COLUMN {col} Nullable(String)");
                self.alter(&cfg.expenses_table, col, &change, &mut report.columns_added)
                    .await?;
            }
        }
        if report.validation {
            let no_default = self
                .column_names(
                    &cfg.raw_table,
                    " AND default_kind = '' AND name IN ('label_names', 'label_values')",
                )
                .await?;
            for col in no_default {
                let change = format!("MODIFY COLUMN {col} DEFAULT []");
                self.alter(&cfg.raw_table, &col, &change, &mut report.defaults_added)
                    .await?;
            }
        }
        // Inserts cache each table's schema: drop what this may have changed.
        self.client().clear_cached_metadata().await;
        Ok(report)
    }

    /// The names of `table`'s columns (in the current database) that meet
    /// `filter` (`""`, or `AND` and more conditions on `system.columns`).
    async fn column_names(
        &self,
        table: &str,
        filter: &str,
    ) -> Result<Vec<String>, ClickHouseError> {
        let sql = format!(
            "SELECT name FROM system.columns WHERE database = currentDatabase() AND table = ?{filter}"
        );
        self.timed(self.client().query(&sql).bind(table).fetch_all::<String>())
            .await
    }

    /// `ALTER TABLE table change`, noting `table.col` in `done`.
    async fn alter(
        &self,
        table: &str,
        col: &str,
        change: &str,
        done: &mut Vec<String>,
    ) -> Result<(), ClickHouseError> {
        let sql = format!("ALTER TABLE {table} {change}");
        self.timed(self.client().query(&sql).execute()).await?;
        done.push(format!("{table}.{col}"));
        Ok(())
    }
}

/// What `migrate` did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct MigrateReport {
    pub server_version: String,
    /// Rows are validated on this server (see the module doc).
    pub validation: bool,
    pub created: Vec<String>,
    pub columns_added: Vec<String>,
    /// `table.column`s given a default so that validated inserts may omit them.
    pub defaults_added: Vec<String>,
}

/// As `rwgate migrate` prints it and `serve` logs it.
impl std::fmt::Display for MigrateReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = |items: &[String]| match items {
            [] => "none".to_string(),
            items => items.join(", "),
        };
        write!(
            f,
            "clickhouse {}: tables created: {}; columns added: {}",
            self.server_version,
            list(&self.created),
            list(&self.columns_added)
        )?;
        if !self.defaults_added.is_empty() {
            write!(f, "; defaults added: {}", list(&self.defaults_added))?;
        }
        Ok(())
    }
}

/// The columns the platform's older `expenses` tables may lack.
pub const EXPENSE_K8S_COLUMNS: [&str; 3] = ["k8s_namespace", "k8s_node", "k8s_service"];

/// Declares a row struct together with its table: each field is a column
/// of the given ClickHouse type, in order, and `CREATE` is what follows the
/// column list in the table's `CREATE TABLE` (engine, partitioning, sort
/// key). `ddl` is the statement `migrate` runs, so that the struct and the
/// table cannot drift apart.
macro_rules! table_row {
    ($(
        $(#[doc = $doc:literal])*
        CREATE = $create:literal;
        $(#[$meta:meta])*
        pub struct $name:ident $(<$lt:lifetime>)? {
            $(
                $(#[$field_meta:meta])*
                pub $field:ident: $ty:ty => $column:literal,
            )+
        }
    )+) => {$(
        $(#[doc = $doc])*
        $(#[$meta])*
        pub struct $name $(<$lt>)? {
            $(
                $(#[$field_meta])*
                pub $field: $ty,
            )+
        }

        impl $(<$lt>)? $name $(<$lt>)? {
            /// `CREATE TABLE IF NOT EXISTS` of this row's table, named `table`.
            pub fn ddl(table: &str) -> String {
                let columns: &[&str] = &[$(concat!(stringify!($field), " ", $column)),+];
                format!(
                    "CREATE TABLE IF NOT EXISTS {table} ({}) ENGINE = {}",
                    columns.join(", "),
                    $create
                )
            }
        }
    )+};
}

table_row! {
    /// One row of the raw table of samples, borrowed from a decoded spool
    /// record: a row copies nothing. ReplacingMergeTree on (account,
    /// metric, series_id, ts): a re-sent sample collapses with its first
    /// copy (read with `FINAL` for exact counts; the rollup deduplicates
    /// timestamps itself). The labels the rollup groups by are columns; the
    /// others are in the series table, once per series (tables created
    /// before it have `label_names`/`label_values` columns here too, left
    /// empty by inserts since).
    CREATE = "ReplacingMergeTree(ingest_time) \
              PARTITION BY toYYYYMM(toDateTime(intDiv(ts, 1000))) \
              ORDER BY (account, metric, series_id, ts)";
    #[derive(Debug, Clone, Copy, PartialEq, Row, Serialize)]
    pub struct RawRow<'a> {
        pub account: &'a str => "String",
        pub metric: &'a str => "String",
        pub cluster: &'a str => "String",
        pub namespace: &'a str => "String",
        pub pod: &'a str => "String",
        pub series_id: u64 => "UInt64",
        pub ts: i64 => "Int64",
        pub value: f64 => "Float64",
        /// Seconds since the epoch, UTC.
        pub ingest_time: u32 => "DateTime",
    }

    /// One row of the series table: the labels of each teed series, written
    /// once per series and month of ingestion (so that dropping a month's
    /// partitions of both tables leaves no orphans); join with the raw
    /// table on (account, metric, series_id). ReplacingMergeTree: a series
    /// written again (after a restart) collapses. Borrowed like [`RawRow`].
    CREATE = "ReplacingMergeTree(ingest_time) \
              PARTITION BY toYYYYMM(ingest_time) \
              ORDER BY (account, metric, series_id)";
    #[derive(Debug, Clone, Copy, PartialEq, Row, Serialize)]
    pub struct SeriesRow<'a> {
        pub account: &'a str => "String",
        pub metric: &'a str => "String",
        pub series_id: u64 => "UInt64",
        pub cluster: &'a str => "String",
        pub namespace: &'a str => "String",
        pub pod: &'a str => "String",
        /// The other labels, sorted by name: the `label_names` column is
        /// their names. Set it and `label_values` to the same slice.
        #[serde(serialize_with = "label_names")]
        pub label_names: &'a [(&'a str, &'a str)] => "Array(String)",
        /// The `label_values` column: the values of the same slice.
        #[serde(serialize_with = "label_values")]
        pub label_values: &'a [(&'a str, &'a str)] => "Array(String)",
        /// Seconds since the epoch, UTC.
        pub ingest_time: u32 => "DateTime",
    }

    /// One row of the platform's expense table, exactly as DESIGN.md gives it.
    CREATE = "CollapsingMergeTree(sign) \
              PARTITION BY toYYYYMM(date) \
              ORDER BY (cloud_account_id, date, resource_id)";
    #[derive(Debug, Clone, PartialEq, Row, Serialize, Deserialize)]
    pub struct ExpenseRow {
        pub cloud_account_id: String => "String",
        pub resource_id: String => "String",
        /// Seconds since the epoch, UTC (midnight for daily rows).
        pub date: u32 => "DateTime",
        pub cost: f64 => "Float64",
        pub sign: i8 => "Int8",
        pub k8s_namespace: Option<String> => "Nullable(String)",
        pub k8s_node: Option<String> => "Nullable(String)",
        pub k8s_service: Option<String> => "Nullable(String)",
    }

    /// One row of the state table: the rollup watermark (one row per rollup
    /// name; the latest `version` wins).
    CREATE = "ReplacingMergeTree(version) ORDER BY name";
    #[derive(Debug, Clone, PartialEq, Row, Serialize, Deserialize)]
    pub struct StateRow {
        pub name: String => "String",
        pub watermark: u32 => "DateTime",
        pub version: u64 => "UInt64",
    }

    /// One row of the touched table: which (metric, account, UTC hour)
    /// received samples in which ingest minute, the rollup's index of "what
    /// changed since my last pass", ordered by ingest minute so that
    /// reading the recent part is cheap however long the history is. Only
    /// the charged metrics are recorded.
    CREATE = "ReplacingMergeTree \
              PARTITION BY toYYYYMMDD(ingest_minute) \
              ORDER BY (ingest_minute, metric, account, hour)";
    #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Row, Serialize, Deserialize)]
    pub struct TouchedRow {
        pub ingest_minute: u32 => "DateTime",
        pub metric: String => "String",
        pub account: String => "String",
        pub hour: u32 => "DateTime",
    }

    /// One row of the resources table: each registered resource's platform
    /// id and the `first_seen`/`last_seen` (epoch seconds) the platform
    /// holds for it, one row per successful bulk call; the latest `version`
    /// (microseconds) of an (account, cloud resource id) wins. Written
    /// before any expense row under that id, so a restart writes rows for
    /// known resources without the REST API.
    CREATE = "ReplacingMergeTree(version) ORDER BY (account, cloud_resource_id)";
    #[derive(Debug, Clone, PartialEq, Eq, Row, Serialize, Deserialize)]
    pub struct ResourceRow {
        pub account: String => "String",
        pub cloud_resource_id: String => "String",
        /// The platform's id (`_id` of the resource document).
        pub resource_id: String => "String",
        pub first_seen: i64 => "Int64",
        pub last_seen: i64 => "Int64",
        pub version: u64 => "UInt64",
    }
}

fn label_names<S: Serializer>(labels: &[(&str, &str)], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(labels.iter().map(|(name, _)| name))
}

fn label_values<S: Serializer>(labels: &[(&str, &str)], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(labels.iter().map(|(_, value)| value))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two clones (the drain and the rollup of one `serve`) migrate once:
    /// against a server that takes connections and never answers, only one
    /// connection comes; and the waiting clone, too, stops when told.
    #[tokio::test]
    async fn clones_migrate_once_and_both_stop_when_told() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let cfg = ClickHouseConfig {
            url: Some(format!("http://{}", listener.local_addr().unwrap())),
            timeout: Duration::from_secs(60),
            ..ClickHouseConfig::default()
        };
        let ch = ClickHouse::new(&cfg).unwrap();
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let retry = (Duration::from_millis(1), Duration::from_millis(1));
        let migrations: Vec<_> = (0..2)
            .map(|_| {
                let (ch, mut stopped) = (ch.clone(), stopped.clone());
                tokio::spawn(async move { ch.migrate_until_done(retry, &mut stopped).await })
            })
            .collect();
        let mut held = Vec::new();
        // The connections that come within a second.
        let _elapsed = tokio::time::timeout(Duration::from_secs(1), async {
            loop {
                held.push(listener.accept().await.unwrap());
            }
        })
        .await;
        assert_eq!(held.len(), 1, "one migration, one connection");
        stop.send(true).unwrap();
        for m in migrations {
            let done = tokio::time::timeout(Duration::from_secs(10), m).await;
            assert!(
                !done.expect("stops when told").unwrap(),
                "stopped, not done"
            );
        }
    }

    /// `table_row!` lists the fields as columns, in order, with their
    /// types, then the engine clause.
    #[test]
    fn a_row_struct_makes_its_tables_ddl() {
        assert_eq!(
            StateRow::ddl("rwgate_state"),
            "CREATE TABLE IF NOT EXISTS rwgate_state (name String, watermark DateTime, \
             version UInt64) ENGINE = ReplacingMergeTree(version) ORDER BY name"
        );
        assert_eq!(
            ExpenseRow::ddl("expenses"),
            "CREATE TABLE IF NOT EXISTS expenses (cloud_account_id String, resource_id String, \
             date DateTime, cost Float64, sign Int8, k8s_namespace Nullable(String), \
             k8s_node Nullable(String), k8s_service Nullable(String)) \
             ENGINE = CollapsingMergeTree(sign) PARTITION BY toYYYYMM(date) \
             ORDER BY (cloud_account_id, date, resource_id)"
        );
    }

    #[test]
    fn errors_about_the_data_are_told_from_availability() {
        use clickhouse::error::Error as E;
        let bad = |m: &str| ClickHouseError::Client {
            url: "http://ch:8123".into(),
            error: E::BadResponse(m.into()),
        };
        let timeout = || ClickHouseError::Timeout {
            url: "http://ch:8123".into(),
            after: Duration::from_secs(1),
        };
        let old = bad("Code: 62, e.displayText() = DB::Exception: Max query size exceeded");
        assert_eq!(old.code(), Some(62));
        assert!(old.is_data_error());
        assert!(bad("Code: 252. DB::Exception: Too many partitions for single INSERT block (more than 100).").is_data_error());
        assert!(!bad("Code: 252. DB::Exception: Too many parts (300). Merges are processing significantly slower than inserts").is_data_error());
        assert!(
            !bad("Code: 241. DB::Exception: Memory limit (for query) exceeded").is_data_error()
        );
        assert!(!bad("Code: 60. DB::Exception: Table default.x doesn't exist").is_data_error());
        assert!(!bad("502 Bad Gateway").is_data_error());
        assert!(!timeout().is_data_error());
        assert!(timeout().is_timeout());
        assert_eq!(
            timeout().to_string(),
            "ClickHouse at http://ch:8123 did not answer within 1s"
        );
        assert!(bad("Code: 159. DB::Exception: Timeout exceeded").is_timeout());
    }
}
