//! TLS with rustls: termination (ALPN h2 and http/1.1), and the client side
//! towards the upstream (a private CA, mutual TLS).

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::config::UpstreamTlsConfig;

/// Builds an acceptor from PEM files.
pub fn acceptor(cert: &Path, key: &Path) -> anyhow::Result<TlsAcceptor> {
    let certs = read_certs(cert, "tls.cert")?;
    let key = read_key(key, "tls.key")?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("tls.cert and tls.key do not form a usable pair")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The client configuration for an HTTPS upstream: the server's certificate
/// must chain to `ca` (only those CAs, as Prometheus' `tls_config.ca_file`)
/// or, without it, to a public (webpki) root; with `cert` and `key` the
/// client presents that certificate (mutual TLS). ALPN is set by the
/// connector.
pub fn client_config(tls: &UpstreamTlsConfig) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    match &tls.ca {
        Some(ca) => {
            let (added, _) = roots.add_parsable_certificates(read_certs(ca, "upstream.tls.ca")?);
            if added == 0 {
                anyhow::bail!("upstream.tls.ca {}: no usable CA certificate", ca.display());
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    Ok(match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(
                read_certs(cert, "upstream.tls.cert")?,
                read_key(key, "upstream.tls.key")?,
            )
            .context("upstream.tls.cert and upstream.tls.key do not form a usable pair")?,
        _ => builder.with_no_client_auth(),
    })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificates of a PEM file; `setting` names it in errors.
fn read_certs(path: &Path, setting: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("{setting} {}", path.display()))?;
    let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(file))
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{setting} {}: not PEM", path.display()))?;
    if certs.is_empty() {
        anyhow::bail!("{setting} {}: no certificate found", path.display());
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
fn read_key(path: &Path, setting: &str) -> anyhow::Result<PrivateKeyDer<'static>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("{setting} {}", path.display()))?;
    rustls_pemfile::private_key(&mut std::io::BufReader::new(file))
        .with_context(|| format!("{setting} {}: not PEM", path.display()))?
        .with_context(|| format!("{setting} {}: no private key found", path.display()))
}
