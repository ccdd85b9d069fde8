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

use monoio::net::{TcpListener, UnixListener};
use tracing::{debug, error, info, warn};

use crate::net::unix_socket::SocketFile;
use crate::net::{Peer, Stream};
use crate::session::{self, ShardContext, Shared};

pub mod bus;
pub mod driver;
mod fds;
mod services;
pub mod turns;

use bus::Bus;
use driver::Driver;

use crate::config::PlainRelay;

/// Pending connections per listener; the kernel caps it at somaxconn.
const LISTEN_BACKLOG: i32 = 4096;
/// io_uring submission queue entries per shard.
const URING_ENTRIES: u32 = 1024;

/// Running shards.
pub struct Shards {
    /// The TCP listeners' address (with `listen_tcp = false`, the
    /// configured one, which names the Unix-domain socket).
    pub local_addr: SocketAddr,
    pub driver: Driver,
    bus: Arc<Bus>,
    /// The Unix-domain socket file, removed when the drain starts.
    unix_socket: std::sync::Mutex<Option<SocketFile>>,
}

impl Shards {
    /// Puts the Unix-domain socket at its path, once the whole start-up
    /// succeeded (see [`SocketFile::publish`]).
    pub fn publish_unix_socket(&self) -> std::io::Result<()> {
        let mut file = self.unix_socket.lock().unwrap_or_else(|e| e.into_inner());
        file.as_mut().map_or(Ok(()), SocketFile::publish)
    }

    /// Removes the Unix-domain socket file and its lock (if still this
    /// process's): new clients then find no server there, as when
    /// PostgreSQL stops, while the listening socket itself closes with
    /// the drain.
    pub fn release_unix_socket(&self) {
        let mut file = self.unix_socket.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(mut f) = file.take() {
            f.release();
        }
    }

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

/// Binds one SO_REUSEPORT listener per shard (and the Unix-domain socket,
/// which every shard accepts from) and starts the shard threads. Binding
/// happens here, before any thread starts, so that a port in use is
/// reported at once and a port of 0 resolves to one port shared by all.
pub fn start(shared: Arc<Shared>) -> std::io::Result<Shards> {
    let settings = shared.settings.get();
    let config = &settings.config;
    let mut tcp = Vec::with_capacity(config.workers);
    let mut addr = config.listen;
    while config.listen_tcp && tcp.len() < config.workers {
        let l = bind_reuseport(addr)?;
        addr = l.local_addr()?;
        tcp.push(l);
    }
    let unix_socket = match &config.unix_socket {
        Some(u) => Some(SocketFile::bind(
            &u.dir,
            addr.port(),
            u.mode,
            LISTEN_BACKLOG,
        )?),
        None => None,
    };
    let mut listeners = Vec::with_capacity(config.workers);
    let mut tcp = tcp.into_iter();
    for _ in 0..config.workers {
        let unix = unix_socket.as_ref().map(SocketFile::listener).transpose()?;
        listeners.push((tcp.next(), unix));
    }
    small_pages_only();
    let driver = Driver::choose(config.io_driver);
    if driver == Driver::Epoll && config.io_driver != crate::config::IoDriver::Epoll {
        warn!("io_uring is unavailable here (old kernel or seccomp); using the epoll driver");
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let bus = Arc::new(Bus::new(config.workers));
    let mut threads = 0;
    for (shard, listener) in listeners.into_iter().enumerate() {
        let pin_cpus = config.pin_cpus;
        let plain_relay = config.plain_relay;
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
                if let Driver::IoUring(best) = driver {
                    for setup in std::iter::once(best).chain(best.fallbacks()) {
                        match monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
                            .uring_builder(setup.builder())
                            .with_entries(URING_ENTRIES)
                            .enable_timer()
                            .build()
                        {
                            Ok(mut rt) => {
                                return rt.block_on(async move {
                                    if plain_relay == PlainRelay::Completion {
                                        start_relay_ring(&ctx);
                                    }
                                    run(ctx, listener, inbox).await
                                })
                            }
                            Err(e) => warn!(
                                shard,
                                ring_flags = setup.name(),
                                error = %e,
                                "io_uring runtime failed with these flags"
                            ),
                        }
                    }
                    warn!(shard, "no io_uring runtime would build; using epoll");
                }
                match monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
                    .enable_timer()
                    .build()
                {
                    Ok(mut rt) => rt.block_on(run(ctx, listener, inbox)),
                    Err(e) => error!(shard, error = %e, "shard runtime failed to start"),
                }
            })?;
        threads += 1;
    }
    let unix = unix_socket.as_ref().map(|u| u.path.display().to_string());
    info!(
        addr = %addr,
        tcp = config.listen_tcp,
        unix_socket = unix,
        shards = threads,
        io_driver = driver.name(),
        ring_flags = driver.ring_flags(),
        "tollgate listening"
    );
    Ok(Shards {
        local_addr: addr,
        driver,
        bus,
        unix_socket: std::sync::Mutex::new(unix_socket),
    })
}

/// Gives an io_uring shard its relay ring ([`crate::net::ring`]) and starts
/// the ring's reactor (`plain_relay = "completion"`); without one (a kernel
/// before 5.19) the plain relay waits for readiness, as on epoll.
fn start_relay_ring(ctx: &ShardContext) {
    match crate::net::ring::RelayRing::new(ctx.relay_buffers.buffer_size()) {
        Ok(ring) => {
            ctx.relay_buffers.set_ring(ring.clone());
            monoio::spawn(ring.drive());
        }
        Err(e) => warn!(
            shard = ctx.shard,
            error = %e,
            "no relay ring (provided-buffer rings need Linux 5.19); the plain relay waits for readiness"
        ),
    }
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

fn spawn_session(ctx: &Rc<ShardContext>, stream: Stream, peer: Peer) {
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

/// A shard's life: its services, then its accept loops, until the
/// process exits.
async fn run(
    ctx: ShardContext,
    (tcp, unix): (
        Option<std::net::TcpListener>,
        Option<std::os::unix::net::UnixListener>,
    ),
    inbox: Option<flume::Receiver<bus::Request>>,
) {
    let shard = ctx.shard;
    let ctx = Rc::new(ctx);
    spawn_services(&ctx, inbox);
    if let Some(l) = unix {
        match UnixListener::from_std(l) {
            Ok(l) => {
                monoio::spawn(accept_loop(ctx.clone(), Listener::Unix(l)));
            }
            Err(e) => error!(shard, error = %e, "shard could not adopt the Unix-domain socket"),
        }
    }
    if let Some(l) = tcp {
        match TcpListener::from_std(l) {
            Ok(l) => accept_loop(ctx, Listener::Tcp(l)).await,
            Err(e) => error!(shard, error = %e, "shard could not adopt its listener"),
        }
    }
    std::future::pending::<()>().await
}

/// A listener a shard accepts from: its own SO_REUSEPORT TCP socket, or
/// its handle on the Unix-domain socket that all shards share.
enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    async fn accept(&self) -> std::io::Result<(Stream, Peer)> {
        match self {
            Listener::Tcp(l) => l
                .accept()
                .await
                .map(|(s, a)| (Stream::Tcp(s), Peer::Tcp(a))),
            Listener::Unix(l) => {
                let (s, _) = l.accept().await?;
                let cred = s.peer_cred()?;
                let peer = Peer::Local {
                    uid: cred.uid(),
                    pid: cred.pid(),
                };
                Ok((Stream::Unix(s), peer))
            }
        }
    }

    fn fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l) => l.as_raw_fd(),
        }
    }
}

async fn accept_loop(ctx: Rc<ShardContext>, listener: Listener) {
    let shard = ctx.shard;
    let fd = listener.fd();
    ctx.accept_loop_started();
    let unix = matches!(listener, Listener::Unix(_));
    shut_down_on_drain(&ctx, fd);
    let reserve = fds::Reserve::open();
    // Out of fds since the last accept failed so; logged once each way.
    let mut starved = false;
    loop {
        // Kept full before each accept: it is what lets a client queued
        // while the process is out of fds hear why (see fds.rs). Without
        // it, wait for an fd rather than for a client.
        if let Err(e) = reserve.refill() {
            starving(shard, &mut starved, &e);
            if ctx.draining.is_set() {
                break;
            }
            monoio::time::sleep(fds::RETRY).await;
            continue;
        }
        let accepted = listener.accept().await;
        if ctx.draining.is_set() {
            // Accepted in the last moment before the shutdown: serve it.
            // A shut-down Unix-domain socket still hands out what it had
            // queued (its queue cannot move to another process, as TCP's
            // can with tcp_migrate_req), then fails: serve all of it.
            if let Ok((stream, peer)) = accepted {
                spawn_session(&ctx, stream, peer);
                if unix {
                    continue;
                }
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
            Err(e) => accept_failed(&ctx, e, &reserve, &mut starved, fd).await,
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
    info!(shard, unix, "listener closed; draining");
    ctx.accept_loop_stopped();
    let _open_until_exit = listener;
    std::future::pending::<()>().await
}

/// Shuts the listener down when the shard drains. Shutting down fails
/// the accept in flight; cancelling that accept instead would race with
/// the kernel (a connection it completes just then would be lost, its
/// client reset).
fn shut_down_on_drain(ctx: &Rc<ShardContext>, fd: std::os::fd::RawFd) {
    let ctx = ctx.clone();
    monoio::spawn(async move {
        ctx.draining.wait().await;
        // SAFETY: shutdown(2) on the listener's own fd, which stays open
        // until the process exits; it touches no memory.
        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
    });
}

/// The shard's own tasks beside the accept loops: the token watcher, the
/// pools' upkeep, the cancels routed from other shards, and the bus.
fn spawn_services(ctx: &Rc<ShardContext>, inbox: Option<flume::Receiver<bus::Request>>) {
    monoio::spawn(session::watch::run(ctx.clone()));
    monoio::spawn(session::maintain_pools(ctx.clone()));
    monoio::spawn(services::serve_routed_cancels(ctx.clone()));
    if let Some(inbox) = inbox {
        monoio::spawn(services::serve_bus(ctx.clone(), inbox));
    }
}

/// A failed accept: out of fds, the reserve fd tells one queued client
/// why; anything else is logged. Either way, waits a little rather than
/// spinning on an accept that fails at once.
async fn accept_failed(
    ctx: &ShardContext,
    e: std::io::Error,
    reserve: &fds::Reserve,
    starved: &mut bool,
    listener_fd: std::os::fd::RawFd,
) {
    let shard = ctx.shard;
    if fds::out_of_fds(&e) {
        starving(shard, starved, &e);
        if let Some(refused) = reserve.accept_queued(listener_fd) {
            warn!(shard, client = %refused.peer, "out of file descriptors: connection refused");
            ctx.metrics.rejected("out_of_fds");
            monoio::spawn(async move {
                refused
                    .tell_and_close(&session::out_of_fds_response())
                    .await
            });
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
