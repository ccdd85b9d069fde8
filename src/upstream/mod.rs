//! Connecting and logging in to the real PostgreSQL server.
//!
//! [`login`] is the sans-IO state machine; [`connect_and_login`] drives it
//! over a monoio socket.

pub mod login;
pub mod md5;
pub mod scram;

use std::fmt;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};
use monoio::net::{TcpStream, UnixStream};
use rustls_pki_types::ServerName;

use crate::config::UpstreamConfig;
use crate::net::{BufferPool, Stream};
use crate::protocol::backend::BackendKey;
use crate::protocol::backend::MAX_LOGIN_MESSAGE_LEN;
use crate::protocol::frame::peek_frame;
use crate::protocol::startup::ProtocolVersion;
use crate::protocol::startup::SSL_REQUEST_CODE;
use crate::secret::Secret;
use crate::tls::stream::TlsStream;
use crate::tls::{UpstreamTls, UpstreamTlsMode};
use login::{Login, LoginError, LoginStep, Ready, ISSUED_KEY_LEN};
use scram::{ChannelBinding, KeyCache};

/// Why the session could not get an upstream connection.
#[derive(Debug)]
pub enum UpstreamError {
    Connect {
        addr: String,
        source: std::io::Error,
    },
    ConnectTimeout {
        addr: String,
        after: Duration,
    },
    /// The server closed or reset the connection during the login.
    Io(std::io::Error),
    Closed,
    Frame(crate::protocol::FrameError),
    Login(LoginError),
    /// The server answered 'N' to SSLRequest and the mode requires TLS.
    TlsRefused,
    /// The TLS handshake failed (certificate not trusted, wrong host...).
    Tls(String),
}

impl fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpstreamError::Connect { addr, source } => write!(f, "connect to {addr}: {source}"),
            UpstreamError::ConnectTimeout { addr, after } => {
                write!(f, "connect to {addr}: no answer within {after:?}")
            }
            UpstreamError::Io(e) => write!(f, "upstream I/O during login: {e}"),
            UpstreamError::Closed => f.write_str("upstream closed the connection during login"),
            UpstreamError::Frame(e) => write!(f, "upstream framing: {e}"),
            UpstreamError::Login(e) => e.fmt(f),
            UpstreamError::TlsRefused => f.write_str("the server does not support TLS"),
            UpstreamError::Tls(e) => write!(f, "TLS handshake with the server failed: {e}"),
        }
    }
}

impl std::error::Error for UpstreamError {}

impl UpstreamError {
    /// A stable name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            UpstreamError::Connect { .. } | UpstreamError::ConnectTimeout { .. } => {
                "upstream_connect"
            }
            UpstreamError::Io(_) | UpstreamError::Closed => "upstream_lost",
            UpstreamError::Frame(_) => "upstream_protocol",
            UpstreamError::Login(LoginError::ServerError { .. }) => "upstream_error",
            UpstreamError::Login(LoginError::Protocol { .. }) => "upstream_protocol",
            UpstreamError::Login(LoginError::Unsupported { .. } | LoginError::Scram(_)) => {
                "upstream_auth"
            }
            UpstreamError::Login(_) => "upstream_login",
            UpstreamError::TlsRefused | UpstreamError::Tls(_) => "upstream_tls",
        }
    }
}

/// Opens a connection to the upstream: its Unix-domain socket, or each
/// resolved TCP address in turn. Callers bound it with
/// [`within_connect_timeout`].
async fn connect_socket(cfg: &UpstreamConfig) -> Result<Stream, UpstreamError> {
    if let Some(path) = &cfg.socket {
        return UnixStream::connect(path)
            .await
            .map(Stream::Unix)
            .map_err(|source| UpstreamError::Connect {
                addr: describe(cfg),
                source,
            });
    }
    let mut last = None;
    for addr in &cfg.addrs {
        match TcpStream::connect_addr(*addr).await {
            Ok(stream) => {
                let stream = Stream::Tcp(stream);
                // Postgres messages are small and latency-bound; never wait
                // to coalesce.
                stream.set_nodelay();
                stream.set_keepalive(cfg.keepalive);
                return Ok(stream);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(UpstreamError::Connect {
        addr: describe(cfg),
        source: last.unwrap_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, "no address to connect to")
        }),
    })
}

fn describe(cfg: &UpstreamConfig) -> String {
    match &cfg.socket {
        Some(path) => path.display().to_string(),
        None => format!("{}:{}", cfg.host, cfg.port),
    }
}

/// Runs one upstream exchange (connect, TLS, login or cancel) within the
/// connect timeout: a server that accepts but never answers is as
/// unavailable as one that does not accept.
async fn within_connect_timeout<T>(
    cfg: &UpstreamConfig,
    work: impl std::future::Future<Output = Result<T, UpstreamError>>,
) -> Result<T, UpstreamError> {
    monoio::time::timeout(cfg.connect_timeout, work)
        .await
        .unwrap_or_else(|_| {
            Err(UpstreamError::ConnectTimeout {
                addr: describe(cfg),
                after: cfg.connect_timeout,
            })
        })
}

/// The upstream transport.
pub enum UpstreamStream {
    /// TCP without TLS, or a Unix-domain socket.
    Plain(Stream),
    /// Boxed: the stream is larger than a plain one, and pooled
    /// connections and sessions carry this enum.
    Tls(Box<TlsStream>),
}

/// A TCP connection, upgraded to TLS as `tls` says (libpq's sslmode rules:
/// SSLRequest, then 'S' → handshake, 'N' → plaintext only for `prefer`).
/// Returns the stream, for TLS the channel-binding data, and the socket
/// under the stream. A TLS stream takes its buffers from `pool` while
/// bytes flow.
pub async fn connect(
    cfg: &UpstreamConfig,
    tls: Option<&UpstreamTls>,
    pool: &Rc<BufferPool>,
) -> Result<(UpstreamStream, Option<Vec<u8>>, RawFd), UpstreamError> {
    let stream = connect_socket(cfg).await?;
    let fd = stream.as_raw_fd();
    let (tls, mut stream) = match (tls, stream) {
        (Some(tls), Stream::Tcp(s)) => (tls, s),
        // No TLS asked for, or a Unix-domain socket (where the config
        // allows no mode that needs it).
        (_, stream) => return Ok((UpstreamStream::Plain(stream), None, fd)),
    };
    let mut req = Vec::with_capacity(8);
    req.extend_from_slice(&8i32.to_be_bytes());
    req.extend_from_slice(&SSL_REQUEST_CODE.to_be_bytes());
    let (res, _) = stream.write_all(req).await;
    res.map_err(UpstreamError::Io)?;
    // Exactly one byte: anything the server sent after it must go through
    // TLS, never be read as plaintext (CVE-2021-23222).
    let (res, answer) = stream.read(Vec::with_capacity(1)).await;
    if res.map_err(UpstreamError::Io)? == 0 {
        return Err(UpstreamError::Closed);
    }
    match answer[0] {
        b'S' => {}
        b'N' if tls.mode == UpstreamTlsMode::Prefer => {
            return Ok((UpstreamStream::Plain(Stream::Tcp(stream)), None, fd));
        }
        b'N' => return Err(UpstreamError::TlsRefused),
        // An ErrorResponse ('E') or anything else: TLS was not negotiated.
        // Whatever follows the byte is unauthenticated plaintext that a man
        // in the middle may have written, so it is never read.
        other => {
            return Err(UpstreamError::Tls(format!(
                "the server answered SSLRequest with 0x{other:02x}, not 'S' or 'N'"
            )))
        }
    }
    let name = ServerName::try_from(cfg.host.clone()).map_err(|_| {
        UpstreamError::Tls(format!("\"{}\" is not a valid TLS server name", cfg.host))
    })?;
    let (stream, cert) =
        crate::tls::connect::connect(tls.client_config(), name, stream, pool.clone())
            .await
            .map_err(|e| UpstreamError::Tls(crate::tls::describe_error(e)))?;
    let binding = cert.as_deref().and_then(crate::tls::tls_server_end_point);
    Ok((UpstreamStream::Tls(Box::new(stream)), binding, fd))
}

/// An upstream connection that is logged in and ready for queries.
pub struct Upstream {
    pub stream: UpstreamStream,
    /// AuthenticationOk through ReadyForQuery, verbatim, for the client.
    pub for_client: BytesMut,
    /// Bytes the server sent after ReadyForQuery (normally none).
    pub leftover: BytesMut,
    /// How the login went: method, keys, protocol version.
    pub ready: Ready,
    /// The socket under `stream` (under TLS too).
    pub fd: RawFd,
}

/// What the upstream login needs besides the transport.
pub struct LoginParams<'a, P> {
    pub user: &'a str,
    pub password: Option<Secret>,
    /// The version the client asked for; the server negotiates it down.
    pub version: ProtocolVersion,
    pub params: P,
    /// The cancel secret the client gets instead of the server's (with
    /// its backend's real process id), and what finishes it once that
    /// process id is known.
    pub issued_secret: [u8; ISSUED_KEY_LEN],
    pub seal: Option<login::SealKey>,
}

/// Connects (with TLS as configured) and logs in as `user`, passing the
/// client's parameters, all within the connect timeout.
pub async fn connect_and_login<'a, P: Iterator<Item = (&'a str, &'a str)>>(
    cfg: &UpstreamConfig,
    tls: Option<&UpstreamTls>,
    p: LoginParams<'a, P>,
    cache: &std::cell::RefCell<KeyCache>,
    pool: &Rc<BufferPool>,
) -> Result<Upstream, UpstreamError> {
    within_connect_timeout(cfg, connect_and_login_now(cfg, tls, p, cache, pool)).await
}

async fn connect_and_login_now<'a, P: Iterator<Item = (&'a str, &'a str)>>(
    cfg: &UpstreamConfig,
    tls: Option<&UpstreamTls>,
    p: LoginParams<'a, P>,
    cache: &std::cell::RefCell<KeyCache>,
    pool: &Rc<BufferPool>,
) -> Result<Upstream, UpstreamError> {
    let (stream, binding, fd) = connect(cfg, tls, pool).await?;
    let channel_binding = match (&stream, binding) {
        (UpstreamStream::Plain(_), _) => ChannelBinding::NotSupported,
        (UpstreamStream::Tls(_), Some(hash)) => ChannelBinding::TlsServerEndPoint(hash),
        // TLS, but a certificate we cannot bind to: say we could have.
        (UpstreamStream::Tls(_), None) => ChannelBinding::SupportedButNotUsed,
    };
    let mut startup = BytesMut::with_capacity(256);
    let mut login = Login::start(
        p.user,
        p.password,
        channel_binding,
        p.version,
        p.params,
        p.issued_secret,
        &mut startup,
    )
    .require(cfg.require_auth);
    if let Some(seal) = p.seal {
        login = login.seal_with(seal);
    }
    match stream {
        UpstreamStream::Plain(mut s) => {
            let (for_client, leftover, ready) = run_login(&mut s, (login, startup), cache).await?;
            Ok(Upstream {
                stream: UpstreamStream::Plain(s),
                for_client,
                leftover,
                ready,
                fd,
            })
        }
        UpstreamStream::Tls(mut s) => {
            let (for_client, leftover, ready) = run_login(&mut *s, (login, startup), cache).await?;
            Ok(Upstream {
                stream: UpstreamStream::Tls(s),
                for_client,
                leftover,
                ready,
                fd,
            })
        }
    }
}

/// Drives the login state machine over `stream` until ReadyForQuery.
async fn run_login<S: AsyncReadRent + AsyncWriteRent>(
    stream: &mut S,
    (mut login, startup): (Login, BytesMut),
    cache: &std::cell::RefCell<KeyCache>,
) -> Result<(BytesMut, BytesMut, Ready), UpstreamError> {
    let mut to_server = startup;
    let mut for_client = BytesMut::with_capacity(1024);
    let mut input = BytesMut::with_capacity(4096);
    loop {
        if !to_server.is_empty() {
            let (res, buf) = stream.write_all(to_server).await;
            to_server = buf;
            res.map_err(UpstreamError::Io)?;
            to_server.clear();
        }
        // Handle every complete message already buffered before reading more.
        while let Some(frame) =
            peek_frame(&input, MAX_LOGIN_MESSAGE_LEN).map_err(UpstreamError::Frame)?
        {
            let step = login
                .on_message(
                    &input[..frame.total_len],
                    &mut to_server,
                    &mut for_client,
                    &mut cache.borrow_mut(),
                )
                .map_err(UpstreamError::Login)?;
            input.advance(frame.total_len);
            match step {
                LoginStep::Continue(next) => login = next,
                LoginStep::Ready(ready) => return Ok((for_client, input, ready)),
            }
        }
        if !to_server.is_empty() {
            continue;
        }
        let (res, buf) = crate::io_util::read_append(stream, input, 4096).await;
        input = buf;
        match res {
            Ok(0) => return Err(UpstreamError::Closed),
            Ok(_) => {}
            Err(e) => return Err(UpstreamError::Io(e)),
        }
    }
}

/// Sends a CancelRequest for `key` to the upstream on a new connection, as
/// Postgres expects, and waits for the server to close it. Goes over TLS
/// when the upstream connection is configured for it, so the key is never
/// sent in the clear where the session itself was not.
pub async fn send_cancel(
    cfg: &UpstreamConfig,
    tls: Option<&UpstreamTls>,
    key: &BackendKey,
) -> Result<(), UpstreamError> {
    let mut msg = BytesMut::with_capacity(12 + key.secret_key.len());
    msg.extend_from_slice(&((12 + key.secret_key.len()) as i32).to_be_bytes());
    msg.extend_from_slice(&crate::protocol::startup::CANCEL_REQUEST_CODE.to_be_bytes());
    msg.extend_from_slice(&key.process_id.to_be_bytes());
    msg.extend_from_slice(&key.secret_key);
    // Its own small pool: a cancel's TLS session lives for two records.
    let pool = Rc::new(BufferPool::new(CANCEL_BUFFER));
    let attempt = async {
        match connect(cfg, tls, &pool).await?.0 {
            UpstreamStream::Plain(mut s) => write_and_await_close(&mut s, msg).await,
            UpstreamStream::Tls(mut s) => write_and_await_close(&mut *s, msg).await,
        }
    };
    within_connect_timeout(cfg, attempt).await
}

/// Buffer size of a cancel connection's TLS stream (grown if a record
/// needs more).
const CANCEL_BUFFER: usize = 1024;

/// The server closes a cancel connection when it has acted on it; waiting
/// for that keeps a cancel from racing the session's next query.
async fn write_and_await_close<S: AsyncReadRent + AsyncWriteRent>(
    stream: &mut S,
    msg: BytesMut,
) -> Result<(), UpstreamError> {
    let (res, _) = stream.write_all(msg).await;
    res.map_err(UpstreamError::Io)?;
    let _ = stream.read(Vec::with_capacity(64)).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// A one-shot server that reads the SSLRequest, answers `answer` in one
    /// write, and returns everything it read until the client closed.
    fn answering(answer: &'static [u8]) -> (UpstreamConfig, std::thread::JoinHandle<Vec<u8>>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut got = vec![0u8; 8];
            s.read_exact(&mut got).unwrap();
            s.write_all(answer).unwrap();
            let _ = s.read_to_end(&mut got);
            got
        });
        let cfg = UpstreamConfig {
            name: "default".into(),
            databases: vec!["*".into()],
            host: "127.0.0.1".into(),
            port: addr.port(),
            addrs: vec![addr],
            socket: None,
            connect_timeout: Duration::from_secs(5),
            keepalive: Duration::from_secs(60),
            credentials: Default::default(),
            tls: UpstreamTlsMode::Require,
            ca_file: None,
            client_cert: None,
            require_auth: crate::config::AuthMethods::ANY,
            pool: Default::default(),
        };
        (cfg, server)
    }

    fn connect_with(cfg: &UpstreamConfig, mode: UpstreamTlsMode) -> Result<(), UpstreamError> {
        let tls = UpstreamTls::new(mode, None, None).unwrap().unwrap();
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap();
        let pool = Rc::new(BufferPool::new(1024));
        rt.block_on(connect(cfg, Some(&tls), &pool)).map(|_| ())
    }

    /// An ErrorResponse in answer to SSLRequest is a TLS failure in every
    /// mode, never a plaintext fallback, and its text is not read.
    #[test]
    fn error_answer_to_ssl_request_is_a_tls_failure() {
        for mode in [UpstreamTlsMode::Prefer, UpstreamTlsMode::Require] {
            let (cfg, server) = answering(b"E\0\0\0\x0bSFATAL\0\0");
            let e = connect_with(&cfg, mode).err().unwrap();
            assert!(matches!(e, UpstreamError::Tls(_)), "{mode:?}: {e}");
            assert_eq!(e.kind(), "upstream_tls");
            assert!(!e.to_string().contains("FATAL"), "{e}");
            assert_eq!(server.join().unwrap().len(), 8, "only the SSLRequest");
        }
    }

    /// CVE-2021-23222: bytes after the 'S' are handed to the TLS handshake,
    /// never read as the server's plaintext.
    #[test]
    fn bytes_after_s_go_to_the_tls_handshake() {
        // AuthenticationOk and ReadyForQuery, as an injector would send.
        let (cfg, server) = answering(b"SR\0\0\0\x08\0\0\0\0Z\0\0\0\x05I");
        let e = connect_with(&cfg, UpstreamTlsMode::Require).err().unwrap();
        assert!(matches!(e, UpstreamError::Tls(_)), "{e}");
        let got = server.join().unwrap();
        assert_eq!(got.get(8), Some(&0x16), "a TLS handshake record follows");
    }
}
