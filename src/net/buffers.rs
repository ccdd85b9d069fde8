//! The shard's relay buffers, lent to sessions only while bytes are in
//! flight. Shard-local: taking and returning one is a `Vec` pop and push,
//! no lock and, once the pool is warm, no allocation.

use std::cell::{OnceCell, RefCell};
use std::rc::Rc;

use super::ring::RelayRing;

/// Free buffers kept per shard; beyond this, returned buffers are freed, so
/// a burst of activity does not pin its peak memory forever.
const MAX_IDLE_BUFFERS: usize = 64;

pub struct BufferPool {
    buffer_size: usize,
    free: RefCell<Vec<Vec<u8>>>,
    /// On an io_uring shard, the relay ring whose provided buffers the
    /// plain relay uses instead of these.
    ring: OnceCell<Rc<RelayRing>>,
}

impl BufferPool {
    pub fn new(buffer_size: usize) -> Self {
        BufferPool {
            buffer_size,
            free: RefCell::new(Vec::with_capacity(MAX_IDLE_BUFFERS)),
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

    /// Gives back a buffer used as scratch (cleared and refilled): made
    /// whole again first, so that it can be reused; one that grew past the
    /// shard's size is dropped.
    #[inline]
    pub fn put_scratch(&self, mut buf: Vec<u8>) {
        if buf.len() <= self.buffer_size && buf.capacity() <= 2 * self.buffer_size {
            buf.resize(self.buffer_size, 0);
            self.put(buf);
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
}
