//! Forwarding kept series to the remote-write upstream (Thanos receive), with
//! bounded, jittered retries. The retry decision lives in one function,
//! [`retry_action`].

use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::Full;

use crate::client::{http_client, read_capped, Endpoint, HttpClient};
use crate::clock::Backoff;
use crate::config::{RemoteWriteVersion, UpstreamConfig};
use crate::telemetry as t;
use crate::wire_v2::{self, Written};

/// Most bytes of an upstream answer read (its first line is the reason
/// passed back; Thanos and Prometheus answer a line or two).
const MAX_ANSWER_BYTES: usize = 4096;

/// Why a forward failed, as the sender must see it.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The upstream refused the batch for good (400, 409, 413, 422): retrying
    /// it cannot succeed, so the status is passed back.
    #[error("upstream rejected the write: {reason}")]
    Rejected {
        status: StatusCode,
        reason: String,
        /// What a 2.0 upstream says it wrote nonetheless.
        written: Option<Written>,
    },
    /// The upstream kept answering 429.
    #[error("upstream is rate limiting; retry later")]
    RateLimited { retry_after: Option<Duration> },
    /// 5xx, timeouts or connection errors, after all retries. `detail` is for
    /// the log, not the client; `retry_after` is the upstream's own
    /// `Retry-After`, capped by `upstream.max_retry_after`.
    #[error("upstream unavailable; retry later")]
    Unavailable {
        detail: String,
        retry_after: Option<Duration>,
    },
}

/// What to do after one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Done,
    Retry,
    /// The batch itself is refused: pass the status back to the sender.
    Reject,
    /// The upstream is misconfigured (wrong path, auth proxy, redirect):
    /// retrying now will not help, and the sender must not drop the batch.
    Fail,
}

/// The retry decision, in one place: 2xx is done; 5xx and 429 are worth
/// retrying; 400, 409, 413 and 422 say the data can never be accepted (bad
/// samples, out of order, duplicate, too large) and are passed back; any
/// other status (3xx, 401, 403, 404, ...) is an upstream problem that a
/// sender must retry later, so it becomes 503 without retrying here.
pub fn retry_action(status: StatusCode) -> Action {
    match status.as_u16() {
        200..=299 => Action::Done,
        429 | 500..=599 => Action::Retry,
        400 | 409 | 413 | 422 => Action::Reject,
        _ => Action::Fail,
    }
}

/// The upstream remote-write endpoint.
pub struct Upstream {
    client: HttpClient,
    uri: Uri,
    /// The upstream as failures name it.
    endpoint: Endpoint,
    tenant_header: HeaderName,
    cfg: UpstreamConfig,
}

enum Attempt {
    Status {
        status: StatusCode,
        retry_after: Option<Duration>,
        reason: String,
        written: Option<Written>,
    },
    Error(String),
}

impl Upstream {
    pub fn new(cfg: &UpstreamConfig) -> anyhow::Result<Self> {
        Ok(Upstream {
            client: http_client(
                cfg.pool_max_idle,
                Some(crate::tls::client_config(&cfg.tls)?),
            ),
            uri: cfg.url.parse()?,
            endpoint: Endpoint::new("the upstream", &cfg.url),
            tenant_header: HeaderName::from_bytes(cfg.tenant_header.as_bytes())?,
            cfg: cfg.clone(),
        })
    }

    /// POSTs a snappy-compressed request for `account` (`version` says
    /// which message `body` is), retrying as [`retry_action`] says, and not
    /// past `deadline`: no retry starts whose wait would end after it (an
    /// attempt still running then is cut by the request's deadline in the
    /// handler, which answers 504). An upstream `Retry-After` sets the wait
    /// before the next attempt; one longer than what is left of the deadline
    /// ends the retries at once, and is passed back to the sender (capped by
    /// `upstream.max_retry_after`). A 2.0 body's answer gives what the
    /// upstream wrote; a 2.0 upstream that answers 2xx without saying so
    /// does not take 2.0 (it decoded nothing, as a 1.0 receiver decodes a
    /// 2.0 body), which is a 503.
    pub async fn send(
        &self,
        account: &str,
        body: Bytes,
        version: RemoteWriteVersion,
        deadline: Instant,
    ) -> Result<Option<Written>, UpstreamError> {
        let tenant = HeaderValue::from_str(account).map_err(|_| UpstreamError::Unavailable {
            detail: "account id is not a valid header value".into(),
            retry_after: None,
        })?;
        let mut attempt = 0u32;
        let mut backoff = Backoff::new(self.cfg.retry_backoff, self.cfg.retry_max_backoff);
        loop {
            let started = Instant::now();
            let result = self.attempt(&tenant, body.clone(), version).await;
            metrics::histogram!(t::UPSTREAM_DURATION).record(started.elapsed().as_secs_f64());
            let (rate_limited, retry_after, detail) = match result {
                Attempt::Status {
                    status,
                    retry_after,
                    reason,
                    written,
                } => {
                    metrics::counter!(t::UPSTREAM_RESPONSES, "status" => status_class(status))
                        .increment(1);
                    match retry_action(status) {
                        Action::Done if version == RemoteWriteVersion::V2 && written.is_none() => {
                            return Err(UpstreamError::Unavailable {
                                detail: self.endpoint.answered(
                                    status.as_u16(),
                                    "no X-Prometheus-Remote-Write-*-Written headers to a \
                                     Remote-Write 2.0 request: it does not take 2.0 (set \
                                     upstream.protocol = \"1.0\")",
                                ),
                                retry_after: None,
                            })
                        }
                        Action::Done => return Ok(written),
                        Action::Reject => {
                            return Err(UpstreamError::Rejected {
                                status,
                                reason,
                                written,
                            })
                        }
                        Action::Fail => {
                            return Err(UpstreamError::Unavailable {
                                detail: self.endpoint.answered(status.as_u16(), &reason),
                                retry_after: None,
                            })
                        }
                        Action::Retry => (
                            status == StatusCode::TOO_MANY_REQUESTS,
                            retry_after,
                            self.endpoint.answered(status.as_u16(), &reason),
                        ),
                    }
                }
                Attempt::Error(detail) => {
                    metrics::counter!(t::UPSTREAM_RESPONSES, "status" => "error").increment(1);
                    (false, None, detail)
                }
            };
            let wait = retry_after.unwrap_or_else(|| backoff.next_delay());
            let passed_back = retry_after.map(|d| d.min(self.cfg.max_retry_after));
            let last = if rate_limited {
                UpstreamError::RateLimited {
                    retry_after: passed_back,
                }
            } else {
                UpstreamError::Unavailable {
                    detail,
                    retry_after: passed_back,
                }
            };
            if attempt >= self.cfg.max_retries || Instant::now() + wait >= deadline {
                return Err(last);
            }
            attempt += 1;
            metrics::counter!(t::UPSTREAM_RETRIES).increment(1);
            tokio::time::sleep(wait).await;
        }
    }

    async fn attempt(
        &self,
        tenant: &HeaderValue,
        body: Bytes,
        version: RemoteWriteVersion,
    ) -> Attempt {
        let (content_type, rw_version) = match version {
            RemoteWriteVersion::V1 => ("application/x-protobuf", "0.1.0"),
            RemoteWriteVersion::V2 => (wire_v2::CONTENT_TYPE, wire_v2::VERSION),
        };
        let req = Request::builder()
            .method(Method::POST)
            .uri(self.uri.clone())
            .header(http::header::CONTENT_TYPE, content_type)
            .header(http::header::CONTENT_ENCODING, "snappy")
            .header("X-Prometheus-Remote-Write-Version", rw_version)
            .header(
                http::header::USER_AGENT,
                concat!("rwgate/", env!("CARGO_PKG_VERSION")),
            )
            .header(&self.tenant_header, tenant.clone())
            .body(Full::new(body));
        let req = match req {
            Ok(r) => r,
            Err(e) => return Attempt::Error(format!("building request: {e}")),
        };
        let call = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| self.endpoint.unreachable(&e))?;
            let status = resp.status();
            let written = Written::from_headers(resp.headers());
            // Seconds only: Thanos and Mimir send no HTTP-dates.
            let retry_after = resp
                .headers()
                .get(http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            // Only the start of an answer is read: the reason is its first
            // line. A longer answer's connection is closed, not pooled.
            let body = read_capped(resp.into_body(), MAX_ANSWER_BYTES).await;
            let reason = match (status.is_success(), body) {
                (true, _) => String::new(),
                (false, Ok(b)) => one_line(&b.bytes),
                (false, Err(e)) => format!("(unreadable body: {e})"),
            };
            Ok::<_, String>(Attempt::Status {
                status,
                retry_after,
                reason,
                written,
            })
        };
        match tokio::time::timeout(self.cfg.timeout, call).await {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => Attempt::Error(e),
            Err(_) => Attempt::Error(self.endpoint.timed_out(self.cfg.timeout)),
        }
    }
}

fn status_class(s: StatusCode) -> &'static str {
    match s.as_u16() {
        200..=299 => "2xx",
        400 => "400",
        409 => "409",
        429 => "429",
        _ if s.is_client_error() => "4xx",
        _ => "5xx",
    }
}

/// The first line of an upstream answer, trimmed and bounded, to pass back.
fn one_line(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(512)]);
    let line = text
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim();
    if line.is_empty() {
        "(no reason given)".to_string()
    } else {
        line.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_decision() {
        assert_eq!(retry_action(StatusCode::OK), Action::Done);
        assert_eq!(retry_action(StatusCode::NO_CONTENT), Action::Done);
        assert_eq!(
            retry_action(StatusCode::INTERNAL_SERVER_ERROR),
            Action::Retry
        );
        assert_eq!(retry_action(StatusCode::SERVICE_UNAVAILABLE), Action::Retry);
        assert_eq!(retry_action(StatusCode::TOO_MANY_REQUESTS), Action::Retry);
        assert_eq!(retry_action(StatusCode::BAD_REQUEST), Action::Reject);
        assert_eq!(retry_action(StatusCode::CONFLICT), Action::Reject);
        assert_eq!(retry_action(StatusCode::PAYLOAD_TOO_LARGE), Action::Reject);
        assert_eq!(retry_action(StatusCode::NOT_FOUND), Action::Fail);
        assert_eq!(retry_action(StatusCode::UNAUTHORIZED), Action::Fail);
        assert_eq!(retry_action(StatusCode::MOVED_PERMANENTLY), Action::Fail);
    }

    #[test]
    fn reason_is_one_bounded_line() {
        assert_eq!(
            one_line(b"\n  out of order sample\nmore"),
            "out of order sample"
        );
        assert_eq!(one_line(b""), "(no reason given)");
        assert!(one_line(&[b'x'; 2000]).len() <= 512);
    }
}
