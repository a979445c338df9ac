//! The device listener: a pingora [`ServerApp`] that reads each HTTP/1 request head itself.
//!
//! WebSocket upgrades are served by [`crate::ws`], fleetgate's own relay, instead of pingora's
//! upgrade tunnel. That tunnel loses ~0.8% of sessions right after the 101 (pingora #946),
//! cuts client-silent sessions at 60 s, resets sessions on shutdown and holds ~70 kB per idle
//! session; owning the path fixes all four. Every other request is handed, with the bytes
//! already read as a pipelined prefix (no copy), to pingora's [`HttpProxy`] running
//! [`crate::proxy::Gateway`]. HTTP/2 (ALPN `h2`) goes straight to pingora; WebSocket over
//! HTTP/2 is not supported by pingora, and clients fall back to HTTP/1.1 for it.
//!
//! The loop mirrors pingora's own HTTP/1 keep-alive loop (`apps::ServerApp` for
//! `HttpServerApp`), with the head read in front of it.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::BytesMut;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::{ALPN, Stream};
use pingora::proxy::HttpProxy;
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::proxy::Gateway;
use crate::ws::WsRelay;

/// Keep-alive idle time between requests on one connection.
const KEEPALIVE: Duration = Duration::from_secs(60);
/// Once a request has started arriving, its head must complete within this.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head accepted (pingora's own limit is larger; devices need far less).
pub const MAX_HEAD: usize = 64 * 1024;

pub struct DeviceApp {
    pub proxy: Arc<HttpProxy<Gateway>>,
    pub ws: Arc<WsRelay>,
}

/// The end of a request head (built once: building a searcher costs more than a search).
static HEAD_END: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\r\n\r\n"));

/// Outcome of reading a request head.
enum Head {
    /// A complete head (and possibly bytes after it); `websocket` when it asks for an upgrade.
    Complete { buf: BytesMut, websocket: bool },
    /// Bytes that are not a parseable head; pingora answers them (400/431).
    Unparsed(BytesMut),
    /// Connection closed, timed out idle, or shutting down.
    Closed,
}

async fn read_head(stream: &mut Stream, shutdown: &ShutdownWatch) -> Head {
    let mut buf = BytesMut::with_capacity(4096);
    let mut shutdown = shutdown.clone();
    // Wait for the first byte: idle keep-alive, ended early by shutdown. pingora's timer, not
    // tokio's: arming a tokio timer on every request wakes the worker parked on the I/O
    // driver (an eventfd write and a context switch per request at low concurrency), and
    // pingora's is armed only if the read is pending, on its own clock thread.
    let first = tokio::select! {
        r = pingora::time::fast_timeout::fast_timeout(KEEPALIVE, stream.read_buf(&mut buf)) => r,
        _ = shutdown.wait_for(|s| *s) => return Head::Closed,
    };
    match first {
        Ok(Ok(n)) if n > 0 => {}
        _ => return Head::Closed,
    }
    let deadline = tokio::time::Instant::now() + HEAD_TIMEOUT;
    loop {
        // Usually the head is all that arrived, so it ends the buffer. Any `\r\n\r\n`
        // means the head is complete; scanning past the first one only adds bytes to look
        // for the word in (a false "maybe" costs the full parse below, never a wrong answer).
        let end = if buf.ends_with(b"\r\n\r\n") {
            Some(buf.len())
        } else {
            HEAD_END.find(&buf)
        };
        if let Some(end) = end {
            // A complete head that never says "websocket" cannot be an upgrade: pingora parses
            // it anyway, so skip a full parse here (and answer it 400 if it is malformed).
            if !mentions_websocket(&buf[..end]) {
                return Head::Complete {
                    buf,
                    websocket: false,
                };
            }
        }
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => {
                let websocket = is_websocket_upgrade(&req);
                return Head::Complete { buf, websocket };
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
            _ => return Head::Unparsed(buf),
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(4096);
        }
        match tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            // The device went away mid-head: nothing to answer.
            Ok(_) => return Head::Closed,
            // A head that does not complete in time (slowloris): 408 and close, so a slow
            // device cannot hold a connection open.
            Err(_) => {
                const TIMEOUT: &[u8] =
                    b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
                if stream.write_all(TIMEOUT).await.is_ok() {
                    let _flushed = stream.flush().await;
                }
                return Head::Closed;
            }
        }
    }
}

/// Whether `head` contains `websocket` in any letter case: every upgrade request does (in its
/// `Upgrade` header), so a head without it is not one. One pass over the bytes looking for
/// `k`/`K` (rare in heads), then a look at the word around each; cheaper than a full parse.
fn mentions_websocket(head: &[u8]) -> bool {
    const WORD: &[u8] = b"websocket";
    const K: usize = 6; // WORD[K] == b'k'
    memchr::memchr2_iter(b'k', b'K', head).any(|i| {
        i.checked_sub(K)
            .and_then(|start| head.get(start..start + WORD.len()))
            .is_some_and(|w| w.eq_ignore_ascii_case(WORD))
    })
}

/// True when a parsed head is a WebSocket upgrade request (`GET` + `Upgrade: websocket`).
fn is_websocket_upgrade(req: &httparse::Request<'_, '_>) -> bool {
    req.method == Some("GET")
        && req.headers.iter().any(|h| {
            h.name.eq_ignore_ascii_case("upgrade")
                && std::str::from_utf8(h.value).is_ok_and(|v| {
                    v.split(',')
                        .any(|p| p.trim().eq_ignore_ascii_case("websocket"))
                })
        })
}

#[async_trait]
impl ServerApp for DeviceApp {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            return self.proxy.process_new(stream, shutdown).await;
        }
        let cert_device = crate::device_tls::connection_cert_device(&stream);
        let mut stream = stream;
        let mut persistent: Option<HttpPersistentSettings> = None;
        loop {
            let prefix = match read_head(&mut stream, shutdown).await {
                Head::Complete {
                    buf,
                    websocket: true,
                } => {
                    self.ws.serve(stream, buf).await;
                    return None;
                }
                Head::Complete { buf, .. } | Head::Unparsed(buf) => buf,
                Head::Closed => return None,
            };
            let mut session = ServerSession::new_http1(stream);
            // Draining closes keep-alive connections in `proxy::Gateway::request_filter`:
            // pingora re-decides keep-alive from the request's headers when it reads them,
            // so turning it off here, before that, would not hold.
            session.set_keepalive(Some(KEEPALIVE.as_secs()));
            if let Some(p) = persistent.take() {
                p.apply_to_session(&mut session);
            }
            // The certificate's device (device TLS with `bind_device`) for this request:
            // pingora delivers it to `Gateway::on_connection_reuse`.
            if let Some(cert) = cert_device.clone()
                && let ServerSession::H1(h1) = &mut session
            {
                h1.set_connection_user_context(Some(Box::new(cert)));
            }
            session.set_pipelined_prefix(prefix);
            let reused = self.proxy.process_new_http(session, shutdown).await?;
            let (s, p) = reused.consume();
            stream = s;
            persistent = p;
        }
    }

    async fn cleanup(&self) {
        self.proxy.http_cleanup().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upgrade(head: &[u8]) -> bool {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        assert!(matches!(req.parse(head), Ok(httparse::Status::Complete(_))));
        is_websocket_upgrade(&req)
    }

    #[test]
    fn detects_websocket_upgrades_only() {
        assert!(upgrade(
            b"GET /v1/chat?bot_id=1 HTTP/1.1\r\nHost: x\r\nUpgrade: WebSocket\r\nConnection: Upgrade\r\n\r\n"
        ));
        assert!(upgrade(
            b"GET /v1/chat HTTP/1.1\r\nUpgrade: h2c, websocket\r\n\r\n"
        ));
        assert!(!upgrade(
            b"POST /v1/chat HTTP/1.1\r\nUpgrade: websocket\r\n\r\n"
        ));
        assert!(!upgrade(b"GET /v3/chat HTTP/1.1\r\nHost: x\r\n\r\n"));
    }

    #[test]
    fn finds_websocket_in_any_case_and_nothing_else() {
        for (text, mentions) in [
            (&b"Upgrade: websocket"[..], true),
            (b"upgrade: WebSocket\r\n", true),
            (b"websocket", true),
            (b"xWEBSOCKETx", true),
            (b"k websocKet", true),
            (b"", false),
            (b"k", false),
            (b"ebsocket", false),
            (b"websocke", false),
            (b"web socket", false),
            (b"Connection: keep-alive", false),
        ] {
            let shown = String::from_utf8_lossy(text);
            assert_eq!(mentions_websocket(text), mentions, "{shown}");
        }
    }

    /// `word` with the letters whose flag is set in upper case.
    fn mixed_case(word: &str, upper: &[bool]) -> String {
        word.chars()
            .zip(upper.iter().chain(std::iter::repeat(&false)))
            .map(|(c, up)| if *up { c.to_ascii_uppercase() } else { c })
            .collect()
    }

    proptest::proptest! {
        /// The pre-filter never hides an upgrade: a complete head it lets through as "not
        /// websocket" is never one by the full parse, whatever the case of the word and
        /// wherever it sits.
        #[test]
        fn the_filter_never_hides_an_upgrade(
            method in proptest::sample::select(vec!["GET", "POST", "get"]),
            names in proptest::collection::vec("[A-Za-z-]{1,12}", 0..6),
            values in proptest::collection::vec("[ -~]{0,24}", 0..6),
            upgrade_at in proptest::option::of(0usize..6),
            word_case in proptest::collection::vec(proptest::bool::ANY, 9),
            name_case in proptest::collection::vec(proptest::bool::ANY, 7),
        ) {
            let word = mixed_case("websocket", &word_case);
            let upgrade_name = mixed_case("upgrade", &name_case);
            let mut head = format!("{method} /v1/chat HTTP/1.1\r\n");
            for (i, (n, v)) in names.iter().zip(&values).enumerate() {
                if upgrade_at == Some(i) {
                    head.push_str(&format!("{upgrade_name}: h2c, {word}\r\n"));
                }
                head.push_str(&format!("{n}: {}\r\n", v.trim()));
            }
            if upgrade_at.is_some_and(|i| i >= names.len().min(values.len())) {
                head.push_str(&format!("{upgrade_name}: {word}\r\n"));
            }
            head.push_str("\r\n");
            let bytes = head.as_bytes();
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut req = httparse::Request::new(&mut headers);
            if let Ok(httparse::Status::Complete(_)) = req.parse(bytes) {
                if is_websocket_upgrade(&req) {
                    proptest::prop_assert!(mentions_websocket(bytes));
                }
                proptest::prop_assert_eq!(
                    is_websocket_upgrade(&req),
                    upgrade_at.is_some() && method == "GET"
                );
            }
        }
    }

    /// A complete head without the word is classified without a parse; one with it is parsed.
    #[tokio::test]
    async fn plain_heads_skip_the_parse_and_upgrades_do_not() {
        use tokio::io::AsyncWriteExt;
        for (head, websocket) in [
            (
                &b"GET /v1/audio/voices HTTP/1.1\r\nHost: x\r\n\r\n"[..],
                false,
            ),
            // Mentions the word but is no upgrade (not an Upgrade header): parsed, then no.
            (b"GET /v1/chat HTTP/1.1\r\nX-Note: websocket\r\n\r\n", false),
            (b"GET /v1/chat HTTP/1.1\r\nUpgrade: WEBSOCKET\r\n\r\n", true),
        ] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let client = tokio::spawn(async move {
                let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
                c.write_all(head).await.unwrap();
                c
            });
            let (s, _) = listener.accept().await.unwrap();
            let mut stream: Stream = Box::new(pingora::protocols::l4::stream::Stream::from(s));
            let (_tx, rx) = tokio::sync::watch::channel(false);
            match read_head(&mut stream, &rx).await {
                Head::Complete { buf, websocket: w } => {
                    assert_eq!(w, websocket, "{}", String::from_utf8_lossy(head));
                    assert_eq!(&buf[..], head);
                }
                _ => panic!("head not read"),
            }
            drop(client.await.unwrap());
        }
    }

    /// A head that arrives in pieces is read whole, with the bytes after it, and classified.
    #[tokio::test]
    async fn reads_split_heads_whole() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let head = b"GET /v1/chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\nEXTRA";
        let client = tokio::spawn(async move {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            for part in head.chunks(7) {
                c.write_all(part).await.unwrap();
                c.flush().await.unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            c
        });
        let (s, _) = listener.accept().await.unwrap();
        let mut stream: Stream = Box::new(pingora::protocols::l4::stream::Stream::from(s));
        let (_tx, rx) = tokio::sync::watch::channel(false);
        match read_head(&mut stream, &rx).await {
            Head::Complete { buf, websocket } => {
                assert!(websocket);
                // The whole head, and whatever of the bytes after it came with its last piece.
                let end = head.len() - "EXTRA".len();
                assert!(buf.len() >= end && head.starts_with(&buf), "{buf:?}");
            }
            _ => panic!("head not read whole"),
        }
        drop(client.await.unwrap());
    }
}
