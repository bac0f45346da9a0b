//! The cost pipeline: `cloudtuner_kubecost_*` samples from the request path
//! to expense rows the platform reads.
//!
//! 1. [`record`]: the request path writes the teed samples of a request as
//!    one spool record, straight from the decoded body (vocabulary in
//!    [`names`]).
//! 2. [`spool`]: the record is made durable (group commit) before the
//!    request is acknowledged; [`tee`] is the handle the server holds.
//! 3. [`drain`]: a background task reads the spool in batches, shapes them
//!    ([`batch`]) and inserts raw samples into [`clickhouse`], releasing
//!    spool entries once ClickHouse has them.
//! 4. [`rollup`]: a role of its own (`serve` runs it when enabled, `rwgate
//!    rollup` runs nothing else) derives expense rows from the raw samples,
//!    registering the charged resources with the platform REST API first
//!    (`rollup::resources`, `rollup::platform`).
//!
//! Imports point down this list: the request path knows only [`record`],
//! [`names`] and [`tee`]; nothing here knows the server.

pub mod batch;
pub mod clickhouse;
pub mod drain;
pub mod names;
pub mod record;
pub mod rollup;
pub mod spool;
pub mod tee;
