//! Small helpers over monoio's owned-buffer I/O.

use bytes::BytesMut;
use monoio::buf::IoBufMut;
use monoio::io::AsyncReadRent;

/// Reads more bytes onto the end of `buf` (monoio reads at the start of a
/// buffer unless given a slice), growing it to at least `min_spare` free bytes.
pub async fn read_append<S: AsyncReadRent>(
    stream: &mut S,
    mut buf: BytesMut,
    min_spare: usize,
) -> (std::io::Result<usize>, BytesMut) {
    buf.reserve(min_spare);
    let len = buf.len();
    let (res, slice) = stream.read(buf.slice_mut(len..)).await;
    (res, slice.into_inner())
}

/// Keepalive probes after the idle time, and the time between them: a peer
/// that vanished without a FIN or RST (powered off, NAT entry dropped) is
/// noticed `idle` + 6 × 10 s after its last byte, instead of never.
const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
const KEEPALIVE_RETRIES: u32 = 6;

/// Turns on TCP keepalive for `stream`, probing after `idle` of silence.
/// Best effort: a socket that refuses keeps working without it.
pub fn set_keepalive(stream: &impl std::os::fd::AsRawFd, idle: std::time::Duration) {
    // SAFETY: the descriptor belongs to `stream`, which outlives this
    // borrow; socket2 only calls setsockopt on it.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(stream.as_raw_fd()) };
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(idle)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_RETRIES);
    if let Err(e) = socket2::SockRef::from(&fd).set_tcp_keepalive(&keepalive) {
        tracing::debug!(error = %e, "TCP keepalive not set");
    }
}

/// Runs a future, turning a panic inside it into `Err` instead of letting it
/// unwind through the shard's runtime (which would take every session on
/// the shard down with it).
pub struct CatchUnwind<F>(pub std::pin::Pin<Box<F>>);

impl<F: std::future::Future> std::future::Future for CatchUnwind<F> {
    type Output = Result<F::Output, Box<dyn std::any::Any + Send>>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let fut = self.0.as_mut();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fut.poll(cx))) {
            Ok(std::task::Poll::Pending) => std::task::Poll::Pending,
            Ok(std::task::Poll::Ready(v)) => std::task::Poll::Ready(Ok(v)),
            Err(panic) => std::task::Poll::Ready(Err(panic)),
        }
    }
}

/// Whether the peer of an idle socket has closed it or sent something:
/// one non-blocking `recv` with `MSG_PEEK`, which leaves any bytes where
/// they are. A socket with nothing to read is still open.
pub fn peer_closed_or_spoke(fd: std::os::fd::RawFd) -> bool {
    let mut byte = [std::mem::MaybeUninit::<u8>::uninit()];
    // SAFETY: the descriptor belongs to a stream its caller holds, which
    // outlives this borrow; socket2 only calls recv(2) on it.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let flags = libc::MSG_PEEK | libc::MSG_DONTWAIT;
    match socket2::SockRef::from(&fd).recv_with_flags(&mut byte, flags) {
        Ok(_) => true,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

/// Keeps `waker` in `slot` to be woken later. A task polled again mostly
/// has the same waker: kept as is then, with no clone (a reference count
/// up, and the old one's down) per poll.
pub fn remember_waker(slot: &mut Option<std::task::Waker>, waker: &std::task::Waker) {
    if !slot.as_ref().is_some_and(|w| w.will_wake(waker)) {
        *slot = Some(waker.clone());
    }
}
