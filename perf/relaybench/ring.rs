//! A relay on an io_uring of its own, beside or outside monoio's.
//!
//! Every socket has one multishot recv armed that takes its buffer from a
//! ring of provided buffers only when bytes arrive (so an idle connection
//! holds none); each received chunk is sent on with one send SQE, and its
//! buffer goes back to the ring when the send completes.
//!
//! Two ways to wait for it: `ring` runs outside monoio and enters the
//! kernel once per wake-up (submit the turn's sends, wait for the next
//! completion): the bound. `bridge` runs inside a monoio runtime, as
//! tollgate would have to with monoio's ring closed to other requests:
//! the ring signals an eventfd that monoio reads, and each wake-up costs
//! monoio's own enter plus this ring's.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use crate::strategy::Flags;
use tollgate::net::ring::{ProvidedBuffers, GROUP};

const BUF: usize = 16 * 1024;

/// user_data: the kind in the top byte, the socket's index or the
/// buffer id below.
const RECV: u64 = 1 << 56;
const SEND: u64 = 2 << 56;

/// io_uring_enter(2): run deferred work and post completions.
const IORING_ENTER_GETEVENTS: u32 = 1;

/// The relay's state: its ring, buffers and sockets.
struct Relay {
    ring: IoUring,
    bufs: ProvidedBuffers,
    socks: Vec<TcpStream>,
    fds: Vec<RawFd>,
    done: Vec<bool>,
    open: usize,
    sends: Vec<(usize, u16, u32)>,
    rearm: Vec<usize>,
}

impl Relay {
    fn new(flags: Flags, l: TcpListener, server: SocketAddr, clients: usize) -> Relay {
        let ring = flags
            .builder()
            .build(1024)
            .expect("io_uring with these flags");
        let mut bufs = ProvidedBuffers::new(BUF).expect("buffer memory");
        // SAFETY: the buffers live beside the ring in `Relay`, and the
        // mapping is never unmapped.
        unsafe { bufs.register(&ring).expect("provided buffer ring") };
        // 256 buffers: plenty for the bench's clients.
        for _ in 0..4 {
            bufs.grow();
        }
        // Socket i is relayed to socket i ^ 1.
        let mut socks: Vec<TcpStream> = Vec::new();
        for _ in 0..clients {
            let (c, _) = l.accept().unwrap();
            let s = TcpStream::connect(server).unwrap();
            c.set_nodelay(true).unwrap();
            s.set_nodelay(true).unwrap();
            socks.push(c);
            socks.push(s);
        }
        let fds: Vec<RawFd> = socks.iter().map(|s| s.as_raw_fd()).collect();
        let mut r = Relay {
            ring,
            bufs,
            done: vec![false; fds.len()],
            open: fds.len(),
            socks,
            fds,
            sends: Vec::new(),
            rearm: Vec::new(),
        };
        for i in 0..r.fds.len() {
            r.arm(i);
        }
        r
    }

    fn push(&mut self, e: squeue::Entry) {
        // SAFETY: every entry's buffers outlive its completion (provided
        // buffers, or one taken out of the ring until the send completes).
        while unsafe { self.ring.submission().push(&e) }.is_err() {
            self.ring.submit().unwrap();
        }
    }

    fn arm(&mut self, i: usize) {
        let e = opcode::RecvMulti::new(types::Fd(self.fds[i]), GROUP)
            .build()
            .user_data(RECV | i as u64);
        self.push(e);
    }

    /// Handles every completion there is; queues the sends and re-arms
    /// they call for. Returns how many there were.
    fn handle(&mut self) -> usize {
        let mut seen = 0;
        let mut returned = false;
        for cqe in self.ring.completion() {
            seen += 1;
            let (kind, id) = (
                cqe.user_data() & (0xff << 56),
                cqe.user_data() & 0xffff_ffff,
            );
            if kind == RECV {
                let i = id as usize;
                let res = cqe.result();
                if res > 0 {
                    let bid = cqueue::buffer_select(cqe.flags()).expect("a provided buffer");
                    self.sends.push((i ^ 1, bid, res as u32));
                } else if res == -libc::ENOBUFS {
                    // Out of buffers: arm again once sends return some.
                } else if !self.done[i] {
                    // EOF or error (the bench's clients only close): pass
                    // the close on, as the monoio pumps do by returning.
                    self.done[i] = true;
                    self.open -= 1;
                    let _ = self.socks[i ^ 1].shutdown(std::net::Shutdown::Write);
                    continue;
                }
                if !cqueue::more(cqe.flags()) && !self.done[i] {
                    self.rearm.push(i);
                }
            } else {
                // A send finished (the bench's messages always fit the
                // socket buffer, so it never ends short): its buffer goes
                // back to the ring.
                self.bufs.give(id as u16);
                returned = true;
            }
        }
        if returned {
            self.bufs.publish();
        }
        let mut sends = std::mem::take(&mut self.sends);
        for (to, bid, len) in sends.drain(..) {
            let e = opcode::Send::new(types::Fd(self.fds[to]), self.bufs.as_ptr(bid), len)
                .flags(libc::MSG_NOSIGNAL)
                .build()
                .user_data(SEND | bid as u64);
            self.push(e);
        }
        self.sends = sends;
        let mut rearm = std::mem::take(&mut self.rearm);
        for i in rearm.drain(..) {
            self.arm(i);
        }
        self.rearm = rearm;
        seen
    }
}

/// `ring`: the bare loop, one enter per wake-up.
pub fn relay(l: TcpListener, server: SocketAddr, clients: usize) {
    let mut r = Relay::new(Flags::Defer, l, server, clients);
    while r.open > 0 {
        r.ring.submit_and_wait(1).unwrap();
        r.handle();
    }
}

/// `bridge`: the same relay inside a monoio runtime (SINGLE_ISSUER |
/// DEFER_TASKRUN), woken through an eventfd; `flags` set up the relay's
/// own ring.
pub fn bridged(flags: Flags, l: TcpListener, server: SocketAddr, clients: usize) {
    let mut rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
        .uring_builder(Flags::Defer.builder())
        .with_entries(1024)
        .enable_timer()
        .build()
        .expect("monoio on io_uring");
    let mut r = Relay::new(flags, l, server, clients);
    // SAFETY: eventfd takes plain integers.
    let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    assert!(efd >= 0, "eventfd");
    // Every completion signals it, those of our own enters too (the
    // async variant signals only for io-wq's, never for sockets).
    r.ring.submitter().register_eventfd(efd).unwrap();
    // SAFETY: `efd` is ours; the File owns it from here.
    let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(efd) };
    rt.block_on(async move {
        let file = monoio::fs::File::from_std(file).unwrap();
        let mut counter = Vec::with_capacity(8);
        while r.open > 0 {
            // Submit what is queued and run the ring's deferred work, so
            // that its completions are posted; handle them; repeat until
            // quiet, then sleep in monoio until the ring signals.
            // SAFETY: no argument struct is passed.
            let queued = r.ring.submission().len() as u32;
            unsafe {
                r.ring
                    .submitter()
                    .enter::<libc::sigset_t>(queued, 0, IORING_ENTER_GETEVENTS, None)
                    .unwrap()
            };
            if r.handle() == 0 && r.ring.submission().is_empty() {
                let (res, c) = file.read_at(counter, 0).await;
                res.unwrap();
                counter = c;
                counter.clear();
            }
        }
    });
}
