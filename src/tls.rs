//! TLS with rustls: termination (ALPN h2 and http/1.1, optionally requiring
//! client certificates, with a certificate that reloads when its files
//! change), and the client side towards the upstream (a private CA, mutual
//! TLS).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use anyhow::Context;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

use crate::config::{TlsConfig, UpstreamTlsConfig};

/// Server TLS: the acceptor, and the task that reloads its certificate
/// (stopped when this is dropped).
pub struct ServerTls {
    pub acceptor: TlsAcceptor,
    reloader: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for ServerTls {
    fn drop(&mut self) {
        if let Some(task) = &self.reloader {
            task.abort();
        }
    }
}

impl ServerTls {
    /// The acceptor `tls` describes (`cert` and `key` must be set), with its
    /// reload task started when `reload_interval` is not zero. Fails naming
    /// the file that does not load.
    pub fn start(tls: &TlsConfig) -> anyhow::Result<ServerTls> {
        let (config, cert) = server_config(tls)?;
        let interval = tls.reload_interval;
        let reloader = (!interval.is_zero()).then(|| {
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    let cert = cert.clone();
                    let _ = tokio::task::spawn_blocking(move || cert.reload()).await;
                }
            })
        });
        Ok(ServerTls {
            acceptor: TlsAcceptor::from(config),
            reloader,
        })
    }
}

/// The server configuration `tls` describes, and its reloadable certificate
/// (also what `check-config` loads).
pub fn server_config(
    tls: &TlsConfig,
) -> anyhow::Result<(Arc<rustls::ServerConfig>, Arc<ReloadingCert>)> {
    let (Some(cert), Some(key)) = (&tls.cert, &tls.key) else {
        anyhow::bail!("tls.cert and tls.key are both needed to serve TLS");
    };
    let cert = Arc::new(ReloadingCert::load(cert, key)?);
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?;
    let builder = match &tls.client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            let (added, _) = roots.add_parsable_certificates(read_certs(ca, "tls.client_ca")?);
            if added == 0 {
                anyhow::bail!("tls.client_ca {}: no usable CA certificate", ca.display());
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .with_context(|| format!("tls.client_ca {}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(cert.clone());
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((Arc::new(config), cert))
}

/// The server certificate, swapped for a new pair when the files change.
///
/// The files are polled (read and compared) rather than watched with
/// inotify: cert-manager's Secret volumes replace a symlinked directory, which
/// an inotify watch on the files misses (it must watch the parent and re-arm
/// after every swap), while reading two small files every few seconds sees
/// every kind of change (in-place writes, renames, symlink swaps) the same way.
#[derive(Debug)]
pub struct ReloadingCert {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
    /// What the files held when last read (bytes, or the read error), so a
    /// bad pair is logged once, not at every poll.
    seen: Mutex<Contents>,
}

type Contents = (Result<Vec<u8>, String>, Result<Vec<u8>, String>);

impl ReloadingCert {
    fn load(cert_path: &Path, key_path: &Path) -> anyhow::Result<ReloadingCert> {
        let contents = read_pair(cert_path, key_path);
        let current = certified_key(&contents, cert_path, key_path)?;
        Ok(ReloadingCert {
            cert_path: cert_path.to_path_buf(),
            key_path: key_path.to_path_buf(),
            current: RwLock::new(Arc::new(current)),
            seen: Mutex::new(contents),
        })
    }

    /// Reads the files again and, if they changed and form a usable pair,
    /// serves the new pair from the next handshake on. A changed pair that
    /// does not load keeps the current one and logs one line. Returns
    /// whether the certificate was replaced.
    pub fn reload(&self) -> bool {
        let contents = read_pair(&self.cert_path, &self.key_path);
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if *seen == contents {
            return false;
        }
        let loaded = certified_key(&contents, &self.cert_path, &self.key_path);
        *seen = contents;
        match loaded {
            Ok(key) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(key);
                tracing::info!(cert = %self.cert_path.display(), "TLS certificate reloaded");
                true
            }
            Err(e) => {
                tracing::warn!("TLS certificate not reloaded, the current one stays: {e:#}");
                false
            }
        }
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

fn read_pair(cert: &Path, key: &Path) -> Contents {
    let read = |p: &Path| std::fs::read(p).map_err(|e| e.to_string());
    (read(cert), read(key))
}

/// The pair `contents` holds, checked to match.
fn certified_key(contents: &Contents, cert: &Path, key: &Path) -> anyhow::Result<CertifiedKey> {
    let (cert_pem, key_pem) = contents;
    let cert_pem = cert_pem
        .as_ref()
        .map_err(|e| anyhow::anyhow!("tls.cert {}: {e}", cert.display()))?;
    let key_pem = key_pem
        .as_ref()
        .map_err(|e| anyhow::anyhow!("tls.key {}: {e}", key.display()))?;
    let certs = parse_certs(cert_pem, cert, "tls.cert")?;
    let key_der = parse_key(key_pem, key, "tls.key")?;
    CertifiedKey::from_der(certs, key_der, &provider()).with_context(|| {
        format!(
            "tls.cert {} and tls.key {} do not form a usable pair",
            cert.display(),
            key.display()
        )
    })
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
    let pem = std::fs::read(path).with_context(|| format!("{setting} {}", path.display()))?;
    parse_certs(&pem, path, setting)
}

fn parse_certs(
    pem: &[u8],
    path: &Path,
    setting: &str,
) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{setting} {}: not PEM", path.display()))?;
    if certs.is_empty() {
        anyhow::bail!("{setting} {}: no certificate found", path.display());
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
fn read_key(path: &Path, setting: &str) -> anyhow::Result<PrivateKeyDer<'static>> {
    let pem = std::fs::read(path).with_context(|| format!("{setting} {}", path.display()))?;
    parse_key(&pem, path, setting)
}

fn parse_key(pem: &[u8], path: &Path, setting: &str) -> anyhow::Result<PrivateKeyDer<'static>> {
    rustls_pemfile::private_key(&mut &pem[..])
        .with_context(|| format!("{setting} {}: not PEM", path.display()))?
        .with_context(|| format!("{setting} {}: no private key found", path.display()))
}
