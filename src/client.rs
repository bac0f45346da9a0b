//! The outbound HTTP(S) client the upstream and the REST API share:
//! pooled connections, TLS via rustls, and answers read only up to a cap.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

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
