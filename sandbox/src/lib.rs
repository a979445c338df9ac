//! A Coze-compatible upstream ("sandbox") for fleetgate's tests, benches and for firmware
//! development without a Coze account.
//!
//! It speaks the wire contract of `shared/coze-api.md`: the OAuth JWT token endpoint, chat v3
//! (JSON and SSE), workflows, conversations/messages/files, audio REST, the three WebSocket
//! APIs and the commerce (quota/benefit) APIs, with Coze's envelope and `X-Tt-Logid` on every
//! answer.
//!
//! # What it is not
//! Not a model: replies are deterministic text derived from a seed and the input. Not durable:
//! all state is in memory and dies with the process.
//!
//! # Fault injection
//! See [`faults`] for the per-request knobs (`X-Sandbox-Fault` header or `sandbox_fault` query)
//! and [`SandboxHandle::switches`] for per-server switches.

pub mod audio;
pub mod auth;
pub mod chat;
pub mod commerce;
pub mod conversations;
pub mod envelope;
pub mod faults;
pub mod files;
pub mod oauth;
pub mod sse;
pub mod state;
pub mod workflows;
pub mod ws;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use state::{AppKey, MintedToken, SandboxState, Switches};

/// How the sandbox behaves. `Default` gives a fast, deterministic server with one PAT.
#[derive(Clone, Debug)]
pub struct SandboxConfig {
    /// Address to bind; `127.0.0.1:0` picks a free port.
    pub bind: SocketAddr,
    /// OAuth apps whose public keys verify JWT assertions at the token endpoint.
    pub app_keys: Vec<AppKey>,
    /// Static PAT-style tokens that are always valid.
    pub pats: Vec<String>,
    /// Accepted JWT `aud` values besides the server's own `host:port`.
    pub audiences: Vec<String>,
    /// Seed for deterministic replies.
    pub seed: u64,
    /// Delay between SSE events of chat and workflow streams.
    pub sse_event_delay: Duration,
    /// Number of `conversation.message.delta` events in a chat stream.
    pub chat_deltas: usize,
    /// Pace audio frames in real time on the WebSocket APIs (false: as fast as possible).
    pub realtime_audio: bool,
    /// Serve HTTPS/WSS with this certificate instead of plain HTTP/WS.
    pub tls: Option<SandboxTls>,
    /// Plan QPS reported by `GET /v1/commerce/benefit/benefits/get` for `api_run_qps`.
    pub plan_qps: u32,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            app_keys: Vec::new(),
            pats: vec!["pat_sandbox".to_owned()],
            audiences: vec!["api.coze.cn".to_owned(), "api.coze.com".to_owned()],
            seed: 7,
            sse_event_delay: Duration::from_millis(0),
            chat_deltas: 4,
            realtime_audio: true,
            tls: None,
            plan_qps: 500,
        }
    }
}

/// A PEM certificate chain and PKCS#8/PKCS#1/SEC1 private key for serving TLS.
#[derive(Clone)]
pub struct SandboxTls {
    pub cert_chain_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for SandboxTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SandboxTls { <redacted> }")
    }
}

fn tls_acceptor(tls: &SandboxTls) -> std::io::Result<tokio_rustls::TlsAcceptor> {
    use tokio_rustls::rustls::{self, pki_types::pem::PemObject as _};
    let bad = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, e);
    let certs = rustls::pki_types::CertificateDer::pem_slice_iter(tls.cert_chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("certificate: {e}")))?;
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(tls.key_pem.as_bytes())
        .map_err(|e| bad(format!("private key: {e}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| bad(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Serves one HTTP/1.1 connection (plain or TLS) with title-cased header names.
async fn serve_connection<I>(io: I, app: Router)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper_util::service::TowerToHyperService::new(app);
    let conn = hyper::server::conn::http1::Builder::new()
        .title_case_headers(true)
        .serve_connection(hyper_util::rt::TokioIo::new(io), svc)
        .with_upgrades();
    if let Err(e) = conn.await {
        tracing::debug!(error = %e, "Sandbox connection ended with an error.");
    }
}

/// A running sandbox. Dropping the handle does not stop the server; call [`SandboxHandle::shutdown`].
pub struct SandboxHandle {
    pub addr: SocketAddr,
    pub state: Arc<SandboxState>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl SandboxHandle {
    /// `http://127.0.0.1:PORT` (`https://` when serving TLS)
    pub fn base_url(&self) -> String {
        let tls = self.state.config.tls.is_some();
        format!("{}://{}", if tls { "https" } else { "http" }, self.addr)
    }
    /// `ws://127.0.0.1:PORT` (`wss://` when serving TLS)
    pub fn ws_url(&self) -> String {
        let tls = self.state.config.tls.is_some();
        format!("{}://{}", if tls { "wss" } else { "ws" }, self.addr)
    }
    /// Per-server fault switches (token endpoint down, limitations API down, ...).
    pub fn switches(&self) -> &Switches {
        &self.state.switches
    }
    /// Stops accepting and waits for the server task.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        if let Err(e) = self.task.await {
            tracing::warn!(error = %e, "Sandbox task ended abnormally.");
        }
    }
}

/// All routes of the sandbox.
pub fn router(state: Arc<SandboxState>) -> Router {
    Router::new()
        .merge(oauth::routes())
        .merge(chat::routes())
        .merge(workflows::routes())
        .merge(conversations::routes())
        .merge(files::routes())
        .merge(audio::routes())
        .merge(commerce::routes())
        .merge(ws::routes())
        .merge(state::control_routes())
        .fallback(envelope::not_found)
        .with_state(state)
}

/// Resolves once a stop is requested or the sender is gone.
async fn stop_requested(rx: &mut watch::Receiver<bool>) {
    loop {
        let stop = *rx.borrow_and_update();
        if stop || rx.changed().await.is_err() {
            return;
        }
    }
}

/// Binds and serves the sandbox in the background.
///
/// Served with hyper directly (not `axum::serve`) so response header names are title-cased
/// on the wire (`X-Tt-Logid`) like Coze's: coze-js looks the log id up case-sensitively.
pub async fn start(config: SandboxConfig) -> std::io::Result<SandboxHandle> {
    let acceptor = config.tls.as_ref().map(tls_acceptor).transpose()?;
    let listener = TcpListener::bind(config.bind).await?;
    let addr = listener.local_addr()?;
    let state = Arc::new(SandboxState::new(config, addr));
    let app = router(state.clone());
    let (stop, mut stopped) = watch::channel(false);
    let task = tokio::spawn(async move {
        loop {
            let (tcp, _) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors and the like: back off, keep serving.
                        tracing::warn!(error = %e, "Sandbox accept failed.");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                // Either a stop signal or the sender being dropped ends the server.
                _ = stop_requested(&mut stopped) => break,
            };
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "set_nodelay failed.");
            }
            let app = app.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                match acceptor {
                    None => serve_connection(tcp, app).await,
                    Some(a) => match a.accept(tcp).await {
                        Ok(tls) => serve_connection(tls, app).await,
                        Err(e) => tracing::debug!(error = %e, "Sandbox TLS handshake failed."),
                    },
                }
            });
        }
    });
    Ok(SandboxHandle {
        addr,
        state,
        stop,
        task,
    })
}
