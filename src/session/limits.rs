//! Per-token connection limits across shards.
//!
//! The count is shared by all shards, so it sits behind a mutex; it is
//! taken once when a session starts and once when it ends, never on the
//! per-message path.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

#[derive(Default)]
pub struct TokenLimits {
    open: Mutex<HashMap<String, u32>>,
}

/// One open session counted against a token; released on drop.
pub struct TokenSlot {
    limits: Arc<TokenLimits>,
    token_id: String,
}

impl TokenLimits {
    /// Counts a session for `token_id` unless `max` are already open.
    pub fn acquire(self: &Arc<Self>, token_id: &str, max: u32) -> Option<TokenSlot> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(token_id.to_owned()).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(TokenSlot {
            limits: self.clone(),
            token_id: token_id.to_owned(),
        })
    }

    pub fn open(&self, token_id: &str) -> u32 {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.get(token_id).copied().unwrap_or(0)
    }
}

impl Drop for TokenSlot {
    fn drop(&mut self) {
        let mut open = self.limits.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.token_id) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.token_id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_releases() {
        let l = Arc::new(TokenLimits::default());
        let a = l.acquire("t", 2).unwrap();
        let _b = l.acquire("t", 2).unwrap();
        assert!(l.acquire("t", 2).is_none());
        assert!(l.acquire("u", 1).is_some());
        drop(a);
        assert_eq!(l.open("t"), 1);
        assert!(l.acquire("t", 2).is_some());
    }
}
