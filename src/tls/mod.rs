//! TLS with rustls (ring provider), on both sides.
//!
//! Client side: [`ServerTls`] holds the current `ServerConfig` (certificate
//! chain, key, ALPN `postgresql`, session tickets) and reloads it when the
//! files change; shards pick up a new config on their next handshake by
//! comparing a generation number, so the connect path takes no lock unless
//! the certificate actually changed.
//!
//! Upstream side: [`client_config`] builds the `ClientConfig` for libpq-style
//! `sslmode`s, and [`tls_server_end_point`] computes the channel-binding data
//! SCRAM-SHA-256-PLUS needs.
//!
//! <https://www.postgresql.org/docs/current/protocol-flow.html#PROTOCOL-FLOW-SSL>

pub mod accept;
pub mod connect;
mod drive;
pub mod handshake;
pub mod record;
pub mod stream;
pub mod verify;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::crypto::ring as provider;
use rustls::server::ServerSessionMemoryCache;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tracing::{error, info};

use crate::snapshot::{FileStamp, Published, Stamps};

/// The ALPN protocol name PostgreSQL 17 defined for direct TLS.
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// How often the certificate files are checked for changes.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// A TLS configuration problem, with the file it concerns.
#[derive(Debug)]
pub struct TlsConfigError(pub String);

impl std::fmt::Display for TlsConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TlsConfigError {}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(provider::default_provider())
}

/// Reads a PEM certificate chain (leaf first).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsConfigError(format!("{}: {e}", path.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| TlsConfigError(format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(TlsConfigError(format!(
            "{}: no PEM certificate found",
            path.display()
        )));
    }
    Ok(certs)
}

/// Reads a PEM private key (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsConfigError> {
    // The error text names the file, never its contents.
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        TlsConfigError(format!(
            "{}: no usable PEM private key ({e})",
            path.display()
        ))
    })
}

/// The client-facing TLS configuration, reloadable.
pub struct ServerTls {
    /// Shared across reloads, so session tickets issued before a certificate
    /// change still resume after it.
    ticketer: Arc<dyn rustls::server::ProducesTickets>,
    session_cache: Arc<dyn rustls::server::StoresServerSessions>,
    config: Published<ServerConfig>,
    files: Mutex<Files>,
}

/// The certificate and key files, and which versions of them are loaded
/// (or failed to load). A config reload may name other files.
struct Files {
    cert: PathBuf,
    key: PathBuf,
    stamps: Stamps<(Option<FileStamp>, Option<FileStamp>)>,
}

impl ServerTls {
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<ServerTls>, TlsConfigError> {
        let ticketer = provider::Ticketer::new()
            .map_err(|e| TlsConfigError(format!("TLS session tickets: {e}")))?;
        let session_cache: Arc<dyn rustls::server::StoresServerSessions> =
            ServerSessionMemoryCache::new(4096);
        let stamps = Stamps::new((FileStamp::of(cert), FileStamp::of(key)));
        let config = build_server_config(cert, key, &ticketer, &session_cache)?;
        Ok(Arc::new(ServerTls {
            ticketer,
            session_cache,
            config: Published::new(config),
            files: Mutex::new(Files {
                cert: cert.to_owned(),
                key: key.to_owned(),
                stamps,
            }),
        }))
    }

    /// The current config if it changed since `seen`, with its generation.
    /// One relaxed atomic load when nothing changed.
    pub fn refresh(&self, seen: u64) -> Option<(u64, Arc<ServerConfig>)> {
        self.config.get_if_newer(seen)
    }

    /// Rebuilds the config if either file changed. A bad new pair is logged
    /// and the old config stays in force.
    pub fn reload_if_changed(&self) {
        let mut files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        let now = (FileStamp::of(&files.cert), FileStamp::of(&files.key));
        if !files.stamps.is_new(now) {
            return;
        }
        match build_server_config(&files.cert, &files.key, &self.ticketer, &self.session_cache) {
            Ok(config) => {
                self.config.publish(config);
                files.stamps.loaded(now);
                info!(cert = %files.cert.display(), "TLS certificate reloaded");
            }
            Err(e) => {
                // A fixed file changes the stamps again and is picked up then.
                files.stamps.failed(now);
                error!(error = %e, "new TLS certificate or key rejected; keeping the previous pair");
            }
        }
    }

    /// Loads `cert` and `key` now (a config reload), whether or not they
    /// are the files already in use, and watches them from then on. An
    /// error leaves the current pair in force.
    pub fn use_files(&self, cert: &Path, key: &Path) -> Result<(), TlsConfigError> {
        let mut files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        let now = (FileStamp::of(cert), FileStamp::of(key));
        let config = build_server_config(cert, key, &self.ticketer, &self.session_cache)?;
        self.config.publish(config);
        *files = Files {
            cert: cert.to_owned(),
            key: key.to_owned(),
            stamps: Stamps::new(now),
        };
        Ok(())
    }

    /// Starts the thread that polls the files for changes.
    pub fn watch(self: &Arc<Self>) {
        let me = Arc::downgrade(self);
        let _ = std::thread::Builder::new()
            .name("tg-tls-reload".into())
            .spawn(move || loop {
                std::thread::sleep(RELOAD_INTERVAL);
                match me.upgrade() {
                    Some(tls) => tls.reload_if_changed(),
                    None => return,
                }
            });
    }
}

fn build_server_config(
    cert: &Path,
    key: &Path,
    ticketer: &Arc<dyn rustls::server::ProducesTickets>,
    session_cache: &Arc<dyn rustls::server::StoresServerSessions>,
) -> Result<ServerConfig, TlsConfigError> {
    let chain = load_certs(cert)?;
    let key_der = load_key(key)?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsConfigError(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| TlsConfigError(format!("{} and {}: {e}", cert.display(), key.display())))?;
    config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    // The record layer after the handshake is tollgate's (record.rs).
    config.enable_secret_extraction = true;
    config.ticketer = ticketer.clone();
    config.session_storage = session_cache.clone();
    Ok(config)
}

/// libpq's `sslmode`, for tollgate's connection to the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamTlsMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl UpstreamTlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamTlsMode::Disable => "disable",
            UpstreamTlsMode::Prefer => "prefer",
            UpstreamTlsMode::Require => "require",
            UpstreamTlsMode::VerifyCa => "verify-ca",
            UpstreamTlsMode::VerifyFull => "verify-full",
        }
    }
}

/// The upstream TLS settings, built once: the mode and a `ClientConfig`
/// whose verifier implements it.
pub struct UpstreamTls {
    pub mode: UpstreamTlsMode,
    config: Arc<ClientConfig>,
}

impl UpstreamTls {
    /// `None` for `disable`. `ca_file` is required for the verifying modes,
    /// as libpq requires a root certificate for them.
    pub fn new(
        mode: UpstreamTlsMode,
        ca_file: Option<&Path>,
        client_cert: Option<(&Path, &Path)>,
    ) -> Result<Option<UpstreamTls>, TlsConfigError> {
        let verifier: Arc<dyn rustls::client::danger::ServerCertVerifier> = match mode {
            UpstreamTlsMode::Disable => return Ok(None),
            // Encryption without authentication, as libpq's prefer/require.
            UpstreamTlsMode::Prefer | UpstreamTlsMode::Require => {
                Arc::new(verify::AcceptAnyServerCert::new(provider()))
            }
            UpstreamTlsMode::VerifyCa | UpstreamTlsMode::VerifyFull => {
                let ca = ca_file.ok_or_else(|| {
                    TlsConfigError(format!(
                        "[upstream] tls = \"{}\" needs ca_file",
                        mode.as_str()
                    ))
                })?;
                let mut roots = RootCertStore::empty();
                for c in load_certs(ca)? {
                    roots
                        .add(c)
                        .map_err(|e| TlsConfigError(format!("{}: {e}", ca.display())))?;
                }
                let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider(),
                )
                .build()
                .map_err(|e| TlsConfigError(format!("{}: {e}", ca.display())))?;
                if mode == UpstreamTlsMode::VerifyCa {
                    Arc::new(verify::IgnoreHostname(webpki))
                } else {
                    webpki
                }
            }
        };
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsConfigError(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match client_cert {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => builder
                .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
                .map_err(|e| TlsConfigError(format!("{}: {e}", cert.display())))?,
        };
        config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
        // Every handshake must show the certificate, which channel binding
        // hashes (Postgres disables tickets anyway).
        config.resumption = rustls::client::Resumption::disabled();
        // After the handshake, records are tollgate's own (`connect`).
        config.enable_secret_extraction = true;
        Ok(Some(UpstreamTls {
            mode,
            config: Arc::new(config),
        }))
    }

    /// The config as built, for clients other than the upstream login
    /// (the control database's connection).
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.config.clone()
    }
}

/// The real reason behind a TLS failure: the rustls error an I/O error
/// carries (an untrusted certificate, say), not the I/O error's kind.
pub fn describe_error(e: impl Into<std::io::Error>) -> String {
    let e: std::io::Error = e.into();
    match e.get_ref() {
        Some(inner) => inner.to_string(),
        None => e.to_string(),
    }
}

/// Channel-binding data for `tls-server-end-point` (RFC 5929 §4.1): the
/// hash of the server's certificate, with the certificate's own signature
/// hash, where MD5 and SHA-1 are replaced by SHA-256. `None` when the
/// signature algorithm has no single hash (e.g. Ed25519), in which case
/// Postgres does not offer channel binding either.
pub fn tls_server_end_point(cert_der: &[u8]) -> Option<Vec<u8>> {
    use ring::digest::{digest, SHA256, SHA384, SHA512};
    let alg = verify::signature_hash(cert_der)?;
    let algorithm = match alg {
        verify::SignatureHash::Sha256OrWeaker => &SHA256,
        verify::SignatureHash::Sha384 => &SHA384,
        verify::SignatureHash::Sha512 => &SHA512,
    };
    Some(digest(algorithm, cert_der).as_ref().to_vec())
}
