//! The few libc calls the harness needs, in one place so that every `unsafe`
//! block sits beside its `// SAFETY:` note (house style, rule 6).

use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;

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

/// The (uid, gid) to run servers as when we are root (PgBouncer refuses
/// root; HAProxy and the relay need not have it): the same unprivileged
/// user the throwaway cluster uses. `None` when not root.
pub fn unprivileged_ids() -> Option<(u32, u32)> {
    tollgate::cluster::unprivileged_ids()
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

/// Starts a child in a session of its own, as each part of a deployment
/// is a service of its own: the proxy under test, Postgres and pgbench
/// each get their own autogroup from the scheduler instead of sharing the
/// harness's. Sharing one, with every task weighed against every other,
/// Postgres's backends were measured sitting runnable for seconds under
/// tollgate's transaction pooling at 100 clients (`/proc/PID/schedstat`),
/// which put multi-second transactions into the figures (max up to 9.6 s,
/// against 9–88 ms with tollgate in a session of its own). A session also
/// keeps a terminal's Ctrl-C from reaching the child: the harness stops
/// its children itself, in order.
pub fn own_session(cmd: &mut Command) {
    tollgate::cluster::new_session(cmd);
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
