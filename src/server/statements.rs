//! The prepared statements a pooled server connection holds under
//! transaction pooling, by the server-side names tollgate gave them.
//!
//! A statement's server-side name is derived from its content (the SQL and
//! the parameter types), so every client that prepares the same statement
//! shares it on every connection that has it. The cache is bounded: past
//! `max_prepared_statements`, the least recently used one is closed on the
//! server to make room.

use std::collections::HashMap;
use std::rc::Rc;

/// Whether the server has a statement, as far as tollgate knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// Its Parse is on its way, in the lend's `cycle`-th extended-query
    /// cycle (Syncs sent before it): later messages of that cycle may use
    /// it, as they are skipped if it fails; a later cycle may not count
    /// on it (see [`StatementCache::usable`]).
    Pending { cycle: u64 },
    /// The server said ParseComplete.
    Prepared,
}

/// One connection's statements.
#[derive(Debug, Default)]
pub struct StatementCache {
    /// What the server has, when it was last used, and how many Parses
    /// of it are unanswered.
    entries: HashMap<Rc<[u8]>, (Held, u64, u32)>,
    /// Bumped per use: the least recently used has the smallest.
    tick: u64,
}

impl StatementCache {
    /// Whether the connection has `name` (pending or prepared), noting
    /// the use.
    pub fn has(&mut self, name: &[u8]) -> bool {
        self.tick += 1;
        match self.entries.get_mut(name) {
            Some((_, used, _)) => {
                *used = self.tick;
                true
            }
            None => false,
        }
    }

    /// Whether a message of the lend's `cycle` can use `name` without
    /// preparing it: it is prepared, or its Parse is in this same cycle.
    /// A Parse in an earlier cycle may yet fail (in a failed transaction
    /// block every Parse does), and then a message that counted on it
    /// would get "prepared statement does not exist" where Postgres
    /// would have answered what the client's own statement gets; so it
    /// is prepared again (a Close goes first, so a Parse that succeeded
    /// after all is no duplicate). Notes the use.
    pub fn usable(&mut self, name: &[u8], cycle: u64) -> bool {
        self.tick += 1;
        match self.entries.get_mut(name) {
            Some((held, used, _)) => {
                *used = self.tick;
                match *held {
                    Held::Prepared => true,
                    Held::Pending { cycle: sent } => sent == cycle,
                }
            }
            None => false,
        }
    }

    /// Notes a Parse of `name` sent in the lend's `cycle`, evicting the
    /// least recently used statement beyond `capacity`: returned, for the
    /// caller to close on the server.
    pub fn parsing(&mut self, name: Rc<[u8]>, cycle: u64, capacity: usize) -> Option<Rc<[u8]>> {
        self.tick += 1;
        let evicted = if self.entries.len() >= capacity.max(1) && !self.entries.contains_key(&name)
        {
            let oldest = self
                .entries
                .iter()
                .min_by_key(|(_, (_, used, _))| *used)
                .map(|(k, _)| k.clone());
            if let Some(k) = &oldest {
                self.entries.remove(k);
            }
            oldest
        } else {
            None
        };
        let in_flight = self.entries.get(&name).map_or(0, |e| e.2);
        self.entries
            .insert(name, (Held::Pending { cycle }, self.tick, in_flight + 1));
        evicted
    }

    /// The server confirmed a Parse. Prepared only once every Parse of it
    /// sent is answered: a later one (sent again for a later cycle, a
    /// Close before it) may yet fail and leave the server without it.
    pub fn prepared(&mut self, name: &[u8]) {
        if let Some((held, _, in_flight)) = self.entries.get_mut(name) {
            *in_flight = in_flight.saturating_sub(1);
            if *in_flight == 0 {
                *held = Held::Prepared;
            }
        }
    }

    /// The server does not have it (its Parse failed or was skipped, or
    /// using it failed: a plan that went stale after DDL is made again).
    pub fn forget(&mut self, name: &[u8]) {
        self.entries.remove(name);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn held(&self, name: &[u8]) -> Option<Held> {
        self.entries.get(name).map(|(h, _, _)| *h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> Rc<[u8]> {
        s.as_bytes().into()
    }

    #[test]
    fn the_least_recently_used_is_evicted_beyond_capacity() {
        let mut c = StatementCache::default();
        assert_eq!(c.parsing(name("a"), 0, 2), None);
        assert_eq!(c.parsing(name("b"), 0, 2), None);
        assert!(c.has(b"a"));
        assert_eq!(c.parsing(name("c"), 0, 2).as_deref(), Some(&b"b"[..]));
        assert!(c.has(b"a") && c.has(b"c") && !c.has(b"b"));
        c.prepared(b"a");
        assert_eq!(c.held(b"a"), Some(Held::Prepared));
        assert_eq!(c.held(b"c"), Some(Held::Pending { cycle: 0 }));
        c.forget(b"a");
        assert_eq!(c.len(), 1);
        // Parsing one already held evicts nothing.
        assert_eq!(c.parsing(name("c"), 0, 1), None);
    }

    #[test]
    fn a_pending_statement_serves_only_its_own_cycle() {
        let mut c = StatementCache::default();
        c.parsing(name("a"), 3, 8);
        assert!(
            c.usable(b"a", 3),
            "the rest of its cycle is skipped if it fails"
        );
        assert!(!c.usable(b"a", 4), "a later cycle prepares it again");
        // Sent again for cycle 4: the first one's answer does not make it
        // prepared, as the second may fail.
        c.parsing(name("a"), 4, 8);
        c.prepared(b"a");
        assert_eq!(c.held(b"a"), Some(Held::Pending { cycle: 4 }));
        assert!(!c.usable(b"a", 5));
        c.prepared(b"a");
        assert!(c.usable(b"a", 5) && c.usable(b"a", 9));
        assert!(!c.usable(b"b", 0));
    }
}
