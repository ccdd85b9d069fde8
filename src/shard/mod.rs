//! Shards: one OS thread per worker, each pinned to a CPU and running its own
//! monoio runtime (io_uring, or epoll where io_uring is unavailable) with its
//! own SO_REUSEPORT listener, so the kernel spreads connections across
//! shards and a connection never leaves the shard that accepted it.
//!
//! Besides its clients, each shard serves what other threads ask of it over
//! the [`bus`] (metrics, sessions, terminations, the drain) and the cancel
//! requests other shards route to it ([`services`]); the life of one client
//! connection is [`crate::session`].

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use monoio::net::TcpListener;
use tracing::{debug, error, info, warn};

use crate::session::{self, ShardContext, Shared};

pub mod bus;
mod fds;
mod services;

use bus::Bus;

/// Pending connections per listener; the kernel caps it at somaxconn.
const LISTEN_BACKLOG: i32 = 4096;
/// io_uring submission queue entries per shard.
const URING_ENTRIES: u32 = 1024;

/// Running shards.
pub struct Shards {
    pub local_addr: SocketAddr,
    pub io_uring: bool,
    bus: Arc<Bus>,
}

impl Shards {
    /// The way to ask the shards for metrics and sessions (the admin API).
    pub fn bus(&self) -> Arc<Bus> {
        self.bus.clone()
    }

    /// Drains every shard: each stops accepting at once, lets its sessions
    /// finish until `timeout` has passed, then ends the rest with FATAL
    /// 57P01. Returns, once every shard answered (or gave no answer in
    /// time), how many sessions had to be ended.
    pub fn drain(&self, timeout: Duration) -> usize {
        let deadline = std::time::Instant::now() + timeout;
        let mut replies = Vec::new();
        for shard in 0..self.bus.shards() {
            let (tx, rx) = flume::bounded(1);
            let request = bus::Request::Drain {
                deadline,
                reply: tx,
            };
            if self.bus.send(shard, request) {
                replies.push(rx);
            } else {
                warn!(shard, "shard did not take the drain request");
            }
        }
        // The shards' own grace after the deadline, and a margin.
        let wait_until = deadline + Duration::from_secs(5);
        replies
            .into_iter()
            .map(|rx| {
                let left = wait_until.saturating_duration_since(std::time::Instant::now());
                rx.recv_timeout(left).unwrap_or(0)
            })
            .sum()
    }
}

/// Binds one SO_REUSEPORT listener per shard and starts the shard threads.
/// Binding happens here, before any thread starts, so that a port in use is
/// reported at once and a port of 0 resolves to one port shared by all.
pub fn start(shared: Arc<Shared>) -> std::io::Result<Shards> {
    let settings = shared.settings.get();
    let config = &settings.config;
    let mut listeners = Vec::with_capacity(config.workers);
    let mut addr = config.listen;
    for _ in 0..config.workers {
        let l = bind_reuseport(addr)?;
        addr = l.local_addr()?;
        listeners.push(l);
    }
    small_pages_only();
    let io_uring = monoio::utils::detect_uring();
    if !io_uring {
        warn!("io_uring is unavailable here (old kernel or seccomp); using the epoll driver");
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let bus = Arc::new(Bus::new(config.workers));
    let mut threads = 0;
    for (shard, listener) in listeners.into_iter().enumerate() {
        let pin_cpus = config.pin_cpus;
        let shared = shared.clone();
        let inbox = bus.take_inbox(shard);
        // Detached: shards run until the process exits.
        std::thread::Builder::new()
            // Thread names (comm) are cut at 15 bytes: keep them short.
            .name(format!("tg-shard-{shard}"))
            .spawn(move || {
                if !pin_cpus {
                    // Left to the scheduler.
                } else if let Err(e) = monoio::utils::bind_to_cpu_set([shard % cpus]) {
                    warn!(shard, error = ?e, "could not pin shard to a CPU");
                }
                let ctx = ShardContext::new(shard, &shared);
                if io_uring {
                    match monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
                        .with_entries(URING_ENTRIES)
                        .enable_timer()
                        .build()
                    {
                        Ok(mut rt) => return rt.block_on(accept_loop(ctx, listener, inbox)),
                        Err(e) => warn!(shard, error = %e, "io_uring runtime failed; using epoll"),
                    }
                }
                match monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
                    .enable_timer()
                    .build()
                {
                    Ok(mut rt) => rt.block_on(accept_loop(ctx, listener, inbox)),
                    Err(e) => error!(shard, error = %e, "shard runtime failed to start"),
                }
            })?;
        threads += 1;
    }
    info!(addr = %addr, shards = threads, io_uring, "tollgate listening");
    Ok(Shards {
        local_addr: addr,
        io_uring,
        bus,
    })
}

/// Opts the process out of transparent huge pages. The allocator asks for
/// them on its arenas, and then a session that touches a few hundred bytes
/// of a fresh 2 MiB page makes all of it resident: 1,000 idle sessions
/// measured 10 KiB each with huge pages, against about 2 KiB without. The
/// heap is small and per-shard, so the TLB gains are nil. Best effort: an
/// old kernel without the flag just keeps its default.
fn small_pages_only() {
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and touches no memory
    // of ours; it only sets a flag on this process.
    let rc = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if rc != 0 {
        debug!(error = %std::io::Error::last_os_error(), "transparent huge pages left on");
    }
}

fn spawn_session(ctx: &Rc<ShardContext>, stream: monoio::net::TcpStream, peer: SocketAddr) {
    let shard = ctx.shard;
    let session = crate::io_util::CatchUnwind(Box::pin(session::run(ctx.clone(), stream, peer)));
    monoio::spawn(async move {
        if session.await.is_err() {
            // A bug, not bad input: input errors are handled. Only this
            // session is lost; the shard carries on.
            error!(shard, %peer, "session panicked; connection closed");
        }
    });
}

fn bind_reuseport(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_port(true)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket
        .bind(&addr.into())
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

async fn accept_loop(
    ctx: ShardContext,
    listener: std::net::TcpListener,
    inbox: Option<flume::Receiver<bus::Request>>,
) {
    let shard = ctx.shard;
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            error!(shard, error = %e, "shard could not adopt its listener");
            return;
        }
    };
    let ctx = Rc::new(ctx);
    let fd = std::os::fd::AsRawFd::as_raw_fd(&listener);
    spawn_services(&ctx, inbox, fd);
    ctx.set_accepting(true);
    let mut reserve = fds::Reserve::open();
    // Out of fds since the last accept failed so; logged once each way.
    let mut starved = false;
    loop {
        // Kept full before each accept: it is what lets a client queued
        // while the process is out of fds hear why (see fds.rs). Without
        // it, wait for an fd rather than for a client.
        if let Err(e) = reserve.refill() {
            starving(shard, &mut starved, &e);
            if ctx.draining.fired().is_some() {
                break;
            }
            monoio::time::sleep(fds::RETRY).await;
            continue;
        }
        let accepted = listener.accept().await;
        if ctx.draining.fired().is_some() {
            // Accepted in the last moment before the shutdown: serve it.
            if let Ok((stream, peer)) = accepted {
                spawn_session(&ctx, stream, peer);
            }
            break;
        }
        match accepted {
            Ok((stream, peer)) => {
                if std::mem::take(&mut starved) {
                    info!(shard, "file descriptors free again; accepting");
                }
                spawn_session(&ctx, stream, peer);
            }
            Err(e) => accept_failed(&ctx, e, &mut reserve, &mut starved, fd).await,
        }
    }
    // Draining: shut the listener down so new connections go elsewhere
    // (another process on the same port) or are refused, and keep the
    // runtime alive for the sessions still open; the process exits when the
    // drain is done. Shut down here as well as in the task above, which may
    // not have run yet when an accept failed at once (out of fds). The fd
    // stays open until the exit: closed, its number could go to another
    // shard's new socket before that task's shutdown(2) runs.
    // SAFETY: shutdown(2) on the listener's own open fd; no memory touched.
    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
    info!(shard, "listener closed; draining");
    ctx.set_accepting(false);
    let _open_until_exit = listener;
    std::future::pending::<()>().await
}

/// The shard's own tasks beside the accept loop: the token watcher, the
/// cancels routed from other shards, the bus, and the listener's shutdown
/// when draining starts.
fn spawn_services(
    ctx: &Rc<ShardContext>,
    inbox: Option<flume::Receiver<bus::Request>>,
    listener_fd: std::os::fd::RawFd,
) {
    monoio::spawn(session::watch::run(ctx.clone()));
    monoio::spawn(session::maintain_pools(ctx.clone()));
    monoio::spawn(services::serve_routed_cancels(ctx.clone()));
    if let Some(inbox) = inbox {
        monoio::spawn(services::serve_bus(ctx.clone(), inbox));
    }
    // Draining shuts the listener down, which fails the accept in flight.
    // Cancelling that accept instead would race with the kernel: a
    // connection it completes just then would be lost, and its client
    // would see a reset.
    let ctx = ctx.clone();
    monoio::spawn(async move {
        ctx.draining.wait().await;
        // SAFETY: shutdown(2) on the listener's own fd, which stays
        // open until the process exits; it touches no memory.
        unsafe { libc::shutdown(listener_fd, libc::SHUT_RDWR) };
    });
}

/// A failed accept: out of fds, the reserve fd tells one queued client
/// why; anything else is logged. Either way, waits a little rather than
/// spinning on an accept that fails at once.
async fn accept_failed(
    ctx: &ShardContext,
    e: std::io::Error,
    reserve: &mut fds::Reserve,
    starved: &mut bool,
    listener_fd: std::os::fd::RawFd,
) {
    let shard = ctx.shard;
    if fds::out_of_fds(&e) {
        starving(shard, starved, &e);
        if let Some((stream, peer)) = reserve.accept_queued(listener_fd) {
            warn!(shard, %peer, "out of file descriptors: connection refused");
            ctx.metrics.rejected("out_of_fds");
            monoio::spawn(session::refuse_out_of_fds(stream));
        }
        // The failed accept did not wait for a client: wait here
        // instead of spinning, until fds are free or one queues.
        monoio::time::sleep(fds::RETRY).await;
    } else if e.raw_os_error() == Some(libc::ECONNABORTED) {
        // The client gave up while queued; nothing to do.
        debug!(shard, "queued connection aborted before accept");
    } else {
        // Anything else (ENOBUFS, ENOMEM): back off instead of
        // spinning, and let open sessions finish.
        warn!(shard, error = %e, "accept failed");
        monoio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Logs, once per episode, that the shard is out of fds.
fn starving(shard: usize, starved: &mut bool, e: &std::io::Error) {
    if !std::mem::replace(starved, true) {
        warn!(shard, error = %e, "out of file descriptors: new clients are refused");
    }
}
