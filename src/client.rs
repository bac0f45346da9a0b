//! The outbound HTTP(S) client the upstream and the REST API share:
//! pooled connections, TLS via rustls.

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
