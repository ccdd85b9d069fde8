//! A plain socket, TCP or Unix-domain, as the session and the pool use it.
//!
//! Both kinds take the same syscalls (recv, send, shutdown), so one type
//! carries either through the start-up, the relay and the pool: a branch
//! per I/O call, nothing per byte. Only TCP can carry TLS; a Unix-domain
//! socket never negotiates it, as in PostgreSQL.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll};

use monoio::buf::{IoBuf, IoBufMut, IoVecBuf, IoVecBufMut};
use monoio::io::poll_io::{AsyncRead, AsyncWrite, ReadBuf};
use monoio::io::{AsyncReadRent, AsyncWriteRent, Split};
use monoio::net::tcp::stream_poll::TcpStreamPoll;
use monoio::net::unix::stream_poll::UnixStreamPoll;
use monoio::net::{TcpStream, UnixStream};
use monoio::BufResult;

/// A connected plain socket in completion mode (monoio's owned buffers).
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

// SAFETY: each variant is itself `Split`: its read and write halves may be
// used at the same time (recv and send on one socket are independent).
unsafe impl Split for Stream {}

impl From<TcpStream> for Stream {
    fn from(s: TcpStream) -> Self {
        Stream::Tcp(s)
    }
}

impl From<UnixStream> for Stream {
    fn from(s: UnixStream) -> Self {
        Stream::Unix(s)
    }
}

impl Stream {
    /// Turns off Nagle's algorithm on TCP: Postgres messages are small and
    /// latency-bound. Unix-domain sockets never delay.
    pub fn set_nodelay(&self) {
        if let Stream::Tcp(s) = self {
            let _ = s.set_nodelay(true);
        }
    }

    /// TCP keepalive after `idle` of silence; nothing to do on a
    /// Unix-domain socket, whose peer cannot vanish without the kernel
    /// knowing.
    pub fn set_keepalive(&self, idle: std::time::Duration) {
        if let Stream::Tcp(s) = self {
            crate::io_util::set_keepalive(s, idle);
        }
    }

    /// The same socket in poll-io mode (readiness, then a non-blocking
    /// syscall), or itself back when the driver cannot switch it.
    pub fn try_into_poll_io(self) -> Result<StreamPoll, Stream> {
        match self {
            Stream::Tcp(s) => s
                .try_into_poll_io()
                .map(StreamPoll::Tcp)
                .map_err(|(_, s)| Stream::Tcp(s)),
            Stream::Unix(s) => s
                .try_into_poll_io()
                .map(StreamPoll::Unix)
                .map_err(|(_, s)| Stream::Unix(s)),
        }
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        }
    }
}

impl AsyncReadRent for Stream {
    async fn read<T: IoBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            Stream::Tcp(s) => s.read(buf).await,
            Stream::Unix(s) => s.read(buf).await,
        }
    }

    async fn readv<T: IoVecBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            Stream::Tcp(s) => s.readv(buf).await,
            Stream::Unix(s) => s.readv(buf).await,
        }
    }
}

impl AsyncWriteRent for Stream {
    async fn write<T: IoBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            Stream::Tcp(s) => s.write(buf).await,
            Stream::Unix(s) => s.write(buf).await,
        }
    }

    async fn writev<T: IoVecBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            Stream::Tcp(s) => s.writev(buf).await,
            Stream::Unix(s) => s.writev(buf).await,
        }
    }

    async fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush().await,
            Stream::Unix(s) => s.flush().await,
        }
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.shutdown().await,
            Stream::Unix(s) => s.shutdown().await,
        }
    }
}

/// A [`Stream`] in poll-io mode, for the relay's lent-buffer pump.
pub enum StreamPoll {
    Tcp(TcpStreamPoll),
    Unix(UnixStreamPoll),
}

impl StreamPoll {
    /// Back to completion mode, or `None` when the driver cannot switch.
    pub fn try_into_comp_io(self) -> Option<Stream> {
        match self {
            StreamPoll::Tcp(s) => s.try_into_comp_io().ok().map(Stream::Tcp),
            StreamPoll::Unix(s) => s.try_into_comp_io().ok().map(Stream::Unix),
        }
    }
}

impl AsyncRead for StreamPoll {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            StreamPoll::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            StreamPoll::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for StreamPoll {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            StreamPoll::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            StreamPoll::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            StreamPoll::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            StreamPoll::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            StreamPoll::Tcp(s) => Pin::new(s).poll_flush(cx),
            StreamPoll::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            StreamPoll::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            StreamPoll::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
