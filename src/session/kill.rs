//! Ending a session from outside its task: the shard's watcher fires a
//! session's [`KillSwitch`] when its token is revoked, expires or is
//! rotated out, and the admin API when an operator ends the session; the
//! relay notices at its next message boundary.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use crate::auth::Rejection;

/// Why a session is being ended from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KillReason {
    /// Its token no longer allows it.
    Token(Rejection),
    /// An operator ended it through the admin API.
    Admin,
    /// tollgate is shutting down and the drain time is over.
    Shutdown,
}

impl KillReason {
    /// A stable name for logs, audit events and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            KillReason::Token(r) => r.as_str(),
            KillReason::Admin => "admin_terminated",
            KillReason::Shutdown => "shutdown",
        }
    }
}

impl From<Rejection> for KillReason {
    fn from(r: Rejection) -> Self {
        KillReason::Token(r)
    }
}

/// Shard-local (`!Send`): only the owning shard fires it.
#[derive(Default)]
pub struct KillSwitch {
    reason: Cell<Option<KillReason>>,
    waker: Cell<Option<Waker>>,
}

impl KillSwitch {
    /// Asks the session to end; the first reason wins.
    pub fn fire(&self, reason: impl Into<KillReason>) {
        if self.reason.get().is_none() {
            self.reason.set(Some(reason.into()));
        }
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    pub fn fired(&self) -> Option<KillReason> {
        self.reason.get()
    }

    /// Resolves when the switch fires.
    pub fn wait(&self) -> Wait<'_> {
        Wait(self)
    }
}

pub struct Wait<'a>(&'a KillSwitch);

impl Future for Wait<'_> {
    type Output = KillReason;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<KillReason> {
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
            Poll::Ready(KillReason::Token(Rejection::Revoked))
        );
    }
}
