//! The device listener's accept loop, run as a pingora background service.
//!
//! pingora's own listener spawns one task per connection whose future also holds the
//! (TLS-capable) handshake state for the connection's whole life; measured here, that is
//! ~16 KB per idle connection, more than the whole per-session budget of an idle WebSocket
//! (≤ 16 KiB). This loop accepts on a socket fleetgate bound itself, wraps each connection in
//! pingora's L4 `Stream` (unbuffered reads, pingora's write buffer), and hands it to
//! [`DeviceApp`], which serves REST/SSE through pingora's `HttpProxy` and WebSockets through
//! fleetgate's relay. Binding the socket ourselves also makes port `0` trivial.
//!
//! With `[device_listener.tls]` each connection starts with a TLS handshake
//! ([`crate::device_tls`]) before the app sees it. Not supported on this path: pingora's
//! listening-socket hand-over on graceful upgrade (`SIGQUIT` + `-u`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::{GetSocketDigest, SocketDigest};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use crate::device_tls::LiveTls;
use crate::listener::DeviceApp;

pub struct DeviceAcceptor {
    app: Arc<DeviceApp>,
    listener: Mutex<Option<std::net::TcpListener>>,
    /// `Some`: every connection starts with a TLS handshake (`[device_listener.tls]`).
    tls: Option<Arc<LiveTls>>,
}

impl DeviceAcceptor {
    /// `listener` must already be bound and listening.
    pub fn new(
        app: Arc<DeviceApp>,
        listener: std::net::TcpListener,
        tls: Option<Arc<LiveTls>>,
    ) -> DeviceAcceptor {
        DeviceAcceptor {
            app,
            listener: Mutex::new(Some(listener)),
            tls,
        }
    }
}

fn wrap(tcp: tokio::net::TcpStream) -> L4Stream {
    use std::os::fd::AsRawFd as _;
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!(error = %e, "set_nodelay failed.");
    }
    let digest = SocketDigest::from_raw_fd(tcp.as_raw_fd());
    let mut stream = L4Stream::from(tcp);
    stream.set_socket_digest(digest);
    stream
}

/// Serves one accepted plain connection.
async fn serve_plain(app: Arc<DeviceApp>, tcp: tokio::net::TcpStream, shutdown: ShutdownWatch) {
    // `None`: the connection is finished (DeviceApp loops over keep-alive requests itself).
    let _done = app.process_new(Box::new(wrap(tcp)), &shutdown).await;
}

/// Serves one accepted connection on a TLS listener: the handshake first (a failed one
/// closes the connection: there is no HTTP to answer in), then the device app. The
/// handshake's future is boxed so that its state is freed once it is done, instead of
/// sizing the connection's task for as long as the connection lives.
async fn serve_tls(
    app: Arc<DeviceApp>,
    tls: Arc<LiveTls>,
    tcp: tokio::net::TcpStream,
    shutdown: ShutdownWatch,
) {
    let Ok(stream) = Box::pin(tls.handshake(wrap(tcp))).await else {
        return;
    };
    drop(tls);
    let _done = app.process_new(stream, &shutdown).await;
}

#[async_trait]
impl BackgroundService for DeviceAcceptor {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let std_listener = self
            .listener
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let Some(std_listener) = std_listener else {
            return;
        };
        let listener = match std_listener
            .set_nonblocking(true)
            .and_then(|()| tokio::net::TcpListener::from_std(std_listener))
        {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "Device listener unusable; not accepting.");
                return;
            }
        };
        loop {
            tokio::select! {
                r = listener.accept() => match r {
                    Ok((tcp, _)) => {
                        let (app, shutdown) = (self.app.clone(), shutdown.clone());
                        match &self.tls {
                            None => drop(tokio::spawn(serve_plain(app, tcp, shutdown))),
                            Some(tls) => {
                                drop(tokio::spawn(serve_tls(app, tls.clone(), tcp, shutdown)))
                            }
                        }
                    }
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "Accept failed on the device listener.");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                },
                r = shutdown.changed() => {
                    if r.is_err() || *shutdown.borrow() {
                        break;
                    }
                }
            }
        }
        drop(listener);
        self.app.cleanup().await;
    }
}
