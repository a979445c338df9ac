//! The upstream side of a WebSocket session: TCP (+TLS) connect and the HTTP/1.1 upgrade
//! handshake, written and read by hand so that bytes arriving right after the 101 are kept.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls;

use crate::config::UpstreamSettings;
use crate::upstream::ResolvedUpstream;
use crate::upstream_auth::Authorization;

/// Plain or TLS upstream connection.
pub enum UpstreamIo {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A TLS client trusting the platform's CA store (honouring `SSL_CERT_FILE`/`SSL_CERT_DIR`,
/// like pingora's REST connector) plus the Mozilla root set (webpki-roots), ring provider.
pub fn tls_connector() -> TlsConnector {
    TlsConnector::from(tls_client_config())
}

/// The rustls client configuration shared by the WebSocket relay and the upstream token
/// client (see [`tls_connector`]).
pub fn tls_client_config() -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    match rustls_native_certs::load_native_certs() {
        Ok(certs) => {
            let (added, ignored) = roots.add_parsable_certificates(certs);
            tracing::debug!(
                added,
                ignored,
                "Loaded platform CA certificates for WebSocket upstreams."
            );
        }
        Err(e) => {
            tracing::warn!(error = %e, "Platform CA store unavailable; using the Mozilla roots only.")
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map(|b| b.with_root_certificates(roots).with_no_client_auth())
        .unwrap_or_else(|_| {
            // The ring provider supports the default versions; this branch is unreachable in
            // practice, and an empty-root config would fail closed anyway.
            rustls::ClientConfig::builder()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth()
        });
    Arc::new(config)
}

/// The upstream's answer to the upgrade request.
pub struct Handshaken {
    pub io: UpstreamIo,
    pub status: u16,
    /// The response head as received.
    pub head: Vec<u8>,
    /// Bytes after the head (early frames after a 101, or the start of an error body).
    pub rest: Vec<u8>,
    pub content_length: Option<usize>,
}

/// Headers never forwarded from the device's handshake: hop-by-hop ones, ones the relay sets
/// itself, device credentials, and `Sec-WebSocket-Extensions` (no compression, see module doc).
const DROP: &[&str] = &[
    "host",
    "connection",
    "upgrade",
    "authorization",
    "x-coze-deviceinfo",
    "sec-websocket-extensions",
    "content-length",
    "transfer-encoding",
    "keep-alive",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
];

fn handshake_request(
    authority: &str,
    path: &str,
    query: &str,
    headers: &[(String, Vec<u8>)],
    auth: &Authorization,
    device: &str,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(1024);
    out.extend_from_slice(b"GET ");
    out.extend_from_slice(path.as_bytes());
    if !query.is_empty() {
        out.push(b'?');
        out.extend_from_slice(query.as_bytes());
    }
    out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    out.extend_from_slice(authority.as_bytes());
    out.extend_from_slice(b"\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n");
    for (k, v) in headers {
        if DROP.contains(&k.as_str()) {
            continue;
        }
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"Authorization: ");
    out.extend_from_slice(auth.header.as_bytes());
    out.extend_from_slice(b"\r\n");
    if auth.device_info_header {
        out.extend_from_slice(b"X-Coze-DeviceInfo: ");
        out.extend_from_slice(crate::proxy::upstream::device_info_header(device).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Connects, sends the upgrade request and reads the response head.
/// What the upgrade request to the upstream carries.
pub struct UpgradeRequest<'a> {
    pub path: &'a str,
    /// The device's query, `authorization` already removed.
    pub query: &'a str,
    pub headers: &'a [(String, Vec<u8>)],
    pub auth: &'a Authorization,
    pub device: &'a str,
}

pub async fn connect_and_handshake(
    up: &ResolvedUpstream,
    tls: &TlsConnector,
    settings: &UpstreamSettings,
    r: UpgradeRequest<'_>,
) -> io::Result<Handshaken> {
    let tcp = tokio::time::timeout(settings.connect_timeout, TcpStream::connect(up.addr()))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    tcp.set_nodelay(true)?;
    let mut io = if up.target.tls {
        let name = rustls::pki_types::ServerName::try_from(up.target.host.clone())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        UpstreamIo::Tls(Box::new(tls.connect(name, tcp).await?))
    } else {
        UpstreamIo::Plain(tcp)
    };
    let req = handshake_request(
        &up.target.authority(),
        r.path,
        r.query,
        r.headers,
        r.auth,
        r.device,
    );
    io.write_all(&req).await?;
    io.flush().await?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = vec![0u8; 2048]; // heap: a stack array would live in the session future for hours
    loop {
        let n = io.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "upstream closed during handshake",
            ));
        }
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
        let mut hs = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut hs);
        match resp.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let status = resp.code.unwrap_or(0);
                let content_length = resp
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| std::str::from_utf8(h.value).ok())
                    .and_then(|v| v.trim().parse().ok());
                let rest = buf.split_off(len);
                return Ok(Handshaken {
                    io,
                    status,
                    head: buf,
                    rest,
                    content_length,
                });
            }
            Ok(httparse::Status::Partial) if buf.len() < 64 * 1024 => continue,
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "bad upstream handshake response",
                ));
            }
        }
    }
}

/// The upstream's response head as the device should see it: `X-Tt-Logid` added when absent,
/// `Sec-WebSocket-Extensions` removed, and `Connection: close` for non-101 answers.
pub fn response_head_for_device(head: &[u8], logid: &str) -> Vec<u8> {
    let mut hs = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut hs);
    if !matches!(resp.parse(head), Ok(httparse::Status::Complete(_))) {
        return head.to_vec();
    }
    let code = resp.code.unwrap_or(502);
    let reason = resp.reason.unwrap_or("");
    let mut out = format!("HTTP/1.1 {code} {reason}\r\n").into_bytes();
    let mut has_logid = false;
    for h in resp.headers.iter() {
        let name = h.name.to_ascii_lowercase();
        if name == "sec-websocket-extensions" || (code != 101 && name == "connection") {
            continue;
        }
        has_logid |= name == "x-tt-logid";
        out.extend_from_slice(h.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    if !has_logid {
        out.extend_from_slice(b"X-Tt-Logid: ");
        out.extend_from_slice(logid.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if code != 101 {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}
