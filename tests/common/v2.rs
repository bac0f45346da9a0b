//! Remote-Write 2.0 requests for tests: built with prost from the vendored
//! official proto (`rwgate::prompb_v2`), posted with a 2.0 sender's
//! headers, and the answers' `X-Prometheus-Remote-Write-*-Written` counts.
//! Malformed requests are written by hand in the tests that need them.

use std::time::Duration;

use prost::Message;
use rwgate::prompb;
use rwgate::prompb_v2::{self as v2, Symbols};

use super::clickhouse::Series;

/// A request under construction: series whose labels are interned into
/// one symbol table, as a 2.0 sender builds it.
#[derive(Default)]
pub struct Builder {
    pub symbols: Symbols,
    pub series: Vec<v2::TimeSeries>,
}

impl Builder {
    pub fn new() -> Builder {
        Builder::default()
    }

    /// Adds a series of float samples `(timestamp ms, value)`; labels in the
    /// order given (`__name__` included), and returns it for more fields.
    pub fn series(
        &mut self,
        labels: &[(&str, &str)],
        samples: &[(i64, f64)],
    ) -> &mut v2::TimeSeries {
        let labels_refs = self.symbols.refs(labels);
        self.series.push(v2::TimeSeries {
            labels_refs,
            samples: samples
                .iter()
                .map(|&(timestamp, value)| v2::Sample {
                    value,
                    timestamp,
                    start_timestamp: 0,
                })
                .collect(),
            ..Default::default()
        });
        self.series.last_mut().expect("just pushed")
    }

    /// The symbol of `text` (added if new), for metadata and exemplars.
    pub fn sym(&mut self, text: &str) -> u32 {
        self.symbols.intern(text)
    }

    pub fn request(self) -> v2::Request {
        v2::Request {
            symbols: self.symbols.into_table(),
            timeseries: self.series,
        }
    }
}

/// A native histogram sample with a few buckets.
pub fn histogram(timestamp: i64, count: u64, sum: f64) -> v2::Histogram {
    v2::Histogram {
        count: Some(v2::histogram::Count::CountInt(count)),
        sum,
        schema: 0,
        zero_threshold: 1e-128,
        zero_count: Some(v2::histogram::ZeroCount::ZeroCountInt(0)),
        positive_spans: vec![v2::BucketSpan {
            offset: 0,
            length: 2,
        }],
        // Bucket counts as deltas: 1, then 1 + (count - 2).
        positive_deltas: vec![1, count as i64 - 2],
        timestamp,
        ..Default::default()
    }
}

/// An exemplar with `trace_id`.
pub fn exemplar(b: &mut Builder, trace_id: &str, value: f64, timestamp: i64) -> v2::Exemplar {
    v2::Exemplar {
        labels_refs: b.symbols.refs(&[("trace_id", trace_id)]),
        value,
        timestamp,
    }
}

/// Snappy-compressed protobuf bytes (of a message, or written by hand).
pub fn snappy(raw: &[u8]) -> Vec<u8> {
    snap::raw::Encoder::new()
        .compress_vec(raw)
        .expect("snappy compress")
}

/// A snappy-compressed 2.0 body.
pub fn body(req: &v2::Request) -> Vec<u8> {
    snappy(&req.encode_to_vec())
}

/// A 2.0 body of the tee harness' series (the same series a 1.0 body of
/// [`super::clickhouse::body`] holds).
pub fn body_of(series: &[Series]) -> Vec<u8> {
    let mut b = Builder::new();
    for s in series {
        let labels: Vec<(&str, &str)> = s
            .labels
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        b.series(&labels, &s.samples);
    }
    body(&b.request())
}

/// A remote-write POST with a 2.0 sender's headers.
pub fn post(
    http: &reqwest::Client,
    url: &str,
    account: &str,
    body: Vec<u8>,
) -> reqwest::RequestBuilder {
    http.post(url)
        .header(
            "Content-Type",
            "application/x-protobuf;proto=io.prometheus.write.v2.Request",
        )
        .header("Content-Encoding", "snappy")
        .header("X-Prometheus-Remote-Write-Version", "2.0.0")
        .header("Cloud-Account-Id", account)
        .timeout(Duration::from_secs(30))
        .body(body)
}

/// (samples, histograms, exemplars) an answer says were written; panics if
/// a header is missing or not a number.
pub fn written(headers: &http::HeaderMap) -> (u64, u64, u64) {
    let get = |kind: &str| {
        let name = format!("X-Prometheus-Remote-Write-{kind}-Written");
        headers
            .get(&name)
            .unwrap_or_else(|| panic!("{name} missing from {headers:?}"))
            .to_str()
            .expect("ASCII header")
            .parse::<u64>()
            .expect("a count")
    };
    (get("Samples"), get("Histograms"), get("Exemplars"))
}

/// Sends a [`post`] of `body` as `account`: the answer's status and body
/// ([`super::status_body`]), and what it says was written ([`written`]).
pub async fn send(
    http: &reqwest::Client,
    url: &str,
    account: &str,
    body: Vec<u8>,
) -> ((u16, String), (u64, u64, u64)) {
    let resp = post(http, url, account, body)
        .send()
        .await
        .expect("POST 2.0");
    let written = written(resp.headers());
    (super::status_body(resp).await, written)
}

/// A 1.0 body as a 1.0 receiver reads it, histograms included.
pub fn decode_v1(body: &[u8]) -> prompb::WriteRequest {
    let raw = snap::raw::Decoder::new()
        .decompress_vec(body)
        .expect("upstream body is snappy");
    prompb::WriteRequest::decode(raw.as_slice()).expect("upstream body is a 1.0 WriteRequest")
}

/// A 2.0 body as a 2.0 receiver reads it.
pub fn decode_v2(body: &[u8]) -> v2::Request {
    let raw = snap::raw::Decoder::new()
        .decompress_vec(body)
        .expect("upstream body is snappy");
    v2::Request::decode(raw.as_slice()).expect("upstream body is a 2.0 Request")
}
