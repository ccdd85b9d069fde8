//! A one-way flag that several of a shard's tasks wait on (the drain: the
//! accept loops' shutdown, the pools' upkeep). A session's
//! [`KillSwitch`](super::kill::KillSwitch) keeps one waker, for its one
//! relay; here every waiting task is woken, or a task that polled later
//! would silently take the wake-up from one that polled earlier.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

/// Shard-local (`!Send`).
#[derive(Default)]
pub struct Latch {
    set: Cell<bool>,
    waiters: RefCell<Vec<Waker>>,
}

impl Latch {
    /// Sets the flag and wakes every waiting task; later calls do nothing.
    pub fn set(&self) {
        if !self.set.replace(true) {
            for w in self.waiters.take() {
                w.wake();
            }
        }
    }

    pub fn is_set(&self) -> bool {
        self.set.get()
    }

    /// Resolves once the flag is set.
    pub fn wait(&self) -> Wait<'_> {
        Wait(self)
    }
}

pub struct Wait<'a>(&'a Latch);

impl Future for Wait<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0.set.get() {
            return Poll::Ready(());
        }
        let mut waiters = self.0.waiters.borrow_mut();
        // A task that waits again (a loop) keeps one entry.
        if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
            waiters.push(cx.waker().clone());
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::Wake;

    use super::*;

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn every_waiting_task_is_woken_once() {
        let latch = Latch::default();
        let (a, b) = (Arc::new(Count(0.into())), Arc::new(Count(0.into())));
        let (wa, wb) = (Waker::from(a.clone()), Waker::from(b.clone()));
        let mut first = latch.wait();
        let mut second = latch.wait();
        for _ in 0..3 {
            // Polled again and again, as a loop does: still one entry each.
            assert!(Pin::new(&mut first)
                .poll(&mut Context::from_waker(&wa))
                .is_pending());
        }
        assert!(Pin::new(&mut second)
            .poll(&mut Context::from_waker(&wb))
            .is_pending());
        latch.set();
        latch.set();
        assert_eq!(a.0.load(Ordering::Relaxed), 1);
        assert_eq!(b.0.load(Ordering::Relaxed), 1);
        assert!(latch.is_set());
        assert!(Pin::new(&mut first)
            .poll(&mut Context::from_waker(&wa))
            .is_ready());
    }
}
