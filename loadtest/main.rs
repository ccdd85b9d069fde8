//! `loadtest`: pgbench against Postgres directly, through tollgate, through
//! PgBouncer and through a plain TCP relay, interleaved, with exact latency
//! percentiles and the proxies' CPU time per transaction.
//!
//! ```sh
//! cargo run --release --bin loadtest -- --quick          # CI smoke test, < 2 min
//! cargo run --release --bin loadtest -- -M prepared,simple -c 1,8
//! ```
//!
//! Layout: `main.rs` (command line), `runner.rs` (set-up, the matrix loop,
//! progress), `targets.rs` (starting and stopping what pgbench connects to),
//! `pgbench.rs` (running pgbench, parsing its summary and transaction log),
//! `procstat.rs` (CPU time from /proc), `report.rs` (tables, JSON,
//! Markdown), `chart.rs` (SVG), `relay.rs` (the fallback relay), `tls.rs`,
//! `matrix.rs`, `sys.rs` (libc), `util.rs`.
//!
//! Everything it starts listens on 127.0.0.1 only, runs for a fixed time, and
//! is stopped (processes killed, temp dirs removed) on success, failure or
//! Ctrl-C.

mod chart;
mod matrix;
mod pgbench;
mod procstat;
mod relay;
mod report;
mod runner;
mod sys;
mod targets;
mod tls;
mod util;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use matrix::{MatrixSpec, Mode, Workload};
use targets::TargetKind;

/// Compare tollgate with direct connections, PgBouncer and a TCP relay under pgbench.
///
/// Starts a throwaway Postgres (or uses --upstream), loads pgbench data,
/// starts every target on a free loopback port, and runs pgbench against each
/// in turn (direct, tollgate, pgbouncer, relay, repeated) for every cell of
/// the matrix: workload × query mode × clients × transport (× -C). Prints a
/// table per cell and writes results.json, summary.md and an SVG per cell.
/// Exits non-zero if any run fails or any target cannot start; PgBouncer or
/// HAProxy not being installed only skips them.
#[derive(Parser, Debug)]
#[command(name = "loadtest", version)]
struct Args {
    /// Benchmark this server instead of a throwaway cluster:
    /// postgres://user:password@127.0.0.1:port/db (loopback only). Its pgbench
    /// tables are dropped and re-created unless --no-init.
    #[arg(long, value_name = "URL")]
    upstream: Option<String>,
    /// Skip `pgbench -i`: the pgbench tables must already exist.
    #[arg(long)]
    no_init: bool,
    /// pgbench scale factor (×100,000 accounts) [default: 10; --quick: 1]
    #[arg(long, short = 's')]
    scale: Option<u32>,
    /// tollgate shards, PgBouncer processes and HAProxy threads [default: CPUs]
    #[arg(long)]
    shards: Option<usize>,
    /// Repetitions of every run [default: 3; --quick: 1]
    #[arg(long)]
    reps: Option<u32>,
    /// Length of each measured run, whole seconds [default: 10s; --quick: 3s]
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Warm-up run per target and cell, discarded; 0s for none
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    warmup: Duration,
    /// Workloads, comma-separated [default: select-only,tpcb-like; --quick: select-only]
    #[arg(long, short = 'w', value_delimiter = ',')]
    workload: Vec<Workload>,
    /// Query modes (pgbench -M), comma-separated [default: prepared,simple; --quick: prepared]
    #[arg(long = "mode", short = 'M', value_delimiter = ',')]
    modes: Vec<Mode>,
    /// Client counts, comma-separated [default: 1,8,32; --quick: 1,8]
    #[arg(long, short = 'c', value_delimiter = ',')]
    clients: Vec<u32>,
    /// Add TLS cells (sslmode=require; skipped for targets without TLS)
    #[arg(long)]
    tls: bool,
    /// Add cells with a new connection per transaction (pgbench -C)
    #[arg(long)]
    connect: bool,
    /// Targets, comma-separated [default: direct,tollgate,pgbouncer,relay;
    /// add tollgate-metrics to measure what metrics cost, tollgate-nopool for a login per client,
    /// tollgate-readiness for the readiness-driven plain relay,
    /// tollgate-tx and pgbouncer-tx for transaction pooling over --tx-pool-size,
    /// direct-unix and tollgate-unix-upstream for Postgres over its Unix socket]
    #[arg(long, value_delimiter = ',')]
    targets: Vec<TargetKind>,
    /// Most pgbench threads (-j); each cell uses min(clients, this) [default: CPUs]
    #[arg(long)]
    jobs: Option<u32>,
    /// The floor reference: HAProxy if installed (auto), or the harness's own
    #[arg(long, value_enum, default_value_t = RelayChoice::Auto)]
    relay: RelayChoice,
    /// PgBouncer's client authentication
    #[arg(long, value_enum, default_value_t = PgbouncerAuth::ScramSha256)]
    pgbouncer_auth: PgbouncerAuth,
    /// Server connections in all for tollgate-tx and pgbouncer-tx
    #[arg(long, default_value_t = 16)]
    tx_pool_size: u32,
    /// The tollgate binary [default: built with cargo, next to this program]
    #[arg(long, value_name = "PATH")]
    tollgate_bin: Option<PathBuf>,
    /// Where results go [default: loadtest/results/<timestamp>/]
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Smoke test: select-only, -M prepared, 1 and 8 clients, plaintext,
    /// scale 1, one 3 s repetition (explicit options still apply)
    #[arg(long)]
    quick: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RelayChoice {
    /// HAProxy when installed, else the builtin relay.
    Auto,
    Haproxy,
    Builtin,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PgbouncerAuth {
    ScramSha256,
    Md5,
    /// Cleartext password, like tollgate's token exchange.
    Plain,
}

impl PgbouncerAuth {
    pub fn name(self) -> &'static str {
        match self {
            PgbouncerAuth::ScramSha256 => "scram-sha-256",
            PgbouncerAuth::Md5 => "md5",
            PgbouncerAuth::Plain => "plain",
        }
    }
}

/// The options with defaults (and `--quick`) applied and checked.
#[derive(Debug, Clone)]
pub struct Settings {
    pub upstream: Option<String>,
    pub init: bool,
    pub scale: u32,
    pub shards: usize,
    pub reps: u32,
    pub duration: Duration,
    pub warmup: Duration,
    pub matrix: MatrixSpec,
    pub targets: Vec<TargetKind>,
    pub max_jobs: u32,
    pub relay: RelayChoice,
    pub pgbouncer_auth: PgbouncerAuth,
    pub tx_pool_size: u32,
    pub tollgate_bin: Option<PathBuf>,
    pub out: Option<PathBuf>,
    /// The command line as run, password in --upstream masked.
    pub command_line: String,
}

fn settings(args: Args, command_line: String) -> Result<Settings, String> {
    let quick = args.quick;
    let pick = |v: Option<u32>, normal: u32, q: u32| v.unwrap_or(if quick { q } else { normal });
    fn or<T: Clone>(v: Vec<T>, quick: bool, normal: &[T], q: &[T]) -> Vec<T> {
        if !v.is_empty() {
            v
        } else if quick {
            q.to_vec()
        } else {
            normal.to_vec()
        }
    }
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let duration = args
        .duration
        .unwrap_or(Duration::from_secs(if quick { 3 } else { 10 }));
    for (name, d, min) in [("--duration", duration, 1), ("--warmup", args.warmup, 0)] {
        if d.subsec_nanos() != 0 || d.as_secs() < min {
            return Err(format!(
                "{name} must be whole seconds (pgbench -T), at least {min}s"
            ));
        }
    }
    let mut clients = or(args.clients, quick, &[1, 8, 32], &[1, 8]);
    clients.dedup();
    if clients.contains(&0) {
        return Err("--clients must be at least 1".into());
    }
    let mut targets = or(args.targets, quick, &TargetKind::ALL, &TargetKind::ALL);
    targets.sort();
    targets.dedup();
    if let Some(t) = targets.iter().find(|t| t.needs_socket()) {
        if args.upstream.is_some() {
            return Err(format!(
                "--targets {t} needs the throwaway cluster's Unix socket, not --upstream"
            ));
        }
    }
    let reps = pick(args.reps, 3, 1);
    if reps == 0 {
        return Err("--reps must be at least 1".into());
    }
    Ok(Settings {
        upstream: args.upstream,
        init: !args.no_init,
        scale: pick(args.scale, 10, 1).max(1),
        shards: args.shards.unwrap_or(cpus).max(1),
        reps,
        duration,
        warmup: args.warmup,
        matrix: MatrixSpec {
            workloads: or(
                args.workload,
                quick,
                &[Workload::SelectOnly, Workload::TpcbLike],
                &[Workload::SelectOnly],
            ),
            modes: or(
                args.modes,
                quick,
                &[Mode::Prepared, Mode::Simple],
                &[Mode::Prepared],
            ),
            clients,
            tls: args.tls,
            connect: args.connect,
        },
        targets,
        max_jobs: args.jobs.unwrap_or(cpus as u32).max(1),
        relay: args.relay,
        pgbouncer_auth: args.pgbouncer_auth,
        tx_pool_size: args.tx_pool_size,
        tollgate_bin: args.tollgate_bin,
        out: args.out,
        command_line,
    })
}

/// `10s`, `1m`, or a bare number of seconds (as pgbench's `-T` takes).
fn parse_duration(s: &str) -> Result<Duration, String> {
    match s.parse::<u64>() {
        Ok(secs) => Ok(Duration::from_secs(secs)),
        Err(_) => humantime::parse_duration(s).map_err(|e| e.to_string()),
    }
}

/// How this run was invoked, for summary.md: as `cargo run` when run by
/// cargo, with any password in a postgres:// URL masked.
fn command_line() -> String {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .map(|a| quote(&mask_url_password(&a)))
        .collect();
    let prefix = if std::env::var_os("CARGO").is_some() {
        "cargo run --release --bin loadtest --".to_owned()
    } else {
        std::env::args().next().unwrap_or_else(|| "loadtest".into())
    };
    if args.is_empty() {
        prefix.trim_end_matches(" --").to_owned()
    } else {
        format!("{prefix} {}", args.join(" "))
    }
}

fn quote(arg: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_-./:=,@%+".contains(c);
    if !arg.is_empty() && arg.chars().all(plain) {
        arg.to_owned()
    } else {
        format!("'{}'", arg.replace('\'', "'\\''"))
    }
}

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`.
fn mask_url_password(arg: &str) -> String {
    let Some(scheme_end) = arg.find("://") else {
        return arg.to_owned();
    };
    let rest = &arg[scheme_end + 3..];
    let Some(at) = rest.find('@') else {
        return arg.to_owned();
    };
    match rest[..at].find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &arg[..scheme_end + 3],
            &rest[..colon],
            &rest[at..]
        ),
        None => arg.to_owned(),
    }
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some(relay::SUBCOMMAND) {
        return relay::main(&argv[2..]);
    }
    let command_line = command_line();
    let settings = match settings(Args::parse(), command_line) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("loadtest: {e}");
            return ExitCode::from(2);
        }
    };
    match runner::run(&settings) {
        Ok(0) => ExitCode::SUCCESS,
        Ok(failures) => {
            eprintln!("loadtest: FAILED: {failures} failure(s), listed above");
            ExitCode::FAILURE
        }
        Err(runner::Stop::Interrupted) => {
            eprintln!("loadtest: interrupted; everything it started has been stopped");
            ExitCode::from(130)
        }
        Err(runner::Stop::Fatal(e)) => {
            eprintln!("loadtest: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Settings, String> {
        let args = Args::try_parse_from(std::iter::once("loadtest").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        settings(args, String::new())
    }

    #[test]
    fn quick_defaults_and_overrides() {
        let s = parse(&["--quick"]).unwrap();
        assert_eq!((s.scale, s.reps, s.duration.as_secs()), (1, 1, 3));
        assert_eq!(s.matrix.clients, vec![1, 8]);
        assert_eq!(s.matrix.modes, vec![Mode::Prepared]);
        assert_eq!(matrix::cells(&s.matrix).len(), 2);
        let s = parse(&["--quick", "-c", "4", "-M", "simple,extended"]).unwrap();
        assert_eq!(s.matrix.clients, vec![4]);
        assert_eq!(s.matrix.modes, vec![Mode::Simple, Mode::Extended]);
    }

    #[test]
    fn full_defaults() {
        let s = parse(&[]).unwrap();
        assert_eq!((s.scale, s.reps, s.duration.as_secs()), (10, 3, 10));
        assert_eq!(matrix::cells(&s.matrix).len(), 2 * 2 * 3);
        assert_eq!(s.targets, TargetKind::ALL.to_vec());
    }

    #[test]
    fn bad_options() {
        assert!(parse(&["--duration", "1500ms"]).is_err());
        assert_eq!(parse(&["--duration", "7"]).unwrap().duration.as_secs(), 7);
        assert_eq!(parse(&["--duration", "1m"]).unwrap().duration.as_secs(), 60);
        assert!(parse(&["--clients", "0"]).is_err());
        assert!(parse(&["--reps", "0"]).is_err());
        assert!(parse(&["--mode", "bogus"]).is_err());
        let url = "postgres://app:x@127.0.0.1/appdb";
        assert!(parse(&["--upstream", url, "--targets", "direct,direct-unix"]).is_err());
        assert!(parse(&["--upstream", url, "--targets", "tollgate-unix-upstream"]).is_err());
        assert!(parse(&["--upstream", url, "--targets", "direct,tollgate"]).is_ok());
    }

    #[test]
    fn command_line_masks_passwords_and_quotes() {
        assert_eq!(
            mask_url_password("postgres://app:s3cret@127.0.0.1:5432/appdb"),
            "postgres://app:***@127.0.0.1:5432/appdb"
        );
        assert_eq!(
            mask_url_password("postgres://app@h/db"),
            "postgres://app@h/db"
        );
        assert_eq!(mask_url_password("--quick"), "--quick");
        assert_eq!(quote("-M"), "-M");
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("it's"), "'it'\\''s'");
    }
}
