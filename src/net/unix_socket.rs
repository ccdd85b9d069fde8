//! The client listener on a Unix-domain socket, made as PostgreSQL makes
//! its own: `<dir>/.s.PGSQL.<port>`, so that `psql -h <dir> -p <port>`
//! finds it, beside a lock file `<dir>/.s.PGSQL.<port>.lock` whose first
//! line is the owner's process id.
//!
//! - A lock whose process is gone (a crash, a kill -9) is stale: its socket
//!   and lock are reclaimed.
//! - A lock held by a live process that is not a tollgate (a PostgreSQL on
//!   the same port in the same directory, say) is never touched: start-up
//!   fails and says so.
//! - A lock held by a live tollgate is an in-place upgrade: the new process
//!   binds its socket under a temporary name and renames it over the path,
//!   so that connecting clients reach either process and never find no
//!   socket; the old one drains the connections it already has.
//! - On shutdown each process removes the socket and lock only while they
//!   are still its own.

use std::io::{self, Write};
use std::os::fd::{FromRawFd, IntoRawFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tracing::{info, warn};

/// What the second line of a tollgate lock file says. PostgreSQL writes
/// its data directory there.
const LOCK_MARK: &str = "tollgate";

/// `sun_path` holds 108 bytes on Linux, the terminating NUL included.
const SUN_PATH_MAX: usize = 107;

/// The socket's path for `dir` and `port`, as libpq builds it.
pub fn socket_path(dir: &Path, port: u16) -> PathBuf {
    dir.join(format!(".s.PGSQL.{port}"))
}

/// A bound, listening socket and its lock. It listens under a staging
/// name first and takes the path only on [`publish`], once the rest of the
/// start-up succeeded: a start that fails later never takes a running
/// process's path away. [`release`] (or drop) removes what is still this
/// process's.
///
/// [`publish`]: SocketFile::publish
/// [`release`]: SocketFile::release
pub struct SocketFile {
    pub path: PathBuf,
    lock: PathBuf,
    /// Where it listens until published.
    staging: Option<PathBuf>,
    listener: std::os::unix::net::UnixListener,
    /// (device, inode) of the socket file this process bound.
    identity: (u64, u64),
    released: bool,
}

impl SocketFile {
    /// Claims `<dir>/.s.PGSQL.<port>` (see the module's rules), and binds
    /// and listens under a staging name beside it with file mode `mode`.
    pub fn bind(dir: &Path, port: u16, mode: u32, backlog: i32) -> io::Result<SocketFile> {
        let path = socket_path(dir, port);
        let lock = lock_path(&path);
        let own = std::process::id();
        // The longer of the two names bind(2) sees.
        let staging = dir.join(format!(".s.PGSQL.{port}.{own}.new"));
        if staging.as_os_str().len() > SUN_PATH_MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "Unix-domain socket path \"{}\" is too long: with a temporary suffix it \
                     must fit in {SUN_PATH_MAX} bytes",
                    path.display()
                ),
            ));
        }
        claim(&path, &lock)?;
        let _ = std::fs::remove_file(&staging);
        let listener = listen_at(&staging, mode, backlog).inspect_err(|_| {
            let _ = std::fs::remove_file(&staging);
        })?;
        let meta = std::fs::metadata(&staging)?;
        Ok(SocketFile {
            path,
            lock,
            staging: Some(staging),
            listener,
            identity: (meta.dev(), meta.ino()),
            released: false,
        })
    }

    /// Takes the path: renames the socket into place (atomically, so that
    /// a connecting client finds the old socket or this one) and writes
    /// the lock.
    pub fn publish(&mut self) -> io::Result<()> {
        let Some(staging) = self.staging.take() else {
            return Ok(());
        };
        if let Err(e) = std::fs::rename(&staging, &self.path) {
            let _ = std::fs::remove_file(&staging);
            return Err(e);
        }
        write_lock(&self.lock, std::process::id(), &self.path)?;
        info!(socket = %self.path.display(), "listening on a Unix-domain socket");
        Ok(())
    }

    /// Another handle on the listening socket, for one more shard: every
    /// shard accepts from the same queue.
    pub fn listener(&self) -> io::Result<std::os::unix::net::UnixListener> {
        self.listener.try_clone()
    }

    /// Removes the socket file and the lock if they are still this
    /// process's (an upgrade may have taken them over); before
    /// [`publish`](Self::publish), only the staging file.
    pub fn release(&mut self) {
        if std::mem::replace(&mut self.released, true) {
            return;
        }
        if let Some(staging) = self.staging.take() {
            let _ = std::fs::remove_file(staging);
            return;
        }
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| (m.dev(), m.ino()) == self.identity);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
        if read_lock(&self.lock)
            .is_ok_and(|o| o.is_some_and(|o| o.pid == std::process::id() as i32))
        {
            let _ = std::fs::remove_file(&self.lock);
        }
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        self.release();
    }
}

fn lock_path(socket: &Path) -> PathBuf {
    let mut name = socket.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

/// Who a lock file names.
struct Owner {
    pid: i32,
    tollgate: bool,
}

/// The lock's owner; `Ok(None)` when there is no lock, or one whose
/// first line is not a pid (left half-written); an error when a lock is
/// there but cannot be read (another user's, say), which is never taken
/// for stale.
fn read_lock(lock: &Path) -> io::Result<Option<Owner>> {
    let text = match std::fs::read_to_string(lock) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut lines = text.lines();
    let Some(pid) = lines.next().and_then(|l| l.trim().parse().ok()) else {
        return Ok(None);
    };
    let tollgate = lines.next().is_some_and(|l| l.trim() == LOCK_MARK);
    Ok(Some(Owner { pid, tollgate }))
}

/// Whether process `pid` exists (signal 0 checks without sending).
fn alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill(2) with signal 0 sends nothing; it only checks.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Decides whether this process may take the socket path, and clears
/// what a dead owner left behind.
fn claim(path: &Path, lock: &Path) -> io::Result<()> {
    let in_use = |holder: String| {
        io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "{} is in use by {holder}; choose another unix_socket_dir or port",
                path.display()
            ),
        )
    };
    let own = std::process::id() as i32;
    let owner = read_lock(lock).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot read the lock file {}: {e}", lock.display()),
        )
    })?;
    match owner {
        // A lock naming this very process is left from an earlier life
        // with the same pid (a container restarted): stale.
        Some(o) if o.pid != own && alive(o.pid) => {
            if !o.tollgate {
                return Err(in_use(format!(
                    "process {} (its lock file {} is not a tollgate's)",
                    o.pid,
                    lock.display()
                )));
            }
            info!(
                socket = %path.display(),
                pid = o.pid,
                "taking the Unix-domain socket over from a running tollgate"
            );
        }
        Some(o) => {
            warn!(
                socket = %path.display(),
                pid = o.pid,
                "reclaiming a stale Unix-domain socket (its process is gone)"
            );
            remove_if_socket(path)?;
        }
        None if path.exists() => {
            // No lock: only a socket nobody listens on is reclaimed (a
            // refused connect); any other answer may be someone's live one.
            match std::os::unix::net::UnixStream::connect(path) {
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                Ok(_) => return Err(in_use("a listener without a lock file".into())),
                Err(e) => {
                    return Err(in_use(format!(
                        "something that could not be checked ({e}), without a lock file"
                    )))
                }
            }
            warn!(socket = %path.display(), "reclaiming a Unix-domain socket left without a lock");
            remove_if_socket(path)?;
        }
        None => {}
    }
    Ok(())
}

/// Removes a leftover socket file; anything else at the path is an error
/// (a regular file there is not ours to delete).
fn remove_if_socket(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn listen_at(at: &Path, mode: u32, backlog: i32) -> io::Result<std::os::unix::net::UnixListener> {
    use socket2::{Domain, SockAddr, Socket, Type};
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    socket.bind(&SockAddr::unix(at)?)?;
    std::fs::set_permissions(at, std::fs::Permissions::from_mode(mode))?;
    socket.listen(backlog)?;
    socket.set_nonblocking(true)?;
    // SAFETY: the fd comes from a socket we own and give up here.
    Ok(unsafe { std::os::unix::net::UnixListener::from_raw_fd(socket.into_raw_fd()) })
}

/// Writes the lock under a temporary name and renames it into place, so
/// that a reader never sees half of it.
fn write_lock(lock: &Path, pid: u32, socket: &Path) -> io::Result<()> {
    let mut staging = lock.as_os_str().to_owned();
    staging.push(format!(".{pid}.new"));
    let staging = PathBuf::from(staging);
    let mut f = std::fs::File::create(&staging)?;
    writeln!(f, "{pid}\n{LOCK_MARK}\n{}", socket.display())?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&staging, lock)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    #[test]
    fn binds_with_a_lock_and_removes_both() {
        let d = dir();
        let mut s = SocketFile::bind(d.path(), 6432, 0o770, 16).unwrap();
        let path = d.path().join(".s.PGSQL.6432");
        // Nothing at the path until published.
        assert!(!path.exists());
        s.publish().unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o770);
        let lock = std::fs::read_to_string(d.path().join(".s.PGSQL.6432.lock")).unwrap();
        assert!(lock.starts_with(&format!("{}\ntollgate\n", std::process::id())));
        std::os::unix::net::UnixStream::connect(&path).unwrap();
        s.release();
        assert!(!path.exists());
        assert!(!d.path().join(".s.PGSQL.6432.lock").exists());
    }

    #[test]
    fn a_dead_owners_files_are_reclaimed() {
        let d = dir();
        let path = d.path().join(".s.PGSQL.7000");
        // A socket file nobody listens on, and a lock naming a pid that
        // cannot exist.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        std::fs::write(d.path().join(".s.PGSQL.7000.lock"), "999999999\ntollgate\n").unwrap();
        let mut s = SocketFile::bind(d.path(), 7000, 0o777, 16).unwrap();
        s.publish().unwrap();
        std::os::unix::net::UnixStream::connect(&path).unwrap();
    }

    #[test]
    fn a_live_foreign_lock_is_left_alone() {
        let d = dir();
        // PostgreSQL's lock: the postmaster's pid, then its data directory.
        // pid 1 is always alive.
        let lock = d.path().join(".s.PGSQL.5432.lock");
        std::fs::write(&lock, "1\n/var/lib/postgresql/15/main\n").unwrap();
        let e = SocketFile::bind(d.path(), 5432, 0o777, 16).err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        assert!(e.to_string().contains("not a tollgate"), "{e}");
        assert!(std::fs::read_to_string(&lock).unwrap().starts_with("1\n"));
    }

    #[test]
    fn a_live_tollgate_is_taken_over_and_keeps_nothing_of_the_new_one() {
        let d = dir();
        let path = d.path().join(".s.PGSQL.7001");
        let lock = d.path().join(".s.PGSQL.7001.lock");
        let mut old = SocketFile::bind(d.path(), 7001, 0o777, 16).unwrap();
        old.publish().unwrap();
        // The lock now names this process, alive: pretend it is another
        // tollgate by naming pid 1 instead.
        std::fs::write(&lock, "1\ntollgate\n").unwrap();
        let mut new = SocketFile::bind(d.path(), 7001, 0o777, 16).unwrap();
        // Not published yet: the old socket is still the one at the path.
        let before = std::fs::metadata(&path).unwrap().ino();
        new.publish().unwrap();
        assert_ne!(std::fs::metadata(&path).unwrap().ino(), before);
        // The new owner is another process for the old one: pid 1 again.
        std::fs::write(&lock, "1\ntollgate\n").unwrap();
        // The old one's release leaves the new socket and lock where they are.
        old.release();
        assert!(path.exists());
        assert!(std::fs::read_to_string(&lock).unwrap().starts_with("1\n"));
        std::os::unix::net::UnixStream::connect(&path).unwrap();
        new.release();
        assert!(!path.exists());
    }

    #[test]
    fn a_listener_without_a_lock_is_not_stolen() {
        let d = dir();
        let path = d.path().join(".s.PGSQL.7002");
        let _other = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let e = SocketFile::bind(d.path(), 7002, 0o777, 16).err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
    }

    #[test]
    fn a_path_too_long_for_sun_path_is_refused() {
        let long = PathBuf::from(format!("/tmp/{}", "d".repeat(120)));
        let e = SocketFile::bind(&long, 6432, 0o777, 16).err().unwrap();
        assert!(e.to_string().contains("is too long"), "{e}");
    }
}
