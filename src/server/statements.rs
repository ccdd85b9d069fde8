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
    /// Its Parse is on its way: later messages may use it.
    Pending,
    /// The server said ParseComplete.
    Prepared,
}

/// One connection's statements.
#[derive(Debug, Default)]
pub struct StatementCache {
    entries: HashMap<Rc<[u8]>, (Held, u64)>,
    /// Bumped per use: the least recently used has the smallest.
    tick: u64,
}

impl StatementCache {
    /// Whether the connection has `name` (pending or prepared), noting
    /// the use.
    pub fn has(&mut self, name: &[u8]) -> bool {
        self.tick += 1;
        match self.entries.get_mut(name) {
            Some((_, used)) => {
                *used = self.tick;
                true
            }
            None => false,
        }
    }

    /// Notes a Parse of `name` sent, evicting the least recently used
    /// statement beyond `capacity`: returned, for the caller to close on
    /// the server.
    pub fn parsing(&mut self, name: Rc<[u8]>, capacity: usize) -> Option<Rc<[u8]>> {
        self.tick += 1;
        let evicted = if self.entries.len() >= capacity.max(1) && !self.entries.contains_key(&name)
        {
            let oldest = self
                .entries
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone());
            if let Some(k) = &oldest {
                self.entries.remove(k);
            }
            oldest
        } else {
            None
        };
        self.entries.insert(name, (Held::Pending, self.tick));
        evicted
    }

    /// The server confirmed the Parse.
    pub fn prepared(&mut self, name: &[u8]) {
        if let Some((held, _)) = self.entries.get_mut(name) {
            *held = Held::Prepared;
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
        self.entries.get(name).map(|(h, _)| *h)
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
        assert_eq!(c.parsing(name("a"), 2), None);
        assert_eq!(c.parsing(name("b"), 2), None);
        assert!(c.has(b"a"));
        assert_eq!(c.parsing(name("c"), 2).as_deref(), Some(&b"b"[..]));
        assert!(c.has(b"a") && c.has(b"c") && !c.has(b"b"));
        c.prepared(b"a");
        assert_eq!(c.held(b"a"), Some(Held::Prepared));
        assert_eq!(c.held(b"c"), Some(Held::Pending));
        c.forget(b"a");
        assert_eq!(c.len(), 1);
        // Parsing one already held evicts nothing.
        assert_eq!(c.parsing(name("c"), 1), None);
    }
}
