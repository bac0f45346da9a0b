//! Serving: the accept loop (plain or TLS, HTTP/1.1 and h2), routing, and the
//! write handler that takes one request through auth, the pipeline, the
//! upstream and the tee, top to bottom.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::server::graceful::GracefulShutdown;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::admission::Admission;
use crate::auth::Authenticator;
use crate::config::Config;
use crate::connection::{self, Serving};
use crate::cost::clickhouse::ClickHouse;
use crate::cost::rollup::RollupTask;
use crate::cost::tee::Tee;
use crate::error::ApiError;
use crate::filter::Allowlist;
use crate::health::Health;
use crate::pipeline::{self, Params, ScratchPool};
use crate::protocol::{self, Protocol};
use crate::ratelimit::{Exceeded, TenantLimiter};
use crate::telemetry::{self as t, LogLimiter};
use crate::upstream::{Upstream, UpstreamError};
use crate::wire::ShapeLimits;
use crate::wire_v2::Written;

/// The remote-write paths: diproxy's, and the two Prometheus/Thanos ones.
pub const WRITE_PATHS: [&str; 3] = ["/storage/api/v2/write", "/api/v1/write", "/api/v1/receive"];

/// Scratch buffers larger than this (after a rare large request) are freed
/// rather than pooled, so the pool never pins much memory.
const SCRATCH_KEEP_BYTES: usize = 8 << 20;

/// Everything a request needs, shared by all connections.
pub struct State {
    cfg: Config,
    auth: Authenticator,
    upstream: Upstream,
    allowlist: Allowlist,
    scratch: ScratchPool,
    /// Write requests processed at once, in all and per tenant.
    admission: Admission,
    /// Decompressed bytes held by requests at once, in KiB permits (the
    /// declared snappy length is known before decompressing); beyond it, 503.
    decoded_budget: Semaphore,
    rate: TenantLimiter,
    metrics: PrometheusHandle,
    /// What the probes answer: serving, and the cost pipeline's components.
    health: Arc<Health>,
    log_limiter: LogLimiter,
    /// The ClickHouse tee, when `clickhouse.url` is set.
    tee: Option<Tee>,
    /// Whether the ingest port serves `/metrics` (not when `metrics_listen`
    /// serves it).
    metrics_on_ingest: bool,
}

impl State {
    /// Builds the shared state from a validated config: auth source, upstream
    /// client and allowlist. Fails naming what could not be set up.
    pub fn new(cfg: Config) -> anyhow::Result<State> {
        let auth = Authenticator::from_config(&cfg.auth)?;
        let upstream = Upstream::new(&cfg.upstream)?;
        let allowlist = Allowlist::new(&cfg.filter.allowlist)?;
        Ok(State {
            auth,
            upstream,
            allowlist,
            scratch: ScratchPool::new(SCRATCH_KEEP_BYTES),
            admission: Admission::new(&cfg.limits),
            decoded_budget: Semaphore::new(kib(cfg.limits.max_decoded_bytes_in_flight.bytes())),
            rate: TenantLimiter::new(&cfg.limits),
            metrics: t::metrics_handle(),
            health: Arc::new(Health::default()),
            log_limiter: LogLimiter::new(cfg.log.max_rejections_per_sec),
            tee: None,
            metrics_on_ingest: true,
            cfg,
        })
    }
}

/// Serves on `listener` (and on `metrics_listen`, when set) until `shutdown`
/// completes, then stops accepting, lets in-flight requests finish and
/// stops the cost pipeline, all within `limits.shutdown_grace`, and returns.
pub async fn run(
    cfg: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let metrics = match cfg.metrics_listen {
        Some(addr) => Some(bind_metrics(addr).await?),
        None => None,
    };
    serve(cfg, listener, metrics, shutdown).await
}

/// Binds `metrics_listen`.
pub async fn bind_metrics(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} (metrics_listen): {e}"))
}

/// [`run`] with the listeners given: remote-write on `listener`; with
/// `metrics`, the operator endpoints there too and `/metrics` only there.
pub async fn serve(
    cfg: Config,
    listener: TcpListener,
    metrics: Option<TcpListener>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    // Dropped (stopping its certificate reloads) when serving ends.
    let tls = if cfg.tls.cert.is_some() {
        Some(crate::tls::ServerTls::start(&cfg.tls)?)
    } else {
        None
    };
    let grace = cfg.limits.shutdown_grace;
    let header_timeout = cfg.limits.header_read_timeout;
    let max_connections = cfg.limits.max_connections;
    let mut state = State::new(cfg)?;
    state.metrics_on_ingest = metrics.is_none();
    // The tee and, when this process is the one rollup writer, the rollup:
    // one client, so the schema is migrated once.
    let mut rollup = None;
    if state.cfg.clickhouse.url.is_some() {
        let ch = ClickHouse::new(&state.cfg.clickhouse)?;
        state.tee = Some(Tee::start(&state.cfg, ch.clone(), &state.health).await?);
        if state.cfg.rollup.enabled {
            rollup = Some(RollupTask::start(&state.cfg, ch, &state.health)?);
        }
    }
    let state = Arc::new(state);
    state.health.set_serving(true);
    let listen = listener.local_addr()?;
    // Where /metrics and the probes are served: metrics_listen, or listen.
    let operator = match &metrics {
        Some(l) => l.local_addr()?,
        None => listen,
    };
    tracing::info!(
        %listen,
        metrics = %operator,
        tls = tls.is_some(),
        upstream = %crate::config::redact_url(&state.cfg.upstream.url),
        auth = %state.cfg.auth.mode,
        "rwgate serving"
    );

    let serving = Serving::new(tls.as_ref().map(|t| t.acceptor.clone()), header_timeout);
    let graceful = GracefulShutdown::new();

    // Idle tenants' rate-limit buckets are forgotten once a minute.
    let housekeeping = {
        let state = state.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
            loop {
                tick.tick().await;
                state.rate.forget_idle();
            }
        })
    };

    let connections = Arc::new(Semaphore::new(max_connections));
    let ingest = |peer| {
        let state = state.clone();
        service_fn(move |req| {
            let state = state.clone();
            async move { Ok::<_, Infallible>(handle(&state, req, peer).await) }
        })
    };
    // Both listeners stop accepting when `shutdown` completes.
    let (stop, stopped) = tokio::sync::watch::channel(());
    let until_stopped = |mut rx: tokio::sync::watch::Receiver<()>| async move {
        let _ = rx.changed().await;
    };
    let operator = async {
        let Some(listener) = &metrics else { return };
        // Plain HTTP: scrapers and kubelet probes present no client certificate.
        let serving = Serving::new(None, header_timeout);
        let limit = Arc::new(Semaphore::new(OPERATOR_MAX_CONNECTIONS));
        let make = |_peer| {
            let state = state.clone();
            service_fn(move |req| {
                let resp = answer_operator(&req, &state.metrics, &state.health);
                async move { Ok::<_, Infallible>(resp) }
            })
        };
        let stop = until_stopped(stopped.clone());
        connection::accept_loop(listener, &serving, limit, &graceful, make, stop).await;
    };
    let ingest = connection::accept_loop(
        &listener,
        &serving,
        connections,
        &graceful,
        ingest,
        until_stopped(stopped.clone()),
    );
    tokio::join!(
        async {
            shutdown.await;
            drop(stop);
        },
        ingest,
        operator,
    );

    // Shutdown, in order: stop accepting, fail readiness, drain connections,
    // then the cost pipeline (the rollup, the drain, the spool's flush). One
    // deadline for all of it: each stage gets what the earlier ones left.
    let deadline = tokio::time::Instant::now() + grace;
    drop(listener);
    drop(metrics);
    housekeeping.abort();
    state.health.set_serving(false);
    tracing::info!(grace = %crate::clock::HumanDuration(grace), "shutting down: finishing in-flight requests");
    match tokio::time::timeout_at(deadline, graceful.shutdown()).await {
        Ok(()) => tracing::info!("all connections closed"),
        Err(_) => tracing::warn!("grace period over with requests still in flight"),
    }
    if let Some(rollup) = rollup {
        rollup.shutdown(deadline).await;
    }
    if let Some(tee) = &state.tee {
        tee.shutdown(deadline).await;
    }
    Ok(())
}

type Resp = Response<Full<Bytes>>;

/// Routes one request and records its metrics.
async fn handle(state: &State, req: Request<Incoming>, peer: SocketAddr) -> Resp {
    let started = Instant::now();
    let path = req.uri().path();
    let (route, resp) = match path {
        p if WRITE_PATHS.contains(&p) => {
            let route = path_label(p);
            if req.method() == Method::POST {
                (route, write(state, req, peer).await)
            } else {
                (route, error_response(&ApiError::MethodNotAllowed("POST")))
            }
        }
        "/metrics" if !state.metrics_on_ingest => {
            ("other", error_response(&ApiError::MetricsElsewhere))
        }
        p if OPERATOR_PATHS.contains(&p) => {
            operator(req.method(), p, &state.metrics, &state.health)
        }
        _ => ("other", error_response(&ApiError::NotFound)),
    };
    record(route, &resp, started);
    resp
}

/// Counts an answered request.
fn record(route: &'static str, resp: &Resp, started: Instant) {
    metrics::counter!(t::REQUESTS, "route" => route, "status" => status_label(resp.status()))
        .increment(1);
    metrics::histogram!(t::REQUEST_DURATION, "route" => route)
        .record(started.elapsed().as_secs_f64());
}

/// The operator endpoints, on whichever port serves them.
const OPERATOR_PATHS: [&str; 3] = ["/metrics", "/-/healthy", "/-/ready"];

/// Connections open at once on `metrics_listen` (scrapers and probes: few).
const OPERATOR_MAX_CONNECTIONS: usize = 64;

/// `/metrics`, `/-/healthy` or `/-/ready` (`path` is one of them). Both
/// probes fail (503, naming what died and what to do) once a background
/// component died: a restart is the only remedy, and the spool keeps what
/// was acknowledged. `/-/ready` also fails while starting or shutting down.
fn operator(
    method: &Method,
    path: &str,
    metrics: &PrometheusHandle,
    health: &Health,
) -> (&'static str, Resp) {
    if !matches!(*method, Method::GET | Method::HEAD) {
        return (
            "operator",
            error_response(&ApiError::MethodNotAllowed("GET, HEAD")),
        );
    }
    match path {
        "/metrics" => {
            let mut r = text(StatusCode::OK, metrics.render());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            ("metrics", r)
        }
        "/-/healthy" => match health.live() {
            Ok(()) => ("healthy", text(StatusCode::OK, "OK\n".into())),
            Err(dead) => ("healthy", error_response(&ApiError::Unhealthy(dead))),
        },
        _ => match health.ready() {
            Ok(()) => ("ready", text(StatusCode::OK, "ready\n".into())),
            Err(e) => ("ready", error_response(&e.into())),
        },
    }
}

/// One request on a port that serves only the operator endpoints.
fn answer_operator(req: &Request<Incoming>, metrics: &PrometheusHandle, health: &Health) -> Resp {
    let started = Instant::now();
    let path = req.uri().path();
    let (route, resp) = if OPERATOR_PATHS.contains(&path) {
        operator(req.method(), path, metrics, health)
    } else {
        ("other", error_response(&ApiError::NotOperatorPath))
    };
    record(route, &resp, started);
    resp
}

/// Serves only the operator endpoints on `listener` until `shutdown`
/// completes (the `rollup` role's `metrics_listen`); the probes answer
/// from `health`.
pub async fn serve_operator(
    listener: TcpListener,
    header_timeout: std::time::Duration,
    health: Arc<Health>,
    shutdown: impl Future<Output = ()>,
) {
    let metrics = t::metrics_handle();
    let serving = Serving::new(None, header_timeout);
    let limit = Arc::new(Semaphore::new(OPERATOR_MAX_CONNECTIONS));
    let graceful = GracefulShutdown::new();
    let make = |_peer| {
        let metrics = metrics.clone();
        let health = health.clone();
        service_fn(move |req| {
            let resp = answer_operator(&req, &metrics, &health);
            async move { Ok::<_, Infallible>(resp) }
        })
    };
    connection::accept_loop(&listener, &serving, limit, &graceful, make, shutdown).await;
    drop(listener);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), graceful.shutdown()).await;
}

/// One remote-write request, top to bottom. Remote-Write 2.0 is known from
/// the headers alone, so every answer to it says what was written, a
/// refusal before any work (no tenant, bad credentials, overload) included.
async fn write(state: &State, req: Request<Incoming>, peer: SocketAddr) -> Resp {
    let protocol = protocol::negotiate(req.headers());
    let mut written = matches!(protocol, Ok(Protocol::RemoteWrite2)).then(Written::default);
    let mut resp = answer(state, req, peer, protocol, &mut written).await;
    if let Some(w) = written {
        w.insert_into(resp.headers_mut());
    }
    resp
}

/// The answer to a write; `written` (for 2.0) counts what the answer's
/// `X-Prometheus-Remote-Write-*-Written` headers give.
async fn answer(
    state: &State,
    req: Request<Incoming>,
    peer: SocketAddr,
    protocol: Result<Protocol, ApiError>,
    written: &mut Option<Written>,
) -> Resp {
    // 1. Identify the tenant (cheap header checks come before any work).
    let account = match tenant_of(&req) {
        Ok(a) => a,
        Err(e) => return reject(state, &e, None, peer),
    };
    let span = tracing::info_span!("write", tenant = %account);
    async {
        // 2. Shed load beyond the concurrency limit, or beyond the tenant's
        // share of it, rather than queue it. The place is held until the
        // answer (body reading included) and given back on drop, also when
        // the sender hangs up and hyper drops this future.
        let _admitted = match state.admission.admit(&account) {
            Ok(a) => a,
            Err(e) => return reject(state, &e, Some(&account), peer),
        };
        // 3. Everything else within one deadline.
        let limit = state.cfg.limits.request_timeout;
        let deadline = tokio::time::Instant::now() + limit;
        let result = tokio::time::timeout_at(
            deadline,
            accept(state, req, &account, protocol, deadline, written),
        )
        .await
        .unwrap_or(Err(ApiError::DeadlineExceeded { limit }));
        match result {
            Ok(()) => Response::builder()
                .status(StatusCode::NO_CONTENT)
                .body(Full::new(Bytes::new()))
                .unwrap_or_default(),
            Err(e) => reject(state, &e, Some(&account), peer),
        }
    }
    .instrument(span)
    .await
}

/// The request's work after the permit. `protocol` is what the headers
/// negotiated (its refusal comes after authentication); `written`, `Some`
/// for 2.0, counts samples, histograms and exemplars of the series the
/// allowlist dropped (on purpose, and again on any retry) and of those the
/// upstream acknowledged, from the moment the request passed its guards (a
/// request refused whole wrote 0).
async fn accept(
    state: &State,
    req: Request<Incoming>,
    account: &str,
    protocol: Result<Protocol, ApiError>,
    deadline: tokio::time::Instant,
    written: &mut Option<Written>,
) -> Result<(), ApiError> {
    let cfg = &state.cfg;

    // 4. Authenticate, then check the body is something we can read.
    let authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(HeaderValue::as_bytes);
    let tenant = state.auth.authenticate(account, authorization).await?;
    let protocol = protocol?;

    // 5. Read the body within its size and time limits.
    let limit = cfg.limits.max_body_bytes.bytes();
    if let Some(len) = content_length(&req) {
        if len > limit {
            return Err(ApiError::BodyTooLarge { limit });
        }
    }
    let body = Limited::new(req.into_body(), limit as usize);
    let body = match tokio::time::timeout(cfg.limits.body_read_timeout, body.collect()).await {
        Err(_) => return Err(ApiError::BodyTimeout),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(ApiError::BodyTooLarge { limit })
        }
        Ok(Err(e)) => return Err(ApiError::BodyRead(e.to_string())),
        Ok(Ok(b)) => b.to_bytes(),
    };

    // 6. Decode, filter, enforce tenancy, re-encode (CPU only, no awaits).
    let allowlist = tenant.allowlist.as_deref().unwrap_or(&state.allowlist);
    let params = Params {
        account,
        tenant_labels: &cfg.tenancy.labels,
        allowlist,
        limits: ShapeLimits {
            max_series: cfg.limits.max_series_per_request,
            max_labels_per_series: cfg.limits.max_labels_per_series,
            max_label_name_bytes: cfg.limits.max_label_name_bytes,
            max_label_value_bytes: cfg.limits.max_label_value_bytes,
        },
        max_decoded_bytes: cfg.limits.max_decoded_bytes.bytes(),
        tee: state.tee.as_ref().map(|t| t.accepted_now()),
    };
    let declared = pipeline::declared_len(&body).unwrap_or(0);
    let units = kib(declared.min(cfg.limits.max_decoded_bytes.bytes()));
    let Ok(budget) = state.decoded_budget.try_acquire_many(units as u32) else {
        return Err(ApiError::Overloaded);
    };
    let mut scratch = state.scratch.take();
    let outcome = match protocol {
        Protocol::RemoteWrite1 => pipeline::process(&body, &params, &mut scratch),
        Protocol::RemoteWrite2 => {
            pipeline::process_v2(&body, &params, cfg.upstream.protocol, &mut scratch)
        }
    };
    state.scratch.give(scratch);
    drop(budget);
    let mut out = outcome?;
    let refused = out.refused.take();
    for (reason, n) in refused.iter().flat_map(|r| r.reasons()) {
        metrics::counter!(t::SERIES_REFUSED, "reason" => reason).increment(n);
    }
    state
        .rate
        .check(account, out.samples_received)
        .map_err(|limited| match limited {
            Exceeded::Wait(retry_after) => ApiError::RateLimited { retry_after },
            Exceeded::OverBurst { samples, burst } => ApiError::OverBurst { samples, burst },
        })?;
    metrics::counter!(t::SAMPLES_RECEIVED).increment(out.samples_received);
    if out.series_dropped > 0 {
        metrics::counter!(t::SERIES_DROPPED, "reason" => "allowlist").increment(out.series_dropped);
        metrics::counter!(t::SAMPLES_DROPPED, "reason" => "allowlist")
            .increment(out.samples_dropped);
    }
    if out.metadata_dropped > 0 {
        metrics::counter!(t::METADATA_DROPPED).increment(out.metadata_dropped);
    }
    if let Some(w) = written {
        *w = out.dropped;
    }

    // 7. Take the tee's room in the spool first: a full (or failed) spool
    // is answered 503 now, before forwarding, not after it (every retry of
    // the sender forwarded again).
    let record = std::mem::take(&mut out.tee);
    let teed = match &state.tee {
        Some(tee) => Some(tee.reserve(record)?),
        None => None,
    };

    // 8. Forward what is left (nothing left means nothing to send) and, at
    // the same time, make the cost samples durable. The tee append happens
    // whatever the upstream says: samples Thanos refuses as too old are
    // exactly the history the tee must keep. 2xx only when both succeeded.
    let body = Bytes::from(std::mem::take(&mut out.body));
    let forward = async {
        if out.series_kept == 0 {
            return Ok(None);
        }
        let acked = state
            .upstream
            .send(account, body, out.body_version, deadline)
            .await?;
        metrics::counter!(t::SAMPLES_FORWARDED).increment(out.samples_kept);
        // What a 2.0 upstream says it wrote, else everything sent.
        Ok::<_, UpstreamError>(Some(acked.unwrap_or(out.kept)))
    };
    let tee = async {
        match teed {
            Some(teed) => teed.write().await.map(|buf| state.scratch.recycle_tee(buf)),
            None => Ok(()),
        }
    };
    let (forwarded, teed) = tokio::join!(forward, tee);
    if let Some(w) = written {
        match &forwarded {
            Ok(Some(acked)) => *w = *w + *acked,
            Err(UpstreamError::Rejected {
                written: Some(acked),
                ..
            }) => *w = *w + *acked,
            _ => {}
        }
    }
    // A failed tee wins over an upstream 4xx: the sender must retry (503)
    // rather than drop the batch, or the cost samples would be lost.
    teed?;
    forwarded?;
    // Series refused for their content: 400 now that the rest is written,
    // so that the sender does not retry a batch that cannot pass.
    match refused {
        Some(r) => Err(r.into()),
        None => Ok(()),
    }
}

/// The `Cloud-Account-Id` header, required and a UUID (normalised to the
/// lower-case hyphenated form the platform uses).
fn tenant_of(req: &Request<Incoming>) -> Result<String, ApiError> {
    let raw = req
        .headers()
        .get("cloud-account-id")
        .ok_or(ApiError::MissingTenant)?;
    let text = raw.to_str().map_err(|_| ApiError::InvalidTenant)?.trim();
    if text.is_empty() {
        return Err(ApiError::MissingTenant);
    }
    uuid::Uuid::try_parse(text)
        .map(|u| u.hyphenated().to_string())
        .map_err(|_| ApiError::InvalidTenant)
}

fn content_length(req: &Request<Incoming>) -> Option<u64> {
    req.headers()
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Logs (rate-limited) and answers a refused write.
fn reject(state: &State, e: &ApiError, account: Option<&str>, peer: SocketAddr) -> Resp {
    metrics::counter!(t::REJECTED, "reason" => e.reason()).increment(1);
    if state.log_limiter.allow() {
        let detail = match e {
            ApiError::Upstream(crate::upstream::UpstreamError::Unavailable { detail, .. }) => {
                detail.as_str()
            }
            ApiError::Auth(crate::auth::AuthError::Unavailable(detail)) => detail.as_str(),
            _ => "",
        };
        if e.status().is_server_error() {
            tracing::error!(tenant = account.unwrap_or("-"), %peer, reason = e.reason(), status = e.status().as_u16(), detail, "{e}");
        } else {
            tracing::warn!(tenant = account.unwrap_or("-"), %peer, reason = e.reason(), status = e.status().as_u16(), "{e}");
        }
    }
    error_response(e)
}

/// The one place an error becomes a response.
fn error_response(e: &ApiError) -> Resp {
    let reply = e.reply();
    let mut resp = text(reply.status, format!("{}\n", reply.body));
    if let Some(after) = reply.retry_after {
        if let Ok(v) = HeaderValue::from_str(&after.as_secs().max(1).to_string()) {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
    }
    if let Some(allow) = reply.allow {
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static(allow));
    }
    if reply.www_authenticate {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"rwgate\""),
        );
    }
    resp
}

fn text(status: StatusCode, body: String) -> Resp {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// Bytes as KiB semaphore permits, rounded up (semaphores count in `usize`,
/// `acquire_many` in `u32`: KiB keeps a 4 TiB budget within range).
fn kib(bytes: u64) -> usize {
    bytes.div_ceil(1024).min(u64::from(u32::MAX)) as usize
}

fn path_label(path: &str) -> &'static str {
    match path {
        "/storage/api/v2/write" => "storage_write",
        "/api/v1/write" => "write",
        _ => "receive",
    }
}

fn status_label(s: StatusCode) -> &'static str {
    match s.as_u16() {
        200 => "200",
        204 => "204",
        400 => "400",
        401 => "401",
        404 => "404",
        405 => "405",
        408 => "408",
        409 => "409",
        413 => "413",
        415 => "415",
        422 => "422",
        429 => "429",
        503 => "503",
        504 => "504",
        _ if s.is_client_error() => "4xx",
        _ => "5xx",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// The `rollup` role as `main` runs it (the loop, and the operator
    /// endpoints on `metrics_listen` answering from the loop's health):
    /// once the loop died (here cancelled, as only a fault would), both
    /// probes answer 503 naming it and its gauge reads 0.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_rollup_roles_probes_fail_when_its_loop_dies() {
        t::metrics_handle();
        let mut cfg = Config::default();
        cfg.clickhouse.url = Some("http://127.0.0.1:1".into());
        cfg.auth.mode = crate::config::AuthMode::None;
        cfg.resources.enabled = Some(false);
        let health = Arc::new(Health::default());
        let ch = ClickHouse::new(&cfg.clickhouse).expect("the client builds");
        let rollup = RollupTask::start(&cfg, ch, &health).expect("the rollup starts");
        health.set_serving(true);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let operator = tokio::spawn(serve_operator(
            listener,
            Duration::from_secs(5),
            health.clone(),
            async move {
                let _ = stopped.await;
            },
        ));
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(5))
            .build()
            .expect("client");
        let get = |path: &'static str| {
            let http = http.clone();
            async move {
                let r = http
                    .get(format!("http://{addr}{path}"))
                    .send()
                    .await
                    .expect("an answer");
                (r.status().as_u16(), r.text().await.expect("a body"))
            }
        };
        assert_eq!(get("/-/ready").await, (200, "ready\n".to_string()));

        rollup.kill();
        let why = "the rollup loop stopped: it was cancelled; expense rows are not updated; restart rwgate";
        let ready = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match get("/-/ready").await {
                    (200, _) => tokio::time::sleep(Duration::from_millis(10)).await,
                    answer => return answer,
                }
            }
        })
        .await
        .expect("/-/ready fails within 10s of the loop's death");
        assert_eq!(ready, (503, format!("not ready: {why}\n")));
        assert_eq!(
            get("/-/healthy").await,
            (503, format!("unhealthy: {why}\n"))
        );
        let (_, metrics) = get("/metrics").await;
        let line = format!("{}{{component=\"rollup\"}} 0", t::COMPONENT_UP);
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");

        let _ = stop.send(());
        tokio::time::timeout(Duration::from_secs(5), operator)
            .await
            .expect("the operator endpoints stop within 5s")
            .expect("they did not panic");
        rollup
            .shutdown(tokio::time::Instant::now() + Duration::from_secs(1))
            .await;
    }
}
