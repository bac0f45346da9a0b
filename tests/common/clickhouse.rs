//! The ClickHouse side of the harness: a real ClickHouse in a temporary
//! directory on free loopback ports, killed on drop, either Debian's 18.16
//! `clickhouse-server` or ClickHouse 26.9 (chdb-core, in-process) behind
//! `tests/chdb_server.py`, a front speaking the server's HTTP interface (see
//! [`Engine`]); remote-write bodies of many-sample series; and the money rule
//! written again, independently of `rwgate::cost::rollup`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use rwgate::prompb;

use super::{client, free_port, http_get, ChildGuard};

pub const NS_METRIC: &str = "cloudtuner_kubecost_namespace_total_cost";

/// Which ClickHouse a test talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// Debian's `clickhouse-server` 18.16 (older installs run 21.10).
    ClickHouse18,
    /// ClickHouse 26.9 (chdb-core) behind `tests/chdb_server.py`, run with
    /// the Python of the venv `scripts/install-deps.sh` makes
    /// (`$RWGATE_CHDB_VENV`, default `/opt/chdb-venv`); the platform runs 24.12.
    Modern,
}

impl Engine {
    /// Both, oldest first.
    pub const ALL: [Engine; 2] = [Engine::ClickHouse18, Engine::Modern];

    /// The major version `SELECT version()` starts with.
    pub fn version_prefix(self) -> &'static str {
        match self {
            Engine::ClickHouse18 => "18.16.",
            Engine::Modern => "26.9.",
        }
    }
}

/// One test per [`Engine`] for a shared `async fn case(engine: Engine)`:
/// `on_both_engines!(case);` makes the tests `case::clickhouse18` and
/// `case::modern`. `on_both_engines!(case, multi_thread);` runs them on the
/// two-worker runtime the end-to-end tests use (the gateway, the spool
/// writer and the rollup beside the test's own client); any other
/// `#[tokio::test(...)]` arguments pass through as they are.
#[macro_export]
macro_rules! on_both_engines {
    ($case:ident, multi_thread) => {
        $crate::on_both_engines!($case, flavor = "multi_thread", worker_threads = 2);
    };
    ($case:ident $(, $($arg:tt)*)?) => {
        mod $case {
            #[tokio::test $( ( $($arg)* ) )?]
            async fn clickhouse18() {
                super::$case($crate::common::clickhouse::Engine::ClickHouse18).await
            }
            #[tokio::test $( ( $($arg)* ) )?]
            async fn modern() {
                super::$case($crate::common::clickhouse::Engine::Modern).await
            }
        }
    };
}

/// A ClickHouse server of our own.
pub struct ClickHouseServer {
    pub dir: tempfile::TempDir,
    pub http_port: u16,
    pub engine: Engine,
    tcp_port: u16,
    interserver_port: u16,
    child: Option<ChildGuard>,
}

impl ClickHouseServer {
    /// Starts Debian's 18.16; see [`start_engine`](Self::start_engine).
    pub fn start() -> ClickHouseServer {
        ClickHouseServer::start_engine(Engine::ClickHouse18)
    }

    /// Starts a server of `engine` and waits for `/ping` (retrying with
    /// other ports if another test grabbed one in between).
    pub fn start_engine(engine: Engine) -> ClickHouseServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut s = ClickHouseServer {
            dir,
            http_port: 0,
            engine,
            tcp_port: 0,
            interserver_port: 0,
            child: None,
        };
        for attempt in 0..3 {
            s.http_port = free_port();
            s.tcp_port = free_port();
            s.interserver_port = free_port();
            if s.spawn() {
                return s;
            }
            eprintln!("{engine:?} did not start (attempt {attempt}); retrying on other ports");
        }
        panic!("{engine:?} did not start:\n{}", s.log_tail());
    }

    fn write_config(&self) {
        let d = self.dir.path().display();
        let config = format!(
            r#"<?xml version="1.0"?>
<yandex>
  <logger><level>warning</level><console>1</console></logger>
  <listen_host>127.0.0.1</listen_host>
  <http_port>{http}</http_port>
  <tcp_port>{tcp}</tcp_port>
  <interserver_http_port>{inter}</interserver_http_port>
  <path>{d}/data/</path>
  <tmp_path>{d}/tmp/</tmp_path>
  <user_files_path>{d}/user_files/</user_files_path>
  <format_schema_path>{d}/format_schemas/</format_schema_path>
  <users_config>{d}/users.xml</users_config>
  <default_profile>default</default_profile>
  <default_database>default</default_database>
  <mark_cache_size>5368709</mark_cache_size>
  <uncompressed_cache_size>8589934</uncompressed_cache_size>
  <max_concurrent_queries>100</max_concurrent_queries>
</yandex>
"#,
            http = self.http_port,
            tcp = self.tcp_port,
            inter = self.interserver_port,
        );
        let users = r#"<?xml version="1.0"?>
<yandex>
  <profiles><default><max_memory_usage>2000000000</max_memory_usage></default></profiles>
  <users><default><password></password><networks><ip>127.0.0.1</ip></networks><profile>default</profile><quota>default</quota></default></users>
  <quotas><default></default></quotas>
</yandex>
"#;
        std::fs::write(self.dir.path().join("config.xml"), config).expect("write config");
        std::fs::write(self.dir.path().join("users.xml"), users).expect("write users");
    }

    fn command(&self) -> Command {
        match self.engine {
            Engine::ClickHouse18 => {
                self.write_config();
                let mut cmd = Command::new("clickhouse-server");
                cmd.arg(format!(
                    "--config-file={}",
                    self.dir.path().join("config.xml").display()
                ));
                cmd
            }
            Engine::Modern => {
                let venv = std::env::var_os("RWGATE_CHDB_VENV")
                    .map_or_else(|| PathBuf::from("/opt/chdb-venv"), PathBuf::from);
                let mut cmd = Command::new(venv.join("bin/python"));
                cmd.arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/chdb_server.py"))
                    .arg(format!("--port={}", self.http_port))
                    .arg(format!("--path={}", self.dir.path().join("data").display()));
                cmd
            }
        }
    }

    fn spawn(&mut self) -> bool {
        let mut cmd = self.command();
        cmd.current_dir(self.dir.path());
        let name = format!("{:?}", self.engine);
        let child = ChildGuard::spawn(&name, cmd, self.dir.path().join("server.log"));
        self.child = Some(child);
        // chdb loads a 500 MB library first: slow on a busy machine.
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Some(Some(_)) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                return false;
            }
            if http_get(self.http_port, "/ping").is_some_and(|b| b.starts_with("Ok.")) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.stop();
        false
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// kill -9 (an outage, or the end).
    pub fn stop(&mut self) {
        self.child.take();
    }

    /// Starts again on the same data and ports.
    pub fn restart(&mut self) {
        self.stop();
        assert!(
            self.spawn(),
            "{:?} did not restart:\n{}",
            self.engine,
            self.log_tail()
        );
    }

    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
        log.lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Creates rwgate's tables (`migrate`, default names) so that a test may
    /// poll them at once: a gateway's own migrate at start-up runs in the
    /// background and can come later on a busy machine.
    pub async fn migrate(&self) {
        let cfg = rwgate::config::ClickHouseConfig {
            url: Some(self.url()),
            ..Default::default()
        };
        rwgate::cost::clickhouse::ClickHouse::new(&cfg)
            .expect("client")
            .migrate()
            .await
            .expect("migrate");
    }

    /// Runs one statement; panics with the server's message on failure.
    pub async fn exec(&self, sql: &str) -> String {
        let resp = client()
            .post(self.url())
            .body(sql.to_string())
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .expect("clickhouse reachable");
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        assert!(status.is_success(), "{sql}\n-> {status}: {text}");
        text
    }

    /// Rows as JSON objects (`FORMAT JSONEachRow`), read independently of
    /// the crate's RowBinary structs.
    pub async fn rows(&self, sql: &str) -> Vec<serde_json::Value> {
        self.exec(&format!("{sql} FORMAT JSONEachRow"))
            .await
            .lines()
            .map(|l| serde_json::from_str(l).expect("JSONEachRow line"))
            .collect()
    }
}

/// One series of a remote-write request.
#[derive(Clone, Debug)]
pub struct Series {
    pub labels: Vec<(String, String)>,
    pub samples: Vec<(i64, f64)>,
}

impl Series {
    pub fn new(name: &str, labels: &[(&str, &str)], samples: Vec<(i64, f64)>) -> Series {
        let mut l = vec![("__name__".to_string(), name.to_string())];
        l.extend(labels.iter().map(|(n, v)| (n.to_string(), v.to_string())));
        Series { labels: l, samples }
    }
}

/// One hour (`hour` from `day_s`, seconds) of a synthetic cost day: for each
/// namespace `i`, the charged metric at `rate(i, minute)` USD/h every minute
/// and its CPU component at a third of that (both teed, `tenant_id`
/// spoofed), then one `kube_pod_info` (forwarded, not teed).
pub fn cost_hour(
    day_s: i64,
    namespaces: &[&str],
    rate: impl Fn(usize, i64) -> f64,
    hour: i64,
) -> Vec<Series> {
    let mut series = Vec::new();
    for (i, ns) in namespaces.iter().enumerate() {
        let total: Vec<(i64, f64)> = (hour * 60..(hour + 1) * 60)
            .map(|k| ((day_s + k * 60) * 1000, rate(i, k)))
            .collect();
        let cpu: Vec<(i64, f64)> = total.iter().map(|&(t, v)| (t, v / 3.0)).collect();
        let labels = [
            ("cluster", "prod-1"),
            ("namespace", ns),
            ("currency", "USD"),
            ("tenant_id", "spoofed"),
            ("instance", "exporter:9100"),
        ];
        series.push(Series::new(NS_METRIC, &labels, total));
        series.push(Series::new(
            "cloudtuner_kubecost_namespace_cpu_cost",
            &labels,
            cpu,
        ));
    }
    series.push(Series::new(
        "kube_pod_info",
        &[("namespace", "default")],
        vec![((day_s + hour * 3600) * 1000, 1.0)],
    ));
    series
}

/// A snappy-compressed Remote-Write 1.0 body of `series`.
pub fn body(series: &[Series]) -> Vec<u8> {
    super::write_body(
        series
            .iter()
            .map(|s| prompb::TimeSeries {
                labels: s
                    .labels
                    .iter()
                    .map(|(n, v)| prompb::Label {
                        name: n.clone(),
                        value: v.clone(),
                    })
                    .collect(),
                samples: s
                    .samples
                    .iter()
                    .map(|&(t, v)| prompb::Sample {
                        value: v,
                        timestamp: t,
                    })
                    .collect(),
                ..Default::default()
            })
            .collect(),
    )
}

/// POSTs a body to rwgate; returns the status (0 on connection error).
pub async fn post(client: &reqwest::Client, url: &str, account: &str, body: Vec<u8>) -> u16 {
    match client
        .post(url)
        .header("Cloud-Account-Id", account)
        .header("Content-Encoding", "snappy")
        .header("Content-Type", "application/x-protobuf")
        .header("X-Prometheus-Remote-Write-Version", "0.1.0")
        .body(body)
        .timeout(Duration::from_secs(30))
        .send()
        .await
    {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

/// POSTs until 2xx, like Prometheus (bounded by `deadline`).
pub async fn post_until_ok(
    client: &reqwest::Client,
    url: impl Fn() -> String,
    account: &str,
    body: Vec<u8>,
    deadline: Instant,
) {
    loop {
        let status = post(client, &url(), account, body.clone()).await;
        if (200..300).contains(&status) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "request never succeeded (last status {status})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The money rule, written again for the tests: merge a resource's samples,
/// one value per timestamp, `r * min(dt, max_gap) / 3600` into the bucket of
/// `t`, the first sample `step`. Returns bucket start (s) -> cost.
pub fn reference_costs(
    samples: &[(i64, f64)],
    bucket_s: i64,
    max_gap_s: i64,
    step_s: i64,
) -> BTreeMap<i64, f64> {
    let mut by_ts: BTreeMap<i64, f64> = BTreeMap::new();
    for &(t, v) in samples {
        let e = by_ts.entry(t).or_insert(v);
        *e = e.max(v);
    }
    let mut out = BTreeMap::new();
    let mut prev: Option<i64> = None;
    for (t, r) in by_ts {
        let dt_ms = match prev {
            None => step_s * 1000,
            Some(p) => (t - p).min(max_gap_s * 1000),
        };
        *out.entry((t / 1000).div_euclid(bucket_s) * bucket_s)
            .or_insert(0.0) += r * dt_ms as f64 / 3_600_000.0;
        prev = Some(t);
    }
    out
}

/// `k8s-ns-` + md5("namespace-" + ns)[..16], computed here independently.
pub fn ns_resource_id(ns: &str) -> String {
    let d = format!("{:x}", md5::compute(format!("namespace-{ns}")));
    format!("k8s-ns-{}", &d[..16])
}

pub fn rel_close(a: f64, b: f64, tol: f64) -> bool {
    a == b || (a - b).abs() <= tol * a.abs().max(b.abs())
}

/// An rwgate config for tests: no auth, the given upstream and ClickHouse,
/// small batches and a fast rollup.
pub fn tee_config(upstream: &str, clickhouse: &str, spool: PathBuf) -> rwgate::config::Config {
    let mut c = rwgate::config::Config {
        listen: "127.0.0.1:0".parse().expect("addr"),
        ..rwgate::config::Config::default()
    };
    c.auth.mode = rwgate::config::AuthMode::None;
    c.upstream.url = upstream.to_string();
    c.upstream.max_retries = 0;
    c.clickhouse.url = Some(clickhouse.to_string());
    c.spool.dir = spool;
    c.spool.batch_max_age = Duration::from_millis(100);
    // The tests replay 2024 on fixed timestamps.
    c.spool.max_sample_age = Duration::from_secs(20 * 365 * 86_400);
    c.spool.retry_backoff = Duration::from_millis(100);
    c.spool.retry_max_backoff = Duration::from_millis(500);
    c.rollup.interval = Duration::from_millis(200);
    c.limits.shutdown_grace = Duration::from_secs(5);
    c
}

/// [`tee_config`]'s counterpart for an rwgate process: the `[upstream]`
/// (no retries), `[clickhouse]`, `[spool]` and `[rollup]` tables of its
/// config file, with the spool in `spool`, quick batches, the 2024
/// timestamps the tests replay let in and a quick rollup. `spool_more`:
/// more `[spool]` lines. The test adds its root keys before, its own
/// tables (`[auth]`, `[log]`, ...) before or after.
pub fn tee_toml(
    upstream: &str,
    clickhouse: &str,
    spool: &std::path::Path,
    spool_more: &str,
) -> String {
    format!(
        r#"
[upstream]
url = "{upstream}"
max_retries = 0
[clickhouse]
url = "{clickhouse}"
[spool]
dir = "{spool}"
batch_max_age = "30ms"
max_sample_age = "20years"
{spool_more}
[rollup]
interval = "100ms"
"#,
        spool = spool.display(),
    )
}

/// A [`tee_config`] in `spool` whose ClickHouse is down (a port nobody
/// listens on: the spool only grows), the rollup off.
pub fn tee_config_clickhouse_down(upstream: &str, spool: PathBuf) -> rwgate::config::Config {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let clickhouse = format!("http://{}", closed.local_addr().expect("addr"));
    drop(closed);
    let mut c = tee_config(upstream, &clickhouse, spool);
    c.rollup.enabled = false;
    c
}

/// An integer from JSONEachRow (18.16 quotes 64-bit integers).
pub fn int(v: &serde_json::Value) -> i64 {
    v.as_i64()
        .or_else(|| v.as_u64().map(|u| u as i64))
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        .unwrap_or_else(|| panic!("not an integer: {v}"))
}

/// A UTC day from `YYYY-MM-DD`.
pub fn day(s: &str) -> rwgate::clock::Day {
    s.parse().expect("a YYYY-MM-DD day")
}

/// The platform's own read of expense rows for one account and UTC day, as
/// its REST API does it (OptScale `ExpenseController._get_expenses_clickhouse`
/// grouped by resource): the account's resource documents whose
/// `first_seen`/`last_seen` overlap the day become the `resources` table
/// (external data there, a Memory table here), joined to `expenses` by id
/// and account, `SUM(cost * sign)` with `HAVING SUM(sign) > 0`. Returns the
/// resource `id` -> cost of the day.
pub async fn platform_day_costs(
    ch: &ClickHouseServer,
    docs: &[serde_json::Value],
    account: &str,
    day_start: i64,
) -> BTreeMap<String, f64> {
    let day_end = day_start + 86_400;
    let seen = |d: &serde_json::Value, k: &str| d[k].as_i64().unwrap_or(0);
    let selected: Vec<String> = docs
        .iter()
        .filter(|d| d["cloud_account_id"] == account)
        .filter(|d| seen(d, "first_seen") < day_end && seen(d, "last_seen") >= day_start)
        .map(|d| {
            let id = d["_id"]
                .as_str()
                .or(d["id"].as_str())
                .expect("a document id");
            format!("('{id}', '{account}', '{id}')")
        })
        .collect();
    ch.exec("DROP TABLE IF EXISTS resources").await;
    ch.exec(
        "CREATE TABLE resources (_id String, cloud_account_id String, group_field Nullable(String)) \
         ENGINE = Memory",
    )
    .await;
    if !selected.is_empty() {
        ch.exec(&format!(
            "INSERT INTO resources VALUES {}",
            selected.join(",")
        ))
        .await;
    }
    let rows = ch
        .rows(&format!(
            "SELECT date, group_field, cloud_account_id, SUM(cost * sign) AS total_cost \
             FROM expenses JOIN resources ON expenses.resource_id = resources._id \
             AND expenses.cloud_account_id = resources.cloud_account_id \
             WHERE date >= toDateTime({day_start}) AND date <= toDateTime({}) \
             GROUP BY date, group_field, cloud_account_id HAVING SUM(sign) > 0 \
             ORDER BY total_cost DESC",
            day_end - 1
        ))
        .await;
    ch.exec("DROP TABLE resources").await;
    rows.iter()
        .map(|r| {
            (
                r["group_field"].as_str().expect("group_field").to_string(),
                r["total_cost"].as_f64().expect("total_cost"),
            )
        })
        .collect()
}
