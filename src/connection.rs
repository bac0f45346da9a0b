//! Connections below HTTP: the accept loop every listener runs, the wait for
//! a first byte, the TLS handshake, and the count of the rejections hyper
//! answers by itself (400, 414, 431, header timeout), which never reach
//! routing.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use crate::telemetry as t;

/// How a listener's connections are served.
#[derive(Clone)]
pub struct Serving {
    builder: auto::Builder<TokioExecutor>,
    tls: Option<TlsAcceptor>,
    header_timeout: Duration,
}

impl Serving {
    /// HTTP/1.1 and h2 (h2c without TLS), TLS when `tls` is given; a
    /// connection must send its first byte, finish its TLS handshake and
    /// each request head within `header_timeout`.
    pub fn new(tls: Option<TlsAcceptor>, header_timeout: Duration) -> Serving {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .keep_alive(true);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(256)
            // Dead h2 peers are found by pings rather than kept forever.
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(20));
        Serving {
            builder,
            tls,
            header_timeout,
        }
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }
}

/// A listener's service: answers every request with a whole body and never
/// fails (errors are responses).
pub trait Handler:
    hyper::service::Service<
        Request<Incoming>,
        Response = Response<Full<Bytes>>,
        Error = Infallible,
        Future = Self::Answer,
    > + Send
    + 'static
{
    type Answer: Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static;
}

impl<S, A> Handler for S
where
    S: hyper::service::Service<
            Request<Incoming>,
            Response = Response<Full<Bytes>>,
            Error = Infallible,
            Future = A,
        > + Send
        + 'static,
    A: Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static,
{
    type Answer = A;
}

/// Accepts on `listener` until `stop` completes, serving each connection on
/// its own task with the service `make(peer)` builds. At most
/// `connections.available_permits()` connections are open at once; beyond
/// that, new ones wait in the kernel's backlog instead of using up fds.
/// Connections are watched by `graceful`, which the caller drains.
pub async fn accept_loop<F, S>(
    listener: &TcpListener,
    serving: &Serving,
    connections: Arc<Semaphore>,
    graceful: &GracefulShutdown,
    make: F,
    stop: impl Future<Output = ()>,
) where
    F: Fn(SocketAddr) -> S,
    S: Handler,
{
    tokio::pin!(stop);
    loop {
        let permit = tokio::select! {
            p = connections.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            () = &mut stop => return,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Usually EMFILE: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stop => return,
        };
        let _ = stream.set_nodelay(true);
        let service = make(peer);
        let serving = serving.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _permit = permit;
            serving.serve(stream, peer, service, watcher).await;
        });
    }
}

impl Serving {
    async fn serve(
        self,
        stream: TcpStream,
        peer: SocketAddr,
        service: impl Handler,
        watcher: hyper_util::server::graceful::Watcher,
    ) {
        // A client that connects and sends nothing must not hold the
        // connection: hyper's header timeout starts only once the protocol
        // is known.
        let mut first = [0u8; 1];
        match tokio::time::timeout(self.header_timeout, stream.peek(&mut first)).await {
            Ok(Ok(n)) if n > 0 => {}
            Ok(_) => return,
            Err(_) => return rejected(Rejection::HeaderTimeout),
        }
        let head_started = Arc::new(AtomicBool::new(false));
        let served = match self.tls {
            None => {
                let io = TokioIo::new(Watched::new(stream, head_started.clone()));
                let conn = self.builder.serve_connection(io, service);
                watcher.watch(conn.into_owned()).await
            }
            Some(acceptor) => {
                let tls = match tokio::time::timeout(self.header_timeout, acceptor.accept(stream))
                    .await
                {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return rejected(Rejection::TlsHandshake);
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return rejected(Rejection::TlsHandshake);
                    }
                };
                let io = TokioIo::new(Watched::new(tls, head_started.clone()));
                let conn = self.builder.serve_connection(io, service);
                watcher.watch(conn.into_owned()).await
            }
        };
        if let Err(e) = served {
            tracing::debug!(%peer, error = %e, "connection ended with an error");
            if let Some(r) = Rejection::of(&*e, head_started.load(Ordering::Relaxed)) {
                rejected(r);
            }
        }
    }
}

/// Why a connection was refused before any request reached routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rejection {
    /// 400 from hyper: a request head that does not parse.
    Malformed,
    /// 431 from hyper: the head is over hyper's buffer or has over 100 headers.
    HeadersTooLarge,
    /// 414 from hyper: a URI of 64 KiB or more.
    UriTooLong,
    /// No first byte, or no complete request head, within
    /// `limits.header_read_timeout` (the connection is closed, no answer).
    HeaderTimeout,
    /// The TLS handshake failed (e.g. no client certificate signed by
    /// `tls.client_ca`) or did not finish within `limits.header_read_timeout`.
    TlsHandshake,
}

impl Rejection {
    fn label(self) -> &'static str {
        match self {
            Rejection::Malformed => "malformed",
            Rejection::HeadersTooLarge => "headers_too_large",
            Rejection::UriTooLong => "uri_too_long",
            Rejection::HeaderTimeout => "header_timeout",
            Rejection::TlsHandshake => "tls_handshake",
        }
    }

    /// The rejection a connection's error stands for, if any. A header
    /// timeout counts only when a request head had begun: hyper's timer also
    /// closes idle keep-alive connections, which is no rejection.
    fn of(err: &(dyn std::error::Error + 'static), head_started: bool) -> Option<Rejection> {
        let e = err.downcast_ref::<hyper::Error>()?;
        if e.is_timeout() {
            return head_started.then_some(Rejection::HeaderTimeout);
        }
        if e.is_parse_too_large() {
            // hyper has no predicate that tells 414 from 431; its message does.
            return Some(if e.to_string() == "URI too long" {
                Rejection::UriTooLong
            } else {
                Rejection::HeadersTooLarge
            });
        }
        e.is_parse().then_some(Rejection::Malformed)
    }
}

fn rejected(r: Rejection) {
    metrics::counter!(t::CONNECTIONS_REJECTED, "reason" => r.label()).increment(1);
}

/// A connection's byte stream that records whether a request head has begun:
/// set when bytes arrive, cleared when an answer is written.
struct Watched<S> {
    inner: S,
    head_started: Arc<AtomicBool>,
}

impl<S> Watched<S> {
    fn new(inner: S, head_started: Arc<AtomicBool>) -> Self {
        Watched {
            inner,
            head_started,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.head_started.store(true, Ordering::Relaxed);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.head_started.store(false, Ordering::Relaxed);
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.head_started.store(false, Ordering::Relaxed);
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
