//! Failed authentications per source: a source that fails `limit` times
//! within `window` (a limit of 0 turns this off) (bad or unknown tokens, JWTs that do not
//! verify, cancel requests with wrong keys) is refused at once, before
//! anything is read or verified, until its window ends. Other sources are
//! not affected.
//!
//! A source is an IPv4 address or an IPv6 /64: one host usually owns a
//! whole /64, so counting single IPv6 addresses would let it rotate
//! through 2^64 of them.
//!
//! Shared by all shards (a flood is spread over them by SO_REUSEPORT), and
//! touched only when a connection starts and when one fails, never per
//! message. The table is split into independently locked parts so that
//! shards rarely meet on a lock, and it is bounded: when full, expired
//! entries are swept, and if it is still full a new source is not tracked
//! (a flood of distinct sources cannot grow memory without bound).

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Parts of the table, each with its own lock.
const PARTS: usize = 16;
/// Sources tracked at most, over all parts.
const MAX_SOURCES: usize = 65_536;

/// A source as counted: an IPv4 address, or the /64 of an IPv6 one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    V4(u32),
    V6Prefix(u64),
}

impl From<IpAddr> for Source {
    fn from(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Source::V4(v4.into()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source::V4(v4.into()),
                None => Source::V6Prefix((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Window {
    started: Instant,
    failures: u32,
}

pub struct FailureLimiter {
    /// Both reloadable; read once per check.
    limit: AtomicU32,
    window_ms: AtomicU64,
    parts: Vec<Mutex<HashMap<Source, Window>>>,
    hasher: std::collections::hash_map::RandomState,
}

impl FailureLimiter {
    pub fn new(limit: u32, window: Duration) -> Self {
        FailureLimiter {
            limit: AtomicU32::new(limit),
            window_ms: AtomicU64::new(window.as_millis().try_into().unwrap_or(u64::MAX)),
            parts: (0..PARTS).map(|_| Mutex::default()).collect(),
            hasher: Default::default(),
        }
    }

    /// New limits, from a reload. Windows already running keep their start
    /// and are judged by the new numbers.
    pub fn set_limits(&self, limit: u32, window: Duration) {
        self.limit.store(limit, Ordering::Relaxed);
        let ms = window.as_millis().try_into().unwrap_or(u64::MAX);
        self.window_ms.store(ms, Ordering::Relaxed);
    }

    fn limits(&self) -> (u32, Duration) {
        (
            self.limit.load(Ordering::Relaxed),
            Duration::from_millis(self.window_ms.load(Ordering::Relaxed)),
        )
    }

    fn part(&self, source: &Source) -> &Mutex<HashMap<Source, Window>> {
        &self.parts[self.hasher.hash_one(source) as usize % PARTS]
    }

    /// Whether `ip` is refused right now.
    pub fn is_blocked(&self, ip: IpAddr, now: Instant) -> bool {
        let (limit, window) = self.limits();
        if limit == 0 {
            return false;
        }
        let source = Source::from(ip);
        let part = self.part(&source).lock().unwrap_or_else(|e| e.into_inner());
        part.get(&source)
            .is_some_and(|w| w.failures >= limit && now < w.started + window)
    }

    /// Counts a failed authentication from `ip`.
    pub fn failed(&self, ip: IpAddr, now: Instant) {
        let (limit, window) = self.limits();
        if limit == 0 {
            return;
        }
        let source = Source::from(ip);
        let mut part = self.part(&source).lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = part.get_mut(&source) {
            if now >= w.started + window {
                *w = Window {
                    started: now,
                    failures: 1,
                };
            } else {
                w.failures = w.failures.saturating_add(1);
            }
            return;
        }
        if part.len() >= MAX_SOURCES / PARTS {
            part.retain(|_, w| now < w.started + window);
            if part.len() >= MAX_SOURCES / PARTS {
                return;
            }
        }
        part.insert(
            source,
            Window {
                started: now,
                failures: 1,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_is_refused_after_the_limit_until_its_window_ends() {
        let l = FailureLimiter::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..2 {
            l.failed(a, t0);
        }
        assert!(!l.is_blocked(a, t0));
        l.failed(a, t0);
        assert!(l.is_blocked(a, t0));
        assert!(!l.is_blocked(b, t0), "other sources are not affected");
        assert!(!l.is_blocked(a, t0 + Duration::from_secs(10)));
        // A new window starts counting from one.
        l.failed(a, t0 + Duration::from_secs(11));
        assert!(!l.is_blocked(a, t0 + Duration::from_secs(11)));
    }

    #[test]
    fn a_limit_of_zero_is_off() {
        let l = FailureLimiter::new(0, Duration::from_secs(10));
        let t = Instant::now();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..10 {
            l.failed(a, t);
        }
        assert!(!l.is_blocked(a, t));
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_v4_as_v4() {
        let l = FailureLimiter::new(2, Duration::from_secs(10));
        let t = Instant::now();
        l.failed("2001:db8:1:2::1".parse().unwrap(), t);
        l.failed("2001:db8:1:2:ffff::9".parse().unwrap(), t);
        assert!(l.is_blocked("2001:db8:1:2::77".parse().unwrap(), t));
        assert!(!l.is_blocked("2001:db8:1:3::1".parse().unwrap(), t));
        l.failed("::ffff:198.51.100.7".parse().unwrap(), t);
        l.failed("198.51.100.7".parse().unwrap(), t);
        assert!(l.is_blocked("198.51.100.7".parse().unwrap(), t));
    }

    #[test]
    fn the_table_is_bounded() {
        let l = FailureLimiter::new(1, Duration::from_secs(10));
        let t = Instant::now();
        for i in 0..(MAX_SOURCES as u32 * 2) {
            l.failed(IpAddr::V4(i.into()), t);
        }
        let tracked: usize = l.parts.iter().map(|p| p.lock().unwrap().len()).sum();
        assert!(tracked <= MAX_SOURCES, "{tracked}");
        // After the window, room is made for new sources.
        let later = t + Duration::from_secs(11);
        l.failed("203.0.113.9".parse().unwrap(), later);
        assert!(l.is_blocked("203.0.113.9".parse().unwrap(), later));
    }
}
