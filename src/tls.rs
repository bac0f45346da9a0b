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
    CertifiedKey::from_der(certs, key_der, &provider())
        .map_err(|e| unusable_pair("tls", cert, key, &e))
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
            .map_err(|e| unusable_pair("upstream.tls", cert, key, &e))?,
        _ => builder.with_no_client_auth(),
    })
}

/// A certificate and key (settings `{prefix}.cert`, `{prefix}.key`) that
/// rustls refused together, with both files named.
fn unusable_pair(prefix: &str, cert: &Path, key: &Path, e: &rustls::Error) -> anyhow::Error {
    anyhow::anyhow!(
        "{prefix}.cert {} and {prefix}.key {} do not form a usable pair: {}",
        cert.display(),
        key.display(),
        describe(e)
    )
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

/// A rustls error in words, for a log line or a start-up error. rustls'
/// own messages print its enums in Rust syntax (`received corrupt message
/// of type InvalidContentType`, `invalid peer certificate:
/// Other(OtherError(CaUsedAsEndEntity))`), so the cases an operator meets
/// (a wrong CA, a plain-HTTP port, a certificate for another name, a key
/// that is not the certificate's) are written out here; the rest say what
/// failed without the variant's name.
pub fn describe(e: &rustls::Error) -> String {
    use rustls::{AlertDescription as A, Error as E, InvalidMessage as M};
    match e {
        E::InvalidCertificate(c) => certificate(c),
        E::InvalidMessage(M::InvalidContentType | M::UnknownProtocolVersion)
        | E::PeerSentOversizedRecord => {
            "the server did not speak TLS (is it plain HTTP? then use http://)".into()
        }
        E::InvalidMessage(_) | E::InappropriateMessage { .. } | E::InappropriateHandshakeMessage { .. } => {
            "the server sent a TLS message rwgate cannot use".into()
        }
        E::AlertReceived(A::CertificateRequired) => {
            "the server requires a client certificate".into()
        }
        E::AlertReceived(
            A::BadCertificate | A::UnsupportedCertificate | A::CertificateUnknown | A::UnknownCA
            | A::CertificateExpired | A::CertificateRevoked | A::AccessDenied,
        ) => "the server refused the client certificate".into(),
        E::AlertReceived(A::ProtocolVersion) => {
            "the server speaks neither TLS 1.2 nor TLS 1.3".into()
        }
        E::AlertReceived(A::HandshakeFailure) => {
            "the server refused the TLS handshake (no protocol version or cipher suite in common, or it wants a client certificate)".into()
        }
        E::AlertReceived(alert) => {
            format!("the server ended the TLS handshake (TLS alert {})", u8::from(*alert))
        }
        E::PeerIncompatible(_) => {
            "the server offers no TLS version or cipher suite in common with rwgate".into()
        }
        E::PeerMisbehaved(_) => "the server broke the TLS protocol".into(),
        E::NoCertificatesPresented => "the server presented no certificate".into(),
        E::NoApplicationProtocol => {
            "the server speaks neither HTTP/2 nor HTTP/1.1 over TLS (ALPN)".into()
        }
        E::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
            "the private key is not the certificate's (the first certificate of the file must be the one the key signs for)".into()
        }
        E::InconsistentKeys(_) => {
            "cannot check that the private key is the certificate's (unsupported key type)".into()
        }
        E::General(text) => text.clone(),
        E::DecryptError | E::EncryptError => "TLS encryption failed".into(),
        _ => "the TLS handshake failed".into(),
    }
}

/// Why the server's certificate was refused.
fn certificate(c: &rustls::CertificateError) -> String {
    use rustls::CertificateError as C;
    let what = match c {
        C::BadEncoding => "is malformed",
        C::Expired | C::ExpiredContext { .. } => "has expired",
        C::NotValidYet | C::NotValidYetContext { .. } => "is not valid yet",
        C::Revoked => "is revoked",
        C::UnknownIssuer => "is not signed by a CA rwgate trusts",
        C::BadSignature => "has a signature that does not verify",
        C::NotValidForName => "is not valid for the host name of the URL",
        C::NotValidForNameContext {
            expected,
            presented,
        } => {
            // webpki lists the names in Rust syntax (`DnsName("a.example")`).
            let bare = |n: &String| {
                let inner = match (n.find('('), n.rfind(')')) {
                    (Some(open), Some(close)) if open < close => &n[open + 1..close],
                    _ => n.as_str(),
                };
                inner.trim_matches('"').to_string()
            };
            let names = match presented.as_slice() {
                [] => "no name".to_string(),
                names => names.iter().map(bare).collect::<Vec<_>>().join(", "),
            };
            return format!(
                "the server's certificate is not valid for {} (it is for {names})",
                expected.to_str()
            );
        }
        C::InvalidPurpose | C::InvalidPurposeContext { .. } => {
            "is not meant for a TLS server (extended key usage)"
        }
        C::Other(other) => match other.0.downcast_ref::<webpki::Error>() {
            Some(webpki::Error::CaUsedAsEndEntity) => {
                "is a CA certificate, not a server certificate"
            }
            Some(webpki::Error::EndEntityUsedAsCa) => "chain uses a server certificate as a CA",
            Some(webpki::Error::UnsupportedCertVersion) => "is not an X.509 v3 certificate",
            Some(
                webpki::Error::PathLenConstraintViolated
                | webpki::Error::MaximumPathDepthExceeded
                | webpki::Error::NameConstraintViolation,
            ) => "chain breaks its CA's constraints",
            _ => "was refused",
        },
        _ => "was refused",
    };
    format!("the server's certificate {what}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What an operator meets is said in words, not in rustls' enum names.
    #[test]
    fn tls_errors_are_described_in_words() {
        use rustls::{CertificateError as C, Error as E};
        let other = |e: webpki::Error| rustls::OtherError(Arc::new(e));
        for (e, words) in [
            (
                E::InvalidMessage(rustls::InvalidMessage::InvalidContentType),
                "the server did not speak TLS (is it plain HTTP? then use http://)",
            ),
            (
                E::InvalidCertificate(C::Other(other(webpki::Error::CaUsedAsEndEntity))),
                "the server's certificate is a CA certificate, not a server certificate",
            ),
            (
                E::InvalidCertificate(C::UnknownIssuer),
                "the server's certificate is not signed by a CA rwgate trusts",
            ),
            (
                E::InvalidCertificate(C::NotValidForNameContext {
                    expected: rustls::pki_types::ServerName::try_from("thanos.example")
                        .unwrap()
                        .to_owned(),
                    presented: vec!["DnsName(\"other.example\")".into()],
                }),
                "the server's certificate is not valid for thanos.example (it is for other.example)",
            ),
            (
                E::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch),
                "the private key is not the certificate's (the first certificate of the file must be the one the key signs for)",
            ),
            (
                E::AlertReceived(rustls::AlertDescription::CertificateRequired),
                "the server requires a client certificate",
            ),
            (
                E::AlertReceived(rustls::AlertDescription::DecodeError),
                "the server ended the TLS handshake (TLS alert 50)",
            ),
        ] {
            assert_eq!(describe(&e), words, "{e:?}");
        }
    }

    /// A key that is not the certificate's is refused in words, naming
    /// both files, for the listener and for the upstream's client pair.
    #[test]
    fn a_mismatched_pair_names_both_files() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let cert_path = dir.path().join("tls.crt");
        let key_path = dir.path().join("other.key");
        std::fs::write(&cert_path, cert.pem()).unwrap();
        let other = rcgen::KeyPair::generate().unwrap();
        std::fs::write(&key_path, other.serialize_pem()).unwrap();
        let server = TlsConfig {
            cert: Some(cert_path.clone()),
            key: Some(key_path.clone()),
            ..TlsConfig::default()
        };
        let upstream = UpstreamTlsConfig {
            cert: Some(cert_path.clone()),
            key: Some(key_path.clone()),
            ..UpstreamTlsConfig::default()
        };
        for (prefix, e) in [
            ("tls", server_config(&server).err().unwrap()),
            ("upstream.tls", client_config(&upstream).err().unwrap()),
        ] {
            assert_eq!(
                format!("{e:#}"),
                format!(
                    "{prefix}.cert {} and {prefix}.key {} do not form a usable pair: the private \
                     key is not the certificate's (the first certificate of the file must be the \
                     one the key signs for)",
                    cert_path.display(),
                    key_path.display()
                )
            );
        }
    }
}
