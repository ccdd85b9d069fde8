//! Running pgbench and reading what it reports.
//!
//! Percentiles come from pgbench's per-transaction log (`--log`), one line per
//! transaction, fed into an HdrHistogram (µs, 3 significant digits), so they
//! are exact to 0.1 % rather than derived from pgbench's averages. Throughput
//! comes from pgbench's own summary line (`tps = …`). See
//! <https://www.postgresql.org/docs/current/pgbench.html#PGBENCH-PER-TRANSACTION-LOGGING>.
//!
//! pgbench writes one log file per thread (`<prefix>.<pid>` for thread 0,
//! `<prefix>.<pid>.<n>` for the others) into a per-run temporary directory
//! that is removed once read: at tens of thousands of transactions per
//! second the files grow by megabytes per run.

use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::matrix::{Cell, Transport, Workload};
use crate::util::{tail, TempDir};

/// Highest latency the histograms track: one hour, in µs.
const MAX_LATENCY_US: u64 = 3_600 * 1_000_000;
/// Significant digits of the histograms (0.1 % resolution).
const SIGFIG: u8 = 3;
/// How long past its nominal duration a run may take before it counts as hung
/// (connection set-up, pgbench's vacuum, the last transactions).
const RUN_GRACE: Duration = Duration::from_secs(60);
/// pgbench's libpq connect timeout, so an unreachable target fails fast.
const CONNECT_TIMEOUT_SECS: &str = "10";

/// Where pgbench connects and with which password (a token for tollgate).
#[derive(Clone)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    pub database: String,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}@{}:{}/{}",
            self.user, self.host, self.port, self.database
        )
    }
}

/// Why a pgbench invocation produced no result.
#[derive(Debug)]
pub enum RunError {
    /// Ctrl-C: stop everything, not a benchmark failure.
    Interrupted,
    /// pgbench failed, hung, or reported failed transactions.
    Failed(String),
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunError::Interrupted => write!(f, "interrupted"),
            RunError::Failed(msg) => write!(f, "{msg}"),
        }
    }
}

/// The figures read from pgbench's closing summary.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Summary {
    pub tps: f64,
    /// What the tps figure covers, as pgbench words it, e.g. "without
    /// initial connection time" or, with `-C`, "including reconnection times".
    pub tps_basis: String,
    pub transactions: u64,
    /// pgbench ≥ 15 reports failed transactions; older versions abort instead.
    pub failed: u64,
    pub latency_avg_ms: Option<f64>,
    /// "initial connection time" or, with `-C`, "average connection time".
    pub connection_time_ms: Option<f64>,
}

/// Parses pgbench's summary (its stdout).
pub fn parse_summary(stdout: &str) -> Result<Summary, String> {
    let mut tps = None;
    let mut transactions = None;
    let mut failed = 0;
    let mut latency_avg_ms = None;
    let mut connection_time_ms = None;
    let first_number = |s: &str| -> Option<f64> { s.split_whitespace().next()?.parse().ok() };
    for line in stdout.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("tps = ") {
            let value = first_number(rest).ok_or_else(|| format!("bad tps line {line:?}"))?;
            let basis = rest
                .split_once('(')
                .map(|(_, b)| b.trim_end_matches(')').to_owned())
                .unwrap_or_default();
            tps = Some((value, basis));
        } else if let Some(rest) = line.strip_prefix("number of transactions actually processed:") {
            // "N" or, with -t, "N/M".
            let n = rest.trim().split('/').next().unwrap_or("");
            transactions = Some(n.parse::<u64>().map_err(|_| format!("bad line {line:?}"))?);
        } else if let Some(rest) = line.strip_prefix("number of failed transactions:") {
            failed = rest
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| format!("bad line {line:?}"))?;
        } else if let Some(rest) = line.strip_prefix("latency average = ") {
            latency_avg_ms = first_number(rest);
        } else if let Some(rest) = line
            .strip_prefix("initial connection time = ")
            .or_else(|| line.strip_prefix("average connection time = "))
        {
            connection_time_ms = first_number(rest);
        }
    }
    let (tps, tps_basis) = tps.ok_or("no \"tps = \" line in pgbench's output")?;
    let transactions =
        transactions.ok_or("no \"number of transactions actually processed\" line")?;
    Ok(Summary {
        tps,
        tps_basis,
        transactions,
        failed,
        latency_avg_ms,
        connection_time_ms,
    })
}

/// One line of the per-transaction log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogEntry {
    /// A completed transaction and its latency in µs.
    Done(u64),
    /// A transaction that failed (serialization/deadlock errors, pgbench ≥ 15).
    Failed,
    /// Skipped because it fell behind `--latency-limit` (unused here).
    Skipped,
}

/// Parses `client_id transaction_no time script_no time_epoch time_us
/// [schedule_lag] [retries]`, where `time` is the latency in µs or the word
/// `failed` / `skipped`; returns the client id and the outcome.
pub fn parse_log_line(line: &str) -> Result<(u32, LogEntry), String> {
    let mut fields = line.split_ascii_whitespace();
    let client = fields
        .next()
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad client id in log line {line:?}"))?;
    let time = fields
        .nth(1)
        .ok_or_else(|| format!("short log line {line:?}"))?;
    // The remaining mandatory fields must be there, or this is not a
    // per-transaction log line (e.g. an aggregate log).
    if fields.nth(2).is_none() {
        return Err(format!("short log line {line:?}"));
    }
    let entry = match time {
        "failed" => LogEntry::Failed,
        "skipped" => LogEntry::Skipped,
        t => t
            .parse()
            .map(LogEntry::Done)
            .map_err(|_| format!("bad latency in log line {line:?}"))?,
    };
    Ok((client, entry))
}

/// Latencies of one or more runs.
#[derive(Debug, Clone)]
pub struct Latencies {
    pub hist: Histogram<u64>,
    pub failed: u64,
    pub skipped: u64,
    /// The exact largest latency (the histogram rounds within 0.1 %).
    pub max_us: u64,
    /// Completed transactions per pgbench client id. A wide spread means
    /// some clients were starved while others ran: the histogram alone
    /// cannot tell that from uniformly slow service.
    pub client_txns: Vec<u64>,
}

impl Latencies {
    pub fn new() -> Self {
        Latencies {
            hist: Histogram::new_with_bounds(1, MAX_LATENCY_US, SIGFIG)
                .expect("valid histogram bounds"),
            failed: 0,
            skipped: 0,
            max_us: 0,
            client_txns: Vec::new(),
        }
    }

    pub fn record(&mut self, client: u32, entry: LogEntry) {
        match entry {
            LogEntry::Done(us) => {
                self.hist.saturating_record(us);
                self.max_us = self.max_us.max(us);
                let client = client as usize;
                if client >= self.client_txns.len() {
                    self.client_txns.resize(client + 1, 0);
                }
                self.client_txns[client] += 1;
            }
            LogEntry::Failed => self.failed += 1,
            LogEntry::Skipped => self.skipped += 1,
        }
    }

    pub fn merge(&mut self, other: &Latencies) {
        self.hist
            .add(&other.hist)
            .expect("histograms share their bounds");
        self.failed += other.failed;
        self.skipped += other.skipped;
        self.max_us = self.max_us.max(other.max_us);
        if other.client_txns.len() > self.client_txns.len() {
            self.client_txns.resize(other.client_txns.len(), 0);
        }
        for (mine, theirs) in self.client_txns.iter_mut().zip(&other.client_txns) {
            *mine += theirs;
        }
    }

    pub fn count(&self) -> u64 {
        self.hist.len()
    }

    /// Latency at `percentile` (0–100), in µs.
    pub fn at(&self, percentile: f64) -> u64 {
        if percentile >= 100.0 {
            self.max_us
        } else {
            self.hist.value_at_quantile(percentile / 100.0)
        }
    }
}

/// Reads every log file pgbench wrote into `dir`.
pub fn read_logs(dir: &Path) -> Result<Latencies, String> {
    let mut latencies = Latencies::new();
    let entries = fs::read_dir(dir).map_err(|e| format!("reading {}: {e}", dir.display()))?;
    let mut files = 0;
    for entry in entries {
        let path = entry.map_err(|e| e.to_string())?.path();
        let is_log = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(LOG_PREFIX));
        if !is_log {
            continue;
        }
        files += 1;
        let file = File::open(&path).map_err(|e| format!("opening {}: {e}", path.display()))?;
        for line in BufReader::new(file).lines() {
            let line = line.map_err(|e| format!("reading {}: {e}", path.display()))?;
            if !line.is_empty() {
                let (client, entry) = parse_log_line(&line)?;
                latencies.record(client, entry);
            }
        }
        // Free the space now rather than when the run's directory goes.
        let _ = fs::remove_file(&path);
    }
    if files == 0 {
        return Err(format!("pgbench wrote no log file in {}", dir.display()));
    }
    Ok(latencies)
}

/// File-name prefix of the per-transaction logs (inside a per-run directory).
const LOG_PREFIX: &str = "txlog";

/// A pgbench program and how to call it.
#[derive(Debug, Clone)]
pub struct Pgbench {
    pub bin: PathBuf,
}

/// One measured (or warm-up) run.
#[derive(Debug, Clone)]
pub struct RunSpec<'a> {
    pub cell: &'a Cell,
    pub duration: Duration,
    /// pgbench threads (`-j`).
    pub jobs: u32,
    pub endpoint: &'a Endpoint,
}

/// What a successful run produced.
#[derive(Debug)]
pub struct RunOutput {
    pub summary: Summary,
    pub latencies: Latencies,
}

impl Pgbench {
    /// `pgbench --version`, e.g. "pgbench (PostgreSQL) 15.8".
    pub fn version(&self) -> String {
        Command::new(&self.bin)
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    }

    /// `pgbench -i -s SCALE`: (re)creates the pgbench tables.
    pub fn init(&self, endpoint: &Endpoint, scale: u32, stop: &AtomicBool) -> Result<(), RunError> {
        let dir = TempDir::new("loadtest-pgbench-init", None)
            .map_err(|e| RunError::Failed(format!("temp dir: {e}")))?;
        let mut cmd = self.command(endpoint, Transport::Plain, dir.path());
        cmd.args(["-i", "-q", "-s", &scale.to_string()])
            .arg(&endpoint.database);
        let status = supervise(cmd, dir.path(), Duration::from_secs(30 * 60), stop)?;
        if !status.success() {
            return Err(RunError::Failed(format!(
                "pgbench -i failed ({status}):\n{}",
                tail(&read_lossy(&dir.path().join("stderr")))
            )));
        }
        Ok(())
    }

    /// Runs pgbench for one cell against one endpoint and reads its results.
    pub fn run(&self, spec: &RunSpec<'_>, stop: &AtomicBool) -> Result<RunOutput, RunError> {
        let failed = RunError::Failed;
        let dir =
            TempDir::new("loadtest-pgbench", None).map_err(|e| failed(format!("temp dir: {e}")))?;
        let cell = spec.cell;
        let mut cmd = self.command(spec.endpoint, cell.transport, dir.path());
        cmd.args(["-c", &cell.clients.to_string()])
            .args(["-j", &spec.jobs.to_string()])
            .args(["-T", &spec.duration.as_secs().max(1).to_string()])
            .args(["-M", cell.mode.name()])
            .arg("--log")
            .arg(format!(
                "--log-prefix={}",
                dir.path().join(LOG_PREFIX).display()
            ));
        if cell.workload == Workload::SelectOnly {
            cmd.arg("-S");
        }
        if cell.connect {
            cmd.arg("-C");
        }
        cmd.arg(&spec.endpoint.database);
        let status = supervise(cmd, dir.path(), spec.duration + RUN_GRACE, stop)?;
        let stdout = read_lossy(&dir.path().join("stdout"));
        let stderr = read_lossy(&dir.path().join("stderr"));
        if !status.success() {
            return Err(failed(format!(
                "pgbench exited with {status}:\n{}",
                tail(&format!("{stderr}{stdout}"))
            )));
        }
        let summary = parse_summary(&stdout).map_err(|e| failed(format!("{e}:\n{stdout}")))?;
        if summary.failed > 0 {
            return Err(failed(format!(
                "pgbench reported {} failed transactions:\n{}",
                summary.failed,
                tail(&stderr)
            )));
        }
        let latencies = read_logs(dir.path()).map_err(failed)?;
        if latencies.failed > 0 {
            return Err(failed(format!(
                "the transaction log lists {} failed transactions",
                latencies.failed
            )));
        }
        if latencies.count() != summary.transactions {
            return Err(failed(format!(
                "the transaction log has {} transactions, pgbench's summary {}",
                latencies.count(),
                summary.transactions
            )));
        }
        if summary.transactions == 0 {
            return Err(failed("pgbench completed no transaction".to_owned()));
        }
        Ok(RunOutput { summary, latencies })
    }

    /// A pgbench command with a clean libpq environment: only what we set
    /// counts, so a stray `PGHOST` or `PGSSLMODE` cannot redirect a run.
    fn command(&self, endpoint: &Endpoint, transport: Transport, dir: &Path) -> Command {
        let mut cmd = Command::new(&self.bin);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PG") {
                cmd.env_remove(key);
            }
        }
        cmd.env("PGPASSWORD", &endpoint.password)
            .env("PGSSLMODE", transport.sslmode())
            .env("PGCONNECT_TIMEOUT", CONNECT_TIMEOUT_SECS)
            .env("PGAPPNAME", "loadtest")
            .args(["-h", &endpoint.host])
            .args(["-p", &endpoint.port.to_string()])
            .args(["-U", &endpoint.user])
            .current_dir(dir)
            .stdin(Stdio::null());
        cmd
    }
}

/// Runs `cmd` with stdout/stderr in files under `dir`, killing it on Ctrl-C
/// or when it outlives `limit`.
fn supervise(
    mut cmd: Command,
    dir: &Path,
    limit: Duration,
    stop: &AtomicBool,
) -> Result<ExitStatus, RunError> {
    let failed = RunError::Failed;
    let out = File::create(dir.join("stdout")).map_err(|e| failed(e.to_string()))?;
    let err = File::create(dir.join("stderr")).map_err(|e| failed(e.to_string()))?;
    // Its own session (see `sys::own_session`); a terminal Ctrl-C
    // reaches only the harness, which then stops pgbench itself, in order.
    cmd.stdout(out).stderr(err);
    crate::sys::own_session(&mut cmd);
    crate::sys::die_with_parent(&mut cmd);
    let mut child = cmd
        .spawn()
        .map_err(|e| failed(format!("starting {:?}: {e}", cmd.get_program())))?;
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok(status),
            Ok(None) => {}
            Err(e) => return Err(failed(format!("waiting for pgbench: {e}"))),
        }
        if stop.load(Ordering::Relaxed) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(RunError::Interrupted);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(failed(format!(
                "pgbench did not finish within {}",
                humantime::format_duration(limit)
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// pgbench threads for a cell: one per client up to `max_jobs`. pgbench
/// needs more than one thread at 8+ clients or it becomes the bottleneck
/// itself, but more threads than cores only contend with the servers.
pub fn jobs_for(clients: u32, max_jobs: u32) -> u32 {
    clients.clamp(1, max_jobs.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUMMARY_15: &str = "\
pgbench (15.18 (Debian 15.18-0+deb12u1))
transaction type: <builtin: select only>
scaling factor: 1
query mode: prepared
number of clients: 8
number of threads: 2
maximum number of tries: 1
duration: 3 s
number of transactions actually processed: 61234
number of failed transactions: 0 (0.000%)
latency average = 0.391 ms
initial connection time = 11.731 ms
tps = 20445.613201 (without initial connection time)
";

    #[test]
    fn summary_of_a_normal_run() {
        let s = parse_summary(SUMMARY_15).unwrap();
        assert_eq!(s.transactions, 61234);
        assert_eq!(s.failed, 0);
        assert!((s.tps - 20445.613201).abs() < 1e-6);
        assert_eq!(s.tps_basis, "without initial connection time");
        assert_eq!(s.latency_avg_ms, Some(0.391));
        assert_eq!(s.connection_time_ms, Some(11.731));
    }

    #[test]
    fn summary_of_a_connect_run_with_failures() {
        let out = "\
number of transactions actually processed: 1500
number of failed transactions: 3 (0.200%)
latency average = 5.300 ms
average connection time = 2.100 ms
tps = 280.5 (including reconnection times)
";
        let s = parse_summary(out).unwrap();
        assert_eq!(s.failed, 3);
        assert_eq!(s.tps_basis, "including reconnection times");
        assert_eq!(s.connection_time_ms, Some(2.1));
    }

    #[test]
    fn summary_of_older_pgbench_and_fixed_count() {
        // pgbench 13/14: no failure line, "N/M" with -t.
        let out = "number of transactions actually processed: 800/800\n\
                   tps = 1234.5 (without initial connection time)\n";
        let s = parse_summary(out).unwrap();
        assert_eq!((s.transactions, s.failed), (800, 0));
    }

    #[test]
    fn summary_without_tps_is_an_error() {
        assert!(parse_summary("pgbench: error: connection failed\n").is_err());
        assert!(parse_summary("tps = nan-ish\n").is_err());
    }

    #[test]
    fn log_lines() {
        assert_eq!(
            parse_log_line("0 199 2241 0 1175850568 995598"),
            Ok((0, LogEntry::Done(2241)))
        );
        // With --rate and retries columns.
        assert_eq!(
            parse_log_line("3 12 8 0 1700000000 12345 0 0"),
            Ok((3, LogEntry::Done(8)))
        );
        assert_eq!(
            parse_log_line("1 5 failed 0 1700000000 12345"),
            Ok((1, LogEntry::Failed))
        );
        assert_eq!(
            parse_log_line("1 6 skipped 0 1700000000 12345 3"),
            Ok((1, LogEntry::Skipped))
        );
        assert!(parse_log_line("x 199 2241 0 1 2").is_err());
        assert!(parse_log_line("0 199 2241").is_err());
        assert!(parse_log_line("0 199 -5 0 1 2").is_err());
        assert!(parse_log_line("").is_err());
    }

    #[test]
    fn logs_from_several_threads_are_merged_and_removed() {
        let dir = TempDir::new("loadtest-test", None).unwrap();
        fs::write(
            dir.path().join(format!("{LOG_PREFIX}.123")),
            "0 0 100 0 1 2\n0 1 200 0 1 3\n",
        )
        .unwrap();
        fs::write(
            dir.path().join(format!("{LOG_PREFIX}.123.1")),
            "1 0 300 0 1 2\n1 1 failed 0 1 3\n",
        )
        .unwrap();
        fs::write(dir.path().join("stdout"), "not a log").unwrap();
        let l = read_logs(dir.path()).unwrap();
        assert_eq!(l.count(), 3);
        assert_eq!(l.failed, 1);
        assert_eq!(l.max_us, 300);
        assert_eq!(l.at(50.0), 200);
        assert_eq!(l.at(100.0), 300);
        assert_eq!(l.client_txns, vec![2, 1]);
        assert!(!dir.path().join(format!("{LOG_PREFIX}.123")).exists());
        assert!(dir.path().join("stdout").exists());
    }

    #[test]
    fn missing_logs_are_an_error() {
        let dir = TempDir::new("loadtest-test", None).unwrap();
        assert!(read_logs(dir.path()).is_err());
    }

    #[test]
    fn merging_keeps_exact_max() {
        let mut a = Latencies::new();
        a.record(0, LogEntry::Done(1_234_567));
        let mut b = Latencies::new();
        b.record(0, LogEntry::Done(10));
        b.record(2, LogEntry::Done(10));
        b.record(1, LogEntry::Failed);
        a.merge(&b);
        assert_eq!((a.count(), a.failed, a.max_us), (3, 1, 1_234_567));
        assert_eq!(a.client_txns, vec![2, 0, 1]);
        // The histogram itself rounds within 0.1 %.
        let rounded = a.at(99.999);
        assert!(rounded.abs_diff(1_234_567) <= 1_235, "{rounded}");
    }

    #[test]
    fn jobs() {
        assert_eq!(jobs_for(1, 2), 1);
        assert_eq!(jobs_for(8, 2), 2);
        assert_eq!(jobs_for(8, 0), 1);
    }
}
