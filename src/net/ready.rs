//! A plain socket in completion mode driven by readiness: wait until the
//! kernel says it is readable (an io_uring PollAdd, batched with the
//! shard's other submissions), then one non-blocking `recv`.
//!
//! monoio's poll-io mode does the same through epoll, watched through the
//! ring: it registers the socket with epoll (an `epoll_ctl` to switch a
//! socket in, another to switch it back), and since its readiness is only
//! cleared by a `recv` that finds nothing, every read that finds data is
//! followed by one that fails with `EAGAIN`. For a socket that changes
//! hands often (a transaction-pooled server connection, lent per
//! transaction) both costs are per transaction; here neither exists, and
//! the socket never leaves completion mode, so it goes back to the pool
//! as it is.
//!
//! Like poll-io, and unlike io_uring's own reads, no buffer is held while
//! waiting: the caller borrows one only once bytes are there. On the epoll
//! fallback driver `readable` is monoio's readiness plus a `poll(2)`, so
//! the same code is correct there.

use std::cell::{Cell, RefCell};
use std::future::{poll_fn, Future};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll};

use super::Stream;

/// A [`Stream`] read and written by readiness (see the module doc).
pub struct ReadyStream {
    inner: Stream,
    /// The last read filled its buffer: more may be waiting, so the next
    /// read tries before it waits.
    more: Cell<bool>,
}

impl AsRawFd for ReadyStream {
    fn as_raw_fd(&self) -> RawFd {
        self.fd()
    }
}

impl ReadyStream {
    pub fn new(inner: Stream) -> ReadyStream {
        ReadyStream {
            inner,
            more: Cell::new(false),
        }
    }

    pub fn into_inner(self) -> Stream {
        self.inner
    }

    fn fd(&self) -> RawFd {
        match &self.inner {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        }
    }

    /// Waits until the socket is readable (one readiness request: on
    /// io_uring a PollAdd, cancelled if the wait is dropped).
    pub async fn readable(&self) -> io::Result<()> {
        match &self.inner {
            Stream::Tcp(s) => s.readable(false).await,
            Stream::Unix(s) => s.readable(false).await,
        }
    }

    async fn writable(&self) -> io::Result<()> {
        match &self.inner {
            Stream::Tcp(s) => s.writable(false).await,
            Stream::Unix(s) => s.writable(false).await,
        }
    }

    /// Waits until bytes (or the end of the stream) are there, then reads
    /// them into the start of a buffer from `take` (filled to its length),
    /// which is called only then. Returns the buffer and how many bytes it
    /// got (0: end of stream); a buffer taken for a read that found
    /// nothing after all goes to `give_back`.
    /// `standing`: see [`ready_on`](Self::ready_on).
    pub async fn read_with(
        &self,
        take: impl Fn() -> Vec<u8>,
        give_back: impl Fn(Vec<u8>),
        standing: Option<&dyn Readable>,
    ) -> io::Result<(Vec<u8>, usize)> {
        loop {
            self.ready_on(standing).await?;
            let mut buf = take();
            match self.try_recv(&mut buf) {
                Ok(Some(n)) => return Ok((buf, n)),
                Ok(None) => give_back(buf),
                Err(e) => {
                    give_back(buf);
                    return Err(e);
                }
            }
        }
    }

    /// Waits until the socket is readable, unless the last read filled its
    /// buffer (more may be waiting then).
    pub async fn ready(&self) -> io::Result<()> {
        if !self.more.get() {
            self.readable().await?;
        }
        Ok(())
    }

    /// As [`ready`](Self::ready), waiting on `standing` (a wait on this
    /// socket that outlives the futures awaiting it) when one is given.
    pub async fn ready_on(&self, standing: Option<&dyn Readable>) -> io::Result<()> {
        match standing {
            Some(w) if !self.more.get() => poll_fn(|cx| w.poll_readable(cx)).await,
            _ => self.ready().await,
        }
    }

    /// One non-blocking `recv` into `buf`: `Ok(None)` when nothing is
    /// there after all, `Ok(Some(0))` at the end of the stream.
    pub fn try_recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let cap = buf.len();
        // SAFETY: `recv` writes at most `cap` bytes into `buf`.
        let n = unsafe { libc::recv(self.fd(), buf.as_mut_ptr().cast(), cap, libc::MSG_DONTWAIT) };
        if n < 0 {
            self.more.set(false);
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
                _ => Err(e),
            };
        }
        let n = n as usize;
        self.more.set(n == cap && n > 0);
        Ok(Some(n))
    }

    /// One non-blocking `send` of `bytes`: how many went (0 when the
    /// socket buffer is full).
    pub fn try_send(&self, bytes: &[u8]) -> io::Result<usize> {
        // SAFETY: `send` only reads `bytes`.
        let n = unsafe {
            libc::send(
                self.fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
                _ => Err(e),
            };
        }
        if n == 0 && !bytes.is_empty() {
            return Err(io::ErrorKind::WriteZero.into());
        }
        Ok(n as usize)
    }

    /// Shuts the sending side down (a FIN after what was sent).
    pub fn shutdown_write(&self) {
        // SAFETY: a plain syscall on a socket this stream owns.
        unsafe {
            libc::shutdown(self.fd(), libc::SHUT_WR);
        }
    }

    /// Writes all of `bytes`, waiting for room when the socket buffer is
    /// full.
    pub async fn write_all(&self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            match self.try_send(bytes)? {
                0 => self.writable().await?,
                n => bytes = &bytes[n..],
            }
        }
        Ok(())
    }
}

/// A readiness wait that can be left and taken up again.
pub trait Readable {
    /// Ready once the socket is readable; the wait stays posted when the
    /// caller stops polling.
    fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

/// A wait for a socket to become readable that outlives the futures
/// awaiting it. A session that waits on its client in two places in turn
/// (between transactions, and while a transaction runs, in a `select!`
/// that the server's side ends) would otherwise post a readiness request,
/// cancel it when the `select!` ends, and post another: on io_uring a
/// PollAdd, an AsyncCancel (and an allocation the runtime makes to hold
/// the cancelled operation) and a second PollAdd per transaction. Here
/// the request stays posted until the socket is readable, whoever awaits
/// it then.
///
/// `make` starts a wait ([`ReadyStream::readable`] of the socket); the
/// wait in progress lives in `slot`, pinned where the standing wait's
/// owner lives (see [`unarmed`]).
pub struct Standing<'p, F, M> {
    make: M,
    slot: RefCell<Pin<&'p mut Option<F>>>,
}

/// No wait yet, of the type `make` starts: the slot of a [`Standing`],
/// to pin where it lives (`std::pin::pin!(unarmed(&make))`).
pub fn unarmed<F>(_make: &impl Fn() -> F) -> Option<F> {
    None
}

impl<'p, F, M> Standing<'p, F, M>
where
    F: Future<Output = io::Result<()>>,
    M: Fn() -> F,
{
    pub fn new(make: M, slot: Pin<&'p mut Option<F>>) -> Self {
        Standing {
            make,
            slot: RefCell::new(slot),
        }
    }
}

impl<F, M> Readable for Standing<'_, F, M>
where
    F: Future<Output = io::Result<()>>,
    M: Fn() -> F,
{
    fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut slot = self.slot.borrow_mut();
        if slot.is_none() {
            slot.set(Some((self.make)()));
        }
        let polled = slot
            .as_mut()
            .as_pin_mut()
            .map_or(Poll::Ready(Ok(())), |wait| wait.poll(cx));
        if polled.is_ready() {
            slot.set(None);
        }
        polled
    }
}
