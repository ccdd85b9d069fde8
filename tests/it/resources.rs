//! Resources: out of file descriptors, new clients get an error and open
//! sessions carry on; a churn of connect/login/close cycles leaves file
//! descriptors, threads and sessions where they started.

use std::io::Read;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use crate::harness::*;

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// What each fd of `pid` is, for a failure message. (An fd inherited
/// from the test harness may sit above the limit: RLIMIT_NOFILE bounds fd
/// numbers, not their count.)
fn fd_links(pid: u32) -> Vec<String> {
    let mut links: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| {
            let to = std::fs::read_link(e.path()).unwrap_or_default();
            format!("{}: {}", e.file_name().to_string_lossy(), to.display())
        })
        .collect();
    links.sort();
    links
}

fn thread_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .count()
}

/// One login, a query, Terminate, close.
fn cycle(addr: SocketAddr, token: &str) {
    let mut raw = raw_login(addr, &[("user", "app"), ("database", "appdb")], token)
        .unwrap_or_else(|e| panic!("login: {e:?}"));
    raw_query(&mut raw, "select 1").unwrap();
    raw.send(b"X\0\0\0\x04");
    let _ = raw.read_to_close();
}

/// Waits until `/proc` shows `want` fds for `pid` (sockets close a moment
/// after their peers see the end).
fn settle_fds(pid: u32, want: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let n = fd_count(pid);
        if n <= want || Instant::now() > deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The fd count of an idle `pid` once it has held still for 300 ms.
fn quiet_fds(pid: u32) -> usize {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = (fd_count(pid), Instant::now());
    loop {
        std::thread::sleep(Duration::from_millis(20));
        let n = fd_count(pid);
        if n != last.0 {
            last = (n, Instant::now());
        } else if last.1.elapsed() >= Duration::from_millis(300) || Instant::now() > deadline {
            return n;
        }
    }
}

#[test]
fn out_of_file_descriptors_new_clients_get_an_error_open_sessions_go_on() {
    // A login per client: with pooling, a client landing on a shard with
    // an idle server connection needs one fd, not two, and rightly gets
    // through, which would make where the limit bites depend on the shard.
    let mut env = Env::build(EnvOptions {
        tables: "[pool]\nmode = \"off\"\n".into(),
        ..EnvOptions::default()
    });
    let token = env.create_token(&["--user", "app"]);
    // Learn the idle fd count first, then run a second proxy with a limit
    // a few sessions above it.
    env.start_proxy();
    cycle(env.addr(), &token);
    let idle = quiet_fds(env.pid());
    // SIGTERM, not SIGKILL: a killed process's pending io_uring accept
    // keeps its listener alive for some milliseconds after the exit, the
    // next process on the port shares SO_REUSEPORT with that ghost, and
    // connections the kernel hands to it are reset. A drain shuts the
    // listeners down first.
    env.signal(libc::SIGTERM);
    env.wait_exit(Duration::from_secs(10)).unwrap();
    let limit = (idle + 9) as libc::rlim_t;
    env.start_proxy_with(move |c| {
        // SAFETY: setrlimit is async-signal-safe and touches only the child.
        unsafe {
            c.pre_exec(move || {
                let l = libc::rlimit {
                    rlim_cur: limit,
                    rlim_max: limit,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    });
    let addr = env.addr();
    // From a process that has served a login, as in real life; and once
    // that session's fds are closed, or one closing late would make room
    // for a login below.
    cycle(addr, &token);
    quiet_fds(env.pid());

    // Sessions (two fds each: client and server) until one is refused.
    let mut open = Vec::new();
    let refusal = loop {
        assert!(open.len() < 20, "no refusal with {limit} fds");
        let params = [("user", "app"), ("database", "appdb")];
        let started = Instant::now();
        match raw_login(addr, &params, &token) {
            Ok(raw) => open.push(raw),
            Err(e) => break (e, started.elapsed()),
        }
    };
    let ((code, message), took) = refusal;
    eprintln!(
        "{} sessions open at {limit} fds ({idle} idle); next login: {code} {message:?} after {took:?}",
        open.len()
    );
    assert!(
        (code == "53300" && message.contains("out of file descriptors")) || code == "08001",
        "{code} {message}"
    );
    assert!(took < Duration::from_secs(2), "refusal took {took:?}");

    // And so is every client after it, on whichever shard it lands: none is
    // left queued in silence while the fds are gone.
    let mut slowest = Duration::ZERO;
    for _ in 0..30 {
        let raw = Raw::connect(addr);
        raw.0
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        let started = Instant::now();
        let params = [("user", "app"), ("database", "appdb")];
        let refused = std::panic::catch_unwind(|| raw_login_on(raw, &params, &token));
        let took = started.elapsed();
        match refused {
            Ok(Err((code, _))) => assert!(code == "53300" || code == "08001", "{code}"),
            Ok(Ok(_)) => panic!(
                "a login got through with no fds left; the process holds {:?}",
                fd_links(env.pid())
            ),
            Err(_) => panic!("a client out of fds heard nothing for {took:?}"),
        }
        slowest = slowest.max(took);
    }
    eprintln!("30 more logins refused, the slowest after {slowest:?}");

    // Silent clients take the last fds; then the accept itself fails, and
    // the reserve fd lets the next one hear why instead of waiting.
    let mut silent = Vec::new();
    let told = loop {
        assert!(silent.len() < 20, "never told about the fds");
        let mut raw = Raw::connect(addr);
        raw.0
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut head = [0u8; 1];
        match raw.0.read(&mut head) {
            Ok(1) => {
                assert_eq!(head[0], b'E');
                let mut rest = Vec::new();
                raw.0
                    .set_read_timeout(Some(Duration::from_secs(2)))
                    .unwrap();
                let _ = raw.0.read_to_end(&mut rest);
                break String::from_utf8_lossy(&rest).into_owned();
            }
            // Accepted and waiting for its start-up: it holds an fd.
            _ => silent.push(raw),
        }
    };
    assert!(told.contains("53300"), "{told:?}");
    assert!(told.contains("out of file descriptors"), "{told:?}");

    // The open sessions are untouched.
    for raw in &mut open {
        assert_eq!(
            raw_query(raw, "select 41 + 1").unwrap(),
            vec![vec![Some("42".into())]]
        );
    }
    // With room again, logins work.
    drop(silent);
    drop(open.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match raw_login(addr, &[("user", "app"), ("database", "appdb")], &token) {
            Ok(_) => break,
            Err(e) => assert!(Instant::now() < deadline, "no login after fds freed: {e:?}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(env
        .log()
        .contains("out of file descriptors: connection refused"));
}

/// `TOLLGATE_CHURN` cycles (default 2,000) of connect, login, one query,
/// close, from 4 threads: afterwards the process has the fds, threads and
/// sessions it had before. The closing note of #8 reports 100,000.
#[test]
fn connect_churn_returns_to_baseline() {
    let cycles: usize = std::env::var("TOLLGATE_CHURN")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000);
    // One pooled server connection per shard, filled before the baseline:
    // the pool's own connections are not a leak.
    let mut env = Env::build(EnvOptions {
        tables: "[pool]\nmax_server_connections = 2\n".into(),
        ..EnvOptions::default()
    });
    let token = env.create_token(&["--user", "app"]);
    env.start_proxy();
    let addr = env.addr();
    let pid = env.pid();
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| (0..10).for_each(|_| cycle(addr, &token)));
        }
    });
    let warm_up = 40;
    let fds = quiet_fds(pid);
    let threads = thread_count(pid);
    let (rss_before, _) = rss_kib(pid);

    let started = Instant::now();
    std::thread::scope(|s| {
        for t in 0..4 {
            let token = &token;
            s.spawn(move || {
                for _ in (t..cycles).step_by(4) {
                    cycle(addr, token);
                }
            });
        }
    });
    let took = started.elapsed();
    let fds_after = settle_fds(pid, fds);
    let (rss_after, hwm) = rss_kib(pid);
    eprintln!(
        "{cycles} cycles in {took:.1?} ({:.0}/s): fds {fds} -> {fds_after}, threads {threads} -> {}, \
         VmRSS {rss_before} -> {rss_after} KiB (peak {hwm} KiB)",
        cycles as f64 / took.as_secs_f64(),
        thread_count(pid)
    );
    assert_eq!(fds_after, fds, "file descriptors leaked");
    assert_eq!(thread_count(pid), threads, "threads leaked");
    // The last session's end is logged a moment after its client saw the
    // close.
    let deadline = Instant::now() + Duration::from_secs(2);
    let ended = loop {
        let ended = env.log().matches("session ended").count();
        if ended >= cycles + warm_up || Instant::now() > deadline {
            break ended;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(ended, cycles + warm_up, "every session ended once");
    // Memory: the allocator keeps some, but not per cycle.
    assert!(
        rss_after < rss_before + 16 * 1024,
        "VmRSS grew from {rss_before} to {rss_after} KiB"
    );
}
