//! Connections per source that have not finished logging in: from accept
//! until the session is established or refused. A source that holds
//! `limit` of them (a limit of 0 turns this off) is refused at once, before
//! anything is read, so one address cannot tie up the proxy with slow or
//! silent start-ups and TLS handshakes (a handshake happens before login,
//! so it counts) while others wait. `max_connections` bounds all sources
//! together; this bounds each.
//!
//! Sources are counted as by the failure limiter (IPv4 address, IPv6 /64).
//! Behind a TCP load balancer without PROXY protocol every client has the
//! balancer's address: turn this off there.
//!
//! Shared by all shards; touched twice per connection (enter, leave),
//! never per message. An entry exists only while its source has a
//! start-up in progress, so the table is bounded by `max_connections`.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use super::failures::Source;

/// Parts of the table, each with its own lock.
const PARTS: usize = 16;

pub struct PendingPerSource {
    /// Reloadable.
    limit: AtomicU32,
    parts: Vec<Mutex<HashMap<Source, u32>>>,
    hasher: std::collections::hash_map::RandomState,
}

/// One start-up in progress; leaving the table when dropped.
pub struct Pending {
    table: Arc<PendingPerSource>,
    source: Source,
}

impl PendingPerSource {
    pub fn new(limit: u32) -> Self {
        PendingPerSource {
            limit: AtomicU32::new(limit),
            parts: (0..PARTS).map(|_| Mutex::default()).collect(),
            hasher: Default::default(),
        }
    }

    pub fn set_limit(&self, limit: u32) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    fn part(&self, source: &Source) -> &Mutex<HashMap<Source, u32>> {
        &self.parts[self.hasher.hash_one(source) as usize % PARTS]
    }

    /// Counts a start-up from `ip`, or `None` when its source already has
    /// `limit` in progress.
    pub fn enter(self: &Arc<Self>, ip: IpAddr) -> Option<Pending> {
        let limit = self.limit.load(Ordering::Relaxed);
        let source = Source::from(ip);
        let mut part = self.part(&source).lock().unwrap_or_else(|e| e.into_inner());
        let n = part.entry(source).or_insert(0);
        // Counted even when off, so that turning the limit on by a reload
        // sees the start-ups already in progress.
        if limit != 0 && *n >= limit {
            return None;
        }
        *n += 1;
        Some(Pending {
            table: self.clone(),
            source,
        })
    }

    /// Start-ups in progress from `ip`'s source.
    pub fn count(&self, ip: IpAddr) -> u32 {
        let source = Source::from(ip);
        let part = self.part(&source).lock().unwrap_or_else(|e| e.into_inner());
        part.get(&source).copied().unwrap_or(0)
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let mut part = self
            .table
            .part(&self.source)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = part.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                part.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_is_refused_at_the_limit_and_let_in_when_one_leaves() {
        let t = Arc::new(PendingPerSource::new(2));
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        let a = t.enter(ip).unwrap();
        let _b = t.enter(ip).unwrap();
        assert!(t.enter(ip).is_none());
        assert!(t.enter(other).is_some(), "another source is not affected");
        drop(a);
        assert!(t.enter(ip).is_some());
    }

    #[test]
    fn ipv6_counts_per_64_and_entries_are_removed_when_empty() {
        let t = Arc::new(PendingPerSource::new(1));
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2::ffff".parse().unwrap();
        let held = t.enter(a).unwrap();
        assert!(t.enter(b).is_none(), "same /64");
        assert_eq!(t.count(b), 1);
        drop(held);
        assert_eq!(t.count(a), 0);
        assert!(t.parts.iter().all(|p| p.lock().unwrap().is_empty()));
    }

    #[test]
    fn zero_is_off_but_still_counts() {
        let t = Arc::new(PendingPerSource::new(0));
        let ip: IpAddr = "192.0.2.9".parse().unwrap();
        let held: Vec<_> = (0..1000).map(|_| t.enter(ip).unwrap()).collect();
        assert_eq!(t.count(ip), 1000);
        t.set_limit(10);
        assert!(t.enter(ip).is_none());
        drop(held);
        assert!(t.enter(ip).is_some());
    }
}
