//! TLS, and optionally mutual TLS, for devices: terminated by the gateway on the device
//! listener (`[device_listener.tls]`).
//!
//! The accept loop ([`crate::accept`]) runs the handshake before anything else, bounded by
//! `handshake_timeout`, with tokio-rustls. The result, [`DeviceTlsStream`], implements
//! pingora's `IO`, so the device listener serves it exactly like a plain connection (REST and
//! SSE through pingora, WebSockets through fleetgate's relay). It is fleetgate's own type, not
//! pingora's `TlsStream`: that one keeps room for the handshake futures for the connection's
//! whole life (4,728 bytes against ~1,600: ~3 KB per idle connection, "Session 11" in
//! `benches/RESULTS.md`). ALPN offers `http/1.1` only.
//!
//! Client certificates (`client_auth = "optional" | "required"`) are verified against
//! `client_ca_file` (webpki: chain, validity, `clientAuth` usage). With `bind_device = true`,
//! a connection that presented a certificate may only use tokens of the device the
//! certificate names (its subject common name): a token copied off one device is useless on
//! a connection authenticated as another. The name is read once, at the handshake, and kept
//! with the connection ([`CertDevice`] in [`DeviceTlsStream`]); the listener hands it to each
//! request through pingora's per-connection user context.
//!
//! Certificates, the client CA and these settings are re-read on reload (SIGHUP): new
//! connections use the new ones, open connections keep theirs.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl,
    TimingDigest, UniqueID, UniqueIDType,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Whether devices must present a client certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// No client certificates asked for.
    Off,
    /// Asked for, verified when presented; devices without one still connect (tokens only).
    Optional,
    /// Every device must present a certificate from `client_ca_file`.
    Required,
}

/// The files of `[device_listener.tls]` and the client-certificate mode: what [`load`] reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub client_ca_file: Option<PathBuf>,
    pub client_auth: ClientAuth,
}

/// Validated `[device_listener.tls]`, its files already loaded (once, by validation).
#[derive(Clone)]
pub struct DeviceTlsSettings {
    pub files: TlsFiles,
    pub bind_device: bool,
    pub handshake_timeout: Duration,
    /// The rustls configuration [`load`] built from `files`.
    pub server: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for DeviceTlsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceTlsSettings")
            .field("files", &self.files)
            .field("bind_device", &self.bind_device)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("server", &"<loaded>")
            .finish()
    }
}

/// What a connection's client certificate says about its device (only recorded with
/// `bind_device = true`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CertDevice {
    /// The certificate's subject common name.
    Named(Arc<str>),
    /// A verified certificate without a common name: it names no device, so no token is
    /// accepted on the connection.
    Unnamed,
}

impl CertDevice {
    /// Whether a token for `device` may be used on a connection with this certificate.
    pub fn allows(&self, device: &str) -> bool {
        match self {
            CertDevice::Named(name) => &**name == device,
            CertDevice::Unnamed => false,
        }
    }
}

/// A problem with a TLS file, and the key that names it.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct TlsFileError {
    pub key: &'static str,
    pub message: String,
}

fn file_error(key: &'static str, message: impl Into<String>) -> TlsFileError {
    TlsFileError {
        key,
        message: message.into(),
    }
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsFileError> {
    std::fs::read(path)
        .map_err(|e| file_error(key, format!("cannot read `{}`: {e}", path.display())))
}

fn certificates(
    key: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsFileError> {
    let pem = read(key, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(key, format!("`{}`: not PEM: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(file_error(
            key,
            format!("`{}` holds no CERTIFICATE block", path.display()),
        ));
    }
    Ok(certs)
}

fn server_key(settings: &TlsFiles) -> Result<Arc<rustls::sign::CertifiedKey>, Vec<TlsFileError>> {
    const CERT: &str = "device_listener.tls.cert_file";
    const KEY: &str = "device_listener.tls.key_file";
    let chain = certificates(CERT, &settings.cert_file);
    let key = read(KEY, &settings.key_file).and_then(|pem| {
        PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
            file_error(
                KEY,
                format!(
                    "`{}`: no usable PRIVATE KEY block ({e})",
                    settings.key_file.display()
                ),
            )
        })
    });
    let (chain, key) = match (chain, key) {
        (Ok(c), Ok(k)) => (c, k),
        (c, k) => return Err(c.err().into_iter().chain(k.err()).collect()),
    };
    let provider = rustls::crypto::ring::default_provider();
    rustls::sign::CertifiedKey::from_der(chain, key, &provider)
        .map(Arc::new)
        .map_err(|e| {
            vec![file_error(
                KEY,
                format!("the key does not fit the certificate in `cert_file`: {e}"),
            )]
        })
}

fn client_verifier(
    settings: &TlsFiles,
) -> Result<Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>, TlsFileError> {
    const CA: &str = "device_listener.tls.client_ca_file";
    let Some(path) = settings
        .client_ca_file
        .as_ref()
        .filter(|_| settings.client_auth != ClientAuth::Off)
    else {
        return Ok(None);
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in certificates(CA, path)? {
        roots
            .add(cert)
            .map_err(|e| file_error(CA, format!("`{}`: not a usable CA: {e}", path.display())))?;
    }
    let builder = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    );
    let builder = if settings.client_auth == ClientAuth::Optional {
        builder.allow_unauthenticated()
    } else {
        builder
    };
    builder
        .build()
        .map(Some)
        .map_err(|e| file_error(CA, format!("`{}`: {e}", path.display())))
}

/// Reads the certificate, key and client CA, and builds the rustls server configuration:
/// every problem at once.
pub fn load(settings: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, Vec<TlsFileError>> {
    let key = server_key(settings);
    let verifier = client_verifier(settings);
    let (key, verifier) = match (key, verifier) {
        (Ok(k), Ok(v)) => (k, v),
        (k, v) => {
            return Err(k
                .err()
                .unwrap_or_default()
                .into_iter()
                .chain(v.err())
                .collect());
        }
    };
    let builder = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])
    .map_err(|e| vec![file_error("device_listener.tls", e.to_string())])?;
    let builder = match verifier {
        Some(v) => builder.with_client_cert_verifier(v),
        None => builder.with_no_client_auth(),
    };
    let mut config =
        builder.with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(key)));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The device a (verified) leaf certificate names: its subject common name.
pub fn cert_device(leaf_der: &[u8]) -> CertDevice {
    use x509_parser::prelude::FromDer as _;
    x509_parser::certificate::X509Certificate::from_der(leaf_der)
        .ok()
        .and_then(|(_, cert)| {
            let mut names = cert.subject().iter_common_name();
            let first = names.next()?.as_str().ok()?.to_owned();
            // Two common names are ambiguous: bind to neither.
            names.next().is_none().then_some(first)
        })
        .filter(|n| !n.is_empty())
        .map_or(CertDevice::Unnamed, |n| CertDevice::Named(n.into()))
}

/// The certificate device recorded for a connection, if any (only [`DeviceTlsStream`]s with
/// `bind_device` have one).
pub fn connection_cert_device(stream: &pingora::protocols::Stream) -> Option<CertDevice> {
    stream
        .as_any()
        .downcast_ref::<DeviceTlsStream>()
        .and_then(|s| s.cert_device.clone())
}

/// A device connection over TLS: tokio-rustls' stream over pingora's L4 stream, plus the
/// device its client certificate names (with `bind_device`).
#[derive(Debug)]
pub struct DeviceTlsStream {
    inner: tokio_rustls::server::TlsStream<L4Stream>,
    cert_device: Option<CertDevice>,
}

impl AsyncRead for DeviceTlsStream {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for DeviceTlsStream {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for DeviceTlsStream {
    async fn shutdown(&mut self) {
        // close_notify, then the socket's write side; a peer already gone is not an error.
        if let Err(e) = tokio::io::AsyncWriteExt::shutdown(&mut self.inner).await {
            tracing::debug!(error = %e, "Device TLS shutdown failed.");
        }
    }
}

impl UniqueID for DeviceTlsStream {
    fn id(&self) -> UniqueIDType {
        self.inner.get_ref().0.id()
    }
}

/// No pingora TLS digest: nothing in fleetgate reads one, and the certificate's device
/// travels with the stream itself.
impl Ssl for DeviceTlsStream {}

impl GetTimingDigest for DeviceTlsStream {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_ref().0.get_timing_digest()
    }
}

impl GetProxyDigest for DeviceTlsStream {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_ref().0.get_proxy_digest()
    }
}

impl GetSocketDigest for DeviceTlsStream {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_ref().0.get_socket_digest()
    }
    fn set_socket_digest(&mut self, socket_digest: SocketDigest) {
        self.inner.get_mut().0.set_socket_digest(socket_digest)
    }
}

#[async_trait]
impl Peek for DeviceTlsStream {}

/// The device listener's TLS: the acceptor in use, swapped whole on reload.
pub struct LiveTls {
    current: RwLock<Arc<Loaded>>,
    /// `fleetgate_device_tls_handshakes_total`
    handshakes: prometheus::IntCounterVec,
}

/// One generation of the listener's TLS settings.
struct Loaded {
    acceptor: tokio_rustls::TlsAcceptor,
    handshake_timeout: Duration,
    bind_device: bool,
}

impl Loaded {
    fn new(settings: &DeviceTlsSettings) -> Loaded {
        Loaded {
            acceptor: tokio_rustls::TlsAcceptor::from(settings.server.clone()),
            handshake_timeout: settings.handshake_timeout,
            bind_device: settings.bind_device,
        }
    }
}

/// Why a device's TLS handshake did not complete (metrics label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// Not TLS, a refused or missing client certificate, a protocol error.
    Failed,
    /// Not finished within `handshake_timeout`.
    Timeout,
}

impl LiveTls {
    pub fn new(settings: &DeviceTlsSettings, handshakes: prometheus::IntCounterVec) -> LiveTls {
        LiveTls {
            current: RwLock::new(Arc::new(Loaded::new(settings))),
            handshakes,
        }
    }

    /// Installs a reloaded configuration's files and settings; open connections keep theirs.
    pub fn replace(&self, settings: &DeviceTlsSettings) {
        crate::locks::replace(&self.current, Arc::new(Loaded::new(settings)));
    }

    /// Runs the server side of the handshake on a freshly accepted connection.
    pub async fn handshake(
        &self,
        stream: L4Stream,
    ) -> Result<pingora::protocols::Stream, HandshakeFailure> {
        let tls = crate::locks::snapshot(&self.current);
        let done = tokio::time::timeout(tls.handshake_timeout, tls.acceptor.accept(stream)).await;
        let (result, label) = match done {
            Ok(Ok(inner)) => {
                let cert_device = if tls.bind_device {
                    inner
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|chain| chain.first())
                        .map(|leaf| cert_device(leaf))
                } else {
                    None
                };
                let stream = DeviceTlsStream { inner, cert_device };
                (Ok(Box::new(stream) as pingora::protocols::Stream), "ok")
            }
            Ok(Err(e)) => {
                // The reason, never key material: rustls errors name alerts and checks.
                tracing::debug!(error = %e, "Device TLS handshake failed.");
                (Err(HandshakeFailure::Failed), "failed")
            }
            Err(_) => (Err(HandshakeFailure::Timeout), "timeout"),
        };
        self.handshakes.with_label_values(&[label]).inc();
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/tls")
            .join(name)
    }

    fn settings() -> TlsFiles {
        TlsFiles {
            cert_file: fixture("upstream.pem"),
            key_file: fixture("upstream.key"),
            client_ca_file: Some(fixture("device-ca.pem")),
            client_auth: ClientAuth::Required,
        }
    }

    fn der(name: &str) -> Vec<u8> {
        let pem = std::fs::read(fixture(name)).unwrap();
        CertificateDer::from_pem_slice(&pem).unwrap().to_vec()
    }

    #[test]
    fn loads_the_fixtures() {
        assert!(load(&settings()).is_ok());
        let mut s = settings();
        s.client_auth = ClientAuth::Off;
        s.client_ca_file = None;
        assert!(load(&s).is_ok());
    }

    #[test]
    fn reports_every_bad_file_with_its_key() {
        let mut s = settings();
        s.cert_file = fixture("missing.pem");
        s.key_file = fixture("README.md");
        s.client_ca_file = Some(fixture("upstream.key"));
        let errors = load(&s).err().unwrap();
        let keys: Vec<_> = errors.iter().map(|e| e.key).collect();
        assert_eq!(
            keys,
            [
                "device_listener.tls.cert_file",
                "device_listener.tls.key_file",
                "device_listener.tls.client_ca_file"
            ],
            "{errors:?}"
        );
        assert!(errors[0].message.contains("missing.pem"), "{errors:?}");
    }

    #[test]
    fn a_key_that_does_not_fit_the_certificate_is_refused() {
        let mut s = settings();
        s.key_file = fixture("device-a.key");
        let errors = load(&s).err().unwrap();
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].key, "device_listener.tls.key_file");
        assert!(errors[0].message.contains("does not fit"), "{errors:?}");
    }

    #[test]
    fn the_certificate_names_its_device_by_common_name() {
        assert_eq!(
            cert_device(&der("device-a.pem")),
            CertDevice::Named("tls-dev-a".into())
        );
        assert_eq!(cert_device(&der("device-nocn.pem")), CertDevice::Unnamed);
        assert_eq!(cert_device(b"not a certificate"), CertDevice::Unnamed);
    }

    #[test]
    fn a_named_certificate_allows_only_its_own_device() {
        let named = CertDevice::Named("tls-dev-a".into());
        assert!(named.allows("tls-dev-a"));
        assert!(!named.allows("tls-dev-b"));
        assert!(!named.allows("tls-dev-a "));
        assert!(!CertDevice::Unnamed.allows(""));
        assert!(!CertDevice::Unnamed.allows("tls-dev-a"));
    }
}
