//! The shard's relay buffers, lent to sessions only while bytes are in
//! flight. Shard-local: taking and returning one is a `Vec` pop and push,
//! no lock and, once the pool is warm, no allocation.

use std::cell::{OnceCell, RefCell};
use std::rc::Rc;

use super::ring::RelayRing;

/// Free buffers kept per shard; beyond this, returned buffers are freed, so
/// a burst of activity does not pin its peak memory forever.
const MAX_IDLE_BUFFERS: usize = 64;
/// Free scratch buffers kept per shard: one is held only while its
/// contents are written out, which is seldom more than a few at once.
const MAX_IDLE_SCRATCH: usize = 16;

pub struct BufferPool {
    buffer_size: usize,
    free: RefCell<Vec<Vec<u8>>>,
    /// Empty buffers with room for `buffer_size` bytes, for output built
    /// with `extend_from_slice`: kept apart so that none is zeroed again.
    scratch: RefCell<Vec<Vec<u8>>>,
    /// On an io_uring shard, the relay ring whose provided buffers the
    /// plain relay uses instead of these.
    ring: OnceCell<Rc<RelayRing>>,
}

impl BufferPool {
    pub fn new(buffer_size: usize) -> Self {
        BufferPool {
            buffer_size,
            free: RefCell::new(Vec::with_capacity(MAX_IDLE_BUFFERS)),
            scratch: RefCell::new(Vec::with_capacity(MAX_IDLE_SCRATCH)),
            ring: OnceCell::new(),
        }
    }

    /// Gives the shard's relay ring to the plain relay (once, at start).
    pub fn set_ring(&self, ring: Rc<RelayRing>) {
        let _ = self.ring.set(ring);
    }

    pub fn ring(&self) -> Option<Rc<RelayRing>> {
        self.ring.get().cloned()
    }

    pub fn buffer_size(&self) -> usize {
        self.buffer_size
    }

    /// A zeroed buffer of `buffer_size` bytes (initialized once, so reads
    /// into it need no `unsafe`).
    #[inline]
    pub fn take(&self) -> Vec<u8> {
        self.free
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| vec![0; self.buffer_size])
    }

    /// Takes a buffer back. One grown for a long TLS record is kept at
    /// the shard's size (its capacity stays, so the next long record
    /// needs no allocation); one grown further is freed.
    #[inline]
    pub fn put(&self, mut buf: Vec<u8>) {
        if buf.len() != self.buffer_size {
            if buf.len() < self.buffer_size || buf.capacity() > 2 * self.buffer_size {
                return;
            }
            buf.truncate(self.buffer_size);
        }
        let mut free = self.free.borrow_mut();
        if free.len() < MAX_IDLE_BUFFERS {
            free.push(buf);
        }
    }

    /// An empty buffer with room for `buffer_size` bytes, to build output
    /// in: it goes back with [`put_scratch`](Self::put_scratch).
    #[inline]
    pub fn take_scratch(&self) -> Vec<u8> {
        if let Some(buf) = self.scratch.borrow_mut().pop() {
            return buf;
        }
        let mut buf = self.take();
        buf.clear();
        buf
    }

    /// Takes back a buffer from [`take_scratch`](Self::take_scratch),
    /// emptied, not zeroed; one that grew past twice the shard's size is
    /// dropped.
    #[inline]
    pub fn put_scratch(&self, mut buf: Vec<u8>) {
        if buf.capacity() < self.buffer_size || buf.capacity() > 2 * self.buffer_size {
            return;
        }
        buf.clear();
        let mut scratch = self.scratch.borrow_mut();
        if scratch.len() < MAX_IDLE_SCRATCH {
            scratch.push(buf);
        }
    }

    #[cfg(test)]
    fn idle(&self) -> usize {
        self.free.borrow().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_and_the_idle_set_is_bounded() {
        let pool = BufferPool::new(1024);
        let a = pool.take();
        let p = a.as_ptr();
        assert_eq!(a.len(), 1024);
        pool.put(a);
        let again = pool.take();
        assert_eq!(again.as_ptr(), p);
        pool.put(again);
        let many: Vec<_> = (0..MAX_IDLE_BUFFERS + 5).map(|_| pool.take()).collect();
        for b in many {
            pool.put(b);
        }
        assert_eq!(pool.idle(), MAX_IDLE_BUFFERS);
    }

    #[test]
    fn scratch_buffers_come_back_empty_with_their_room() {
        let pool = BufferPool::new(1024);
        let mut a = pool.take_scratch();
        assert!(a.is_empty() && a.capacity() >= 1024);
        a.extend_from_slice(b"abc");
        let p = a.as_ptr();
        pool.put_scratch(a);
        let again = pool.take_scratch();
        assert_eq!((again.as_ptr(), again.len()), (p, 0));
        // Grown past twice the size: not kept.
        let mut big = again;
        big.reserve(4096);
        pool.put_scratch(big);
        let fresh = pool.take_scratch();
        assert_ne!(fresh.as_ptr(), p);
    }
}
