//! Ending a session from outside its task: the shard's watcher fires a
//! session's [`KillSwitch`] when its token is revoked, expires or is
//! rotated out; the relay notices at its next message boundary.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use crate::auth::Rejection;

/// Shard-local (`!Send`): only the owning shard fires it.
#[derive(Default)]
pub struct KillSwitch {
    reason: Cell<Option<Rejection>>,
    waker: Cell<Option<Waker>>,
}

impl KillSwitch {
    /// Asks the session to end; the first reason wins.
    pub fn fire(&self, reason: Rejection) {
        if self.reason.get().is_none() {
            self.reason.set(Some(reason));
        }
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    pub fn fired(&self) -> Option<Rejection> {
        self.reason.get()
    }

    /// Resolves when the switch fires.
    pub fn wait(&self) -> Wait<'_> {
        Wait(self)
    }
}

pub struct Wait<'a>(&'a KillSwitch);

impl Future for Wait<'_> {
    type Output = Rejection;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Rejection> {
        match self.0.reason.get() {
            Some(r) => Poll::Ready(r),
            None => {
                // Replace only when the task changed: the common case keeps
                // the stored waker and costs no clone.
                let w = self.0.waker.take();
                let w = match w {
                    Some(w) if w.will_wake(cx.waker()) => w,
                    _ => cx.waker().clone(),
                };
                self.0.waker.set(Some(w));
                Poll::Pending
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_resolves_after_fire() {
        let k = KillSwitch::default();
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut w = k.wait();
        assert!(Pin::new(&mut w).poll(&mut cx).is_pending());
        k.fire(Rejection::Revoked);
        k.fire(Rejection::Expired);
        assert_eq!(
            Pin::new(&mut w).poll(&mut cx),
            Poll::Ready(Rejection::Revoked)
        );
    }
}
