//! ClickHouse's HTTP interface as rwgate and the tests use it, on both
//! engines: the front over chdb (`tests/chdb_server.py`) must answer what a
//! server answers and be no looser. Native compression is written here a
//! third time (cityhash-rs, lz4_flex), independently of the `clickhouse`
//! crate and of the front.

mod common;

use std::time::Duration;

use common::clickhouse::*;
use common::client;

struct Answer {
    status: u16,
    /// `X-ClickHouse-Exception-Code` (newer than 18.16).
    code_header: Option<u32>,
    /// The `Code: N` the body starts with.
    code: Option<u32>,
    encoding: Option<String>,
    body: Vec<u8>,
}

impl Answer {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

async fn send(req: reqwest::RequestBuilder) -> Answer {
    let resp = req
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .expect("clickhouse reachable");
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .map(|v| v.to_str().expect("ascii header").to_string())
    };
    let code_header =
        header("X-ClickHouse-Exception-Code").map(|c| c.parse().expect("numeric code"));
    let encoding = header("Content-Encoding");
    let status = resp.status().as_u16();
    let body = resp.bytes().await.expect("body").to_vec();
    let code = std::str::from_utf8(&body)
        .ok()
        .and_then(|t| t.strip_prefix("Code: "))
        .and_then(|t| t.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .or(code_header);
    Answer {
        status,
        code_header,
        code,
        encoding,
        body,
    }
}

fn post(
    ch: &ClickHouseServer,
    params: &str,
    body: impl Into<reqwest::Body>,
) -> reqwest::RequestBuilder {
    client().post(format!("{}/?{params}", ch.url())).body(body)
}

/// One block of ClickHouse's native compression: CityHash128 (v1.0.2) of
/// what follows, method 0x82 (LZ4), compressed size with the 9-byte header,
/// raw size, the LZ4 block.
fn native_block(raw: &[u8]) -> Vec<u8> {
    let lz4 = lz4_flex::block::compress(raw);
    let mut block = vec![0x82];
    block.extend_from_slice(&(9 + lz4.len() as u32).to_le_bytes());
    block.extend_from_slice(&(raw.len() as u32).to_le_bytes());
    block.extend_from_slice(&lz4);
    let sum = cityhash_rs::cityhash_102_128(&block).rotate_right(64);
    let mut out = sum.to_le_bytes().to_vec();
    out.extend_from_slice(&block);
    out
}

/// Reads native blocks back, checking every checksum.
fn native_decode(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let size = u32::from_le_bytes(data[17..21].try_into().expect("4 bytes")) as usize;
        let raw = u32::from_le_bytes(data[21..25].try_into().expect("4 bytes")) as usize;
        let (sum, block) = (&data[..16], &data[16..16 + size]);
        let want = cityhash_rs::cityhash_102_128(block).rotate_right(64);
        assert_eq!(sum, want.to_le_bytes(), "checksum of a block");
        assert_eq!(block[0], 0x82, "LZ4");
        out.extend(lz4_flex::block::decompress(&block[9..], raw).expect("an LZ4 block"));
        data = &data[16 + size..];
    }
    out
}

/// RowBinary of `(n UInt64, s String)` rows.
fn row_binary(rows: std::ops::Range<u64>) -> Vec<u8> {
    let mut out = Vec::new();
    for n in rows {
        out.extend_from_slice(&n.to_le_bytes());
        let s = format!("row-{n}");
        out.push(s.len() as u8);
        out.extend_from_slice(s.as_bytes());
    }
    out
}

async fn count(ch: &ClickHouseServer) -> i64 {
    int(&ch.rows("SELECT count() AS c FROM t").await[0]["c"])
}

on_both_engines!(errors_carry_the_servers_code_status_and_message);
async fn errors_carry_the_servers_code_status_and_message(engine: Engine) {
    let ch = ClickHouseServer::start_engine(engine);
    let modern = engine == Engine::Modern;
    let url = ch.url();
    let c = client();
    // (what, request, (code, HTTP status)), `p` and `get` making the POST
    // and GET requests. Authentication is where the two differ: 18.16 has
    // its own codes and answers 401.
    let auth = |old: u32| if modern { (516, 403) } else { (old, 401) };
    let get = |sql: &str| c.get(format!("{url}/?query={}", sql.replace(' ', "%20")));
    let p = |params: &str, sql: &'static str| post(&ch, params, sql);
    let cases: Vec<(&str, reqwest::RequestBuilder, (u32, u16))> = vec![
        ("unknown setting", p("no_such=1", "SELECT 1"), (115, 404)),
        ("multi-statement", p("", "SELECT 1; SELECT 2"), (62, 400)),
        ("empty", p("", "").header("Content-Length", "0"), (62, 400)),
        ("POST without a length", p("", ""), (381, 411)),
        ("syntax", p("", "SELEC 1"), (62, 400)),
        ("unknown table", p("", "SELECT * FROM nowhere"), (60, 404)),
        ("unknown database", p("database=no", "SELECT 1"), (81, 404)),
        (
            "GET is read-only",
            get("CREATE TABLE g (a UInt8) ENGINE = Memory"),
            (164, 500),
        ),
        (
            "wrong password",
            p("", "SELECT 1").basic_auth("default", Some("x")),
            auth(193),
        ),
        (
            "two ways of passing credentials",
            p("", "SELECT 1")
                .basic_auth("default", Some(""))
                .header("X-ClickHouse-User", "default"),
            auth(194),
        ),
        (
            "a limit from a setting",
            p(
                "max_result_rows=2&result_overflow_mode=throw",
                "SELECT * FROM system.numbers LIMIT 5",
            ),
            (396, 500),
        ),
    ];
    for (what, req, (code, status)) in cases {
        let a = send(req).await;
        let text = a.text();
        assert_eq!((a.status, a.code), (status, Some(code)), "{what}: {text}");
        assert!(text.contains("DB::Exception"), "{what}: {text}");
        if modern {
            assert_eq!(a.code_header, Some(code), "{what}");
        }
        // Nothing of a failed request (its settings) leaks into the next one.
        let a = send(post(&ch, "", "SELECT number FROM system.numbers LIMIT 9")).await;
        assert_eq!(
            (a.status, a.text().lines().count()),
            (200, 9),
            "after {what}"
        );
    }
}

on_both_engines!(a_compressed_insert_is_checked_before_anything_is_written);
async fn a_compressed_insert_is_checked_before_anything_is_written(engine: Engine) {
    let ch = ClickHouseServer::start_engine(engine);
    ch.exec("CREATE TABLE t (n UInt64, s String) ENGINE = MergeTree ORDER BY n")
        .await;
    let insert = "decompress=1&query=INSERT%20INTO%20t%20FORMAT%20RowBinary";
    // Two blocks, as the crate sends a long insert.
    let mut body = native_block(&row_binary(0..700));
    body.extend(native_block(&row_binary(700..1000)));
    let a = send(post(&ch, insert, body.clone())).await;
    assert_eq!(a.status, 200, "{}", a.text());
    let rows = ch
        .rows("SELECT n, s FROM t WHERE n IN (0, 999) ORDER BY n")
        .await;
    assert_eq!(rows[1]["s"], "row-999");
    assert_eq!(count(&ch).await, 1000);

    // One bit flipped in the second block's data: the checksum fails.
    let mut bad = body.clone();
    let at = bad.len() - 3;
    bad[at] ^= 1;
    let a = send(post(&ch, insert, bad)).await;
    assert_eq!((a.status, a.code), (500, Some(40)), "{}", a.text());
    assert!(a.text().contains("Checksum doesn't match"), "{}", a.text());
    // A body cut inside a block.
    let a = send(post(&ch, insert, body[..body.len() - 10].to_vec())).await;
    assert_ne!(a.status, 200, "{}", a.text());
    // An unknown method byte (the checksum matches it).
    let mut odd = native_block(&row_binary(0..10));
    odd[16] = 0x42;
    let sum = cityhash_rs::cityhash_102_128(&odd[16..]).rotate_right(64);
    odd[..16].copy_from_slice(&sum.to_le_bytes());
    let a = send(post(&ch, insert, odd)).await;
    assert_eq!((a.status, a.code), (500, Some(89)), "{}", a.text());
    assert_eq!(
        count(&ch).await,
        1000,
        "nothing of the bad inserts was written"
    );
}

on_both_engines!(a_block_the_table_refuses_is_refused_whole);
async fn a_block_the_table_refuses_is_refused_whole(engine: Engine) {
    let ch = ClickHouseServer::start_engine(engine);
    ch.exec(
        "CREATE TABLE t (n UInt64, s String, chk UInt8 MATERIALIZED throwIf(s = 'row-7')) \
         ENGINE = MergeTree ORDER BY n",
    )
    .await;
    let insert = "query=INSERT%20INTO%20t(n,s)%20FORMAT%20RowBinary";
    let a = send(post(&ch, insert, row_binary(0..10))).await;
    assert_eq!((a.status, a.code), (500, Some(395)), "{}", a.text());
    let a = send(post(&ch, insert, row_binary(8..10))).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(count(&ch).await, 2);
}

/// What the server answers in compressed form. Modern only: 18.16 has
/// `enable_http_compression` off by default, and Debian's 18.16 answers
/// `compress=1` with an empty body (a Poco assertion in its log), which is
/// why the crate's native compression, used for inserts only, suits both.
#[tokio::test]
async fn modern_answers_compressed_as_asked() {
    let ch = ClickHouseServer::start_engine(Engine::Modern);
    let sql =
        "SELECT number, toString(number) FROM system.numbers LIMIT 300000 FORMAT TabSeparated";
    let plain = send(post(&ch, "", sql)).await;
    assert_eq!((plain.status, plain.encoding.as_deref()), (200, None));
    assert!(plain.body.len() > 1 << 20, "more than one native block");

    // What the crate asks for: Accept-Encoding lz4 -> an LZ4 frame.
    let a = send(post(&ch, "", sql).header("Accept-Encoding", "lz4")).await;
    assert_eq!(a.encoding.as_deref(), Some("lz4"));
    assert_eq!(&a.body[..4], &[0x04, 0x22, 0x4d, 0x18], "LZ4 frame magic");
    let mut got = Vec::new();
    std::io::Read::read_to_end(
        &mut lz4_flex::frame::FrameDecoder::new(&a.body[..]),
        &mut got,
    )
    .expect("an LZ4 frame");
    assert!(got == plain.body, "the frame holds the plain answer");
    // Errors are compressed too.
    let a = send(post(&ch, "", "SELECT * FROM nowhere").header("Accept-Encoding", "lz4")).await;
    assert_eq!((a.code, a.encoding.as_deref()), (Some(60), Some("lz4")));
    // enable_http_compression=0 turns it off.
    let a =
        send(post(&ch, "enable_http_compression=0", sql).header("Accept-Encoding", "lz4")).await;
    assert!(a.encoding.is_none() && a.body == plain.body);

    // compress=1: native blocks of at most 1 MiB, checksums included.
    let a = send(post(&ch, "compress=1", sql)).await;
    assert_eq!(a.status, 200);
    assert!(native_decode(&a.body) == plain.body);
}

/// A body that stops early (the client gave up) runs nothing. Modern only:
/// 18.16 inserts the rows it received before the connection dropped
/// (ClickHouse#9666, fixed in 2020 by throwing on an early end of a chunked
/// or Content-Length body).
#[tokio::test]
async fn modern_commits_nothing_of_a_cut_off_insert() {
    use tokio::io::AsyncWriteExt;
    let ch = ClickHouseServer::start_engine(Engine::Modern);
    ch.exec("CREATE TABLE t (n UInt64, s String) ENGINE = MergeTree ORDER BY n")
        .await;
    let rows = row_binary(0..100);
    for head in [
        "Transfer-Encoding: chunked\r\n".to_string(),
        format!("Content-Length: {}\r\n", rows.len() + 100),
    ] {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", ch.http_port))
            .await
            .expect("connect");
        let mut req = format!(
            "POST /?query=INSERT%20INTO%20t%20FORMAT%20RowBinary HTTP/1.1\r\nHost: x\r\n{head}\r\n"
        )
        .into_bytes();
        if head.starts_with("Transfer") {
            req.extend(format!("{:x}\r\n", rows.len()).into_bytes());
            req.extend(&rows);
            req.extend(b"\r\n"); // and no last chunk
        } else {
            req.extend(&rows);
        }
        s.write_all(&req).await.expect("write");
        s.shutdown().await.expect("half-close");
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::io::AsyncReadExt::read_to_end(&mut s, &mut answer),
        )
        .await
        .expect("the front closes the connection");
        assert!(
            !String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"),
            "{head}"
        );
        assert_eq!(count(&ch).await, 0, "{head}");
    }
}

/// What the front cannot reproduce exactly, it refuses (Code: 48, 501)
/// rather than accept with other semantics.
#[tokio::test]
async fn the_modern_front_refuses_what_it_does_not_reproduce() {
    let ch = ClickHouseServer::start_engine(Engine::Modern);
    for (what, req) in [
        ("a session", post(&ch, "session_id=s1", "SELECT 1")),
        (
            "a server-side parameter",
            post(&ch, "param_x=1", "SELECT {x:UInt8}"),
        ),
        (
            "SET outside a session",
            post(&ch, "", "SET max_threads = 1"),
        ),
        ("readonly", post(&ch, "readonly=1", "SELECT 1")),
        (
            "zstd answers",
            post(&ch, "", "SELECT 1").header("Accept-Encoding", "zstd"),
        ),
        (
            "INSERT data after SETTINGS",
            post(
                &ch,
                "",
                "INSERT INTO x SETTINGS async_insert = 0 FORMAT TSV\n1",
            ),
        ),
    ] {
        let a = send(req).await;
        assert_eq!((a.status, a.code), (501, Some(48)), "{what}: {}", a.text());
    }
}
