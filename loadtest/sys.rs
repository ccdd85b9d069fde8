//! The few libc calls the harness needs, in one place so that every `unsafe`
//! block sits beside its `// SAFETY:` note (house style, rule 6).

use std::ffi::CStr;
use std::io;
use std::mem::MaybeUninit;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Fallback uid/gid of `nobody` when the passwd lookup fails (as in
/// `tollgate::cluster`).
const NOBODY_FALLBACK: (u32, u32) = (65534, 65534);

/// Clock ticks per second, the unit of `utime`/`stime` in `/proc/<pid>/stat`
/// (`USER_HZ`, nearly always 100 on Linux).
pub fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf takes a plain integer name and has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as u64
    } else {
        100
    }
}

/// Whether we run as root, in which case servers that refuse root
/// (PgBouncer) or that need not have it (HAProxy, the relay) run as `nobody`.
pub fn is_root() -> bool {
    // SAFETY: geteuid takes no arguments, cannot fail and has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The uid/gid that unprivileged children run as: `nobody` when we are root,
/// `None` otherwise (children then simply run as us).
pub fn unprivileged_ids() -> Option<(u32, u32)> {
    if !is_root() {
        return None;
    }
    match lookup_user_ids(c"nobody") {
        // A passwd entry mapping nobody to root would defeat the purpose.
        Some((uid, gid)) if uid != 0 => Some((uid, gid)),
        _ => Some(NOBODY_FALLBACK),
    }
}

/// Looks up a user's uid and gid in the passwd database (thread-safe).
fn lookup_user_ids(name: &CStr) -> Option<(u32, u32)> {
    let mut buf: Vec<libc::c_char> = vec![0; 4096];
    loop {
        let mut pwd = MaybeUninit::<libc::passwd>::uninit();
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: `name` is NUL-terminated; `pwd`, `buf` (passed with its true
        // length) and `result` are valid for writes and outlive the call. When
        // getpwnam_r returns 0 with a non-null `result`, `result` points to
        // `pwd`, which it has initialised; we only copy two integers out.
        let (rc, ids) = unsafe {
            let rc = libc::getpwnam_r(
                name.as_ptr(),
                pwd.as_mut_ptr(),
                buf.as_mut_ptr(),
                buf.len(),
                &mut result,
            );
            let ids = (rc == 0 && !result.is_null()).then(|| ((*result).pw_uid, (*result).pw_gid));
            (rc, ids)
        };
        if rc == libc::ERANGE && buf.len() < (1 << 20) {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        return ids;
    }
}

/// Sends `signal` to process `pid`.
pub fn send_signal(pid: u32, signal: libc::c_int) -> io::Result<()> {
    let pid =
        libc::pid_t::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: kill has no memory-safety preconditions; `pid` is positive, so
    // it names exactly one process (never a group or "everyone").
    if unsafe { libc::kill(pid, signal) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Raises the soft open-files limit to the hard limit (capped), so that
/// PgBouncer, HAProxy and `pgbench -C` with many clients do not run out of
/// descriptors; children inherit it. Best effort.
pub fn raise_fd_limit() {
    const CAP: libc::rlim_t = 65_536;
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid, writable rlimit for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return;
    }
    let wanted = limit.rlim_max.min(CAP);
    if limit.rlim_cur < wanted {
        limit.rlim_cur = wanted;
        // SAFETY: `limit` is a valid rlimit; failure only leaves the old limit.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
    }
}

/// Makes a child die with SIGKILL if the harness dies first (even by
/// SIGKILL, which no destructor survives), so a benchmark never leaves
/// proxies or pgbench behind. The signal is tied to the spawning thread:
/// spawn from the main thread only.
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the closure runs in the forked child before exec and calls only
    // async-signal-safe functions (prctl, getppid); std runs it after the
    // uid/gid switch, which would otherwise clear the death signal.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl.
            if libc::getppid() != parent {
                return Err(io::Error::other("parent exited during spawn"));
            }
            Ok(())
        });
    }
}
