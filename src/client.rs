//! The outbound HTTP(S) client the upstream and the REST API share:
//! pooled connections, TLS via rustls, and answers read only up to a cap;
//! and the one way a failed outbound call is told ([`Endpoint`], [`cause`]),
//! which ClickHouse's errors use too.

use std::error::Error as StdError;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;

/// An HTTP(S) client with connection pooling; outbound TLS via rustls.
pub type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Builds the pooled client used for the upstream and the REST API: TLS
/// as `tls` says (`None`: the public webpki roots, no client certificate).
pub fn http_client(pool_max_idle: usize, tls: Option<rustls::ClientConfig>) -> HttpClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(5)));
    let builder = hyper_rustls::HttpsConnectorBuilder::new();
    let https = match tls {
        Some(tls) => builder.with_tls_config(tls),
        None => builder.with_webpki_roots(),
    }
    .https_or_http()
    .enable_all_versions()
    .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(pool_max_idle)
        .pool_idle_timeout(Duration::from_secs(60))
        .build(https)
}

/// A response body read up to a cap.
#[derive(Debug)]
pub struct Capped {
    /// The body, or its first `cap` bytes.
    pub bytes: Vec<u8>,
    /// The body ended within the cap. When it did not, the rest was not
    /// read: dropping the body then closes the connection rather than
    /// returning it to the pool, so a huge answer costs nothing more.
    pub complete: bool,
}

/// Reads a response body until it ends or more than `cap` bytes arrived,
/// so that no upstream or REST API answer, however large, is buffered
/// whole.
pub async fn read_capped<B>(mut body: B, cap: usize) -> Result<Capped, B::Error>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
{
    use http_body_util::BodyExt;
    let hint = usize::try_from(body.size_hint().lower()).unwrap_or(usize::MAX);
    let mut bytes = Vec::with_capacity(hint.min(cap));
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue; // trailers
        };
        let room = cap - bytes.len();
        if data.len() > room {
            bytes.extend_from_slice(&data[..room]);
            return Ok(Capped {
                bytes,
                complete: false,
            });
        }
        bytes.extend_from_slice(&data);
    }
    Ok(Capped {
        bytes,
        complete: true,
    })
}

/// Why [`call`] got no whole answer.
#[derive(Debug)]
pub enum CallError {
    /// Not sent, cut off, or longer than the cap: in words, naming the
    /// endpoint.
    Failed(String),
    /// No whole answer within the timeout.
    TimedOut,
}

/// Sends `req` to `at` and reads its answer, at most `cap` bytes of it,
/// all within `timeout`: the status and the answer.
pub async fn call(
    client: &HttpClient,
    req: http::Request<Full<Bytes>>,
    at: &Endpoint,
    timeout: Duration,
    cap: usize,
) -> Result<(http::StatusCode, Vec<u8>), CallError> {
    let exchange = async {
        let resp = client
            .request(req)
            .await
            .map_err(|e| CallError::Failed(at.unreachable(&e)))?;
        let status = resp.status();
        let body = read_capped(resp.into_body(), cap)
            .await
            .map_err(|e| CallError::Failed(at.unreachable(&e)))?;
        if !body.complete {
            return Err(CallError::Failed(format!(
                "{at} sent an answer longer than {cap} bytes"
            )));
        }
        Ok((status, body.bytes))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| CallError::TimedOut)?
}

/// What a refusing answer says, in one short line: the platform REST API's
/// `{"error": {"error_code", "reason"}}`, or the start of whatever else
/// came back.
pub fn answer_detail(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Wrapper {
        error: Inner,
    }
    #[derive(Deserialize)]
    struct Inner {
        #[serde(default)]
        error_code: String,
        #[serde(default)]
        reason: String,
    }
    let text = match serde_json::from_slice::<Wrapper>(body) {
        Ok(w) => format!("{} {}", w.error.error_code, w.error.reason),
        Err(_) => String::from_utf8_lossy(body).into_owned(),
    };
    let line: String = text
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .take(200)
        .collect();
    if line.is_empty() {
        "no detail".into()
    } else {
        line
    }
}

/// An outbound service as messages name it: what it is and its URL, with
/// any `user:password@` masked. Every failure of a call names it once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    what: &'static str,
    url: Arc<str>,
}

impl Endpoint {
    /// `what` is the service as a sentence names it ("the upstream").
    pub fn new(what: &'static str, url: &str) -> Endpoint {
        Endpoint {
            what,
            url: crate::config::redact_url(url).into(),
        }
    }

    /// The URL without credentials.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The call could not be made: no connection, no TLS, no answer.
    pub fn unreachable(&self, error: &(dyn StdError + 'static)) -> String {
        format!("cannot reach {self}: {}", cause(error))
    }

    /// No answer within `after`.
    pub fn timed_out(&self, after: Duration) -> String {
        format!(
            "{self} did not answer within {}",
            crate::clock::HumanDuration(after)
        )
    }

    /// An answer that is not what was asked for.
    pub fn answered(&self, status: u16, detail: &str) -> String {
        match http::StatusCode::from_u16(status) {
            Ok(s) => format!("{self} answered {s}: {detail}"),
            Err(_) => format!("{self} answered {status}: {detail}"),
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} at {}", self.what, self.url)
    }
}

/// What went wrong below an outbound call, in one line of plain words.
/// hyper-util's errors wrap the connector's, each naming only its stage
/// (`client error (Connect)`, `tcp connect error`): those are left out,
/// each remaining cause is said once, and the usual ends of the chain (an
/// OS error, a TLS error) are put in words rather than in their Rust names.
pub fn cause(error: &(dyn StdError + 'static)) -> String {
    let mut causes: Vec<String> = Vec::new();
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(words) = in_words(e) {
            causes.push(words);
            break;
        }
        let text = match e.to_string() {
            t if t == "dns error" => "cannot resolve the host name".to_string(),
            t => t,
        };
        let stage = text.starts_with("client error (") || text.ends_with(" connect error");
        let said = (stage && e.source().is_some()) || causes.iter().any(|c| c.contains(&text));
        if !said {
            causes.push(text);
        }
        next = e.source();
    }
    causes.join(": ")
}

/// An OS or TLS error in words, or `None` for anything else.
fn in_words(e: &(dyn StdError + 'static)) -> Option<String> {
    if let Some(tls) = e.downcast_ref::<rustls::Error>() {
        return Some(crate::tls::describe(tls));
    }
    let mut io = e.downcast_ref::<std::io::Error>()?;
    // rustls' errors reach hyper inside an io::Error (tokio-rustls), inside
    // another (hyper-rustls).
    while let Some(inner) = io.get_ref() {
        if let Some(tls) = inner.downcast_ref::<rustls::Error>() {
            return Some(crate::tls::describe(tls));
        }
        match inner.downcast_ref::<std::io::Error>() {
            Some(i) => io = i,
            None => break,
        }
    }
    use std::io::ErrorKind as K;
    Some(match io.kind() {
        K::ConnectionRefused => "connection refused".into(),
        K::ConnectionReset => "the connection was reset".into(),
        K::ConnectionAborted => "the connection was aborted".into(),
        K::TimedOut => "the connection timed out".into(),
        K::UnexpectedEof => "the server closed the connection".into(),
        _ => {
            // `Network is unreachable (os error 101)`: the number says nothing more.
            let text = io.to_string();
            match text.rfind(" (os error ") {
                Some(at) if text.ends_with(')') => text[..at].to_string(),
                _ => text,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_detail_is_one_short_line() {
        assert_eq!(
            answer_detail(br#"{"error": {"error_code": "OE0212", "reason": "Unexpected parameters: x", "params": []}}"#),
            "OE0212 Unexpected parameters: x"
        );
        assert_eq!(
            answer_detail(b"<html>\n bad\n gateway</html>"),
            "<html> bad gateway</html>"
        );
        assert_eq!(answer_detail(b""), "no detail");
    }

    /// The first error a GET of `url` through the pooled client ends in.
    async fn failure(url: &str, tls: Option<rustls::ClientConfig>) -> String {
        let req = http::Request::get(url)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let call = http_client(1, tls).request(req);
        match tokio::time::timeout(Duration::from_secs(10), call).await {
            Ok(Err(e)) => Endpoint::new("the upstream", url).unreachable(&e),
            Ok(Ok(r)) => panic!("{url} answered {}", r.status()),
            Err(_) => panic!("{url}: no outcome within 10s"),
        }
    }

    /// A loopback port nothing listens on.
    fn closed_port() -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }

    /// A loopback server that answers every connection with `reply` and
    /// closes it; stopped when the returned task is aborted (`Drop`).
    struct Answering(tokio::task::JoinHandle<()>, u16);

    impl Drop for Answering {
        fn drop(&mut self) {
            self.0.abort();
        }
    }

    async fn answering(tls: Option<tokio_rustls::TlsAcceptor>, reply: &'static [u8]) -> Answering {
        use tokio::io::AsyncWriteExt;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = l.accept().await {
                let tls = tls.clone();
                tokio::spawn(async move {
                    match tls {
                        Some(tls) => {
                            if let Ok(mut s) = tls.accept(tcp).await {
                                let _ = s.write_all(reply).await;
                            }
                        }
                        None => {
                            let mut tcp = tcp;
                            let _ = tcp.write_all(reply).await;
                        }
                    }
                });
            }
        });
        Answering(task, port)
    }

    /// Each cause once, in words, after the URL without its password: no
    /// `client error (Connect)`, no OS error number.
    #[tokio::test]
    async fn a_refused_connection_is_said_in_words() {
        let port = closed_port();
        let url = format!("http://bob:s3cret@127.0.0.1:{port}/api/v1/receive");
        assert_eq!(
            failure(&url, None).await,
            format!("cannot reach the upstream at http://***@127.0.0.1:{port}/api/v1/receive: connection refused")
        );
    }

    /// https:// towards a plain-HTTP server.
    #[tokio::test]
    async fn a_server_that_does_not_speak_tls_is_said_so() {
        let plain = answering(
            None,
            b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n",
        )
        .await;
        let url = format!("https://127.0.0.1:{}/", plain.1);
        assert_eq!(
            failure(&url, None).await,
            format!(
                "cannot reach the upstream at {url}: the server did not speak TLS \
                 (is it plain HTTP? then use http://)"
            )
        );
    }

    /// A server presenting its CA's own certificate (trusted, but not a
    /// server certificate): rustls says `Other(OtherError(CaUsedAsEndEntity))`.
    #[tokio::test]
    async fn a_ca_certificate_served_as_the_server_certificate_is_said_so() {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        let der = cert.der().clone();
        let key_der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![der.clone()], key_der)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tls = answering(Some(Arc::new(server).into()), b"").await;
        let url = format!("https://127.0.0.1:{}/", tls.1);
        assert_eq!(
            failure(&url, Some(client)).await,
            format!(
                "cannot reach the upstream at {url}: the server's certificate is a CA \
                 certificate, not a server certificate"
            )
        );
    }

    #[test]
    fn timeouts_and_answers_name_the_endpoint() {
        let e = Endpoint::new("the REST API", "https://u:p@rest.example/");
        assert_eq!(
            e.timed_out(Duration::from_millis(1500)),
            "the REST API at https://***@rest.example/ did not answer within 1s 500ms"
        );
        assert_eq!(
            e.answered(500, "no detail"),
            "the REST API at https://***@rest.example/ answered 500 Internal Server Error: no detail"
        );
    }
}
