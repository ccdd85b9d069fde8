//! Live configuration: a control thread publishes new snapshots; shards
//! pick them up without locks on their hot paths.
//!
//! [`Published`] holds the current snapshot behind a mutex plus a
//! generation counter. A shard keeps a [`ShardCopy`]: checking for a new
//! snapshot is one atomic load of a word that changes only on reload, and
//! using the snapshot touches only the shard's own `Rc`-free copy (no
//! shared reference count is written per connection).
#![forbid(unsafe_code)]

use std::cell::{Cell, RefCell};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// The current snapshot of something reloadable.
pub struct Published<T> {
    current: Mutex<Arc<T>>,
    generation: AtomicU64,
}

impl<T> Published<T> {
    pub fn new(value: T) -> Self {
        Published {
            current: Mutex::new(Arc::new(value)),
            generation: AtomicU64::new(1),
        }
    }

    /// Replaces the snapshot; shards see it on their next check.
    pub fn publish(&self, value: T) {
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(value);
        self.generation.fetch_add(1, Ordering::Release);
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The snapshot if its generation differs from `seen`.
    pub fn get_if_newer(&self, seen: u64) -> Option<(u64, Arc<T>)> {
        let generation = self.generation();
        if generation == seen {
            return None;
        }
        let value = self
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        Some((generation, value))
    }

    pub fn get(&self) -> Arc<T> {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// A shard's copy of a published snapshot.
pub struct ShardCopy<T> {
    seen: Cell<u64>,
    value: RefCell<Arc<T>>,
}

impl<T> ShardCopy<T> {
    pub fn new(published: &Published<T>) -> Self {
        ShardCopy {
            seen: Cell::new(published.generation()),
            value: RefCell::new(published.get()),
        }
    }

    /// Brings the copy up to date; true when it changed.
    pub fn refresh(&self, published: &Published<T>) -> bool {
        match published.get_if_newer(self.seen.get()) {
            Some((generation, value)) => {
                self.seen.set(generation);
                *self.value.borrow_mut() = value;
                true
            }
            None => false,
        }
    }

    /// The current snapshot (after a refresh).
    pub fn current(&self, published: &Published<T>) -> Arc<T> {
        self.refresh(published);
        self.value.borrow().clone()
    }

    /// Runs `f` on the current snapshot (after a refresh).
    pub fn with<R>(&self, published: &Published<T>, f: impl FnOnce(&T) -> R) -> R {
        self.refresh(published);
        f(&self.value.borrow())
    }
}

/// What identifies a version of a file: a rewrite in place changes the
/// time and usually the size, an atomic rename changes the inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

impl FileStamp {
    /// `None` when the file cannot be read (missing, no permission).
    pub fn of(path: &Path) -> Option<FileStamp> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some(FileStamp {
            modified: m.modified().ok(),
            len: m.len(),
            inode: m.ino(),
        })
    }
}

/// Tracks which version of some files is loaded and which failed, so a
/// bad version is reported once, not on every poll.
#[derive(Debug, Default)]
pub struct Stamps<K: PartialEq> {
    loaded: Option<K>,
    failed: Option<K>,
}

impl<K: PartialEq + Copy> Stamps<K> {
    pub fn new(loaded: K) -> Self {
        Stamps {
            loaded: Some(loaded),
            failed: None,
        }
    }

    /// Whether `now` is a version not yet tried.
    pub fn is_new(&self, now: K) -> bool {
        self.loaded != Some(now) && self.failed != Some(now)
    }

    pub fn loaded(&mut self, now: K) {
        self.loaded = Some(now);
        self.failed = None;
    }

    pub fn failed(&mut self, now: K) {
        self.failed = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_copies_follow_publications() {
        let p = Published::new(1);
        let copy = ShardCopy::new(&p);
        assert!(!copy.refresh(&p));
        assert_eq!(copy.with(&p, |v| *v), 1);
        p.publish(2);
        assert_eq!(copy.with(&p, |v| *v), 2);
        assert!(!copy.refresh(&p));
    }

    #[test]
    fn stamps_report_each_version_once() {
        let mut s = Stamps::new(1);
        assert!(!s.is_new(1));
        assert!(s.is_new(2));
        s.failed(2);
        assert!(!s.is_new(2));
        assert!(s.is_new(3));
        s.loaded(3);
        assert!(!s.is_new(3) && s.is_new(2));
    }

    #[test]
    fn file_stamps_change_on_rename() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, "a").unwrap();
        let a = FileStamp::of(&p).unwrap();
        let tmp = d.path().join("g");
        std::fs::write(&tmp, "b").unwrap();
        std::fs::rename(&tmp, &p).unwrap();
        assert_ne!(FileStamp::of(&p).unwrap(), a);
        assert_eq!(FileStamp::of(&d.path().join("none")), None);
    }
}
