//! Which remote-write protocol a request speaks, from its `Content-Type` and
//! `Content-Encoding` (one function, [`negotiate`]), and the RFC 9110
//! media-type parser it needs.

use http::{header, HeaderMap, HeaderValue};

use crate::error::ApiError;

/// The media type of every remote-write protocol.
const PROTOBUF: &str = "application/x-protobuf";
/// The `proto` parameter of Remote-Write 1.0 (absent means 1.0 too).
const PROTO_V1: &[u8] = b"prometheus.WriteRequest";
/// The `proto` parameter of Remote-Write 2.0.
const PROTO_V2: &[u8] = crate::wire_v2::PROTO.as_bytes();

/// A remote-write protocol rwgate can decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Remote-Write 1.0: snappy-compressed `prometheus.WriteRequest`.
    RemoteWrite1,
    /// Remote-Write 2.0 (spec 2.0-rc.4): snappy-compressed
    /// `io.prometheus.write.v2.Request`.
    RemoteWrite2,
}

/// The protocol of a request, or 415 naming the header to fix.
///
/// `Content-Encoding` must be `snappy` or absent (older senders omit it).
/// `Content-Type` must be absent (the 1.0 default) or
/// `application/x-protobuf`, whose `proto` parameter says the message:
/// `prometheus.WriteRequest`, or no `proto` at all, is Remote-Write 1.0;
/// `io.prometheus.write.v2.Request` is 2.0 (message names are
/// case-sensitive). A missing `Content-Encoding` is snappy for 2.0 too, as
/// Prometheus' own receiver has it.
/// Names are case-insensitive and values may be quoted, as RFC 9110 has it;
/// other parameters are ignored. A header sent twice, or a `proto` given
/// twice, is refused rather than guessed at.
pub fn negotiate(headers: &HeaderMap) -> Result<Protocol, ApiError> {
    if let Some(enc) = single(headers, header::CONTENT_ENCODING)
        .map_err(|v| ApiError::UnsupportedEncoding(v.trim().to_ascii_lowercase()))?
    {
        let text = String::from_utf8_lossy(enc.as_bytes());
        let text = text.trim();
        if !text.eq_ignore_ascii_case("snappy") {
            return Err(ApiError::UnsupportedEncoding(text.to_ascii_lowercase()));
        }
    }
    let Some(ct) =
        single(headers, header::CONTENT_TYPE).map_err(ApiError::UnsupportedContentType)?
    else {
        return Ok(Protocol::RemoteWrite1);
    };
    let unsupported = || ApiError::UnsupportedContentType(lossy(ct));
    let media = MediaType::parse(ct.as_bytes()).ok_or_else(unsupported)?;
    if !media.essence.eq_ignore_ascii_case(PROTOBUF.as_bytes()) {
        return Err(unsupported());
    }
    let mut protos = media
        .params
        .iter()
        .filter(|(name, _)| name.eq_ignore_ascii_case(b"proto"));
    let proto = protos.next();
    if protos.next().is_some() {
        return Err(unsupported());
    }
    match proto {
        None => Ok(Protocol::RemoteWrite1),
        Some((_, value)) if value.as_slice() == PROTO_V1 => Ok(Protocol::RemoteWrite1),
        Some((_, value)) if value.as_slice() == PROTO_V2 => Ok(Protocol::RemoteWrite2),
        Some(_) => Err(unsupported()),
    }
}

/// The one value of header `name`, if present; `Err` with the values joined
/// when it was sent more than once.
fn single(headers: &HeaderMap, name: header::HeaderName) -> Result<Option<&HeaderValue>, String> {
    let mut all = headers.get_all(&name).iter();
    let first = all.next();
    if all.next().is_some() {
        let joined: Vec<String> = headers.get_all(&name).iter().map(lossy).collect();
        return Err(joined.join(", "));
    }
    Ok(first)
}

fn lossy(v: &HeaderValue) -> String {
    String::from_utf8_lossy(v.as_bytes()).into_owned()
}

/// A parsed media type (RFC 9110 section 8.3.1):
/// `type "/" subtype *( OWS ";" OWS [ name "=" value ] )`, the value a token
/// or a quoted string whose quoted pairs (`\x`) are unescaped.
///
/// Written here rather than taken from a crate: `mime` 0.3 keeps quoted
/// pairs escaped (`"a\b"` reads as `a\b`), and `mediatype` 0.23 keeps the
/// last of two equal parameter names; both refuse whitespace around `=`,
/// which senders write and which is harmless to accept (one reading only).
/// The grammar is a dozen lines; the tests below cover it.
#[derive(Debug, PartialEq, Eq)]
struct MediaType<'a> {
    /// `type/subtype` as sent (compare case-insensitively).
    essence: &'a [u8],
    /// Parameters in order: name as sent, value unquoted.
    params: Vec<(&'a [u8], Vec<u8>)>,
}

impl<'a> MediaType<'a> {
    /// `None` if `text` does not follow the grammar.
    fn parse(text: &'a [u8]) -> Option<MediaType<'a>> {
        let mut p = Cursor { text, at: 0 };
        p.skip_ows();
        let start = p.at;
        p.token()?;
        p.eat(b'/')?;
        p.token()?;
        let essence = &text[start..p.at];
        let mut params = Vec::new();
        loop {
            p.skip_ows();
            if p.done() {
                return Some(MediaType { essence, params });
            }
            p.eat(b';')?;
            p.skip_ows();
            // Empty parameters (`;;`, a trailing `;`) are allowed.
            if p.done() || p.peek() == Some(b';') {
                continue;
            }
            let name = p.token()?;
            p.skip_ows();
            p.eat(b'=')?;
            p.skip_ows();
            let value = if p.peek() == Some(b'"') {
                p.quoted()?
            } else {
                p.token()?.to_vec()
            };
            params.push((name, value));
        }
    }
}

struct Cursor<'a> {
    text: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn done(&self) -> bool {
        self.at >= self.text.len()
    }

    fn peek(&self) -> Option<u8> {
        self.text.get(self.at).copied()
    }

    fn eat(&mut self, b: u8) -> Option<()> {
        (self.peek() == Some(b)).then(|| self.at += 1)
    }

    fn skip_ows(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.at += 1;
        }
    }

    /// `1*tchar`.
    fn token(&mut self) -> Option<&'a [u8]> {
        let start = self.at;
        while self.peek().is_some_and(is_tchar) {
            self.at += 1;
        }
        (self.at > start).then(|| &self.text[start..self.at])
    }

    /// `DQUOTE *( qdtext / quoted-pair ) DQUOTE`, unescaped.
    fn quoted(&mut self) -> Option<Vec<u8>> {
        self.eat(b'"')?;
        let mut out = Vec::new();
        loop {
            match self.peek()? {
                b'"' => {
                    self.at += 1;
                    return Some(out);
                }
                b'\\' => {
                    self.at += 1;
                    let c = self
                        .peek()
                        .filter(|&c| c == b'\t' || c >= b' ' && c != 0x7f)?;
                    out.push(c);
                    self.at += 1;
                }
                c if c == b'\t' || (c >= b' ' && c != 0x7f) => {
                    out.push(c);
                    self.at += 1;
                }
                _ => return None,
            }
        }
    }
}

/// RFC 9110 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn ct(value: &str) -> Result<Protocol, ApiError> {
        negotiate(&headers(&[("content-type", value)]))
    }

    #[test]
    fn remote_write_1_in_every_spelling() {
        for value in [
            "application/x-protobuf",
            "Application/X-Protobuf",
            "application/x-protobuf;proto=prometheus.WriteRequest",
            "application/x-protobuf; proto=prometheus.WriteRequest",
            "application/x-protobuf ;proto=prometheus.WriteRequest ",
            "application/x-protobuf;PROTO=prometheus.WriteRequest",
            "application/x-protobuf;Proto=\"prometheus.WriteRequest\"",
            "application/x-protobuf;proto=\"prometheus.\\WriteRequest\"",
            "application/x-protobuf; proto = prometheus.WriteRequest",
            "application/x-protobuf;\tproto=prometheus.WriteRequest",
            "application/x-protobuf;charset=utf-8;proto=prometheus.WriteRequest",
            "application/x-protobuf; encoding=\"a;b=c\"",
            "application/x-protobuf;",
            "application/x-protobuf;;proto=prometheus.WriteRequest",
        ] {
            assert_eq!(ct(value).ok(), Some(Protocol::RemoteWrite1), "{value:?}");
        }
        assert_eq!(
            negotiate(&HeaderMap::new()).ok(),
            Some(Protocol::RemoteWrite1)
        );
        let snappy = headers(&[("content-encoding", " Snappy ")]);
        assert_eq!(negotiate(&snappy).ok(), Some(Protocol::RemoteWrite1));
    }

    #[test]
    fn remote_write_2_by_its_proto() {
        for value in [
            "application/x-protobuf;proto=io.prometheus.write.v2.Request",
            "application/x-protobuf; proto=\"io.prometheus.write.v2.Request\"",
            "Application/X-Protobuf;PROTO=io.prometheus.write.v2.Request;charset=utf-8",
        ] {
            assert_eq!(ct(value).ok(), Some(Protocol::RemoteWrite2), "{value:?}");
            let snappy = headers(&[("content-type", value), ("content-encoding", "snappy")]);
            assert_eq!(negotiate(&snappy).ok(), Some(Protocol::RemoteWrite2));
            for enc in ["gzip", "zstd", "identity"] {
                let other = headers(&[("content-type", value), ("content-encoding", enc)]);
                assert!(
                    matches!(negotiate(&other), Err(ApiError::UnsupportedEncoding(v)) if v == enc),
                    "{value} {enc}"
                );
            }
        }
    }

    #[test]
    fn everything_else_is_415() {
        for value in [
            "application/x-protobuf;proto=io.prometheus.write.v2.request",
            "application/x-protobuf;proto=io.prometheus.write.v3.Request",
            "application/x-protobuf;proto=io.prometheus.write.v2.Request;proto=prometheus.WriteRequest",
            "application/x-protobuf;proto=Prometheus.WriteRequest",
            "application/x-protobuf;proto=\"\"",
            "application/x-protobuf;proto=prometheus.WriteRequest;proto=io.prometheus.write.v2.Request",
            "application/x-protobuf;proto=prometheus.WriteRequest;Proto=prometheus.WriteRequest",
            "application/x-protobuf;proto=\"prometheus.WriteRequest",
            "application/x-protobuf;proto",
            "application/x-protobuf;proto=",
            "application/x-protobuf;proto=a b",
            "application/x-protobufx",
            "application/json",
            "application/x-protobuf/x",
            "x-protobuf",
            "",
        ] {
            let err = ct(value).expect_err(value);
            assert!(
                matches!(&err, ApiError::UnsupportedContentType(v) if v == value),
                "{value:?}: {err}"
            );
        }
        let twice = headers(&[
            ("content-type", "application/x-protobuf"),
            (
                "content-type",
                "application/x-protobuf;proto=io.prometheus.write.v2.Request",
            ),
        ]);
        assert!(matches!(
            negotiate(&twice),
            Err(ApiError::UnsupportedContentType(v))
                if v == "application/x-protobuf, application/x-protobuf;proto=io.prometheus.write.v2.Request"
        ));
        for enc in ["gzip", "snappy, gzip", "identity"] {
            let h = headers(&[("content-encoding", enc)]);
            assert!(
                matches!(negotiate(&h), Err(ApiError::UnsupportedEncoding(v)) if v == enc),
                "{enc}"
            );
        }
        let enc_twice = headers(&[("content-encoding", "snappy"), ("content-encoding", "gzip")]);
        assert!(matches!(
            negotiate(&enc_twice),
            Err(ApiError::UnsupportedEncoding(v)) if v == "snappy, gzip"
        ));
    }

    #[test]
    fn parses_parameters_per_rfc_9110() {
        let m = MediaType::parse(b"Text/Plain ; A=1;b=\"x\\\"y\\\\z\" ;c=\"\"").unwrap();
        assert_eq!(m.essence, b"Text/Plain");
        let params: Vec<(&[u8], &[u8])> =
            m.params.iter().map(|(n, v)| (*n, v.as_slice())).collect();
        assert_eq!(
            params,
            [(&b"A"[..], &b"1"[..]), (b"b", b"x\"y\\z"), (b"c", b""),]
        );
        for bad in [
            &b"text"[..],
            b"text/",
            b"/plain",
            b"text/plain;=1",
            b"text/plain;a=\"\x01\"",
            b"text/plain;a=\"x\\",
            b"text/plain a=1",
            b"text/plain;a=1 b",
            b"te xt/plain",
        ] {
            assert_eq!(
                MediaType::parse(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
