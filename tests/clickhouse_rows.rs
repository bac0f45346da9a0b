//! Row validation (`rwgate::cost::clickhouse`, "Row validation"): on a
//! server that supports it (26.9 here) a Rust row type that does not match
//! the table is an error, for inserts and for queries; on 18.16 the client
//! falls back to plain RowBinary, where the same mistake goes through
//! unnoticed, which is why the row structs mirror their DDL.

mod common;

use clickhouse::Row;
use serde::{Deserialize, Serialize};

use common::clickhouse::*;
use rwgate::cost::clickhouse::{ClickHouse, ClickHouseError, RawRow};

/// [`RawRow`] with `value` as an integer: the same 8 bytes, the wrong type.
#[derive(Row, Serialize)]
struct WrongRaw<'a> {
    account: &'a str,
    metric: &'a str,
    cluster: &'a str,
    namespace: &'a str,
    pod: &'a str,
    series_id: u64,
    ts: i64,
    value: i64,
    ingest_time: u32,
}

/// `SELECT ts, value` read with `value` as an integer.
#[derive(Debug, Row, Deserialize)]
struct WrongRead {
    ts: i64,
    value: i64,
}

fn raw(value: f64) -> RawRow<'static> {
    RawRow {
        account: "a",
        metric: NS_METRIC,
        cluster: "c",
        namespace: "web",
        pod: "",
        series_id: 1,
        ts: 1_709_460_000_000,
        value,
        ingest_time: 0,
    }
}

fn schema_mismatch(e: &ClickHouseError) -> bool {
    matches!(
        e,
        ClickHouseError::Client {
            error: clickhouse::error::Error::SchemaMismatch(_),
            ..
        }
    )
}

on_both_engines!(a_wrong_field_type_is_caught_where_the_server_validates);
async fn a_wrong_field_type_is_caught_where_the_server_validates(engine: Engine) {
    let server = ClickHouseServer::start_engine(engine);
    server.migrate().await;
    let cfg = rwgate::config::ClickHouseConfig {
        url: Some(server.url()),
        ..Default::default()
    };
    let ch = ClickHouse::new(&cfg).expect("client");
    assert_eq!(ch.validates(), None, "decided on first use");
    ch.insert::<RawRow>(&ch.config.raw_table, &[raw(2.5)])
        .await
        .expect("the right row type");
    let modern = engine == Engine::Modern;
    assert_eq!(ch.validates(), Some(modern));

    let wrong = WrongRaw {
        account: "a",
        metric: NS_METRIC,
        cluster: "c",
        namespace: "web",
        pod: "",
        series_id: 2,
        ts: 1_709_460_000_000,
        value: 7,
        ingest_time: 0,
    };
    let inserted = ch.insert::<WrongRaw>(&ch.config.raw_table, &[wrong]).await;
    let read = ch
        .timed(
            ch.client()
                .query("SELECT ts, value FROM kubecost_samples WHERE series_id = 1")
                .fetch_all::<WrongRead>(),
        )
        .await;
    let stored = server
        .rows(
            "SELECT series_id, reinterpretAsUInt64(reinterpretAsString(value)) AS bits \
             FROM kubecost_samples ORDER BY series_id",
        )
        .await;
    if modern {
        let e = inserted.expect_err("the insert is refused");
        assert!(schema_mismatch(&e), "{e}");
        assert!(
            !e.is_data_error(),
            "a mismatch is retried, not dead-lettered"
        );
        let e = read.expect_err("the query is refused");
        assert!(schema_mismatch(&e), "{e}");
        assert_eq!(stored.len(), 1, "nothing of the wrong row was written");
    } else {
        // Plain RowBinary: the integer's bytes land in the Float64 column,
        // and the float's bits come back as an integer.
        inserted.expect("18.16 takes the bytes as they are");
        assert_eq!(stored.len(), 2);
        assert_eq!(int(&stored[1]["bits"]), 7, "the Float64 holds 7's bits");
        let back = read.expect("18.16 returns the bytes as they are");
        assert_eq!(
            (back[0].ts, back[0].value),
            (1_709_460_000_000, 2.5f64.to_bits() as i64)
        );
    }
}
