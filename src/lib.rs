//! rwgate: a Prometheus remote_write ingestion gateway for a multi-tenant
//! Kubernetes cost SaaS.
//!
//! # Layout
//!
//! A write request flows through these modules in this order:
//!
//! - [`connection`]: the accept loop, TLS handshakes (via [`tls`]) and the
//!   count of what hyper refuses by itself; then
//! - [`server`]: routes, and holds the write handler, which reads top to
//!   bottom:
//! - [`admission`]: the concurrency limit and each tenant's share of it,
//!   held (body reading included) until the answer or a cancellation.
//! - [`auth`]: the `Cloud-Account-Id` and its credentials (REST API, tenants
//!   file, or trust), cached.
//! - [`protocol`]: which remote-write protocol the body is, from
//!   `Content-Type` and `Content-Encoding` (415 otherwise).
//! - [`pipeline`]: the CPU work with no I/O: snappy, decode ([`wire`]),
//!   the allowlist ([`filter`]), tenant labels, re-encode.
//! - [`ratelimit`]: the per-tenant samples/s token bucket (off by default).
//! - [`upstream`]: forwards kept series to Thanos receive, retrying in one place.
//! - [`cost`]: the cost pipeline. The request's `cloudtuner_kubecost_*`
//!   samples are appended to the spool concurrently with the upstream send
//!   (the request answers 2xx only when both succeeded); a background drain
//!   empties the spool into ClickHouse, and the rollup derives expense rows
//!   from there.
//! - [`error`]: every way a request can fail and its HTTP status, in one place.
//!
//! Around them: [`config`] (the one documented settings tree), [`settings`]
//! (how the file, `RWGATE_<PATH>` variables and the command line fill it, in
//! one precedence), [`cli`] (the subcommands and their flags), [`client`] (the outbound HTTP client),
//! [`clock`] (time, backoff, dates), [`display`] (values as written in
//! messages), [`telemetry`] (metric names and
//! logging), [`health`] (what `/-/ready` and `/-/healthy` answer: the
//! background components report their death there), and, with the
//! `loadgen` feature, `loadgen` (realistic payloads shared by `benches/` and
//! `rwgate-loadgen`), and, with the `fuzz` feature or in tests, `fuzz` (the
//! decoders and the pipeline against prost).

pub mod admission;
pub mod auth;
pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod connection;
pub mod cost;
pub mod display;
pub mod error;
pub mod filter;
#[cfg(any(test, feature = "fuzz"))]
pub mod fuzz;
pub mod health;
#[cfg(any(test, feature = "loadgen"))]
pub mod loadgen;
pub mod pipeline;
pub mod prompb_v2;
pub mod protocol;
pub mod ratelimit;
pub mod server;
pub mod settings;
pub mod telemetry;
pub mod tls;
pub mod upstream;
pub mod wire;
pub mod wire_v2;

/// Types generated from `third_party/prometheus/` by prost (the
/// Remote-Write 1.0 reference messages; the hot path uses [`wire`] instead).
pub mod prompb {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/prometheus.rs"));
}

pub use server::run;
