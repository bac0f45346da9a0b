//! Certificate reload: when the files of `tls.cert` and `tls.key` change,
//! new handshakes present the new certificate (within 10 s with the default
//! `tls.reload_interval`), established connections go on, and a pair that
//! does not load keeps the current certificate and is logged once. Both ways
//! files change in practice: cert-manager's Secret volume (the kubelet swaps
//! a `..data` symlink to a new directory) and writes in place. Real TLS
//! clients: rustls (tokio-rustls, reqwest) and curl.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

/// A directory laid out as the kubelet lays out a Secret volume:
/// `tls.crt -> ..data/tls.crt`, `..data -> ..<version>/`.
struct SecretVolume {
    dir: tempfile::TempDir,
    version: u32,
}

impl SecretVolume {
    fn new(cert: &str, key: &str) -> SecretVolume {
        let mut v = SecretVolume {
            dir: tempfile::tempdir().expect("tempdir"),
            version: 0,
        };
        v.publish(cert, key);
        for name in ["tls.crt", "tls.key"] {
            std::os::unix::fs::symlink(format!("..data/{name}"), v.dir.path().join(name))
                .expect("symlink a file");
        }
        v
    }

    fn cert(&self) -> PathBuf {
        self.dir.path().join("tls.crt")
    }

    fn key(&self) -> PathBuf {
        self.dir.path().join("tls.key")
    }

    /// Writes a new version directory, points `..data` at it with one
    /// atomic rename, and removes the old version, as the kubelet does.
    fn publish(&mut self, cert: &str, key: &str) {
        let old = format!("..v{}", self.version);
        self.version += 1;
        let new = format!("..v{}", self.version);
        let root = self.dir.path();
        std::fs::create_dir(root.join(&new)).expect("version dir");
        std::fs::write(root.join(&new).join("tls.crt"), cert).expect("write cert");
        std::fs::write(root.join(&new).join("tls.key"), key).expect("write key");
        std::os::unix::fs::symlink(&new, root.join("..data_tmp")).expect("symlink ..data_tmp");
        std::fs::rename(root.join("..data_tmp"), root.join("..data")).expect("swap ..data");
        let _ = std::fs::remove_dir_all(root.join(old));
    }
}

/// The certificate a new rustls handshake with `addr` is shown.
async fn presented(addr: std::net::SocketAddr, ca: &Path) -> Vec<u8> {
    let s = tls_connect(addr, ca, None).await.expect("handshake");
    s.get_ref()
        .1
        .peer_certificates()
        .expect("a server certificate")[0]
        .to_vec()
}

/// Waits until new handshakes present `want`; returns how long it took.
async fn until_presented(
    addr: std::net::SocketAddr,
    ca: &Path,
    want: &[u8],
    limit: Duration,
) -> Duration {
    let started = Instant::now();
    wait_for("the new certificate on new handshakes", limit, || async {
        (presented(addr, ca).await == want).then(|| started.elapsed())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swapped_secret_volume_is_served_within_10s_without_dropping_connections() {
    let pki = TestPki::new();
    let (cert_a, key_a) = pki.server_pair("rwgate-a");
    let (cert_b, key_b) = pki.server_pair("rwgate-b");
    let mut volume = SecretVolume::new(&cert_a, &key_a);
    let up = FakeUpstream::start(Vec::new()).await;
    let mut cfg = test_config(&up.url());
    cfg.tls.cert = Some(volume.cert());
    cfg.tls.key = Some(volume.key());
    assert_eq!(
        cfg.tls.reload_interval,
        Duration::from_secs(5),
        "the default"
    );
    let gw = Gateway::start(cfg).await;
    let (der_a, der_b) = (first_cert_der(&cert_a), first_cert_der(&cert_b));

    // A keep-alive connection made before the swap.
    let get = "GET /-/healthy HTTP/1.1\r\nHost: localhost\r\n\r\n";
    let mut held = tls_connect(gw.addr, &pki.ca, None)
        .await
        .expect("handshake");
    assert_eq!(
        held.get_ref().1.peer_certificates().unwrap()[0].as_ref(),
        der_a
    );
    assert_eq!(
        tls_exchange(&mut held, get).await.expect("answer"),
        (200, "OK\n".to_string())
    );

    volume.publish(&cert_b, &key_b);
    let took = until_presented(gw.addr, &pki.ca, &der_b, Duration::from_secs(10)).await;
    eprintln!(
        "new certificate presented {:.2}s after the swap",
        took.as_secs_f64()
    );

    // The connection from before is still served, with its certificate.
    assert_eq!(
        tls_exchange(&mut held, get)
            .await
            .expect("the old connection still answers"),
        (200, "OK\n".to_string())
    );
    assert_eq!(
        held.get_ref().1.peer_certificates().unwrap()[0].as_ref(),
        der_a
    );

    // reqwest (rustls) and curl see the new one too.
    let reqwest = reqwest::Client::builder()
        .no_proxy()
        .tls_info(true)
        .resolve("localhost", gw.addr)
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(&pki.ca).unwrap()).unwrap(),
        )
        .build()
        .expect("client");
    let url = format!("https://localhost:{}/-/healthy", gw.addr.port());
    let resp = reqwest.get(&url).send().await.expect("GET");
    let info = resp
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .expect("TLS info")
        .clone();
    assert_eq!(info.peer_certificate(), Some(&der_b[..]));
    assert_eq!(resp.status(), 200);
    let (code, out, err) = curl(vec![
        "--verbose".into(),
        "--cacert".into(),
        pki.ca.display().to_string(),
        "--resolve".into(),
        format!("localhost:{}:127.0.0.1", gw.addr.port()),
        url,
    ])
    .await;
    assert_eq!((code, out.as_str()), (0, "OK\n"), "{err}");
    assert!(err.contains("subject: CN=rwgate-b"), "{err}");
    gw.stop().await;
}

/// Writes in place, and pairs that do not load, through the binary (its log
/// is what an operator reads).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_pair_keeps_the_current_certificate_and_is_logged_once() {
    let pki = TestPki::new();
    let up = FakeUpstream::start(Vec::new()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    let (cert_a, key_a) = pki.server_pair("rwgate-a");
    std::fs::write(&cert, &cert_a).expect("write");
    std::fs::write(&key, &key_a).expect("write");
    let (c, k) = (cert.display().to_string(), key.display().to_string());
    let args = [
        "--tls-cert",
        &c,
        "--tls-key",
        &k,
        "--set",
        "tls.reload_interval=100ms",
    ];
    let (rw, addr) = RwgateProcess::serve_with_metrics_listen(&up.url(), &args).await;
    assert_eq!(presented(addr, &pki.ca).await, first_cert_der(&cert_a));
    let not_reloaded = || {
        rw.child
            .log()
            .matches("TLS certificate not reloaded")
            .count()
    };

    // Rewritten in place: picked up.
    let (cert_b, key_b) = pki.server_pair("rwgate-b");
    std::fs::write(&key, &key_b).expect("write");
    std::fs::write(&cert, &cert_b).expect("write");
    let der_b = first_cert_der(&cert_b);
    until_presented(addr, &pki.ca, &der_b, Duration::from_secs(10)).await;
    let before = not_reloaded();

    // A certificate whose key is not the one in tls.key: refused, B stays,
    // one line in the log however many times the files are read again.
    let (cert_c, key_c) = pki.server_pair("rwgate-c");
    std::fs::write(&cert, &cert_c).expect("write");
    wait_for("the bad pair logged", Duration::from_secs(10), || async {
        (not_reloaded() > before).then_some(())
    })
    .await;
    // Twenty reload intervals pass.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        presented(addr, &pki.ca).await,
        der_b,
        "the current pair stays"
    );
    let log = rw.child.log();
    assert_eq!(not_reloaded(), before + 1, "{log}");
    let line = log
        .lines()
        .rfind(|l| l.contains("TLS certificate not reloaded"))
        .unwrap();
    assert!(line.contains("do not form a usable pair"), "{line}");

    // Not PEM at all: the same.
    std::fs::write(&cert, "not a certificate\n").expect("write");
    wait_for(
        "the unreadable pair logged",
        Duration::from_secs(10),
        || async { (not_reloaded() > before + 1).then_some(()) },
    )
    .await;
    assert_eq!(presented(addr, &pki.ca).await, der_b);

    // The matching pair arrives: served.
    std::fs::write(&key, &key_c).expect("write");
    std::fs::write(&cert, &cert_c).expect("write");
    until_presented(
        addr,
        &pki.ca,
        &first_cert_der(&cert_c),
        Duration::from_secs(10),
    )
    .await;
    let resp = client().get(rw.url("/-/ready")).send().await.expect("GET");
    assert_eq!(resp.status(), 200);
}
