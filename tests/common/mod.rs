//! The integration-test harness: real servers on loopback ports.
//!
//! - [`Prometheus`]: Debian's Prometheus as a remote-write receiver (the stand-in
//!   for Thanos receive), queried through its HTTP API; plain, or HTTPS
//!   requiring a client certificate from a [`TestPki`] made at test time.
//! - [`VmAgent`]: vmagent, a real remote-write client that sends headers and
//!   basic auth.
//! - [`RestApi`]: an in-process stand-in for the platform REST API (the only
//!   server faked, besides [`FakeUpstream`], which exists only to force the
//!   upstream answers a real Prometheus cannot give on demand: 409, 429, 5xx,
//!   slow answers).
//! - [`clickhouse::ClickHouseServer`]: Debian's ClickHouse 18.16, with the
//!   cost pipeline's helpers (many-sample bodies, the money rule written
//!   again) beside it in [`clickhouse`].
//! - [`Sink`]: a remote-write receiver that answers 204 and counts, for tests
//!   about the tee rather than the upstream.
//! - [`HugeAnswer`]: a server whose every answer is a body of any size, made
//!   as it is sent (the upstream or REST API that answers too much).
//! - [`Gateway`]: rwgate itself, in-process through `rwgate::run` with its own
//!   listener and shutdown signal; tests that need process behaviour (signals,
//!   exit codes) run the built binary instead.
//!
//! Every child process is killed when its guard drops, so a failing test still
//! stops what it started. Every wait is bounded and its panic names what was
//! awaited. Ports come from the kernel (bind port 0), directories from
//! `tempfile`, so tests can run in parallel and twice in a row.

#![allow(dead_code)] // each test file uses a different part of the harness

pub mod bulk;
pub mod clickhouse;
pub mod v2;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::future::Future;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener as StdListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use prost::Message;
use rwgate::config::{AuthMode, Config};
use rwgate::prompb;
use tempfile::TempDir;

/// How long a server may take to come up.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Labels of one series, sorted by name.
pub type LabelSet = BTreeMap<String, String>;

// ---------------------------------------------------------------------------
// Small utilities
// ---------------------------------------------------------------------------

/// A loopback port nobody listens on right now (the kernel's choice). There is
/// a window before the caller binds it; servers started on it retry with a new
/// port if it was taken meanwhile.
pub fn free_port() -> u16 {
    let l = StdListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr()
        .expect("local addr of a bound listener")
        .port()
}

/// A size field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`, ...) in bytes.
pub fn proc_status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{field} in kB in /proc/{pid}/status"));
    kib << 10
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64
}

/// Polls `check` until it returns `Some`, panicking after `timeout` with a
/// message naming `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(10);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// Polls `f` until it returns `Ok`, panicking after `limit` with `what`
/// and the last error.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + limit;
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) if Instant::now() >= deadline => panic!("{what}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// A minimal HTTP/1.0 GET (for readiness probes without a runtime).
pub fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(1),
    )
    .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let body = out.split("\r\n\r\n").nth(1)?.to_string();
    out.starts_with("HTTP/1.").then_some(body)
}

/// The body of `GET url`, if it answered at all.
pub async fn get_text(url: &str) -> Option<String> {
    client().get(url).send().await.ok()?.text().await.ok()
}

/// An HTTP client for tests: no proxies (loopback only), short timeouts.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("build reqwest client")
}

/// A child process that is killed (and reaped) when dropped.
pub struct ChildGuard {
    pub name: String,
    child: Child,
    log: PathBuf,
}

impl ChildGuard {
    /// Spawns `cmd` with stdout and stderr going to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> ChildGuard {
        let out = std::fs::File::create(&log).expect("create child log file");
        let err = out.try_clone().expect("clone log file handle");
        for var in ["http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"] {
            cmd.env_remove(var);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}; is it installed? see scripts/install-deps.sh"));
        ChildGuard {
            name: name.to_string(),
            child,
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Some(status)` once the process has exited.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().expect("try_wait on a child")
    }

    /// The last lines of the child's output, for panic messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends a signal with `kill(1)` (no libc, no unsafe).
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig} {} failed", self.pid());
    }

    /// Waits (bounded) for the process to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let name = self.name.clone();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait() {
                return s;
            }
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {name} to exit; its log:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Starts a server child on a fresh port until it answers `ready_path` with
/// 200, retrying on another port if it exits early (port taken meanwhile).
async fn start_child(
    name: &str,
    dir: &Path,
    fixed_port: Option<u16>,
    make: impl Fn(u16) -> Command,
    ready_path: &str,
) -> (ChildGuard, u16) {
    start_child_with(name, dir, fixed_port, make, &client(), "http", ready_path).await
}

/// [`start_child`], probing with `http` over `scheme` (https with a client
/// certificate, say).
async fn start_child_with(
    name: &str,
    dir: &Path,
    fixed_port: Option<u16>,
    make: impl Fn(u16) -> Command,
    http: &reqwest::Client,
    scheme: &str,
    ready_path: &str,
) -> (ChildGuard, u16) {
    for attempt in 0..3 {
        let port = fixed_port.unwrap_or_else(free_port);
        let mut child =
            ChildGuard::spawn(name, make(port), dir.join(format!("{name}-{attempt}.log")));
        let url = format!("{scheme}://127.0.0.1:{port}{ready_path}");
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait() {
                eprintln!(
                    "{name} exited early ({status}) on port {port}; log:\n{}",
                    child.log_tail()
                );
                break;
            }
            if let Ok(r) = http.get(&url).send().await {
                if r.status().is_success() {
                    return (child, port);
                }
            }
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {START_TIMEOUT:?} waiting for {name} at {url}; log:\n{}",
                    child.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    panic!("{name} did not start in 3 attempts (see logs above)");
}

// ---------------------------------------------------------------------------
// Prometheus (remote-write receiver, the stand-in for Thanos receive)
// ---------------------------------------------------------------------------

/// Debian's Prometheus with `--web.enable-remote-write-receiver`. It scrapes
/// nothing, so every series in it came through remote write.
pub struct Prometheus {
    pub port: u16,
    scheme: &'static str,
    /// What queries it (with a client certificate when it serves mutual TLS).
    http: reqwest::Client,
    child: ChildGuard,
    _dir: TempDir,
}

impl Prometheus {
    pub async fn start() -> Prometheus {
        Self::start_with(None, None, &[]).await
    }

    /// With `--enable-feature` flags, e.g. `native-histograms` and
    /// `exemplar-storage` (2.42 stores neither without them).
    pub async fn start_with_features(features: &[&str]) -> Prometheus {
        Self::start_with(None, None, features).await
    }

    /// Starts on `port` (a port the caller reserved, e.g. one rwgate already
    /// points at), without retrying elsewhere.
    pub async fn start_on(port: u16) -> Prometheus {
        Self::start_with(Some(port), None, &[]).await
    }

    /// Serves HTTPS with `pki`'s server certificate and requires a client
    /// certificate signed by its CA (Prometheus' `--web.config.file`), as a
    /// Thanos receive set up for mutual TLS does.
    pub async fn start_mtls(pki: &TestPki) -> Prometheus {
        Self::start_with(None, Some(pki), &[]).await
    }

    async fn start_with(
        fixed: Option<u16>,
        pki: Option<&TestPki>,
        features: &[&str],
    ) -> Prometheus {
        let dir = tempfile::tempdir().expect("tempdir for prometheus");
        let cfg = dir.path().join("prometheus.yml");
        std::fs::write(&cfg, "global:\n  scrape_interval: 15s\n").expect("write prometheus.yml");
        let data = dir.path().join("data");
        let web = dir.path().join("web.yml");
        if let Some(pki) = pki {
            std::fs::write(
                &web,
                format!(
                    "tls_server_config:\n  cert_file: {}\n  key_file: {}\n  \
                     client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {}\n",
                    pki.server_cert.display(),
                    pki.server_key.display(),
                    pki.ca.display()
                ),
            )
            .expect("write web.yml");
        }
        let make = |port: u16| {
            let mut cmd = Command::new("prometheus");
            cmd.arg("--web.enable-remote-write-receiver")
                .arg(format!("--config.file={}", cfg.display()))
                .arg(format!("--storage.tsdb.path={}", data.display()))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .arg("--log.level=warn");
            if pki.is_some() {
                cmd.arg(format!("--web.config.file={}", web.display()));
            }
            if !features.is_empty() {
                cmd.arg(format!("--enable-feature={}", features.join(",")));
            }
            cmd
        };
        let (scheme, http) = match pki {
            Some(pki) => ("https", pki.client()),
            None => ("http", client()),
        };
        let (child, port) = start_child_with(
            "prometheus",
            dir.path(),
            fixed,
            make,
            &http,
            scheme,
            "/-/ready",
        )
        .await;
        Prometheus {
            port,
            scheme,
            http,
            child,
            _dir: dir,
        }
    }

    pub fn base(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme, self.port)
    }

    pub fn write_url(&self) -> String {
        format!("{}/api/v1/write", self.base())
    }

    pub fn log_tail(&self) -> String {
        self.child.log_tail()
    }

    /// All series matching `selector`, as label sets.
    pub async fn series(&self, selector: &str) -> BTreeSet<LabelSet> {
        let resp = self
            .http
            .get(format!("{}/api/v1/series", self.base()))
            .query(&[("match[]", selector)])
            .send()
            .await
            .expect("query prometheus /api/v1/series");
        let status = resp.status();
        let body: serde_json::Value =
            serde_json::from_slice(&resp.bytes().await.expect("series answer"))
                .expect("series answer is JSON");
        assert_eq!(status, 200, "series query {selector} failed: {body}");
        body["data"]
            .as_array()
            .expect("series data is an array")
            .iter()
            .map(|s| {
                s.as_object()
                    .expect("series entry is an object")
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().expect("label value").to_string()))
                    .collect()
            })
            .collect()
    }

    /// Every series in the receiver.
    pub async fn all_series(&self) -> BTreeSet<LabelSet> {
        self.series("{__name__=~\".+\"}").await
    }

    /// The metric name of every series in the receiver, one per series.
    pub async fn series_names(&self) -> Vec<String> {
        self.all_series()
            .await
            .into_iter()
            .map(|l| l["__name__"].clone())
            .collect()
    }

    /// Waits until `selector` matches at least one series and returns them.
    pub async fn wait_series(&self, selector: &str, timeout: Duration) -> BTreeSet<LabelSet> {
        wait_for(
            &format!("series {selector} in prometheus"),
            timeout,
            || async {
                let s = self.series(selector).await;
                (!s.is_empty()).then_some(s)
            },
        )
        .await
    }

    /// The `data` of a GET on an API path (`/api/v1/...`) with `query`.
    pub async fn api(&self, path: &str, query: &[(&str, &str)]) -> serde_json::Value {
        let resp = self
            .http
            .get(format!("{}{path}", self.base()))
            .query(query)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET prometheus {path}: {e}"));
        let body: serde_json::Value =
            serde_json::from_slice(&resp.bytes().await.expect("API answer"))
                .expect("API answer is JSON");
        assert_eq!(body["status"], "success", "{path} {query:?} failed: {body}");
        body["data"].clone()
    }

    /// The value of a query whose answer is one number (0 if empty).
    pub async fn scalar(&self, query: &str) -> f64 {
        self.query(query).await.first().map_or(0.0, |(_, v)| *v)
    }

    /// The instant vector of `query` as (labels, value) pairs.
    pub async fn query(&self, query: &str) -> Vec<(LabelSet, f64)> {
        let resp = self
            .http
            .get(format!("{}/api/v1/query", self.base()))
            .query(&[("query", query)])
            .send()
            .await
            .expect("query prometheus /api/v1/query");
        let body: serde_json::Value =
            serde_json::from_slice(&resp.bytes().await.expect("query answer"))
                .expect("query answer is JSON");
        assert_eq!(body["status"], "success", "query {query} failed: {body}");
        body["data"]["result"]
            .as_array()
            .expect("result is an array")
            .iter()
            .map(|r| {
                let labels = r["metric"]
                    .as_object()
                    .expect("metric is an object")
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().expect("label value").to_string()))
                    .collect();
                let value = r["value"][1]
                    .as_str()
                    .expect("sample value is a string")
                    .parse()
                    .expect("sample value is a float");
                (labels, value)
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------
// A private PKI (mutual TLS towards the upstream)
// ---------------------------------------------------------------------------

/// A CA made at test time, a server certificate for 127.0.0.1 and a client
/// certificate, all signed by it, as PEM files in a temporary directory.
pub struct TestPki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    _dir: TempDir,
}

impl TestPki {
    pub fn new() -> TestPki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let dir = tempfile::tempdir().expect("tempdir for the PKI");
        let write = |name: &str, pem: String| {
            let path = dir.path().join(name);
            std::fs::write(&path, pem).expect("write a PEM file");
            path
        };
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "rwgate test CA");
        let ca = write(
            "ca.pem",
            ca_params
                .self_signed(&ca_key)
                .expect("CA certificate")
                .pem(),
        );
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf = |names: Vec<String>, cn: &str, file: &str| {
            let (cert, key) = issue(&issuer, names, cn);
            (
                write(&format!("{file}.crt"), cert),
                write(&format!("{file}.key"), key),
            )
        };
        let (server_cert, server_key) = leaf(
            vec!["127.0.0.1".into(), "localhost".into()],
            "receiver",
            "server",
        );
        let (client_cert, client_key) = leaf(Vec::new(), "rwgate", "client");
        TestPki {
            ca,
            server_cert,
            server_key,
            client_cert,
            client_key,
            issuer,
            _dir: dir,
        }
    }

    /// A new server certificate for 127.0.0.1 and localhost with common
    /// name `cn`, signed by the CA: (certificate PEM, key PEM).
    pub fn server_pair(&self, cn: &str) -> (String, String) {
        issue(
            &self.issuer,
            vec!["127.0.0.1".into(), "localhost".into()],
            cn,
        )
    }

    /// A test client trusting the CA and presenting the client certificate.
    pub fn client(&self) -> reqwest::Client {
        let read = |p: &Path| std::fs::read(p).expect("read a PEM file");
        let mut identity = read(&self.client_cert);
        identity.extend(read(&self.client_key));
        reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(30))
            .add_root_certificate(
                reqwest::Certificate::from_pem(&read(&self.ca)).expect("CA certificate"),
            )
            .identity(reqwest::Identity::from_pem(&identity).expect("client identity"))
            .build()
            .expect("build an mTLS client")
    }
}

/// A leaf certificate for `names` with common name `cn`, signed by
/// `issuer`: (certificate PEM, key PEM).
fn issue(
    issuer: &rcgen::Issuer<'static, rcgen::KeyPair>,
    names: Vec<String>,
    cn: &str,
) -> (String, String) {
    let key = rcgen::KeyPair::generate().expect("leaf key");
    let mut params = rcgen::CertificateParams::new(names).expect("leaf params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    let cert = params.signed_by(&key, issuer).expect("sign a leaf");
    (cert.pem(), key.serialize_pem())
}

/// The DER of the first certificate in PEM text.
pub fn first_cert_der(pem: &str) -> Vec<u8> {
    rustls_pemfile::certs(&mut pem.as_bytes())
        .next()
        .expect("a certificate in the PEM")
        .expect("valid PEM")
        .to_vec()
}

/// A TLS connection to `addr` (as `localhost`) from a rustls client that
/// trusts the CA in `ca` (PEM) and, with `identity`, presents that client
/// certificate and key. ALPN `http/1.1`. Fails as the handshake does.
pub async fn tls_connect(
    addr: SocketAddr,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    let ca_pem = std::fs::read(ca).expect("read the CA");
    for cert in rustls_pemfile::certs(&mut &ca_pem[..]) {
        roots.add(cert.expect("CA PEM")).expect("add the CA");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots);
    let mut config = match identity {
        Some((cert, key)) => {
            let certs = rustls_pemfile::certs(&mut &std::fs::read(cert).expect("read cert")[..])
                .collect::<Result<Vec<_>, _>>()
                .expect("client cert PEM");
            let key = rustls_pemfile::private_key(&mut &std::fs::read(key).expect("read key")[..])
                .expect("client key PEM")
                .expect("a client key");
            builder
                .with_client_auth_cert(certs, key)
                .expect("client identity")
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("server name");
    // With TLS 1.3 the server judges a client certificate after the
    // client's side of the handshake is done: a refusal shows on the first
    // read, not here.
    tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp))
        .await
        .map_err(|_| std::io::Error::other("TLS handshake timed out"))?
}

/// Sends `request` (HTTP/1.1, keep-alive) on `stream` and reads one answer
/// whose body is `Content-Length` long; returns the status and body.
pub async fn tls_exchange<S>(stream: &mut S, request: &str) -> std::io::Result<(u16, String)>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(request.as_bytes()).await?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if body.len() >= len {
                let status = head
                    .split(' ')
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                return Ok((status, body.to_string()));
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let n = tokio::time::timeout(left, stream.read(&mut chunk))
            .await
            .map_err(|_| std::io::Error::other("no answer within 10s"))??;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed before the answer",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Runs `curl` with `args` (bounded by `--max-time 10`) and returns (exit
/// code, stdout, stderr). curl is installed by scripts/install-deps.sh.
pub async fn curl(args: Vec<String>) -> (i32, String, String) {
    tokio::task::spawn_blocking(move || {
        let out = Command::new("curl")
            .args([
                "--silent",
                "--show-error",
                "--max-time",
                "10",
                "--noproxy",
                "*",
            ])
            .args(&args)
            .output()
            .expect("run curl (scripts/install-deps.sh installs it)");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .expect("join curl")
}

// ---------------------------------------------------------------------------
// vmagent (a real remote-write client)
// ---------------------------------------------------------------------------

/// vmagent scraping `scrape_target` (`host:port`) every second and
/// remote-writing to `remote_write_url` with the given headers and basic auth.
pub struct VmAgent {
    pub port: u16,
    child: ChildGuard,
    _dir: TempDir,
}

impl VmAgent {
    pub async fn start(
        remote_write_url: &str,
        headers: &[(&str, &str)],
        basic_auth: Option<(&str, &str)>,
        job: &str,
        scrape_target: &str,
    ) -> VmAgent {
        let dir = tempfile::tempdir().expect("tempdir for vmagent");
        let scrape = dir.path().join("scrape.yml");
        std::fs::write(
            &scrape,
            format!(
                "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: {job}\n    static_configs:\n      - targets: ['{scrape_target}']\n"
            ),
        )
        .expect("write scrape.yml");
        let make = |port: u16| {
            let mut cmd = Command::new("vmagent");
            cmd.arg(format!("-httpListenAddr=127.0.0.1:{port}"))
                .arg(format!("-promscrape.config={}", scrape.display()))
                .arg("-promscrape.config.strictParse=false")
                .arg(format!("-remoteWrite.url={remote_write_url}"))
                .arg(format!(
                    "-remoteWrite.tmpDataPath={}",
                    dir.path().join("queue").display()
                ))
                .arg("-remoteWrite.flushInterval=1s")
                .arg("-loggerLevel=WARN");
            if !headers.is_empty() {
                let joined: Vec<String> =
                    headers.iter().map(|(k, v)| format!("{k}: {v}")).collect();
                // vmagent separates several headers of one URL with `^^`.
                cmd.arg(format!("-remoteWrite.headers={}", joined.join("^^")));
            }
            if let Some((user, pass)) = basic_auth {
                cmd.arg(format!("-remoteWrite.basicAuth.username={user}"))
                    .arg(format!("-remoteWrite.basicAuth.password={pass}"));
            }
            cmd
        };
        let (child, port) = start_child("vmagent", dir.path(), None, make, "/health").await;
        VmAgent {
            port,
            child,
            _dir: dir,
        }
    }

    pub fn log_tail(&self) -> String {
        self.child.log_tail()
    }
}

// ---------------------------------------------------------------------------
// Tiny in-process HTTP servers (REST API stand-in, fake upstream)
// ---------------------------------------------------------------------------

/// A request as a test server saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// When the request arrived (tokio's clock: paused time in tests that
    /// pause it).
    pub at: tokio::time::Instant,
    pub method: http::Method,
    pub uri: http::Uri,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

type Handler = Arc<
    dyn Fn(Seen) -> std::pin::Pin<Box<dyn Future<Output = http::Response<Full<Bytes>>> + Send>>
        + Send
        + Sync,
>;

/// An HTTP/1.1 server on a loopback port running `handler`; stops accepting
/// when dropped.
struct TestServer {
    addr: SocketAddr,
    accept_loop: tokio::task::JoinHandle<()>,
}

impl TestServer {
    async fn start(handler: Handler) -> TestServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind test server");
        let addr = listener.local_addr().expect("test server addr");
        let accept_loop = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let handler = handler.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                        let handler = handler.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let seen = Seen {
                                at: tokio::time::Instant::now(),
                                method: parts.method,
                                uri: parts.uri,
                                headers: parts.headers,
                                body,
                            };
                            Ok::<_, std::convert::Infallible>(handler(seen).await)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        TestServer { addr, accept_loop }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.accept_loop.abort();
    }
}

fn respond(status: u16, body: impl Into<Bytes>) -> http::Response<Full<Bytes>> {
    http::Response::builder()
        .status(status)
        .body(Full::new(body.into()))
        .expect("valid test response")
}

/// What the REST stand-in knows about one account.
#[derive(Debug, Clone)]
pub enum Account {
    /// Has remote-write credentials: base64 of `user:password`.
    Credentials(String),
    /// Exists but has none configured.
    NoCredentials,
}

/// Whether the REST stand-in answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestMode {
    Up,
    /// Answers 503 to everything (an outage behind a load balancer).
    Down,
    /// Accepts requests but answers only after a minute (an overloaded or
    /// wedged API): the lookup runs into rwgate's `auth.rest_timeout`.
    Hang,
}

struct RestState {
    secret: String,
    accounts: Mutex<BTreeMap<String, Account>>,
    down: AtomicBool,
    hang: AtomicBool,
    calls: AtomicUsize,
    bad_secret: AtomicUsize,
    paths: Mutex<Vec<String>>,
    bulk: bulk::BulkState,
}

/// An in-process stand-in for the platform REST API:
/// `GET /restapi/v2/cloud_accounts/{id}?details=false` with header `Secret`,
/// and the resource registry's bulk endpoint (see [`bulk`]).
pub struct RestApi {
    server: TestServer,
    state: Arc<RestState>,
}

impl RestApi {
    pub async fn start(secret: &str) -> RestApi {
        let state = Arc::new(RestState {
            secret: secret.to_string(),
            accounts: Mutex::new(BTreeMap::new()),
            down: AtomicBool::new(false),
            hang: AtomicBool::new(false),
            calls: AtomicUsize::new(0),
            bad_secret: AtomicUsize::new(0),
            paths: Mutex::new(Vec::new()),
            bulk: bulk::BulkState::default(),
        });
        let st = state.clone();
        let handler: Handler = Arc::new(move |seen: Seen| {
            let st = st.clone();
            Box::pin(async move {
                if seen.uri.path().ends_with(bulk::BULK_SUFFIX) {
                    return bulk::answer(&st, seen).await;
                }
                if st.hang.load(Ordering::SeqCst) {
                    st.calls.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    return respond(504, "gateway timeout");
                }
                rest_answer(&st, seen)
            })
        });
        RestApi {
            server: TestServer::start(handler).await,
            state,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.server.addr)
    }

    pub fn add(&self, id: &str, account: Account) {
        self.state
            .accounts
            .lock()
            .expect("accounts lock")
            .insert(id.to_string(), account);
    }

    pub fn set_mode(&self, mode: RestMode) {
        self.state
            .down
            .store(mode == RestMode::Down, Ordering::SeqCst);
        self.state
            .hang
            .store(mode == RestMode::Hang, Ordering::SeqCst);
    }

    /// Lookups received (with any secret, up or down).
    pub fn calls(&self) -> usize {
        self.state.calls.load(Ordering::SeqCst)
    }

    /// Lookups whose `Secret` header was missing or wrong.
    pub fn bad_secret_calls(&self) -> usize {
        self.state.bad_secret.load(Ordering::SeqCst)
    }

    /// Path and query of every lookup, in order.
    pub fn paths(&self) -> Vec<String> {
        self.state.paths.lock().expect("paths lock").clone()
    }

    /// Every bulk call received, in order (any answer).
    pub fn bulk_calls(&self) -> Vec<bulk::BulkCall> {
        self.state
            .bulk
            .calls
            .lock()
            .expect("bulk calls lock")
            .clone()
    }

    /// The resource documents of an account, as the platform stores them.
    pub fn resources(&self, account: &str) -> Vec<serde_json::Value> {
        self.state
            .bulk
            .docs
            .lock()
            .expect("docs lock")
            .iter()
            .filter(|((a, _), _)| a == account)
            .map(|(_, d)| d.clone())
            .collect()
    }

    /// Bulk calls answer `status` (None: normally) without changing anything;
    /// lookups are not affected (use [`set_mode`](Self::set_mode) for both).
    pub fn fail_bulk(&self, status: Option<u16>) {
        *self.state.bulk.fail.lock().expect("fail lock") = status;
    }

    /// Bulk calls for `account` answer `status` (None: normally).
    pub fn fail_bulk_for(&self, account: &str, status: Option<u16>) {
        let mut f = self.state.bulk.fail_accounts.lock().expect("fail lock");
        match status {
            Some(s) => f.insert(account.to_string(), s),
            None => f.remove(account),
        };
    }

    /// Bulk calls are applied, then answered only after `d` (a crash
    /// window: the platform has the resources, the caller not yet).
    pub fn hold_bulk(&self, d: Duration) {
        *self.state.bulk.hold.lock().expect("hold lock") = d;
    }

    /// The most bulk calls the stand-in was answering at once.
    pub fn max_bulk_in_flight(&self) -> usize {
        self.state.bulk.max_in_flight.load(Ordering::SeqCst)
    }
}

fn rest_answer(st: &RestState, seen: Seen) -> http::Response<Full<Bytes>> {
    st.calls.fetch_add(1, Ordering::SeqCst);
    st.paths.lock().expect("paths lock").push(
        seen.uri
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default(),
    );
    if st.down.load(Ordering::SeqCst) {
        return respond(503, "service unavailable");
    }
    if seen.headers.get("secret").and_then(|v| v.to_str().ok()) != Some(st.secret.as_str()) {
        st.bad_secret.fetch_add(1, Ordering::SeqCst);
        return respond(403, r#"{"error":{"reason":"Forbidden"}}"#);
    }
    let Some(id) = seen.uri.path().strip_prefix("/restapi/v2/cloud_accounts/") else {
        return respond(404, r#"{"error":{"reason":"no such route"}}"#);
    };
    if seen.method != http::Method::GET || seen.uri.query() != Some("details=false") {
        return respond(400, r#"{"error":{"reason":"unexpected request"}}"#);
    }
    match st.accounts.lock().expect("accounts lock").get(id) {
        None => respond(404, r#"{"error":{"reason":"Cloud account not found"}}"#),
        Some(Account::Credentials(c)) => respond(
            200,
            serde_json::json!({"id": id, "name": "test", "config": {"credentials": c}}).to_string(),
        ),
        Some(Account::NoCredentials) => respond(
            200,
            serde_json::json!({"id": id, "name": "test", "config": {}}).to_string(),
        ),
    }
}

/// One scripted upstream answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: String,
    pub headers: Vec<(&'static str, String)>,
}

impl Reply {
    pub fn status(status: u16, body: &str) -> Reply {
        Reply {
            status,
            body: body.to_string(),
            headers: Vec::new(),
        }
    }

    pub fn header(mut self, name: &'static str, value: &str) -> Reply {
        self.headers.push((name, value.to_string()));
        self
    }
}

struct UpstreamState {
    script: Mutex<VecDeque<Reply>>,
    delay: Mutex<Duration>,
    seen: Mutex<Vec<Seen>>,
}

/// A remote-write upstream that answers from a script (then 204), optionally
/// after a delay, recording every request. Only for what Prometheus cannot be
/// made to answer on demand (409, 429, 5xx sequences, slowness).
pub struct FakeUpstream {
    server: TestServer,
    state: Arc<UpstreamState>,
}

impl FakeUpstream {
    pub async fn start(script: Vec<Reply>) -> FakeUpstream {
        let state = Arc::new(UpstreamState {
            script: Mutex::new(script.into()),
            delay: Mutex::new(Duration::ZERO),
            seen: Mutex::new(Vec::new()),
        });
        let st = state.clone();
        let handler: Handler = Arc::new(move |seen: Seen| {
            let st = st.clone();
            Box::pin(async move {
                st.seen.lock().expect("seen lock").push(seen);
                let delay = *st.delay.lock().expect("delay lock");
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                let reply = st
                    .script
                    .lock()
                    .expect("script lock")
                    .pop_front()
                    .unwrap_or_else(|| Reply::status(204, ""));
                let mut b = http::Response::builder().status(reply.status);
                for (k, v) in &reply.headers {
                    b = b.header(*k, v);
                }
                b.body(Full::new(Bytes::from(reply.body)))
                    .expect("valid scripted reply")
            })
        });
        FakeUpstream {
            server: TestServer::start(handler).await,
            state,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/api/v1/receive", self.server.addr)
    }

    pub fn set_delay(&self, d: Duration) {
        *self.state.delay.lock().expect("delay lock") = d;
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().expect("seen lock").clone()
    }

    pub fn count(&self) -> usize {
        self.state.seen.lock().expect("seen lock").len()
    }

    /// Sends one write to `url` (rwgate in front of this upstream) on a
    /// spawned task and returns once this upstream has it, within `timeout`:
    /// with a delay set, a request stuck at the upstream.
    pub async fn hold_a_write(
        &self,
        url: String,
        timeout: Duration,
    ) -> tokio::task::JoinHandle<()> {
        let before = self.count();
        let task = tokio::spawn(async move {
            let body = write_body(vec![series("up", &[("job", "stuck")], 1.0, now_ms())]);
            let _ = rw_post(&client(), &url, Some(TENANT_A), body).send().await;
        });
        wait_for(
            "the stuck request to reach the upstream",
            timeout,
            || async { (self.count() > before).then_some(()) },
        )
        .await;
        task
    }
}

/// A remote-write receiver answering 204 to everything, counting requests.
pub struct Sink {
    pub addr: SocketAddr,
    pub requests: Arc<AtomicU64>,
    /// Stops accepting when the sink is dropped.
    _server: TestServer,
}

impl Sink {
    pub async fn start() -> Sink {
        let requests = Arc::new(AtomicU64::new(0));
        let counter = requests.clone();
        // Called once the body is read whole.
        let handler: Handler = Arc::new(move |_: Seen| {
            counter.fetch_add(1, Ordering::Relaxed);
            Box::pin(async { respond(204, Bytes::new()) })
        });
        let server = TestServer::start(handler).await;
        Sink {
            addr: server.addr,
            requests,
            _server: server,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/api/v1/write", self.addr)
    }
}

/// A server answering every request with `status` and a body of a first
/// line and `total` bytes of filler, made as it is sent, counting the bytes
/// handed to the connection: how much of a huge answer the client read
/// before it hung up (plus what the socket buffers held).
pub struct HugeAnswer {
    pub addr: SocketAddr,
    sent: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

/// The body of a [`HugeAnswer`], produced frame by frame.
struct Filler {
    first: Option<Bytes>,
    chunk: Bytes,
    left: u64,
    sent: Arc<AtomicU64>,
}

impl hyper::body::Body for Filler {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        let data = match self.first.take() {
            Some(first) => first,
            None if self.left == 0 => return std::task::Poll::Ready(None),
            None => {
                let n = self.left.min(self.chunk.len() as u64) as usize;
                self.left -= n as u64;
                self.chunk.slice(..n)
            }
        };
        self.sent.fetch_add(data.len() as u64, Ordering::Relaxed);
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(data))))
    }
}

impl HugeAnswer {
    pub async fn start(status: u16, first_line: &str, total: u64) -> HugeAnswer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind huge-answer server");
        let addr = listener.local_addr().expect("huge-answer addr");
        let sent = Arc::new(AtomicU64::new(0));
        let first = Bytes::from(format!("{first_line}\n"));
        let chunk = Bytes::from(vec![b'x'; 64 << 10]);
        let counter = sent.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (first, chunk, counter) = (first.clone(), chunk.clone(), counter.clone());
                tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(move |req: http::Request<Incoming>| {
                            let len = first.len() as u64 + total;
                            let body = Filler {
                                left: total,
                                first: Some(first.clone()),
                                chunk: chunk.clone(),
                                sent: counter.clone(),
                            };
                            async move {
                                let _ = req.into_body().collect().await;
                                let resp = http::Response::builder()
                                    .status(status)
                                    .header("content-length", len)
                                    .body(body)
                                    .expect("valid huge answer");
                                Ok::<_, std::convert::Infallible>(resp)
                            }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        HugeAnswer { addr, sent, task }
    }

    /// Body bytes handed to connections so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
}

impl Drop for HugeAnswer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------
// rwgate in-process
// ---------------------------------------------------------------------------

/// A config for tests: no auth, the given upstream, fast retries and short
/// timeouts so failures show quickly.
pub fn test_config(upstream_url: &str) -> Config {
    let mut c = Config {
        listen: "127.0.0.1:0".parse().expect("addr"),
        ..Config::default()
    };
    c.auth.mode = AuthMode::None;
    c.upstream.url = upstream_url.to_string();
    c.upstream.max_retries = 2;
    c.upstream.retry_backoff = Duration::from_millis(10);
    c.upstream.retry_max_backoff = Duration::from_millis(50);
    c.upstream.timeout = Duration::from_secs(5);
    c.limits.shutdown_grace = Duration::from_secs(5);
    c
}

/// rwgate in front of a [`FakeUpstream`] with an empty script (it answers
/// 204), on the [`test_config`] that `set` changes.
pub async fn gateway_to_fake_upstream(set: impl FnOnce(&mut Config)) -> (FakeUpstream, Gateway) {
    let upstream = FakeUpstream::start(Vec::new()).await;
    let mut cfg = test_config(&upstream.url());
    set(&mut cfg);
    (upstream, Gateway::start(cfg).await)
}

/// rwgate on `cfg` with static auth of one tenant, [`TENANT_A`], whose Basic
/// credentials are `user`:`password`. The tenants file is in the returned
/// directory: keep it as long as the gateway.
pub async fn gateway_for_tenant_a(
    mut cfg: Config,
    user: &str,
    password: &str,
) -> (Gateway, TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    cfg.auth.mode = AuthMode::Static;
    cfg.auth.tenants_file = Some(tenant_a_file(dir.path(), user, password));
    (Gateway::start(cfg).await, dir)
}

/// rwgate served by `rwgate::run` on a spawned task, with its own listener
/// on port 0 and a oneshot as its shutdown signal (sent on drop).
pub struct Gateway {
    pub addr: SocketAddr,
    /// The `metrics_listen` port, when started with one.
    pub metrics_addr: Option<SocketAddr>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Gateway {
    pub async fn start(cfg: Config) -> Gateway {
        Gateway::start_with(cfg, false).await
    }

    /// rwgate with a `metrics_listen` port of its own (`metrics_addr`), which
    /// [`Gateway::metrics`] then reads.
    pub async fn start_with_metrics_listener(cfg: Config) -> Gateway {
        Gateway::start_with(cfg, true).await
    }

    async fn start_with(cfg: Config, metrics_listener: bool) -> Gateway {
        rwgate::telemetry::init_logging(rwgate::config::LogFormat::Text, "info");
        cfg.validate().expect("test config is valid");
        let bind = || tokio::net::TcpListener::bind("127.0.0.1:0");
        let listener = bind().await.expect("bind rwgate listener");
        let addr = listener.local_addr().expect("rwgate addr");
        let metrics = match metrics_listener {
            true => Some(bind().await.expect("bind the metrics listener")),
            false => None,
        };
        let metrics_addr = metrics
            .as_ref()
            .map(|l| l.local_addr().expect("metrics addr"));
        let tls = cfg.tls.cert.is_some();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(rwgate::server::serve(cfg, listener, metrics, async move {
            let _ = rx.await;
        }));
        let gw = Gateway {
            addr,
            metrics_addr,
            shutdown: Some(tx),
            task: Some(task),
        };
        // The readiness probe only needs to reach the server; with TLS it
        // does not check the (test-generated) certificate.
        let http = reqwest::Client::builder()
            .no_proxy()
            .danger_accept_invalid_certs(true)
            .build()
            .expect("build probe client");
        // Through the metrics port when there is one (plain HTTP, as kubelet
        // probes go when the ingest port requires client certificates).
        let url = match metrics_addr {
            Some(m) => format!("http://{m}/-/ready"),
            None if tls => format!("https://{addr}/-/ready"),
            None => format!("http://{addr}/-/ready"),
        };
        wait_for("rwgate /-/ready", START_TIMEOUT, || async {
            match http.get(&url).send().await {
                Ok(r) if r.status() == 200 => Some(()),
                _ => None,
            }
        })
        .await;
        gw
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The remote-write URL.
    pub fn write_url(&self) -> String {
        self.url("/api/v1/write")
    }

    /// Where `/metrics` is served.
    pub fn metrics_url(&self) -> String {
        let addr = self.metrics_addr.unwrap_or(self.addr);
        format!("http://{addr}/metrics")
    }

    /// The value of the first line of metric `name` (any labels), if any.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let text = get_text(&self.metrics_url()).await?;
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    /// Signals shutdown and waits (bounded) for `run` to return.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("rwgate stopped within 10s")
                .expect("rwgate task did not panic")
                .expect("rwgate::run returned Ok");
        }
    }

    /// The text of `/metrics`.
    pub async fn metrics(&self) -> String {
        let r = client()
            .get(self.metrics_url())
            .send()
            .await
            .expect("GET /metrics");
        assert_eq!(r.status(), 200);
        r.text().await.expect("metrics text")
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// The value of one metric line (exact name and label text, e.g.
/// `rwgate_samples_dropped_total{reason="allowlist"}`), 0 if absent.
pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.parse::<f64>().expect("metric value"))
        })
        .unwrap_or(0.0)
}

// ---------------------------------------------------------------------------
// Remote-write requests
// ---------------------------------------------------------------------------

/// A series with one sample; `labels` are sent in the given order (not
/// necessarily sorted, like a sloppy client).
pub fn series(name: &str, labels: &[(&str, &str)], value: f64, ts_ms: i64) -> prompb::TimeSeries {
    let mut l = vec![prompb::Label {
        name: "__name__".into(),
        value: name.into(),
    }];
    l.extend(labels.iter().map(|(n, v)| prompb::Label {
        name: n.to_string(),
        value: v.to_string(),
    }));
    prompb::TimeSeries {
        labels: l,
        samples: vec![prompb::Sample {
            value,
            timestamp: ts_ms,
        }],
        ..Default::default()
    }
}

/// Snappy-compressed protobuf `WriteRequest` of `series`.
pub fn write_body(series: Vec<prompb::TimeSeries>) -> Vec<u8> {
    let req = prompb::WriteRequest {
        timeseries: series,
        metadata: Vec::new(),
    };
    snap::raw::Encoder::new()
        .compress_vec(&req.encode_to_vec())
        .expect("snappy compress")
}

/// Decodes a snappy protobuf `WriteRequest` (what an upstream received).
pub fn decode_body(body: &[u8]) -> prompb::WriteRequest {
    let raw = snap::raw::Decoder::new()
        .decompress_vec(body)
        .expect("upstream body is snappy");
    prompb::WriteRequest::decode(raw.as_slice()).expect("upstream body is a WriteRequest")
}

/// Labels of a prost series as a set.
pub fn labels_of(ts: &prompb::TimeSeries) -> LabelSet {
    ts.labels
        .iter()
        .map(|l| (l.name.clone(), l.value.clone()))
        .collect()
}

/// Builds a label set from pairs.
pub fn labels(pairs: &[(&str, &str)]) -> LabelSet {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A remote-write POST with the usual headers.
pub fn rw_post(
    http: &reqwest::Client,
    url: &str,
    account: Option<&str>,
    body: Vec<u8>,
) -> reqwest::RequestBuilder {
    let mut r = http
        .post(url)
        .header("Content-Type", "application/x-protobuf")
        .header("Content-Encoding", "snappy")
        .header("X-Prometheus-Remote-Write-Version", "0.1.0")
        .body(body);
    if let Some(a) = account {
        r = r.header("Cloud-Account-Id", a);
    }
    r
}

/// The `Retry-After` header of a response, if it has one.
pub fn retry_after(resp: &reqwest::Response) -> Option<String> {
    resp.headers()
        .get("retry-after")
        .map(|v| v.to_str().expect("ASCII Retry-After").to_string())
}

/// Status and body text of a response.
pub async fn status_body(resp: reqwest::Response) -> (u16, String) {
    let status = resp.status().as_u16();
    let body = resp.text().await.expect("response body");
    (status, body)
}

/// Sends `req` and returns the status and body text of its answer.
pub async fn send_status_body(req: reqwest::RequestBuilder) -> (u16, String) {
    status_body(req.send().await.expect("an answer")).await
}

/// Asserts `rwgate_series_refused_total` of each reason in `want`, in the
/// text of `/metrics`.
pub fn assert_series_refused(metrics: &str, want: &[(&str, f64)]) {
    for (reason, n) in want {
        let line = format!("rwgate_series_refused_total{{reason=\"{reason}\"}}");
        assert_eq!(metric_value(metrics, &line), *n, "{line}\n{metrics}");
    }
}

/// Base64 of `user:password`, as the platform stores credentials.
pub fn basic_credentials(user: &str, password: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
}

/// A tenants file for `static` auth in `dir`.
pub fn tenants_file(dir: &Path, entries: &[(&str, &str, Option<&str>)]) -> PathBuf {
    let mut text = String::new();
    for (id, creds, allow) in entries {
        text.push_str(&format!(
            "[[tenant]]\nid = \"{id}\"\ncredentials = \"{creds}\"\n"
        ));
        if let Some(a) = allow {
            text.push_str(&format!("allowlist = \"{a}\"\n"));
        }
    }
    let path = dir.join("tenants.toml");
    std::fs::write(&path, text).expect("write tenants file");
    path
}

/// A tenants file in `dir` ([`tenants_file`]) of one tenant, [`TENANT_A`],
/// whose Basic credentials are `user`:`password`.
pub fn tenant_a_file(dir: &Path, user: &str, password: &str) -> PathBuf {
    tenants_file(dir, &[(TENANT_A, &basic_credentials(user, password), None)])
}

/// Static auth in `cfg`, from a tenants file of `entries` written in `dir`
/// ([`tenants_file`]).
pub fn static_auth(cfg: &mut Config, dir: &Path, entries: &[(&str, &str, Option<&str>)]) {
    cfg.auth.mode = AuthMode::Static;
    cfg.auth.tenants_file = Some(tenants_file(dir, entries));
}

/// Sends raw bytes on a fresh TCP connection and returns the whole answer
/// (the server closes after it: `Connection: close` must be in `request`).
pub async fn raw_http(addr: SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect for raw request");
    s.write_all(request).await.expect("write raw request");
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("raw answer within 10s")
        .expect("read raw answer");
    String::from_utf8_lossy(&out).into_owned()
}

/// A remote-write POST sent by hand over one connection, its body held
/// back after the first bytes: a slow sender, or one that hangs up.
pub struct SlowPost {
    stream: tokio::net::TcpStream,
    rest: Vec<u8>,
}

impl SlowPost {
    /// Sends the headers of a POST of `body` to `path` for `account` and the
    /// first `sent` bytes of the body.
    pub async fn start(
        addr: SocketAddr,
        path: &str,
        account: &str,
        body: &[u8],
        sent: usize,
    ) -> SlowPost {
        use tokio::io::AsyncWriteExt;
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .expect("connect for a slow post");
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: rwgate\r\nContent-Type: application/x-protobuf\r\n\
             Content-Encoding: snappy\r\nCloud-Account-Id: {account}\r\n\
             Content-Length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).await.expect("write head");
        stream
            .write_all(&body[..sent])
            .await
            .expect("write body start");
        SlowPost {
            stream,
            rest: body[sent..].to_vec(),
        }
    }

    /// Sends the rest of the body.
    pub async fn finish_body(&mut self) {
        use tokio::io::AsyncWriteExt;
        let rest = std::mem::take(&mut self.rest);
        self.stream.write_all(&rest).await.expect("write body rest");
    }

    /// Reads the answer's status line and body (bounded: 60 s, as the
    /// clock goes; a test on paused time passes it only by rwgate's timers).
    pub async fn answer(&mut self) -> (u16, String) {
        use tokio::io::AsyncReadExt;
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        let read = async {
            loop {
                let n = self.stream.read(&mut buf).await.expect("read answer");
                out.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&out);
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().to_string())
                        })
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    if body.len() >= len || n == 0 {
                        let status = head
                            .split(' ')
                            .nth(1)
                            .and_then(|c| c.parse().ok())
                            .expect("status code");
                        return (status, body.to_string());
                    }
                }
                assert!(n > 0, "connection closed without an answer: {text}");
            }
        };
        tokio::time::timeout(Duration::from_secs(60), read)
            .await
            .expect("an answer within 60s")
    }
}

/// Tenant ids used across tests.
pub const TENANT_A: &str = "0b7f4c8e-1a2b-4c3d-8e9f-00000000000a";
pub const TENANT_B: &str = "0b7f4c8e-1a2b-4c3d-8e9f-00000000000b";

// ---------------------------------------------------------------------------
// rwgate as a process (signals, exit codes)
// ---------------------------------------------------------------------------

/// A `rwgate` command for the built binary.
pub fn rwgate_cmd() -> Command {
    // `option_env!`: the harness is also compiled into examples/, where
    // cargo sets no binary paths.
    let Some(bin) = option_env!("CARGO_BIN_EXE_rwgate") else {
        panic!("the rwgate binary path is set for integration tests only");
    };
    let mut cmd = Command::new(bin);
    // Only what a test sets explicitly.
    for (k, _) in std::env::vars() {
        if k.starts_with("RWGATE_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// `rwgate serve` as a child process with `args` plus `--listen` on a fresh
/// port, waited on until `/-/ready`.
pub struct RwgateProcess {
    pub port: u16,
    pub child: ChildGuard,
    _dir: TempDir,
}

impl RwgateProcess {
    pub async fn start(args: &[&str]) -> RwgateProcess {
        RwgateProcess::start_on("serve", "--listen", args).await
    }

    /// `rwgate <command> --metrics-listen 127.0.0.1:<port> <args>`, waited
    /// on until `/-/ready` answers on that port (`port`, then).
    pub async fn start_with_metrics_listen(command: &str, args: &[&str]) -> RwgateProcess {
        RwgateProcess::start_on(command, "--metrics-listen", args).await
    }

    /// `rwgate serve` without auth forwarding to `upstream_url`, with
    /// `--metrics-listen` (`port`) and `--listen` on fresh ports, plus
    /// `args`; returns the ingest address too.
    pub async fn serve_with_metrics_listen(
        upstream_url: &str,
        args: &[&str],
    ) -> (RwgateProcess, SocketAddr) {
        let ingest = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let listen = ingest.to_string();
        let mut all = vec![
            "--auth",
            "none",
            "--upstream-url",
            upstream_url,
            "--listen",
            &listen,
        ];
        all.extend_from_slice(args);
        let rw = RwgateProcess::start_with_metrics_listen("serve", &all).await;
        (rw, ingest)
    }

    /// `rwgate <command> <port_flag> 127.0.0.1:<port> <args>`, waited on
    /// until `/-/ready` answers on that port.
    async fn start_on(command: &str, port_flag: &str, args: &[&str]) -> RwgateProcess {
        let dir = tempfile::tempdir().expect("tempdir for rwgate");
        let make = |port: u16| {
            let mut cmd = rwgate_cmd();
            cmd.arg(command)
                .arg(port_flag)
                .arg(format!("127.0.0.1:{port}"))
                .args(args);
            cmd
        };
        let (child, port) = start_child("rwgate", dir.path(), None, make, "/-/ready").await;
        RwgateProcess {
            port,
            child,
            _dir: dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }
}

/// Runs a short-lived `rwgate` command (bounded) and returns (exit code,
/// stdout, stderr).
pub fn run_rwgate(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = rwgate_cmd();
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn rwgate");
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().expect("try_wait rwgate").is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("rwgate {args:?} did not exit within 20s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().expect("rwgate output");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
