//! The shard's relay ring: an io_uring of tollgate's own, beside the one
//! monoio runs on, for the plain relay's reads and writes.
//!
//! Why a second ring: a relay is cheapest when it takes the bytes from the
//! completion itself, and an idle session must hold no buffer, which
//! together call for receives that pick their buffer from a ring of
//! provided buffers only when data arrives. monoio 0.2 submits only its own
//! operation types and gives no access to its ring (no buffer-select recv,
//! no way to register a provided-buffer ring), so the relay's operations go
//! to this ring instead. `perf/relaybench` measured this design (`bridge`)
//! at 0.61× the CPU per round trip of the readiness relay when the relay
//! thread is saturated, as cheap as a bare ring outside monoio; in the
//! load harness, where a wake-up finds about one session's work, it cost
//! 1.08× (8 clients) and 1.13× (1 client), so it is opt-in
//! (`plain_relay = "completion"`).
//!
//! How the two rings meet: this ring signals an eventfd on every
//! completion, and the shard's reactor task ([`RelayRing::drive`]) keeps a
//! read of that eventfd posted on monoio's ring, so a shard waiting in
//! monoio wakes for either. Sessions queue their operations here, wake the
//! reactor, and the reactor submits everything queued in one
//! `io_uring_enter` per turn, then hands out the completions.
//!
//! The ring is `COOP_TASKRUN | TASKRUN_FLAG` (with `SINGLE_ISSUER` where
//! the kernel has it): completions are posted when the shard thread enters
//! the kernel anyway, never by interrupting it. Not `DEFER_TASKRUN`: its
//! completions are posted only inside this ring's own enter, so the
//! eventfd would never fire for a shard asleep in monoio's.
//!
//! Receives are single-shot (one per direction, re-armed by the pump): a
//! session never has more than one buffer of unread data waiting per
//! direction, so one slow peer cannot drain the shard's buffers.

use std::cell::{Cell, RefCell};
use std::future::{poll_fn, Future};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use io_uring::{cqueue, opcode, squeue, types, IoUring};

/// Buffer-ring slots; the most buffers the ring can ever provide.
const RING_ENTRIES: u16 = 4096;
/// Buffers added at a time: at start, and when a receive found none.
const GROW_BY: usize = 64;
pub const GROUP: u16 = 0;
/// Submission queue entries: one turn's worth of sends and receives.
const SQ_ENTRIES: u32 = 1024;
/// io_uring_enter(2): run pending task work and post completions.
const IORING_ENTER_GETEVENTS: u32 = 1;
/// user_data of the cancels, whose own completions are ignored.
const CANCEL: u64 = u64::MAX;

/// One operation's state, indexed by its user_data.
enum Slot {
    Free,
    Pending {
        waker: Option<Waker>,
        /// The buffer a send reads from, kept out of the ring until the
        /// send completes.
        holds: Option<u16>,
    },
    Done {
        res: i32,
        flags: u32,
        holds: Option<u16>,
    },
    /// Its future is gone; the completion only returns what the operation
    /// holds or took.
    Abandoned {
        holds: Option<u16>,
    },
}

/// Provided buffers: `RING_ENTRIES` slots the kernel takes buffers from
/// (buffer group [`GROUP`]), and the memory they point at, added
/// [`GROW_BY`] at a time. Public for `perf/relaybench`'s bare ring.
pub struct ProvidedBuffers {
    /// `RING_ENTRIES` slots, mapped for the kernel to read.
    slots: *mut types::BufRingEntry,
    memory: Vec<Box<[u8]>>,
    size: usize,
    tail: u16,
    /// Buffers in the ring now (given and not yet taken by a receive).
    in_ring: usize,
}

/// Freed only with the process: a ring being closed is torn down by the
/// kernel asynchronously, and a receive still posted could write into
/// memory freed before that.
impl Drop for ProvidedBuffers {
    fn drop(&mut self) {
        std::mem::forget(std::mem::take(&mut self.memory));
    }
}

impl ProvidedBuffers {
    /// Unregistered, and without buffers until the first [`grow`](Self::grow).
    pub fn new(size: usize) -> io::Result<ProvidedBuffers> {
        let bytes = RING_ENTRIES as usize * std::mem::size_of::<types::BufRingEntry>();
        // SAFETY: a fresh anonymous private mapping, checked below; it is
        // page-aligned as the kernel requires.
        let slots = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if slots == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(ProvidedBuffers {
            slots: slots.cast(),
            memory: Vec::new(),
            size,
            tail: 0,
            in_ring: 0,
        })
    }

    /// Registers the slots with `ring` as buffer group [`GROUP`].
    ///
    /// # Safety
    /// `self` must outlive `ring`'s use of the group: the kernel reads the
    /// slots and writes the buffers they point at.
    pub unsafe fn register(&self, ring: &IoUring) -> io::Result<()> {
        // SAFETY: the caller keeps the mapping alive (see above).
        unsafe {
            ring.submitter()
                .register_buf_ring(self.slots as u64, RING_ENTRIES, GROUP)
        }
    }

    /// The bytes of buffer `bid`, for a send of what a receive put there.
    pub fn as_ptr(&self, bid: u16) -> *const u8 {
        self.memory[bid as usize].as_ptr()
    }

    /// Adds up to `GROW_BY` buffers; false when the ring is full.
    pub fn grow(&mut self) -> bool {
        let have = self.memory.len();
        let add = GROW_BY.min(RING_ENTRIES as usize - have);
        for bid in have..have + add {
            self.memory.push(vec![0; self.size].into_boxed_slice());
            self.give(bid as u16);
        }
        self.publish();
        add > 0
    }

    /// Puts a buffer back in the ring (seen by the kernel at `publish`).
    pub fn give(&mut self, bid: u16) {
        let slot = (self.tail & (RING_ENTRIES - 1)) as usize;
        let buf = &mut self.memory[bid as usize];
        // SAFETY: `slot` < RING_ENTRIES, inside the mapping; the kernel
        // reads a slot only between the head and the published tail, and
        // this one is past the tail.
        let e = unsafe { &mut *self.slots.add(slot) };
        e.set_addr(buf.as_mut_ptr() as u64);
        e.set_len(buf.len() as u32);
        e.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
        self.in_ring += 1;
    }

    /// Notes that a receive took a buffer out of the ring.
    pub fn taken(&mut self) {
        self.in_ring = self.in_ring.saturating_sub(1);
    }

    /// Buffers the kernel can take now.
    pub fn available(&self) -> usize {
        self.in_ring
    }

    /// Lets the kernel see the buffers given since the last publish.
    pub fn publish(&self) {
        // SAFETY: the tail lives in the first slot, inside the mapping; the
        // release store makes the slots written before it visible to the
        // kernel's acquire load.
        unsafe {
            // The tail is the first slot's last u16 (`resv`, offset 14),
            // derived from the mapping's own pointer.
            let tail = self
                .slots
                .cast::<u8>()
                .add(14)
                .cast::<std::sync::atomic::AtomicU16>();
            (*tail).store(self.tail, std::sync::atomic::Ordering::Release);
        }
    }
}

struct Inner {
    ring: IoUring,
    bufs: ProvidedBuffers,
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// Entries pushed since the last submit.
    queued: u32,
    /// Receives that found no buffer, waiting for one to come back.
    starved: Vec<Waker>,
    /// Entries that found the submission queue full and could not be
    /// submitted at once; pushed first in the next turn.
    backlog: Vec<squeue::Entry>,
}

/// How a reactor turn went.
#[derive(PartialEq, Eq)]
enum Turn {
    Done,
    /// The kernel took nothing from the submission queue this time.
    Stalled,
}

/// A shard's relay ring; see the module doc.
pub struct RelayRing {
    inner: RefCell<Inner>,
    eventfd: Cell<Option<OwnedFd>>,
    /// The reactor task while it waits, to be woken when entries queue.
    reactor: Cell<Option<Waker>>,
}

impl RelayRing {
    /// A ring with `buffer_size`-byte provided buffers, or an error when
    /// this kernel lacks what it needs (provided-buffer rings: Linux 5.19);
    /// the shard then relays with monoio's poll-io instead.
    pub fn new(buffer_size: usize) -> io::Result<Rc<RelayRing>> {
        let ring = build_ring()?;
        let mut bufs = ProvidedBuffers::new(buffer_size)?;
        // SAFETY: the buffers live beside the ring in `Inner`, for the
        // shard's life (the mapping is never unmapped).
        unsafe { bufs.register(&ring)? };
        bufs.grow();
        // SAFETY: eventfd takes plain integers; checked below.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `efd` is a fresh fd owned by nothing else.
        let efd = unsafe { OwnedFd::from_raw_fd(efd) };
        ring.submitter().register_eventfd(efd.as_raw_fd())?;
        Ok(Rc::new(RelayRing {
            inner: RefCell::new(Inner {
                ring,
                bufs,
                slots: Vec::new(),
                free: Vec::new(),
                queued: 0,
                starved: Vec::new(),
                backlog: Vec::new(),
            }),
            eventfd: Cell::new(Some(efd)),
            reactor: Cell::new(None),
        }))
    }

    /// The shard's reactor: submits what sessions queued and hands out
    /// completions, sleeping in monoio (on the eventfd) when there is
    /// neither. Runs for the shard's life.
    pub async fn drive(self: Rc<Self>) {
        let Some(efd) = self.eventfd.take() else {
            return;
        };
        let Ok(file) = monoio::fs::File::from_std(std::fs::File::from(efd)) else {
            tracing::error!("relay ring: the eventfd cannot be read through monoio");
            return;
        };
        let mut read = std::pin::pin!(file.read_at(Vec::with_capacity(8), 0));
        loop {
            // Never yields while busy: the sessions a turn woke run after
            // this task waits, queue their next operations and wake it
            // again, and once all is quiet the shard parks in monoio (which
            // is also when monoio's own timers and completions are seen).
            if self.turn() == Turn::Stalled {
                // The kernel took nothing: give it a moment rather than
                // spin on the shard's thread.
                monoio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            let signalled = poll_fn(|cx| {
                let inner = self.inner.borrow();
                if inner.queued > 0 || !inner.backlog.is_empty() {
                    return Poll::Ready(None);
                }
                drop(inner);
                self.reactor.set(Some(cx.waker().clone()));
                read.as_mut().poll(cx).map(Some)
            })
            .await;
            self.reactor.take();
            if let Some((res, mut buf)) = signalled {
                if let Err(e) = res {
                    // Never seen; if it happens, the ring is still served,
                    // by looking every millisecond.
                    tracing::error!(error = %e, "relay ring: reading its eventfd failed; polling");
                    monoio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
                buf.clear();
                read.set(file.read_at(buf, 0));
            }
        }
    }

    /// Submits what is queued and hands out the completions there are.
    fn turn(&self) -> Turn {
        let mut inner = self.inner.borrow_mut();
        for e in std::mem::take(&mut inner.backlog) {
            self.push(&mut inner, e);
        }
        let queued = inner.queued;
        let (taskrun, overflow) = {
            let sq = inner.ring.submission();
            (sq.taskrun(), sq.cq_overflow())
        };
        let mut outcome = Turn::Done;
        if queued > 0 || taskrun || overflow {
            // SAFETY: no argument struct is passed.
            let res = unsafe {
                inner.ring.submitter().enter::<libc::sigset_t>(
                    queued,
                    0,
                    IORING_ENTER_GETEVENTS,
                    None,
                )
            };
            match res {
                Ok(n) => inner.queued -= n as u32,
                // EBUSY/EAGAIN: completions must be reaped first; the
                // entries stay queued for the next turn.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY | libc::EAGAIN)) => {
                    outcome = Turn::Stalled;
                }
                Err(e) => {
                    tracing::error!(error = %e, "relay ring: io_uring_enter failed");
                    outcome = Turn::Stalled;
                }
            }
        }
        let mut returned = false;
        let Inner {
            ring,
            slots,
            bufs,
            free,
            ..
        } = &mut *inner;
        for cqe in ring.completion() {
            let id = cqe.user_data();
            if id == CANCEL {
                continue;
            }
            let slot = &mut slots[id as usize];
            let took = cqueue::buffer_select(cqe.flags());
            if took.is_some() {
                bufs.taken();
            }
            match std::mem::replace(slot, Slot::Free) {
                Slot::Pending { waker, holds } => {
                    *slot = Slot::Done {
                        res: cqe.result(),
                        flags: cqe.flags(),
                        holds,
                    };
                    if let Some(w) = waker {
                        w.wake();
                    }
                    continue;
                }
                Slot::Abandoned { holds } => {
                    for bid in holds.into_iter().chain(took) {
                        bufs.give(bid);
                        returned = true;
                    }
                    free.push(id as u32);
                }
                // A completion for a slot that is not waiting for one
                // cannot happen; keep the slot as it was.
                other => *slot = other,
            }
        }
        if returned {
            bufs.publish();
        }
        drop(inner);
        if returned {
            self.buffers_returned();
        }
        outcome
    }

    fn push(&self, inner: &mut Inner, e: squeue::Entry) {
        // SAFETY: every entry's memory outlives its completion: receives
        // write only into provided buffers, and a send's buffer is held by
        // its slot until it completes.
        if unsafe { inner.ring.submission().push(&e) }.is_err() {
            // Full: submit what is there, then try again; if the kernel
            // takes nothing now (its completion queue overflowed), the
            // entry waits for the next turn, which reaps first.
            let submitted = inner.ring.submit();
            if let Ok(n) = submitted {
                inner.queued -= n as u32;
            }
            // SAFETY: as above.
            if submitted.is_err() || unsafe { inner.ring.submission().push(&e) }.is_err() {
                inner.backlog.push(e);
                if let Some(w) = self.reactor.take() {
                    w.wake();
                }
                return;
            }
        }
        inner.queued += 1;
        if let Some(w) = self.reactor.take() {
            w.wake();
        }
    }

    fn new_slot(inner: &mut Inner, holds: Option<u16>) -> u32 {
        let slot = Slot::Pending { waker: None, holds };
        match inner.free.pop() {
            Some(id) => {
                inner.slots[id as usize] = slot;
                id
            }
            None => {
                inner.slots.push(slot);
                (inner.slots.len() - 1) as u32
            }
        }
    }

    /// Posts a receive on `fd` that takes a provided buffer when data
    /// comes.
    fn arm_recv(&self, fd: RawFd) -> u32 {
        let mut inner = self.inner.borrow_mut();
        let id = Self::new_slot(&mut inner, None);
        let e = opcode::Recv::new(types::Fd(fd), std::ptr::null_mut(), 0)
            .buf_group(GROUP)
            .build()
            .flags(squeue::Flags::BUFFER_SELECT)
            .user_data(id as u64);
        self.push(&mut inner, e);
        id
    }

    /// Posts a send of `len` bytes of buffer `bid` from `at`.
    fn arm_send(&self, fd: RawFd, bid: u16, at: usize, len: usize) -> u32 {
        let mut inner = self.inner.borrow_mut();
        let id = Self::new_slot(&mut inner, Some(bid));
        // SAFETY: `at` < the buffer's length (checked by send_all).
        let ptr = unsafe { inner.bufs.as_ptr(bid).add(at) };
        let e = opcode::Send::new(types::Fd(fd), ptr, (len - at) as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(id as u64);
        self.push(&mut inner, e);
        id
    }

    /// The result of operation `id` once it completed: (res, flags, the
    /// buffer it held).
    fn poll_op(&self, id: u32, cx: &mut Context<'_>) -> Poll<(i32, u32, Option<u16>)> {
        let mut inner = self.inner.borrow_mut();
        match &mut inner.slots[id as usize] {
            Slot::Pending { waker, .. } => {
                crate::io_util::remember_waker(waker, cx.waker());
                Poll::Pending
            }
            Slot::Done { res, flags, holds } => {
                let done = (*res, *flags, *holds);
                inner.slots[id as usize] = Slot::Free;
                inner.free.push(id);
                Poll::Ready(done)
            }
            Slot::Free | Slot::Abandoned { .. } => {
                unreachable!("relay ring: an operation polled after it was given up")
            }
        }
    }

    /// Gives up on operation `id`: what it holds or takes goes back to the
    /// ring when it completes; a pending one is cancelled.
    fn abandon(&self, id: u32) {
        let mut inner = self.inner.borrow_mut();
        match std::mem::replace(&mut inner.slots[id as usize], Slot::Free) {
            Slot::Pending { holds, .. } => {
                inner.slots[id as usize] = Slot::Abandoned { holds };
                let e = opcode::AsyncCancel::new(id as u64)
                    .build()
                    .user_data(CANCEL);
                self.push(&mut inner, e);
                // Submitted now, not at the reactor's next turn: the
                // session's sockets close once its futures are dropped,
                // and an entry still queued then would name an fd number
                // the next accepted connection may already have. In the
                // kernel, an operation holds its file open until it ends.
                if let Ok(n) = inner.ring.submit() {
                    inner.queued -= n as u32;
                }
            }
            Slot::Done { flags, holds, .. } => {
                inner.free.push(id);
                let took = cqueue::buffer_select(flags);
                for bid in holds.into_iter().chain(took) {
                    inner.bufs.give(bid);
                }
                inner.bufs.publish();
                drop(inner);
                self.buffers_returned();
            }
            other => inner.slots[id as usize] = other,
        }
    }

    fn give_back(&self, bid: u16) {
        {
            let mut inner = self.inner.borrow_mut();
            inner.bufs.give(bid);
            inner.bufs.publish();
        }
        self.buffers_returned();
    }

    fn buffers_returned(&self) {
        let starved = std::mem::take(&mut self.inner.borrow_mut().starved);
        for w in starved {
            w.wake();
        }
    }

    /// After a receive found no buffer: more if the ring has room,
    /// otherwise waits until one comes back.
    async fn wait_for_buffers(&self) {
        {
            let mut inner = self.inner.borrow_mut();
            // Some came back since the receive found none, or the ring can
            // take more: post again at once.
            if inner.bufs.available() > 0 || inner.bufs.grow() {
                return;
            }
        }
        let mut asked = false;
        poll_fn(|cx| {
            if asked {
                return Poll::Ready(());
            }
            asked = true;
            self.inner.borrow_mut().starved.push(cx.waker().clone());
            Poll::Pending
        })
        .await
    }
}

/// The relay ring, set up as well as the kernel allows. The completion
/// queue has room for four completions per submission slot: a busy shard
/// has up to four operations per session in flight.
fn build_ring() -> io::Result<IoUring> {
    let cq = 4 * SQ_ENTRIES;
    let mut best = IoUring::builder();
    best.setup_cqsize(cq)
        .setup_single_issuer()
        .setup_coop_taskrun()
        .setup_taskrun_flag();
    let mut coop = IoUring::builder();
    coop.setup_cqsize(cq)
        .setup_coop_taskrun()
        .setup_taskrun_flag();
    let mut plain = IoUring::builder();
    plain.setup_cqsize(cq);
    best.build(SQ_ENTRIES)
        .or_else(|_| coop.build(SQ_ENTRIES))
        .or_else(|_| plain.build(SQ_ENTRIES))
}

/// Bytes received into a provided buffer; the buffer goes back to the
/// ring when this is dropped.
pub struct Chunk<'r> {
    ring: &'r RelayRing,
    bid: u16,
    len: usize,
}

impl Chunk<'_> {
    pub fn bytes(&self) -> &[u8] {
        let inner = self.ring.inner.borrow();
        let buf: &[u8] = &inner.bufs.memory[self.bid as usize][..self.len];
        // SAFETY: the boxed buffer never moves or is freed while the ring
        // lives (`memory` only grows), and no one writes it while this
        // chunk holds it out of the ring.
        unsafe { std::slice::from_raw_parts(buf.as_ptr(), buf.len()) }
    }

    /// Keeps only the first `len` bytes.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}

impl Drop for Chunk<'_> {
    fn drop(&mut self) {
        self.ring.give_back(self.bid);
    }
}

/// The receiving side of one socket: at most one receive posted.
pub struct Receiver<'r> {
    ring: &'r RelayRing,
    fd: RawFd,
    posted: Option<u32>,
}

impl<'r> Receiver<'r> {
    /// Posts the first receive at once.
    pub fn new(ring: &'r RelayRing, fd: RawFd) -> Self {
        let mut r = Receiver {
            ring,
            fd,
            posted: None,
        };
        r.post();
        r
    }

    /// Posts the next receive (if none is), so that data is taken while
    /// the last chunk is still being sent on.
    pub fn post(&mut self) {
        if self.posted.is_none() {
            self.posted = Some(self.ring.arm_recv(self.fd));
        }
    }

    /// The next bytes; `Ok(None)` at end of stream. Dropping this future
    /// leaves the receive posted.
    pub async fn next(&mut self) -> io::Result<Option<Chunk<'r>>> {
        loop {
            self.post();
            let id = self.posted.expect("posted");
            let (res, flags, _) = poll_fn(|cx| self.ring.poll_op(id, cx)).await;
            self.posted = None;
            if res == -libc::ENOBUFS {
                self.ring.wait_for_buffers().await;
                continue;
            }
            return self.chunk(res, flags);
        }
    }

    fn chunk(&self, res: i32, flags: u32) -> io::Result<Option<Chunk<'r>>> {
        let Some(bid) = cqueue::buffer_select(flags) else {
            return match res {
                r if r < 0 => Err(io::Error::from_raw_os_error(-r)),
                _ => Ok(None),
            };
        };
        if res < 0 {
            self.ring.give_back(bid);
            return Err(io::Error::from_raw_os_error(-res));
        }
        let chunk = Chunk {
            ring: self.ring,
            bid,
            len: res as usize,
        };
        Ok((res > 0).then_some(chunk))
    }

    /// Withdraws the posted receive and returns what it got before the
    /// cancel reached it, so that a socket handed on loses no bytes.
    pub async fn withdraw(mut self) -> io::Result<Option<Chunk<'r>>> {
        // `posted` stays set until the result is in: dropped before, this
        // receiver abandons the receive as usual.
        let Some(id) = self.posted else {
            return Ok(None);
        };
        {
            let mut inner = self.ring.inner.borrow_mut();
            let e = opcode::AsyncCancel::new(id as u64)
                .build()
                .user_data(CANCEL);
            self.ring.push(&mut inner, e);
        }
        let (res, flags, _) = poll_fn(|cx| self.ring.poll_op(id, cx)).await;
        self.posted = None;
        match res {
            r if r == -libc::ECANCELED || r == -libc::ENOBUFS => Ok(None),
            r => self.chunk(r, flags),
        }
    }
}

impl Drop for Receiver<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.posted.take() {
            self.ring.abandon(id);
        }
    }
}

/// Sends all of `chunk` (its first `len` bytes) to `fd`. If dropped while
/// a send is in flight, the buffer stays out of the ring until the kernel
/// is done with it.
pub async fn send_all(ring: &RelayRing, fd: RawFd, chunk: Chunk<'_>) -> io::Result<()> {
    if chunk.len == 0 {
        return Ok(());
    }
    let (bid, len) = (chunk.bid, chunk.len);
    // The slot holds the buffer from here: it goes back with the last
    // send's completion (or the abandoned one's).
    std::mem::forget(chunk);
    let mut at = 0;
    loop {
        let op = Op {
            ring,
            id: Some(ring.arm_send(fd, bid, at, len)),
        };
        let (res, _, _) = op.await;
        let done = match res {
            n if n > 0 => {
                at += n as usize;
                at >= len
            }
            0 => {
                ring.give_back(bid);
                return Err(io::ErrorKind::WriteZero.into());
            }
            e => {
                ring.give_back(bid);
                return Err(io::Error::from_raw_os_error(-e));
            }
        };
        if done {
            ring.give_back(bid);
            return Ok(());
        }
    }
}

/// One posted operation, abandoned if dropped before it completes.
struct Op<'r> {
    ring: &'r RelayRing,
    id: Option<u32>,
}

impl Future for Op<'_> {
    type Output = (i32, u32, Option<u16>);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let id = self.id.expect("polled after completion");
        let done = self.ring.poll_op(id, cx);
        if done.is_ready() {
            self.id = None;
        }
        done
    }
}

impl Drop for Op<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            self.ring.abandon(id);
        }
    }
}
