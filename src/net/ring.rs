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
//! thread is saturated, as cheap as a bare ring outside monoio. In the
//! load harness, where a wake-up finds about one session's work, it makes
//! a fifth to two fifths of the readiness relay's syscalls for about the
//! same CPU. It is the default plain relay (`plain_relay =
//! "completion"`); README, Performance, has the figures.
//!
//! How the two rings meet: an io_uring's own fd is readable while its
//! completion queue holds entries, so the shard's reactor task
//! ([`RelayRing::drive`]), when it has nothing left to do, posts a PollAdd
//! of this ring's fd on monoio's ring, and a shard waiting in monoio wakes
//! for either. Sessions queue their operations here and wake the reactor;
//! everything queued in a turn goes to the kernel in one `io_uring_enter`,
//! made by the last task the turn woke or else by the reactor, and the
//! completions are handed out.
//!
//! Why a poll and not an eventfd registered with the ring: the eventfd is
//! signalled by every completion, including those reaped while the shard
//! is awake (a send to a loopback peer completes inside the enter that
//! submits it), so the read posted for the next sleep found it set and
//! woke the shard at once for nothing: a park and a wake-up wasted per
//! wake-up (`strace` at one client: two `io_uring_enter`s on monoio's
//! ring per half round trip instead of one). A poll posted when the
//! reactor goes to sleep, after it has reaped everything, fires only for
//! completions that come later.
//!
//! The ring is `COOP_TASKRUN | TASKRUN_FLAG` (with `SINGLE_ISSUER` where
//! the kernel has it): completions are posted when the shard thread enters
//! the kernel anyway, never by interrupting it. Not `DEFER_TASKRUN`: its
//! completions are posted only inside this ring's own enter, so its fd
//! would never turn readable for a shard asleep in monoio's.
//!
//! Receives are single-shot (one per direction, re-armed by the pump): a
//! session never has more than one buffer of unread data waiting per
//! direction, so one slow peer cannot drain the shard's buffers.
//!
//! Provided buffers are added [`GROW_BY`] at a time when a receive finds
//! none, up to [`RING_ENTRIES`], and freed again when more than
//! [`KEEP_IN_RING`] sit unused, so a burst does not pin its peak memory.
//! When all of them are out (thousands of peers that stopped reading, each
//! holding the chunk it was sent), a receive that finds none takes a
//! buffer of its own for that one read instead of waiting: sessions never
//! wait for each other's buffers, as with the readiness relay.

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
/// Unused buffers kept in the ring; one coming back beyond this is freed.
/// Twice a growth step, so that the ring does not shrink and grow again
/// around one level.
const KEEP_IN_RING: usize = 2 * GROW_BY;
/// Below this many buffers in the ring, a pump no longer posts its next
/// receive while the last chunk is still being sent, so that a peer that
/// stopped reading holds one buffer per direction, not two.
pub const LOW_WATER: usize = 16;
pub const GROUP: u16 = 0;
/// Submission queue entries: one turn's worth of sends and receives.
const SQ_ENTRIES: u32 = 1024;
/// io_uring_enter(2): run pending task work and post completions.
const IORING_ENTER_GETEVENTS: u32 = 1;
/// user_data of the cancels, whose own completions are ignored.
const CANCEL: u64 = u64::MAX;

/// Memory an operation reads or writes, held by its slot until it
/// completes: the kernel may touch it until then.
enum Held {
    /// A provided buffer, by id: what a send reads from.
    Ring(u16),
    /// A buffer of its own: what a receive writes into when the ring had
    /// none, and what that chunk is then sent from.
    Owned(Box<[u8]>),
}

/// One operation's state, indexed by its user_data.
enum Slot {
    Free,
    Pending {
        waker: Option<Waker>,
        holds: Option<Held>,
    },
    Done {
        res: i32,
        flags: u32,
        holds: Option<Held>,
        /// Its completion woke the task waiting for it (counted in
        /// `Inner::woken` until the task takes the result).
        woke: bool,
    },
    /// Its future is gone; the completion only returns what the operation
    /// holds or took.
    Abandoned {
        holds: Option<Held>,
    },
}

/// Provided buffers: `RING_ENTRIES` slots the kernel takes buffers from
/// (buffer group [`GROUP`]), and the memory they point at, added
/// [`GROW_BY`] at a time. Public for `perf/relaybench`'s bare ring.
pub struct ProvidedBuffers {
    /// `RING_ENTRIES` slots, mapped for the kernel to read.
    slots: *mut types::BufRingEntry,
    /// By buffer id; empty for an id in `spare`.
    memory: Vec<Box<[u8]>>,
    /// Ids whose memory was freed ([`release`](Self::release)), reused
    /// first when the ring grows.
    spare: Vec<u16>,
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
            spare: Vec::new(),
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

    /// Adds up to `GROW_BY` buffers, ids freed earlier first; false when
    /// every id has its buffer out already.
    pub fn grow(&mut self) -> bool {
        let mut added = 0;
        while added < GROW_BY {
            let bid = match self.spare.pop() {
                Some(bid) => bid,
                None if self.memory.len() < RING_ENTRIES as usize => {
                    self.memory.push(Box::default());
                    (self.memory.len() - 1) as u16
                }
                None => break,
            };
            self.memory[bid as usize] = vec![0; self.size].into_boxed_slice();
            self.give(bid);
            added += 1;
        }
        self.publish();
        added > 0
    }

    /// Frees buffer `bid`, which is out of the ring, instead of giving it
    /// back; its id is reused by the next [`grow`](Self::grow).
    pub fn release(&mut self, bid: u16) {
        self.memory[bid as usize] = Box::default();
        self.spare.push(bid);
    }

    /// Takes back a buffer that is out of the ring: into the ring, or freed
    /// when the ring holds enough unused ones. True when the kernel must
    /// be told ([`publish`](Self::publish)).
    fn restore(&mut self, bid: u16) -> bool {
        if self.in_ring >= KEEP_IN_RING {
            self.release(bid);
            false
        } else {
            self.give(bid);
            true
        }
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
    /// Completions that woke their task and are not taken yet: the tasks
    /// a turn woke that have still to run.
    woken: u32,
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
    /// A duplicate of the ring's fd, until the reactor takes it to sleep
    /// on (see [`RelayRing::drive`]).
    waiter: Cell<Option<OwnedFd>>,
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
        // Made here, so that a shard that cannot have it (out of fds)
        // relays by readiness instead of with a reactor that cannot sleep.
        // SAFETY: F_DUPFD_CLOEXEC takes plain integers; checked below.
        let dup = unsafe { libc::fcntl(ring.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `dup` is a fresh fd owned by nothing else.
        let waiter = unsafe { OwnedFd::from_raw_fd(dup) };
        Ok(Rc::new(RelayRing {
            waiter: Cell::new(Some(waiter)),
            inner: RefCell::new(Inner {
                ring,
                bufs,
                slots: Vec::new(),
                free: Vec::new(),
                queued: 0,
                woken: 0,
                backlog: Vec::new(),
            }),
            reactor: Cell::new(None),
        }))
    }

    /// The shard's reactor: submits what sessions queued and hands out
    /// completions, sleeping in monoio (on a poll of this ring's fd) when
    /// there is neither. Runs for the shard's life.
    pub async fn drive(self: Rc<Self>) {
        let Some(fd) = self.waiter.take() else {
            return;
        };
        // monoio offers its readiness wait (a PollAdd on its ring) only on
        // its socket types, while PollAdd itself takes any pollable fd,
        // and an io_uring fd is readable while its completion queue holds
        // entries (or has overflowed). So the duplicate is wrapped as a
        // Unix stream: `readable` is the only method ever called on it,
        // and dropping it closes only the duplicate. On the io_uring
        // driver monoio registers nothing for it.
        let completions = match monoio::net::UnixStream::from_std(
            std::os::unix::net::UnixStream::from(fd),
        ) {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(error = %e, "relay ring: its fd cannot be watched through monoio");
                return;
            }
        };
        // Not posted until first polled (an async fn's body, here monoio's
        // PollAdd, starts at its first poll), which is when the reactor
        // has nothing left to do. Once posted it stays posted while
        // sessions wake the reactor, so a wake-up never costs a cancel.
        let mut sleep = std::pin::pin!(completions.readable(false));
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
            let woke = poll_fn(|cx| {
                let inner = self.inner.borrow();
                if inner.queued > 0 || !inner.backlog.is_empty() {
                    return Poll::Ready(None);
                }
                drop(inner);
                self.reactor.set(Some(cx.waker().clone()));
                sleep.as_mut().poll(cx).map(Some)
            })
            .await;
            self.reactor.take();
            if let Some(res) = woke {
                if let Err(e) = res {
                    // Never seen; if it happens, the ring is still served,
                    // by looking every millisecond.
                    tracing::error!(error = %e, "relay ring: polling its fd failed; looking every millisecond");
                    monoio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
                sleep.set(completions.readable(false));
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
        let mut publish = false;
        let Inner {
            ring,
            slots,
            bufs,
            free,
            woken,
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
                        woke: waker.is_some(),
                    };
                    if let Some(w) = waker {
                        *woken += 1;
                        w.wake();
                    }
                    continue;
                }
                Slot::Abandoned { holds } => {
                    publish |= restore(bufs, holds, took);
                    free.push(id as u32);
                }
                // A completion for a slot that is not waiting for one
                // cannot happen; keep the slot as it was.
                other => *slot = other,
            }
        }
        if publish {
            bufs.publish();
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

    fn new_slot(inner: &mut Inner, holds: Option<Held>) -> u32 {
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

    /// Posts a wait for `fd` to be readable, holding no buffer.
    fn arm_poll(&self, fd: RawFd) -> u32 {
        let mut inner = self.inner.borrow_mut();
        let id = Self::new_slot(&mut inner, None);
        let e = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
            .build()
            .user_data(id as u64);
        self.push(&mut inner, e);
        id
    }

    /// Posts a receive on `fd` into `buf`, a buffer of its own, for when
    /// the ring has none to give.
    fn arm_recv_owned(&self, fd: RawFd, mut buf: Box<[u8]>) -> u32 {
        let mut inner = self.inner.borrow_mut();
        let (ptr, len) = (buf.as_mut_ptr(), buf.len() as u32);
        // The slot holds the buffer (its heap memory does not move) until
        // the receive completes or, abandoned, until its completion.
        let id = Self::new_slot(&mut inner, Some(Held::Owned(buf)));
        let e = opcode::Recv::new(types::Fd(fd), ptr, len)
            .build()
            .user_data(id as u64);
        self.push(&mut inner, e);
        id
    }

    /// Posts a send of bytes `at..len` of `held`, which the slot keeps
    /// until the send completes.
    fn arm_send(&self, fd: RawFd, held: Held, at: usize, len: usize) -> u32 {
        let mut inner = self.inner.borrow_mut();
        let base = match &held {
            Held::Ring(bid) => inner.bufs.as_ptr(*bid),
            Held::Owned(buf) => buf.as_ptr(),
        };
        // SAFETY: `at` < `len` <= the buffer's length (checked by send_all).
        let ptr = unsafe { base.add(at) };
        let id = Self::new_slot(&mut inner, Some(held));
        let e = opcode::Send::new(types::Fd(fd), ptr, (len - at) as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(id as u64);
        self.push(&mut inner, e);
        id
    }

    /// The result of operation `id` once it completed: (res, flags, the
    /// memory it held).
    ///
    /// A task about to wait that is the last one a turn woke submits
    /// what is queued itself, the batch every task of the turn added to:
    /// the reactor would otherwise have to run after it only to do that,
    /// and its send to a loopback peer usually completes inside that same
    /// enter, so the task carries on without waiting at all. The reactor
    /// is still woken by every entry queued, so a batch is never left
    /// unsubmitted when this count is off (a woken task that is gone).
    fn poll_op(&self, id: u32, cx: &mut Context<'_>) -> Poll<(i32, u32, Option<Held>)> {
        if let Some(done) = self.take_done(id) {
            return Poll::Ready(done);
        }
        let last_of_batch = {
            let inner = self.inner.borrow();
            inner.woken == 0 && inner.queued > 0
        };
        if last_of_batch {
            // Stalled or not, what is left stays queued for the reactor.
            let _ = self.turn();
            if let Some(done) = self.take_done(id) {
                return Poll::Ready(done);
            }
        }
        let mut inner = self.inner.borrow_mut();
        match &mut inner.slots[id as usize] {
            Slot::Pending { waker, .. } => {
                crate::io_util::remember_waker(waker, cx.waker());
                Poll::Pending
            }
            _ => unreachable!("relay ring: an operation polled after it was given up"),
        }
    }

    /// Operation `id`'s result if it completed, its slot freed.
    fn take_done(&self, id: u32) -> Option<(i32, u32, Option<Held>)> {
        let mut inner = self.inner.borrow_mut();
        let slot = &mut inner.slots[id as usize];
        match slot {
            Slot::Done { .. } => {
                let Slot::Done {
                    res,
                    flags,
                    holds,
                    woke,
                } = std::mem::replace(slot, Slot::Free)
                else {
                    unreachable!()
                };
                inner.woken -= u32::from(woke);
                inner.free.push(id);
                Some((res, flags, holds))
            }
            Slot::Pending { .. } => None,
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
            Slot::Done {
                flags, holds, woke, ..
            } => {
                inner.woken -= u32::from(woke);
                inner.free.push(id);
                let took = cqueue::buffer_select(flags);
                if restore(&mut inner.bufs, holds, took) {
                    inner.bufs.publish();
                }
            }
            other => inner.slots[id as usize] = other,
        }
    }

    /// Takes back what a finished operation held: a provided buffer goes
    /// back to the ring (or is freed), a buffer of its own is freed.
    fn give_back(&self, held: Held) {
        let mut inner = self.inner.borrow_mut();
        if restore(&mut inner.bufs, Some(held), None) {
            inner.bufs.publish();
        }
    }

    /// After a receive found no buffer: true when the ring has one again
    /// (some came back, or it could grow), false when every buffer is out.
    fn refill(&self) -> bool {
        let mut inner = self.inner.borrow_mut();
        inner.bufs.available() > 0 || inner.bufs.grow()
    }

    /// Unused buffers in the ring now.
    pub fn available(&self) -> usize {
        self.inner.borrow().bufs.available()
    }

    fn buffer_size(&self) -> usize {
        self.inner.borrow().bufs.size
    }
}

/// Takes back what an operation held and the provided buffer it took;
/// true when the ring must be published.
fn restore(bufs: &mut ProvidedBuffers, holds: Option<Held>, took: Option<u16>) -> bool {
    let mut publish = false;
    if let Some(Held::Ring(bid)) = holds {
        publish |= bufs.restore(bid);
    }
    if let Some(bid) = took {
        publish |= bufs.restore(bid);
    }
    publish
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

/// Bytes received, in a provided buffer (or, when the ring had none, one
/// of its own); the buffer goes back when this is dropped.
pub struct Chunk<'r> {
    ring: &'r RelayRing,
    /// Always `Some` until [`send_all`] or drop takes it.
    held: Option<Held>,
    len: usize,
}

impl Chunk<'_> {
    pub fn bytes(&self) -> &[u8] {
        match self.held.as_ref().expect("a chunk holds its buffer") {
            Held::Ring(bid) => {
                let inner = self.ring.inner.borrow();
                let buf: &[u8] = &inner.bufs.memory[*bid as usize][..self.len];
                // SAFETY: the boxed buffer never moves or is freed while
                // this chunk holds it out of the ring (only a buffer
                // given back is ever released), and no one writes it
                // meanwhile.
                unsafe { std::slice::from_raw_parts(buf.as_ptr(), buf.len()) }
            }
            Held::Owned(buf) => &buf[..self.len],
        }
    }

    /// Keeps only the first `len` bytes.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}

impl Drop for Chunk<'_> {
    fn drop(&mut self) {
        if let Some(held) = self.held.take() {
            self.ring.give_back(held);
        }
    }
}

/// The receiving side of one socket: at most one receive posted.
pub struct Receiver<'r> {
    ring: &'r RelayRing,
    fd: RawFd,
    posted: Option<(u32, Posted)>,
    /// The last receive found every provided buffer out: until some come
    /// back, wait for data holding nothing, then read it into a buffer of
    /// its own (a receive that selects a buffer fails at once when there
    /// is none, data or not).
    spent: bool,
}

/// What a receiver has posted.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Posted {
    /// A receive into a provided buffer.
    Ring,
    /// A readiness wait, while the ring is spent.
    Poll,
    /// A receive into a buffer of its own, once the socket is readable.
    Owned,
}

impl<'r> Receiver<'r> {
    /// Posts the first receive at once.
    pub fn new(ring: &'r RelayRing, fd: RawFd) -> Self {
        let mut r = Receiver {
            ring,
            fd,
            posted: None,
            spent: false,
        };
        r.post();
        r
    }

    /// Posts the next receive (if none is), so that data is taken while
    /// the last chunk is still being sent on; unless the ring is running
    /// low, when [`next`](Self::next) posts it once the chunk is sent.
    pub fn post_ahead(&mut self) {
        if self.ring.available() > LOW_WATER {
            self.post();
        }
    }

    fn post(&mut self) {
        if self.posted.is_some() {
            return;
        }
        if self.spent && self.ring.refill() {
            self.spent = false;
        }
        self.posted = Some(if self.spent {
            (self.ring.arm_poll(self.fd), Posted::Poll)
        } else {
            (self.ring.arm_recv(self.fd), Posted::Ring)
        });
    }

    /// The next bytes; `Ok(None)` at end of stream. Dropping this future
    /// leaves the receive posted.
    pub async fn next(&mut self) -> io::Result<Option<Chunk<'r>>> {
        loop {
            self.post();
            let (id, kind) = self.posted.expect("posted");
            let (res, flags, holds) = poll_fn(|cx| self.ring.poll_op(id, cx)).await;
            self.posted = None;
            match kind {
                Posted::Ring if res == -libc::ENOBUFS => {
                    // Every buffer is out (or was, a moment ago): never
                    // wait for another session's to come back.
                    self.spent = !self.ring.refill();
                }
                Posted::Poll if res < 0 => return Err(io::Error::from_raw_os_error(-res)),
                Posted::Poll if self.ring.refill() => self.spent = false,
                Posted::Poll => {
                    // Readable (or closed): the bytes are there, so a
                    // buffer of its own is held only while they are sent.
                    let buf = vec![0; self.ring.buffer_size()].into_boxed_slice();
                    let id = self.ring.arm_recv_owned(self.fd, buf);
                    self.posted = Some((id, Posted::Owned));
                }
                Posted::Ring | Posted::Owned => return self.chunk(res, flags, holds),
            }
        }
    }

    fn chunk(&self, res: i32, flags: u32, holds: Option<Held>) -> io::Result<Option<Chunk<'r>>> {
        let held = match (holds, cqueue::buffer_select(flags)) {
            (Some(held @ Held::Owned(_)), _) => held,
            (_, Some(bid)) => Held::Ring(bid),
            (_, None) => {
                return match res {
                    r if r < 0 => Err(io::Error::from_raw_os_error(-r)),
                    _ => Ok(None),
                };
            }
        };
        let chunk = Chunk {
            ring: self.ring,
            held: Some(held),
            len: res.max(0) as usize,
        };
        match res {
            r if r < 0 => Err(io::Error::from_raw_os_error(-r)),
            0 => Ok(None),
            _ => Ok(Some(chunk)),
        }
    }

    /// Withdraws the posted receive and returns what it got before the
    /// cancel reached it, so that a socket handed on loses no bytes.
    pub async fn withdraw(mut self) -> io::Result<Option<Chunk<'r>>> {
        // `posted` stays set until the result is in: dropped before, this
        // receiver abandons the receive as usual.
        let Some((id, kind)) = self.posted else {
            return Ok(None);
        };
        {
            let mut inner = self.ring.inner.borrow_mut();
            let e = opcode::AsyncCancel::new(id as u64)
                .build()
                .user_data(CANCEL);
            self.ring.push(&mut inner, e);
        }
        let (res, flags, holds) = poll_fn(|cx| self.ring.poll_op(id, cx)).await;
        self.posted = None;
        match res {
            // A readiness wait took no bytes, whatever it found.
            _ if kind == Posted::Poll => Ok(None),
            r if r == -libc::ECANCELED || r == -libc::ENOBUFS => {
                if let Some(held) = holds {
                    self.ring.give_back(held);
                }
                Ok(None)
            }
            r => self.chunk(r, flags, holds),
        }
    }
}

impl Drop for Receiver<'_> {
    fn drop(&mut self) {
        if let Some((id, _)) = self.posted.take() {
            self.ring.abandon(id);
        }
    }
}

/// Sends all of `chunk` (its first `len` bytes) to `fd`. If dropped while
/// a send is in flight, the buffer stays out of the ring until the kernel
/// is done with it.
pub async fn send_all(ring: &RelayRing, fd: RawFd, mut chunk: Chunk<'_>) -> io::Result<()> {
    let len = chunk.len;
    if len == 0 {
        return Ok(());
    }
    // The slot holds the buffer from here: it comes back with each send's
    // completion (or goes back with the abandoned one's).
    let mut held = chunk.held.take().expect("a chunk holds its buffer");
    drop(chunk);
    let mut at = 0;
    loop {
        let op = Op {
            ring,
            id: Some(ring.arm_send(fd, held, at, len)),
        };
        let (res, _, holds) = op.await;
        held = holds.expect("a send holds its buffer");
        match res {
            n if n > 0 => {
                at += n as usize;
                if at >= len {
                    ring.give_back(held);
                    return Ok(());
                }
            }
            0 => {
                ring.give_back(held);
                return Err(io::ErrorKind::WriteZero.into());
            }
            e => {
                ring.give_back(held);
                return Err(io::Error::from_raw_os_error(-e));
            }
        }
    }
}

/// One posted operation, abandoned if dropped before it completes.
struct Op<'r> {
    ring: &'r RelayRing,
    id: Option<u32>,
}

impl Future for Op<'_> {
    type Output = (i32, u32, Option<Held>);

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

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    use super::*;

    /// Runs `test` on an io_uring runtime with a relay ring of `size`-byte
    /// buffers and its reactor. Skipped where io_uring is unavailable (a
    /// seccomp'd container), except where `TOLLGATE_REQUIRE_IO_URING` is
    /// set, as `.ci/run` sets it: there a missing io_uring fails the test
    /// rather than let it pass untested.
    fn with_ring(size: usize, test: impl AsyncFnOnce(Rc<RelayRing>)) {
        let rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .enable_timer()
            .build();
        let mut rt = match rt {
            Ok(rt) => rt,
            Err(e) => {
                assert!(
                    std::env::var_os("TOLLGATE_REQUIRE_IO_URING").is_none(),
                    "io_uring is required here (TOLLGATE_REQUIRE_IO_URING) but unavailable: {e}"
                );
                eprintln!("skipped: no io_uring here ({e})");
                return;
            }
        };
        rt.block_on(async {
            let ring = RelayRing::new(size).expect("relay ring");
            monoio::spawn(ring.clone().drive());
            test(ring).await;
        });
    }

    fn pair() -> (UnixStream, UnixStream) {
        UnixStream::pair().expect("socket pair")
    }

    /// Every provided buffer held by a chunk nobody sends on (peers that
    /// stopped reading): the next receive still gets its bytes, in a
    /// buffer of its own, instead of waiting for one to come back; a
    /// receiver with nothing to read meanwhile holds no buffer; and once
    /// the chunks are dropped the ring keeps only `KEEP_IN_RING` unused
    /// buffers, freeing the rest.
    #[test]
    fn a_spent_ring_lends_no_wait_and_shrinks_back() {
        with_ring(64, async |ring: Rc<RelayRing>| {
            let (mut peer, ours) = pair();
            let mut from = Receiver::new(&ring, ours.as_raw_fd());
            let mut held = Vec::new();
            for i in 0..RING_ENTRIES as usize {
                peer.write_all(&[i as u8]).unwrap();
                let chunk = from.next().await.unwrap().expect("bytes");
                assert_eq!(chunk.bytes(), [i as u8]);
                assert!(matches!(chunk.held, Some(Held::Ring(_))));
                held.push(chunk);
            }
            assert_eq!(ring.available(), 0);
            peer.write_all(b"still served").unwrap();
            let chunk = from.next().await.unwrap().expect("bytes");
            assert_eq!(chunk.bytes(), b"still served");
            assert!(matches!(chunk.held, Some(Held::Owned(_))));
            drop(chunk);
            // A receiver with nothing to read waits holding no buffer.
            let (_quiet_peer, quiet) = pair();
            let mut idle = Receiver::new(&ring, quiet.as_raw_fd());
            let waited =
                monoio::time::timeout(std::time::Duration::from_millis(50), idle.next()).await;
            assert!(waited.is_err(), "nothing to read");
            let (id, kind) = idle.posted.expect("a wait posted");
            assert!(kind == Posted::Poll);
            let holds = match &ring.inner.borrow().slots[id as usize] {
                Slot::Pending { holds, .. } => holds.is_some(),
                _ => panic!("the wait is pending"),
            };
            assert!(!holds, "an idle receiver on a spent ring holds no buffer");
            drop(idle);
            // The next one is back on the ring once buffers return.
            drop(held);
            assert_eq!(ring.available(), KEEP_IN_RING);
            let freed = ring.inner.borrow().bufs.spare.len();
            assert_eq!(freed, RING_ENTRIES as usize - KEEP_IN_RING);
            peer.write_all(b"ring again").unwrap();
            let chunk = from.next().await.unwrap().expect("bytes");
            assert_eq!(chunk.bytes(), b"ring again");
            assert!(matches!(chunk.held, Some(Held::Ring(_))));
        });
    }

    /// A ring that shrank grows again into the ids it freed, and never
    /// past `RING_ENTRIES`.
    #[test]
    fn freed_buffers_are_reused_when_the_ring_grows() {
        let mut bufs = ProvidedBuffers::new(32).expect("mapping");
        assert!(bufs.grow());
        assert_eq!((bufs.available(), bufs.memory.len()), (GROW_BY, GROW_BY));
        for bid in 0..GROW_BY as u16 {
            bufs.taken();
            bufs.release(bid);
        }
        assert_eq!(bufs.available(), 0);
        assert!(bufs.memory.iter().all(|b| b.is_empty()));
        assert!(bufs.grow());
        assert_eq!(
            bufs.memory.len(),
            GROW_BY,
            "no new ids while freed ones wait"
        );
        assert!(bufs.memory.iter().all(|b| b.len() == 32));
        while bufs.grow() {}
        assert_eq!(bufs.memory.len(), RING_ENTRIES as usize);
        assert_eq!(bufs.available(), RING_ENTRIES as usize);
    }

    /// A send from a buffer of its own goes out whole, and a pump's
    /// pre-posted receive waits while the ring runs low.
    #[test]
    fn chunks_of_their_own_are_sent_and_low_rings_post_no_receive_ahead() {
        with_ring(64, async |ring: Rc<RelayRing>| {
            let (mut peer, ours) = pair();
            let (mut sink_peer, sink) = pair();
            let mut from = Receiver::new(&ring, ours.as_raw_fd());
            let mut held = Vec::new();
            while ring.available() > LOW_WATER {
                peer.write_all(b"x").unwrap();
                held.push(from.next().await.unwrap().expect("bytes"));
            }
            from.post_ahead();
            assert!(from.posted.is_none(), "no receive ahead on a low ring");
            while ring.available() > 0 || ring.refill() {
                peer.write_all(b"x").unwrap();
                held.push(from.next().await.unwrap().expect("bytes"));
            }
            peer.write_all(b"own bytes").unwrap();
            let chunk = from.next().await.unwrap().expect("bytes");
            assert!(matches!(chunk.held, Some(Held::Owned(_))));
            send_all(&ring, sink.as_raw_fd(), chunk).await.unwrap();
            let mut got = [0; 9];
            std::io::Read::read_exact(&mut sink_peer, &mut got).unwrap();
            assert_eq!(&got, b"own bytes");
        });
    }
}
