//! Yielding to the shard's other tasks.
//!
//! The usual yield (wake yourself, return `Pending`) yields nothing under
//! monoio: a task woken while it runs is put back at the *front* of the run
//! queue (`Schedule::yield_now`), so it is polled again at once and the
//! tasks behind it keep waiting. Here the waking is left to a task of its
//! own, spawned to the back of the queue: the task that yields runs again
//! after every task that was ready before it. A task per yield is an
//! allocation, for a yield that comes once per many reads in a row.

use std::future::poll_fn;
use std::task::Poll;

/// Lets every other task of the shard that is ready run before the
/// caller goes on.
pub async fn yield_now() {
    let mut asked = false;
    poll_fn(|cx| {
        // Polled again: its turn came (or something else woke it first,
        // which is as good; the wake still to come is a spurious one).
        if asked {
            return Poll::Ready(());
        }
        asked = true;
        let waker = cx.waker().clone();
        drop(monoio::spawn(async move { waker.wake() }));
        Poll::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::rc::Rc;

    use super::yield_now;

    fn run(test: impl std::future::Future<Output = ()>) {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .expect("runtime")
            .block_on(test);
    }

    /// Two tasks that yield after each step take turns, step by step.
    #[test]
    fn tasks_that_yield_take_turns() {
        run(async {
            let log = Rc::new(std::cell::RefCell::new(Vec::new()));
            let step = |name: &'static str| {
                let log = log.clone();
                async move {
                    for i in 0..3 {
                        log.borrow_mut().push((name, i));
                        yield_now().await;
                    }
                }
            };
            let a = monoio::spawn(step("a"));
            let b = monoio::spawn(step("b"));
            a.await;
            b.await;
            let order: Vec<_> = log.borrow().iter().map(|(n, _)| *n).collect();
            assert_eq!(order, ["a", "b", "a", "b", "a", "b"]);
        });
    }

    /// A task that yields lets one that was woken meanwhile run first.
    #[test]
    fn a_yield_lets_a_ready_task_run() {
        run(async {
            let ran = Rc::new(Cell::new(false));
            let other = {
                let ran = ran.clone();
                monoio::spawn(async move { ran.set(true) })
            };
            assert!(!ran.get());
            yield_now().await;
            assert!(ran.get(), "the ready task ran during the yield");
            other.await;
        });
    }
}
