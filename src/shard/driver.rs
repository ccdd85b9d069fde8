//! Which I/O driver the shards run on, and how their io_uring is set up.
//!
//! The setup flags decide when the kernel runs the work that posts a
//! completion. By default it interrupts the thread for it, wherever it
//! is; `COOP_TASKRUN` waits until the thread enters the kernel anyway
//! (`TASKRUN_FLAG` tells it that work is waiting), and `SINGLE_ISSUER`
//! lets the kernel skip locking, since only the shard's thread submits:
//! each shard builds its ring on its own thread. The best set-up the
//! kernel accepts is probed once at start, with throwaway rings, and the
//! choice is logged and exported in `tollgate_build_info`.
//!
//! `DEFER_TASKRUN` (completions posted only when the thread asks for
//! them) is not used: monoio 0.2 asks only when it parks, and a shard
//! whose task queue never empties would then see no completion at all,
//! accepts and TLS reads included, while with `COOP_TASKRUN` any enter
//! posts them. `perf/relaybench` measured the flags on monoio's ring as
//! making no difference to the relay (within ±3%), since the relay's own
//! I/O goes through the shard's relay ring ([`crate::net::ring`]).

use crate::config::IoDriver;

/// An io_uring set-up, best first in [`RingSetup::BEST_FIRST`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingSetup {
    /// `SINGLE_ISSUER | COOP_TASKRUN | TASKRUN_FLAG` (Linux 6.0).
    SingleIssuerCoop,
    /// `COOP_TASKRUN | TASKRUN_FLAG` (Linux 5.19).
    CoopTaskrun,
    /// No flags.
    Plain,
    /// `SINGLE_ISSUER | DEFER_TASKRUN` (Linux 6.1): measured by
    /// `perf/relaybench`, never chosen (see the module doc).
    DeferTaskrun,
}

impl RingSetup {
    const BEST_FIRST: [RingSetup; 3] = [
        RingSetup::SingleIssuerCoop,
        RingSetup::CoopTaskrun,
        RingSetup::Plain,
    ];

    pub fn name(self) -> &'static str {
        match self {
            RingSetup::SingleIssuerCoop => "single_issuer,coop_taskrun,taskrun_flag",
            RingSetup::CoopTaskrun => "coop_taskrun,taskrun_flag",
            RingSetup::Plain => "none",
            RingSetup::DeferTaskrun => "single_issuer,defer_taskrun",
        }
    }

    pub fn builder(self) -> io_uring::Builder {
        let mut b = io_uring::IoUring::builder();
        match self {
            RingSetup::SingleIssuerCoop => {
                b.setup_single_issuer()
                    .setup_coop_taskrun()
                    .setup_taskrun_flag();
            }
            RingSetup::CoopTaskrun => {
                b.setup_coop_taskrun().setup_taskrun_flag();
            }
            RingSetup::Plain => {}
            RingSetup::DeferTaskrun => {
                b.setup_single_issuer().setup_defer_taskrun();
            }
        }
        b
    }

    /// The set-ups after this one, for a shard whose runtime would not
    /// build with it.
    pub fn fallbacks(self) -> impl Iterator<Item = RingSetup> {
        Self::BEST_FIRST
            .into_iter()
            .skip_while(move |s| *s != self)
            .skip(1)
    }

    /// The best set-up this kernel accepts, trying each on a small
    /// throwaway ring; None when io_uring itself is unavailable (old
    /// kernel, seccomp, `io_uring_disabled`).
    fn probe() -> Option<RingSetup> {
        Self::BEST_FIRST
            .into_iter()
            .find(|s| s.builder().build(8).is_ok())
    }
}

/// What the shards run on, decided once at start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Driver {
    IoUring(RingSetup),
    Epoll,
}

impl Driver {
    pub fn choose(wanted: IoDriver) -> Driver {
        match wanted {
            IoDriver::Epoll => Driver::Epoll,
            IoDriver::Auto if !monoio::utils::detect_uring() => Driver::Epoll,
            IoDriver::Auto => RingSetup::probe().map_or(Driver::Epoll, Driver::IoUring),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Driver::IoUring(_) => "io_uring",
            Driver::Epoll => "epoll",
        }
    }

    /// The ring's set-up flags, "-" for epoll.
    pub fn ring_flags(self) -> &'static str {
        match self {
            Driver::IoUring(s) => s.name(),
            Driver::Epoll => "-",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallbacks_go_down_the_list() {
        let after = |s: RingSetup| s.fallbacks().collect::<Vec<_>>();
        assert_eq!(
            after(RingSetup::SingleIssuerCoop),
            [RingSetup::CoopTaskrun, RingSetup::Plain]
        );
        assert_eq!(after(RingSetup::CoopTaskrun), [RingSetup::Plain]);
        assert!(after(RingSetup::Plain).is_empty());
    }

    #[test]
    fn epoll_when_asked() {
        assert_eq!(Driver::choose(IoDriver::Epoll), Driver::Epoll);
        assert_eq!(Driver::Epoll.ring_flags(), "-");
    }

    #[test]
    fn a_chosen_ring_set_up_builds_a_runtime() {
        let Driver::IoUring(setup) = Driver::choose(IoDriver::Auto) else {
            return; // no io_uring on this machine: nothing to build
        };
        let mut rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .uring_builder(setup.builder())
            .enable_timer()
            .build()
            .expect("monoio takes the probed set-up");
        let slept = rt.block_on(async {
            let t = std::time::Instant::now();
            monoio::time::sleep(std::time::Duration::from_millis(5)).await;
            t.elapsed()
        });
        assert!(slept >= std::time::Duration::from_millis(5));
    }
}
