//! Every error a request can end in, and the one place each becomes an HTTP
//! status and a one-line body telling the sender what to fix.

use std::time::Duration;

use http::StatusCode;

use crate::auth::AuthError;
use crate::cost::spool::SpoolError;
use crate::health::{Dead, NotReady};
use crate::pipeline::{PipelineError, SeriesRefused};
use crate::upstream::UpstreamError;

/// Why a request was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("not found: remote_write goes to POST /storage/api/v2/write, /api/v1/write or /api/v1/receive")]
    NotFound,
    #[error("not found: this port serves GET /metrics, /-/healthy and /-/ready")]
    NotOperatorPath,
    #[error("not found: /metrics is served on the metrics_listen port")]
    MetricsElsewhere,
    /// The methods the path allows, as the `Allow` header lists them.
    #[error("method not allowed: use {0}")]
    MethodNotAllowed(&'static str),
    #[error("missing Cloud-Account-Id header")]
    MissingTenant,
    #[error("Cloud-Account-Id must be a UUID")]
    InvalidTenant,
    #[error("unsupported Content-Encoding {0:?}: send snappy")]
    UnsupportedEncoding(String),
    #[error("unsupported Content-Type {0:?}: send application/x-protobuf (Remote-Write 1.0) or application/x-protobuf;proto=io.prometheus.write.v2.Request (2.0)")]
    UnsupportedContentType(String),
    #[error("request body too large: more than {} (limits.max_body_bytes)", crate::config::Size(*limit))]
    BodyTooLarge { limit: u64 },
    #[error("timed out reading the request body; retry")]
    BodyTimeout,
    #[error("could not read the request body: {0}")]
    BodyRead(String),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    /// Some series were refused, the rest written (partial write).
    #[error(transparent)]
    SeriesRefused(#[from] SeriesRefused),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("could not store cost samples durably: {0}; retry later")]
    Tee(#[from] SpoolError),
    #[error("rate limit: this account sends more samples per second than allowed; retry later")]
    RateLimited { retry_after: Duration },
    #[error("rate limit: this request has {samples} samples, more than this account may send at once (limits.tenant_burst_samples = {burst}); send smaller batches (queue_config.max_samples_per_send)")]
    OverBurst { samples: u64, burst: u32 },
    #[error("overloaded: too many requests in flight; retry later")]
    Overloaded,
    #[error("overloaded: this account has its share of the requests in flight (limits.tenant_max_concurrent_share); retry later")]
    TenantOverloaded,
    #[error("the request did not finish within {} (limits.request_timeout); retry later", crate::clock::HumanDuration(*.limit))]
    DeadlineExceeded { limit: Duration },
    #[error("shutting down; retry later")]
    ShuttingDown,
    /// `/-/ready` fails.
    #[error("not ready: {0}")]
    NotReady(#[from] NotReady),
    /// `/-/healthy` fails: a background component died.
    #[error("unhealthy: {0}")]
    Unhealthy(Dead),
}

/// What the client is told.
pub struct Reply {
    pub status: StatusCode,
    pub body: String,
    pub retry_after: Option<Duration>,
    pub www_authenticate: bool,
    /// The `Allow` header of a 405.
    pub allow: Option<&'static str>,
}

impl ApiError {
    /// The status for this error. Exhaustive on purpose: a new kind of error
    /// must be given a status here, it cannot silently become a 500.
    pub fn status(&self) -> StatusCode {
        use ApiError::*;
        match self {
            NotFound | NotOperatorPath | MetricsElsewhere => StatusCode::NOT_FOUND,
            MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            MissingTenant | InvalidTenant | BodyRead(_) => StatusCode::BAD_REQUEST,
            UnsupportedEncoding(_) | UnsupportedContentType(_) => {
                StatusCode::UNSUPPORTED_MEDIA_TYPE
            }
            BodyTooLarge { .. } | OverBurst { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Auth(e) => match e {
                AuthError::UnknownAccount | AuthError::NoCredentials => {
                    StatusCode::UNPROCESSABLE_ENTITY
                }
                AuthError::BadCredentials => StatusCode::UNAUTHORIZED,
                AuthError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            },
            Pipeline(e) => match e {
                PipelineError::DecodedTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
                PipelineError::Snappy(_)
                | PipelineError::SnappyLength { .. }
                | PipelineError::Decode(_) => StatusCode::BAD_REQUEST,
            },
            SeriesRefused(_) => StatusCode::BAD_REQUEST,
            Upstream(e) => match e {
                UpstreamError::Rejected { status, .. } => *status,
                UpstreamError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
                UpstreamError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            },
            RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            // Not 408: Prometheus drops a batch answered with any 4xx but 429
            // (and 429 too unless retry_on_http_429 is set).
            BodyTimeout | Tee(_) | Overloaded | TenantOverloaded | ShuttingDown | NotReady(_)
            | Unhealthy(_) => StatusCode::SERVICE_UNAVAILABLE,
            DeadlineExceeded { .. } => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// A short fixed label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        use ApiError::*;
        match self {
            NotFound | NotOperatorPath | MetricsElsewhere => "not_found",
            MethodNotAllowed(_) => "method",
            MissingTenant => "missing_tenant",
            InvalidTenant => "invalid_tenant",
            UnsupportedEncoding(_) => "encoding",
            UnsupportedContentType(_) => "content_type",
            BodyTooLarge { .. } => "body_too_large",
            BodyTimeout => "body_timeout",
            BodyRead(_) => "body_read",
            Auth(AuthError::UnknownAccount) => "unknown_account",
            Auth(AuthError::NoCredentials) => "no_credentials",
            Auth(AuthError::BadCredentials) => "bad_credentials",
            Auth(AuthError::Unavailable(_)) => "auth_unavailable",
            Pipeline(PipelineError::DecodedTooLarge { .. }) => "decoded_too_large",
            Pipeline(PipelineError::Snappy(_) | PipelineError::SnappyLength { .. }) => "snappy",
            Pipeline(PipelineError::Decode(_)) => "protobuf",
            SeriesRefused(_) => "invalid_series",
            Upstream(UpstreamError::Rejected { .. }) => "upstream_rejected",
            Upstream(UpstreamError::RateLimited { .. }) => "upstream_rate_limited",
            Upstream(UpstreamError::Unavailable { .. }) => "upstream_unavailable",
            RateLimited { .. } => "rate_limited",
            OverBurst { .. } => "over_burst",
            Tee(_) => "tee",
            Overloaded => "overloaded",
            TenantOverloaded => "tenant_overloaded",
            DeadlineExceeded { .. } => "deadline",
            ShuttingDown => "shutting_down",
            NotReady(_) => "not_ready",
            Unhealthy(_) => "unhealthy",
        }
    }

    pub fn reply(&self) -> Reply {
        let retry_after = match self {
            ApiError::Upstream(UpstreamError::RateLimited { retry_after }) => {
                Some(retry_after.unwrap_or(Duration::from_secs(1)))
            }
            ApiError::Upstream(UpstreamError::Unavailable { retry_after, .. }) => *retry_after,
            ApiError::RateLimited { retry_after } => Some(*retry_after),
            _ => None,
        };
        Reply {
            status: self.status(),
            body: self.to_string(),
            retry_after,
            www_authenticate: matches!(self, ApiError::Auth(AuthError::BadCredentials)),
            allow: match self {
                ApiError::MethodNotAllowed(allow) => Some(allow),
                _ => None,
            },
        }
    }
}
