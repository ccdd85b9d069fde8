//! The relay's cost per round trip, without PostgreSQL: `relaybench`.
//!
//! Client threads send a small request through a relay to a trivial
//! server, which answers each with a fixed reply; the relay copies bytes
//! both ways and does nothing else (no framing, no tracking). What varies
//! is how the relay waits for and moves bytes (the read *strategy*) and
//! how its io_uring is set up (the ring *flags*). For each combination
//! the bench reports the relay thread's CPU time per round trip, measured
//! with its own CPU clock, and, when `perf` is there, its syscalls per
//! round trip. Combinations run interleaved, several times, and are
//! compared as ratios to the first one in the same run: this machine is
//! shared, and only ratios measured together mean anything.
//!
//! Strategies (see `strategy.rs`):
//! - `poll`: monoio's poll-io (readiness from epoll, then recv/send), as
//!   tollgate's plain relay reads today; no buffer while idle.
//! - `ready`: a PollAdd on the socket itself through the ring (monoio's
//!   `readable()`), then one recv and one send; no buffer while idle.
//! - `comp`: io_uring reads and writes with owned buffers; each direction
//!   holds its buffer while idle.
//! - `ring`: outside monoio, a bare io_uring loop with a provided-buffer
//!   ring and multishot recv: the bound a completion-driven relay can
//!   reach; no buffer while idle.
//! - `bridge`: the same ring inside a monoio runtime, woken through an
//!   eventfd: what tollgate can build while monoio's own ring takes no
//!   requests from outside.
//!
//! Usage: `relaybench [--clients 8] [--secs 2] [--reps 5]
//! [--request 40] [--reply 100] [--only poll/plain,ready/defer,...]`

mod ring;
mod strategy;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use strategy::{Flags, Strategy};

#[derive(Clone, Copy)]
struct Setup {
    strategy: Strategy,
    flags: Flags,
}

impl Setup {
    fn name(&self) -> String {
        format!("{}/{}", self.strategy.name(), self.flags.name())
    }
}

struct Options {
    clients: usize,
    secs: f64,
    reps: usize,
    request: usize,
    reply: usize,
    only: Option<Vec<String>>,
}

fn parse_args() -> Options {
    let mut o = Options {
        clients: 8,
        secs: 2.0,
        reps: 5,
        request: 40,
        reply: 100,
        only: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| usage(&format!("{a} needs a value")))
        };
        match a.as_str() {
            "--clients" => o.clients = value().parse().unwrap_or_else(|_| usage("--clients")),
            "--secs" => o.secs = value().parse().unwrap_or_else(|_| usage("--secs")),
            "--reps" => o.reps = value().parse().unwrap_or_else(|_| usage("--reps")),
            "--request" => o.request = value().parse().unwrap_or_else(|_| usage("--request")),
            "--reply" => o.reply = value().parse().unwrap_or_else(|_| usage("--reply")),
            "--only" => o.only = Some(value().split(',').map(str::to_owned).collect()),
            _ => usage(&format!("unknown argument {a}")),
        }
    }
    o
}

fn usage(why: &str) -> ! {
    eprintln!("relaybench: {why}\nusage: relaybench [--clients N] [--secs S] [--reps R] [--request B] [--reply B] [--only strategy/flags,...]");
    std::process::exit(2)
}

/// One run's figures.
struct Figures {
    round_trips: u64,
    cpu: Duration,
    window: Duration,
    syscalls: Option<u64>,
}

fn main() {
    let o = parse_args();
    let mut setups = Vec::new();
    for strategy in Strategy::ALL {
        for flags in strategy.flags() {
            setups.push(Setup {
                strategy,
                flags: *flags,
            });
        }
    }
    if let Some(only) = &o.only {
        setups.retain(|s| only.contains(&s.name()));
        if setups.is_empty() {
            usage("--only matched nothing");
        }
    }
    let perf = perf_available();
    if !perf {
        eprintln!("relaybench: perf not usable here; syscalls are not counted");
    }
    println!(
        "relaybench: {} clients, {}-byte requests, {}-byte replies, {} s x {} interleaved repetitions",
        o.clients, o.request, o.reply, o.secs, o.reps
    );
    let server = Server::start(o.request, o.reply);
    let mut results: Vec<Vec<Figures>> = setups.iter().map(|_| Vec::new()).collect();
    for rep in 0..o.reps {
        for (i, setup) in setups.iter().enumerate() {
            let f = run(*setup, &o, server.addr, perf);
            eprintln!(
                "  rep {rep} {:<14} {:>9} round trips  {:>6.2} us CPU/rt{}",
                setup.name(),
                f.round_trips,
                per_rt_us(&f),
                f.syscalls
                    .map(|s| format!("  {:.2} syscalls/rt", s as f64 / f.round_trips as f64))
                    .unwrap_or_default()
            );
            results[i].push(f);
        }
    }
    println!("| strategy/flags | round trips/s | relay CPU per round trip | vs first | syscalls per round trip |");
    println!("|---|---:|---:|---:|---:|");
    let base = median(results[0].iter().map(per_rt_us).collect());
    for (setup, figs) in setups.iter().zip(&results) {
        let cpu = median(figs.iter().map(per_rt_us).collect());
        let rate = median(
            figs.iter()
                .map(|f| f.round_trips as f64 / f.window.as_secs_f64())
                .collect(),
        );
        let sys = figs
            .iter()
            .map(|f| f.syscalls.map(|s| s as f64 / f.round_trips as f64))
            .collect::<Option<Vec<_>>>()
            .map(|v| format!("{:.2}", median(v)))
            .unwrap_or_else(|| "-".into());
        println!(
            "| {} | {:.0} | {:.2} us | {:.2}x | {} |",
            setup.name(),
            rate,
            cpu,
            cpu / base,
            sys
        );
    }
}

fn per_rt_us(f: &Figures) -> f64 {
    f.cpu.as_secs_f64() * 1e6 / f.round_trips.max(1) as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// One setup: a fresh relay thread, the clients through it for a short
/// warm-up, then the measured window.
fn run(setup: Setup, o: &Options, server: SocketAddr, perf: bool) -> Figures {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let relay_addr = listener.local_addr().unwrap();
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let clients = o.clients;
    let relay = std::thread::Builder::new()
        .name("relay".into())
        .spawn(move || {
            // SAFETY: gettid has no arguments and cannot fail.
            let _ = tid_tx.send(unsafe { libc::gettid() });
            match setup.strategy {
                Strategy::Ring => ring::relay(listener, server, clients),
                Strategy::Bridge => ring::bridged(setup.flags, listener, server, clients),
                s => strategy::relay(s, setup.flags, listener, server, clients),
            }
        })
        .unwrap();
    let tid = tid_rx.recv().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..o.clients)
        .map(|_| {
            let (stop, count) = (stop.clone(), count.clone());
            let (request, reply) = (o.request, o.reply);
            std::thread::spawn(move || client(relay_addr, request, reply, &stop, &count))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let clock = thread_clock(&relay);
    let sample = || {
        (
            count.load(Ordering::Relaxed),
            cpu_time(clock),
            Instant::now(),
        )
    };
    let ((rt0, cpu0, t0), (rt1, cpu1, t1), syscalls) = if perf {
        perf_window(tid, o.secs, sample)
    } else {
        let start = sample();
        std::thread::sleep(Duration::from_secs_f64(o.secs));
        (start, sample(), None)
    };
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    relay.join().unwrap();
    Figures {
        round_trips: rt1 - rt0,
        cpu: cpu1.saturating_sub(cpu0),
        window: t1 - t0,
        syscalls,
    }
}

fn client(relay: SocketAddr, request: usize, reply: usize, stop: &AtomicBool, count: &AtomicU64) {
    let mut s = TcpStream::connect(relay).expect("connect to relay");
    s.set_nodelay(true).unwrap();
    let out = vec![b'Q'; request];
    let mut back = vec![0u8; reply];
    while !stop.load(Ordering::Relaxed) {
        s.write_all(&out).expect("write");
        s.read_exact(&mut back).expect("read");
        count.fetch_add(1, Ordering::Relaxed);
    }
}

/// The far end: a thread per connection that answers every `request`
/// bytes with `reply` bytes.
struct Server {
    addr: SocketAddr,
}

impl Server {
    fn start(request: usize, reply: usize) -> Server {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                std::thread::spawn(move || {
                    s.set_nodelay(true).unwrap();
                    let mut inp = vec![0u8; request];
                    let out = vec![b'R'; reply];
                    while s.read_exact(&mut inp).is_ok() {
                        if s.write_all(&out).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Server { addr }
    }
}

fn thread_clock(t: &std::thread::JoinHandle<()>) -> libc::clockid_t {
    let mut id: libc::clockid_t = 0;
    // SAFETY: the thread is alive (joined only later); `id` is written.
    let rc = unsafe { libc::pthread_getcpuclockid(t.as_pthread_t(), &mut id) };
    assert_eq!(rc, 0, "pthread_getcpuclockid");
    id
}

fn cpu_time(clock: libc::clockid_t) -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn perf_available() -> bool {
    std::process::Command::new("perf")
        .args(["stat", "-x,", "-e", "raw_syscalls:sys_enter", "--", "true"])
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stderr).contains("sys_enter"))
        .unwrap_or(false)
}

/// Syscalls the thread makes over about `secs` (perf stat on the one
/// thread), and `sample()` taken when counting starts and ends: perf runs
/// a shell that prints a line, sleeps and prints another, and the samples
/// are taken as those lines arrive, so that the round trips and CPU time
/// cover the window perf counted (to a few ms, perf's own start and exit
/// outside the shell).
fn perf_window<S: Copy>(tid: i32, secs: f64, sample: impl Fn() -> S) -> (S, S, Option<u64>) {
    use std::io::BufRead;
    let mut child = std::process::Command::new("perf")
        .args(["stat", "-x,", "-e", "raw_syscalls:sys_enter", "-t"])
        .arg(tid.to_string())
        .args(["--", "sh", "-c"])
        .arg(format!("echo start; sleep {secs}; echo end"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("perf");
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let _ = lines.next();
    let start = sample();
    let _ = lines.next();
    let end = sample();
    let out = child.wait_with_output().expect("perf");
    let syscalls = String::from_utf8_lossy(&out.stderr)
        .lines()
        .find(|l| l.contains("sys_enter"))
        .and_then(|l| l.split(',').next()?.trim().parse().ok());
    (start, end, syscalls)
}
