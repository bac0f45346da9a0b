//! The ClickHouse tee: `cloudtuner_kubecost_*` samples are appended to the
//! durable spool before the request is acknowledged; a background writer drains
//! the spool into ClickHouse.
//!
//! (Interface only; the spool, writer and rollup land with the tee issue.)

/// The metric-name prefix of the cost exporter's gauges, the only series teed.
pub const TEE_PREFIX: &[u8] = b"cloudtuner_kubecost_";

/// One teed sample, after tenancy enforcement.
#[derive(Debug, Clone, PartialEq)]
pub struct TeeSample {
    /// The authenticated account id.
    pub account: String,
    /// `__name__`.
    pub metric: String,
    /// Every label but `__name__`, sorted by name (tenant labels included).
    pub labels: Vec<(String, String)>,
    pub timestamp_ms: i64,
    pub value: f64,
}

/// Why teed samples could not be made durable (the request then fails with 503).
#[derive(Debug, thiserror::Error)]
pub enum TeeError {
    #[error("spool is full")]
    SpoolFull,
    #[error("spool write failed: {0}")]
    Io(#[from] std::io::Error),
}
