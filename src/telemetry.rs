//! Self-metrics and logs. Every metric name is declared here, with its help
//! text; labels come from small fixed sets (route, status, reason), never raw
//! paths or tenants.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const REQUESTS: &str = "rwgate_requests_total";
pub const REQUEST_DURATION: &str = "rwgate_request_duration_seconds";
pub const IN_FLIGHT: &str = "rwgate_requests_in_flight";
pub const REJECTED: &str = "rwgate_requests_rejected_total";
/// Connections refused below routing (hyper's own 400/414/431, header
/// timeouts, failed TLS handshakes), by reason.
pub const CONNECTIONS_REJECTED: &str = "rwgate_connections_rejected_total";
pub const SAMPLES_RECEIVED: &str = "rwgate_samples_received_total";
pub const SAMPLES_FORWARDED: &str = "rwgate_samples_forwarded_total";
pub const SAMPLES_DROPPED: &str = "rwgate_samples_dropped_total";
pub const SERIES_DROPPED: &str = "rwgate_series_dropped_total";
/// Series refused for their content (neither forwarded nor teed, while the
/// rest of their request is), by reason (`wire::Invalid::REASONS`).
pub const SERIES_REFUSED: &str = "rwgate_series_refused_total";
pub const METADATA_DROPPED: &str = "rwgate_metadata_dropped_total";
pub const UPSTREAM_DURATION: &str = "rwgate_upstream_request_duration_seconds";
pub const UPSTREAM_RESPONSES: &str = "rwgate_upstream_responses_total";
pub const UPSTREAM_RETRIES: &str = "rwgate_upstream_retries_total";
pub const AUTH_CACHE: &str = "rwgate_auth_cache_total";
pub const AUTH_REST_DURATION: &str = "rwgate_auth_rest_request_duration_seconds";
pub const LOG_SUPPRESSED: &str = "rwgate_log_rejections_suppressed_total";
/// 1 while a background component (`tee_writer`, `spool`, `rollup`) this
/// process runs is up, 0 once it died (`health`).
pub const COMPONENT_UP: &str = "rwgate_component_up";

// The ClickHouse tee.
/// Unsent spool bytes.
pub const SPOOL_BYTES: &str = "rwgate_tee_spool_bytes";
/// Age of the oldest unsent spool entry.
pub const SPOOL_OLDEST_AGE: &str = "rwgate_tee_spool_oldest_entry_age_seconds";
/// Time for a request's tee append to become durable.
pub const SPOOL_APPEND_DURATION: &str = "rwgate_tee_spool_append_duration_seconds";
/// Group commits (write + fsync) of the spool.
pub const SPOOL_SYNCS: &str = "rwgate_tee_spool_syncs_total";
/// Samples made durable in the spool.
pub const SAMPLES_SPOOLED: &str = "rwgate_tee_samples_spooled_total";
/// ClickHouse inserts that succeeded, by table (`samples`, `expenses`).
pub const BATCHES_WRITTEN: &str = "rwgate_clickhouse_batches_written_total";
/// ClickHouse inserts that failed (and will be retried), by table.
pub const BATCHES_FAILED: &str = "rwgate_clickhouse_batches_failed_total";
/// Rows inserted, by table (`samples`, `expenses`).
pub const ROWS_WRITTEN: &str = "rwgate_clickhouse_rows_written_total";
/// Spool records that could not be decoded (skipped; a bug if ever non-zero).
pub const RECORDS_UNDECODABLE: &str = "rwgate_tee_records_undecodable_total";
/// Rows ClickHouse refused for their content, written to the dead-letter file.
pub const ROWS_DEAD_LETTERED: &str = "rwgate_tee_rows_dead_lettered_total";
/// Cost samples not teed because of an absurd timestamp, by reason.
pub const SAMPLES_REJECTED: &str = "rwgate_tee_samples_rejected_total";
/// Failed spool reads (retried with backoff).
pub const SPOOL_READ_ERRORS: &str = "rwgate_tee_spool_read_errors_total";
/// Seconds between now and the rollup watermark after the last pass.
pub const ROLLUP_LAG: &str = "rwgate_rollup_lag_seconds";
/// Expense buckets whose value changed (each writes a -1/+1 pair).
pub const ROLLUP_BUCKETS_CHANGED: &str = "rwgate_rollup_buckets_changed_total";
/// (account, bucket)s the rollup gave up on after repeated data errors.
pub const ROLLUP_BUCKETS_SKIPPED: &str = "rwgate_rollup_buckets_skipped_total";
/// Rollup passes by result (`ok`, `error`).
pub const ROLLUP_PASSES: &str = "rwgate_rollup_passes_total";
/// Time of one rollup pass.
pub const ROLLUP_PASS_DURATION: &str = "rwgate_rollup_pass_duration_seconds";
/// Charged resources whose expense rows wait for their registration.
pub const RESOURCES_WAITING: &str = "rwgate_resources_waiting";
/// How long the longest-waiting of them has waited.
pub const RESOURCES_WAITING_OLDEST_AGE: &str = "rwgate_resources_waiting_oldest_age_seconds";
/// Bulk registration calls by result (`ok`, or why not).
pub const RESOURCES_BULK_CALLS: &str = "rwgate_resources_bulk_calls_total";
/// Resources sent in successful bulk calls (registrations and updates).
pub const RESOURCES_REGISTERED: &str = "rwgate_resources_registered_total";
/// Time of one bulk registration call.
pub const RESOURCES_BULK_DURATION: &str = "rwgate_resources_bulk_duration_seconds";

fn describe() {
    describe_counter!(REQUESTS, "HTTP requests by route and status.");
    describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "Time to answer a request, by route."
    );
    describe_gauge!(IN_FLIGHT, "Write requests being processed.");
    describe_counter!(REJECTED, "Write requests refused, by reason.");
    describe_counter!(
        CONNECTIONS_REJECTED,
        "Connections refused before a request reached routing, by reason: malformed (400), headers_too_large (431), uri_too_long (414), header_timeout (no complete request head within limits.header_read_timeout), tls_handshake (failed or timed out)."
    );
    describe_counter!(
        SAMPLES_RECEIVED,
        "Samples received in accepted requests (before filtering)."
    );
    describe_counter!(SAMPLES_FORWARDED, "Samples acknowledged by the upstream.");
    describe_counter!(SAMPLES_DROPPED, "Samples dropped, by reason (allowlist).");
    describe_counter!(SERIES_DROPPED, "Series dropped, by reason (allowlist).");
    describe_counter!(
        SERIES_REFUSED,
        "Series refused as invalid (the rest of their request is written), by reason."
    );
    describe_counter!(
        METADATA_DROPPED,
        "Metric metadata entries not forwarded (they carry no tenant)."
    );
    describe_histogram!(
        UPSTREAM_DURATION,
        Unit::Seconds,
        "Time of one upstream attempt."
    );
    describe_counter!(
        UPSTREAM_RESPONSES,
        "Upstream attempts by status class (or error)."
    );
    describe_counter!(UPSTREAM_RETRIES, "Upstream attempts retried.");
    describe_counter!(
        AUTH_CACHE,
        "Credential lookups by result: hit, miss, stale."
    );
    describe_histogram!(
        AUTH_REST_DURATION,
        Unit::Seconds,
        "Time of one REST API credential lookup."
    );
    describe_counter!(
        LOG_SUPPRESSED,
        "Rejection warnings not logged because of the log rate limit."
    );
    describe_gauge!(
        COMPONENT_UP,
        "1 while a background component this process runs is up, 0 once it died (then /-/ready and /-/healthy fail naming it), by component: tee_writer, spool, rollup."
    );

    describe_gauge!(
        SPOOL_BYTES,
        Unit::Bytes,
        "Spool bytes not yet in ClickHouse."
    );
    describe_gauge!(
        SPOOL_OLDEST_AGE,
        Unit::Seconds,
        "Age of the oldest spool entry not yet in ClickHouse (0 when drained)."
    );
    describe_histogram!(
        SPOOL_APPEND_DURATION,
        Unit::Seconds,
        "Time for a request's cost samples to become durable (group commit)."
    );
    describe_counter!(SAMPLES_SPOOLED, "Cost samples made durable in the spool.");
    describe_counter!(
        SPOOL_SYNCS,
        "Spool group commits (one write and one fsync each)."
    );
    describe_counter!(BATCHES_WRITTEN, "ClickHouse inserts done, by table.");
    describe_counter!(
        BATCHES_FAILED,
        "ClickHouse inserts failed (retried), by table."
    );
    describe_counter!(ROWS_WRITTEN, "Rows inserted into ClickHouse, by table.");
    describe_counter!(
        RECORDS_UNDECODABLE,
        "Spool records skipped because they could not be decoded."
    );
    describe_counter!(
        ROWS_DEAD_LETTERED,
        "Raw rows ClickHouse refused for their content (not availability), written to dead-letter.jsonl in the spool directory instead of being retried."
    );
    describe_counter!(
        SAMPLES_REJECTED,
        "Cost samples not teed because their timestamp is older than spool.max_sample_age or further ahead than spool.max_sample_future, by reason (too_old, too_far_in_future)."
    );
    describe_counter!(
        SPOOL_READ_ERRORS,
        "Spool reads that failed (retried with backoff)."
    );
    describe_gauge!(
        ROLLUP_LAG,
        Unit::Seconds,
        "Time since the rollup watermark (how stale expense rows may be)."
    );
    describe_counter!(
        ROLLUP_BUCKETS_CHANGED,
        "Expense buckets rewritten by the rollup."
    );
    describe_counter!(
        ROLLUP_BUCKETS_SKIPPED,
        "Expense buckets (account, bucket) skipped after failing several passes in a row because of their data; re-derive them with rwgate reconcile."
    );
    describe_counter!(ROLLUP_PASSES, "Rollup passes, by result.");
    describe_histogram!(
        ROLLUP_PASS_DURATION,
        Unit::Seconds,
        "Time of one rollup pass."
    );
    describe_gauge!(
        RESOURCES_WAITING,
        "Charged resources whose expense rows wait for their registration with the platform REST API."
    );
    describe_gauge!(
        RESOURCES_WAITING_OLDEST_AGE,
        Unit::Seconds,
        "How long the longest-waiting resource has waited for its registration (0 when none waits)."
    );
    describe_counter!(
        RESOURCES_BULK_CALLS,
        "Bulk registration calls to the platform REST API, by result (ok, not_found, refused, secret, status, timeout, transport, answer)."
    );
    describe_counter!(
        RESOURCES_REGISTERED,
        "Resources sent in successful bulk registration calls (new ones and first_seen/last_seen updates)."
    );
    describe_histogram!(
        RESOURCES_BULK_DURATION,
        Unit::Seconds,
        "Time of one bulk registration call."
    );
}

/// How often buffered histogram observations are folded into their buckets.
const UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Installs the process-wide Prometheus recorder once and returns its handle
/// (tests start several servers in one process; they share it).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Suffix("_seconds".into()),
                    &[
                        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                        5.0, 10.0,
                    ],
                )
                .expect("static buckets are valid");
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_ok() {
                describe();
            }
            // Histogram observations are buffered until drained; without
            // upkeep they would only be drained by a scrape, and an
            // unscraped rwgate would grow by every request's durations.
            let upkeep = handle.clone();
            let spawned = std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || loop {
                    std::thread::sleep(UPKEEP_INTERVAL);
                    upkeep.run_upkeep();
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start the metrics upkeep thread; histograms are drained only by scrapes");
            }
            handle
        })
        .clone()
}

/// Lets at most `per_sec` warnings through each second, counting the rest, so
/// a misbehaving client cannot flood the log.
pub struct LogLimiter {
    per_sec: u64,
    /// `second << 32 | count` packed in one atomic.
    state: AtomicU64,
}

impl LogLimiter {
    pub fn new(per_sec: u32) -> Self {
        LogLimiter {
            per_sec: u64::from(per_sec),
            state: AtomicU64::new(0),
        }
    }

    /// Whether this warning may be logged.
    pub fn allow(&self) -> bool {
        self.allow_at(crate::clock::unix_now())
    }

    /// [`allow`](Self::allow) in second `now` (since the epoch).
    fn allow_at(&self, now: u64) -> bool {
        let now = now & 0xffff_ffff;
        let mut cur = self.state.load(Ordering::Relaxed);
        loop {
            let (sec, count) = (cur >> 32, cur & 0xffff_ffff);
            let next = if sec == now {
                (sec << 32) | (count + 1)
            } else {
                (now << 32) | 1
            };
            match self
                .state
                .compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => {
                    let allowed = (next & 0xffff_ffff) <= self.per_sec;
                    if !allowed {
                        metrics::counter!(LOG_SUPPRESSED).increment(1);
                    }
                    return allowed;
                }
                Err(actual) => cur = actual,
            }
        }
    }
}

/// Sets up `tracing` output (once per process).
pub fn init_logging(format: crate::config::LogFormat, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, never into a file
        // or a log collector (nor with NO_COLOR set).
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none(),
        );
    let _ = match format {
        crate::config::LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
        crate::config::LogFormat::Text => builder.try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_caps_per_second() {
        let l = LogLimiter::new(3);
        let allowed = |second| (0..100).filter(|_| l.allow_at(second)).count();
        assert_eq!(allowed(1_700_000_000), 3);
        assert_eq!(allowed(1_700_000_000), 0, "the same second is used up");
        assert_eq!(allowed(1_700_000_001), 3, "the next second starts afresh");
    }
}
