//! The relay strategies that run on monoio.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::task::Poll;

use monoio::io::poll_io::{AsyncRead, AsyncWrite, ReadBuf};
use monoio::io::{AsyncReadRent, AsyncWriteRentExt, Splitable};
use monoio::net::TcpStream;
use tollgate::shard::driver::RingSetup;

const BUF: usize = 16 * 1024;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    Poll,
    Ready,
    Comp,
    Ring,
    Bridge,
}

impl Strategy {
    pub const ALL: [Strategy; 5] = [
        Strategy::Poll,
        Strategy::Ready,
        Strategy::Comp,
        Strategy::Ring,
        Strategy::Bridge,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Strategy::Poll => "poll",
            Strategy::Ready => "ready",
            Strategy::Comp => "comp",
            Strategy::Ring => "ring",
            Strategy::Bridge => "bridge",
        }
    }

    pub fn flags(self) -> &'static [Flags] {
        match self {
            Strategy::Poll => &[Flags::Plain, Flags::Coop, Flags::Defer, Flags::Epoll],
            Strategy::Ready => &[Flags::Plain, Flags::Coop, Flags::Defer],
            Strategy::Comp => &[Flags::Plain, Flags::Defer],
            Strategy::Ring => &[Flags::Defer],
            Strategy::Bridge => &[Flags::Plain, Flags::Coop, Flags::Defer],
        }
    }
}

/// How the runtime's ring is set up (or the epoll driver).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Flags {
    /// No setup flags: monoio's default.
    Plain,
    /// COOP_TASKRUN | TASKRUN_FLAG.
    Coop,
    /// SINGLE_ISSUER | DEFER_TASKRUN.
    Defer,
    /// monoio's legacy (epoll) driver.
    Epoll,
}

impl Flags {
    pub fn name(self) -> &'static str {
        match self {
            Flags::Plain => "plain",
            Flags::Coop => "coop",
            Flags::Defer => "defer",
            Flags::Epoll => "epoll",
        }
    }

    /// The ring set-up, as tollgate's shards make it.
    pub fn builder(self) -> io_uring::Builder {
        match self {
            Flags::Coop => RingSetup::CoopTaskrun,
            Flags::Defer => RingSetup::DeferTaskrun,
            Flags::Plain | Flags::Epoll => RingSetup::Plain,
        }
        .builder()
    }
}

pub fn relay(s: Strategy, flags: Flags, l: TcpListener, server: SocketAddr, clients: usize) {
    l.set_nonblocking(true).unwrap();
    if flags == Flags::Epoll {
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap();
        rt.block_on(serve(s, l, server, clients));
    } else {
        let mut rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .uring_builder(flags.builder())
            .with_entries(1024)
            .enable_timer()
            .build()
            .expect("io_uring runtime with these flags");
        rt.block_on(serve(s, l, server, clients));
    }
}

async fn serve(s: Strategy, l: TcpListener, server: SocketAddr, clients: usize) {
    let l = monoio::net::TcpListener::from_std(l).unwrap();
    let mut pumps = Vec::new();
    for _ in 0..clients {
        let (c, _) = l.accept().await.unwrap();
        let up = TcpStream::connect(server).await.unwrap();
        c.set_nodelay(true).unwrap();
        up.set_nodelay(true).unwrap();
        pumps.push(monoio::spawn(async move {
            match s {
                Strategy::Poll => poll_pump(c, up).await,
                Strategy::Ready => ready_pump(c, up).await,
                Strategy::Comp => comp_pump(c, up).await,
                Strategy::Ring | Strategy::Bridge => unreachable!("see ring.rs"),
            }
        }));
    }
    for p in pumps {
        p.await;
    }
}

thread_local! {
    static POOL: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

fn take() -> Vec<u8> {
    POOL.with(|p| p.borrow_mut().pop())
        .unwrap_or_else(|| vec![0; BUF])
}

fn put(b: Vec<u8>) {
    POOL.with(|p| p.borrow_mut().push(b));
}

// ---- poll: readiness through monoio's poll-io, as tollgate today ----

async fn poll_pump(c: TcpStream, s: TcpStream) {
    let c = RefCell::new(c.try_into_poll_io().unwrap());
    let s = RefCell::new(s.try_into_poll_io().unwrap());
    monoio::select! {
        _ = poll_copy(&c, &s) => {},
        _ = poll_copy(&s, &c) => {},
    }
}

async fn poll_copy(
    from: &RefCell<monoio::net::tcp::stream_poll::TcpStreamPoll>,
    to: &RefCell<monoio::net::tcp::stream_poll::TcpStreamPoll>,
) -> io::Result<()> {
    loop {
        let (buf, n) = poll_fn(|cx| {
            let mut buf = take();
            let mut rb = ReadBuf::new(&mut buf);
            match Pin::new(&mut *from.borrow_mut()).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    Poll::Ready(Ok((buf, n)))
                }
                Poll::Ready(Err(e)) => {
                    put(buf);
                    Poll::Ready(Err(e))
                }
                Poll::Pending => {
                    put(buf);
                    Poll::Pending
                }
            }
        })
        .await?;
        if n == 0 {
            put(buf);
            return Ok(());
        }
        let mut at = 0;
        while at < n {
            let w =
                poll_fn(|cx| Pin::new(&mut *to.borrow_mut()).poll_write(cx, &buf[at..n])).await?;
            at += w;
        }
        put(buf);
    }
}

// ---- ready: PollAdd on the socket, then a plain recv and send ----

async fn ready_pump(c: TcpStream, s: TcpStream) {
    monoio::select! {
        _ = ready_copy(&c, &s) => {},
        _ = ready_copy(&s, &c) => {},
    }
}

async fn ready_copy(from: &TcpStream, to: &TcpStream) -> io::Result<()> {
    loop {
        from.readable(true).await?;
        let mut buf = take();
        let n = match recv(from.as_raw_fd(), &mut buf) {
            Ok(0) => {
                put(buf);
                return Ok(());
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                put(buf);
                continue;
            }
            Err(e) => {
                put(buf);
                return Err(e);
            }
        };
        let mut at = 0;
        while at < n {
            match send(to.as_raw_fd(), &buf[at..n]) {
                Ok(w) => at += w,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => to.writable(true).await?,
                Err(e) => {
                    put(buf);
                    return Err(e);
                }
            }
        }
        put(buf);
    }
}

fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of its length.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reads of its length.
    let n = unsafe {
        libc::send(
            fd,
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

// ---- comp: io_uring reads and writes, a buffer per direction ----

async fn comp_pump(c: TcpStream, s: TcpStream) {
    let (mut cr, mut cw) = c.into_split();
    let (mut sr, mut sw) = s.into_split();
    monoio::select! {
        _ = comp_copy(&mut cr, &mut sw) => {},
        _ = comp_copy(&mut sr, &mut cw) => {},
    }
}

async fn comp_copy<R: AsyncReadRent, W: AsyncWriteRentExt>(from: &mut R, to: &mut W) {
    let mut buf = Vec::with_capacity(BUF);
    loop {
        // Reads fill the buffer from its start and set its length.
        let (res, b) = from.read(buf).await;
        if !matches!(res, Ok(n) if n > 0) {
            return;
        }
        let (res, mut b) = to.write_all(b).await;
        if res.is_err() {
            return;
        }
        b.clear();
        buf = b;
    }
}
