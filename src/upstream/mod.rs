//! Connecting and logging in to the real PostgreSQL server.
//!
//! [`login`] is the sans-IO state machine; [`connect_and_login`] drives it
//! over a monoio socket.

pub mod login;
pub mod md5;
pub mod scram;

use std::fmt;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use monoio::io::AsyncWriteRentExt;
use monoio::net::TcpStream;

use crate::config::UpstreamConfig;
use crate::protocol::backend::MAX_LOGIN_MESSAGE_LEN;
use crate::protocol::frame::peek_frame;
use crate::secret::Secret;
use login::{Login, LoginError, LoginStep};
use scram::KeyCache;

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
            UpstreamError::Login(_) => "upstream_login",
        }
    }
}

/// Opens a TCP connection to the upstream, bounded by the connect timeout.
pub async fn connect(cfg: &UpstreamConfig) -> Result<TcpStream, UpstreamError> {
    let addr = format!("{}:{}", cfg.host, cfg.port);
    let stream =
        match monoio::time::timeout(cfg.connect_timeout, TcpStream::connect(addr.as_str())).await {
            Ok(Ok(s)) => s,
            Ok(Err(source)) => return Err(UpstreamError::Connect { addr, source }),
            Err(_) => {
                return Err(UpstreamError::ConnectTimeout {
                    addr,
                    after: cfg.connect_timeout,
                })
            }
        };
    // Postgres messages are small and latency-bound; never wait to coalesce.
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// An upstream connection that is logged in and ready for queries.
pub struct Upstream {
    pub stream: TcpStream,
    /// AuthenticationOk through ReadyForQuery, verbatim, for the client.
    pub for_client: BytesMut,
    /// Bytes the server sent after ReadyForQuery (normally none).
    pub leftover: BytesMut,
}

/// Connects and logs in as `user`, passing the client's parameters.
pub async fn connect_and_login<'a>(
    cfg: &UpstreamConfig,
    user: &'a str,
    password: Option<Secret>,
    params: impl Iterator<Item = (&'a str, &'a str)>,
    cache: &std::cell::RefCell<KeyCache>,
) -> Result<Upstream, UpstreamError> {
    let mut stream = connect(cfg).await?;
    let mut to_server = BytesMut::with_capacity(1024);
    let mut login = Login::start(user, password, params, &mut to_server);
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
                LoginStep::Ready => {
                    return Ok(Upstream {
                        stream,
                        for_client,
                        leftover: input,
                    })
                }
            }
        }
        if !to_server.is_empty() {
            continue;
        }
        let (res, buf) = crate::io_util::read_append(&mut stream, input, 4096).await;
        input = buf;
        match res {
            Ok(0) => return Err(UpstreamError::Closed),
            Ok(_) => {}
            Err(e) => return Err(UpstreamError::Io(e)),
        }
    }
}

/// Forwards a CancelRequest to the upstream on a new connection, as
/// Postgres expects, and closes it. Errors are only logged: the client
/// expects no answer either way.
pub async fn forward_cancel(
    cfg: &UpstreamConfig,
    process_id: u32,
    secret_key: &[u8],
) -> Result<(), UpstreamError> {
    let mut stream = connect(cfg).await?;
    let mut msg = BytesMut::with_capacity(16 + secret_key.len());
    msg.extend_from_slice(&((12 + secret_key.len()) as i32).to_be_bytes());
    msg.extend_from_slice(&crate::protocol::startup::CANCEL_REQUEST_CODE.to_be_bytes());
    msg.extend_from_slice(&process_id.to_be_bytes());
    msg.extend_from_slice(secret_key);
    let (res, _) = stream.write_all(msg).await;
    res.map_err(UpstreamError::Io)?;
    // The server closes the connection when done; wait for that so the
    // cancel is processed before we drop the socket.
    let buf = Vec::with_capacity(64);
    let _ = monoio::time::timeout(
        cfg.connect_timeout,
        monoio::io::AsyncReadRent::read(&mut stream, buf),
    )
    .await;
    Ok(())
}
