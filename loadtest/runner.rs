//! Set-up and the matrix loop.
//!
//! Order of events: find pgbench and tollgate (building tollgate first, since
//! `cargo run --bin loadtest` builds only the harness), start Postgres, load
//! pgbench data, start every target, then per cell: a short warm-up per
//! target (discarded), then `reps` rounds of direct → tollgate → pgbouncer →
//! relay. Interleaving spreads the machine's noise (other tenants, CPU
//! frequency, Postgres' own housekeeping) over all targets alike, instead of
//! letting one target own a noisy minute. Results are written after every
//! cell, so an interrupted run keeps what it finished.
//!
//! A failed run is recorded and the matrix goes on (the target sits out the
//! rest of that cell); the exit status reports it at the end. Ctrl-C stops at
//! once: the running pgbench is killed and everything else stops as it drops.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use tollgate::cluster::{find_pg_bin, Cluster, ClusterOptions, HbaAuth};

use crate::matrix::{self, Cell, Transport};
use crate::pgbench::{jobs_for, Endpoint, Latencies, Pgbench, RunError, RunSpec};
use crate::procstat::CpuClock;
use crate::report::{
    self, CellAcc, CellSummary, Percentiles, Results, RunInfo, RunRecord, TargetAcc,
};
use crate::targets::{self, StartContext, Target, TargetKind};
use crate::tls::TlsFiles;
use crate::{chart, sys, RelayChoice, Settings};

/// Set by Ctrl-C; everything that waits checks it.
static STOP: AtomicBool = AtomicBool::new(false);

/// Why the run ended early.
#[derive(Debug)]
pub enum Stop {
    Interrupted,
    Fatal(String),
}

impl From<RunError> for Stop {
    fn from(e: RunError) -> Self {
        match e {
            RunError::Interrupted => Stop::Interrupted,
            RunError::Failed(msg) => Stop::Fatal(msg),
        }
    }
}

fn fatal(e: impl std::fmt::Display) -> Stop {
    Stop::Fatal(e.to_string())
}

fn check_stop() -> Result<(), Stop> {
    if STOP.load(Ordering::Relaxed) {
        Err(Stop::Interrupted)
    } else {
        Ok(())
    }
}

/// Runs the whole benchmark; returns the number of failures.
pub fn run(s: &Settings) -> Result<usize, Stop> {
    ctrlc::set_handler(|| {
        STOP.store(true, Ordering::Relaxed);
        eprintln!("\nloadtest: Ctrl-C, stopping...");
    })
    .map_err(fatal)?;
    sys::raise_fd_limit();
    let started = now_rfc3339();
    let pgbench = Pgbench {
        bin: find_pg_bin("pgbench").map_err(fatal)?,
    };
    let unprivileged = sys::unprivileged_ids();
    let cells = matrix::cells(&s.matrix);
    let max_clients = s.matrix.clients.iter().copied().max().unwrap_or(1);
    let mut notes = Vec::new();
    let mut failures = Vec::new();
    if s.matrix.tls {
        notes.push(
            "TLS cells: sslmode=require with a self-signed ECDSA P-256 certificate; Postgres, \
             tollgate and PgBouncer terminate TLS (the proxies' upstream legs are plaintext), \
             the relay passes it through to Postgres"
                .to_owned(),
        );
    }
    if s.matrix.connect {
        notes.push(
            "-C cells: TPS includes connection set-up, the logged latencies do not; tollgate \
             and PgBouncer keep server connections between clients (session pooling; \
             tollgate-nopool does not), the relay opens one per client connection"
                .to_owned(),
        );
    }

    if s.targets.iter().any(|t| t.needs_socket()) {
        notes.push(
            "direct-unix and tollgate-unix-upstream reach Postgres over its Unix-domain \
             socket, where pg_hba says trust (TCP: scram-sha-256); pgbench still reaches \
             tollgate over TCP"
                .to_owned(),
        );
    }

    let tollgate_bin = if s.targets.iter().any(|t| t.is_tollgate()) {
        Some(tollgate_binary(s).map_err(Stop::Fatal)?)
    } else {
        None
    };
    check_stop()?;

    let tls = if s.matrix.tls {
        match TlsFiles::generate(unprivileged) {
            Ok(files) => Some(files),
            Err(e) => {
                notes.push(format!(
                    "{e}: only targets that need no certificate run TLS cells"
                ));
                None
            }
        }
    } else {
        None
    };

    let upstream = Upstream::start(s, max_clients, tls.as_ref())?;
    check_stop()?;
    if s.init {
        eprintln!("loadtest: pgbench -i -s {} (loading data)...", s.scale);
        pgbench.init(&upstream.endpoint, s.scale, &STOP)?;
    }
    check_stop()?;

    let ctx = StartContext {
        upstream: &upstream.endpoint,
        upstream_socket_dir: upstream.socket_dir.as_deref(),
        shards: s.shards,
        max_clients,
        tls: tls.as_ref(),
        upstream_tls: upstream.tls,
        unprivileged,
        tx_pool_size: s.tx_pool_size,
    };
    // Targets drop (stop) before `upstream`: declared after it.
    let mut running: Vec<Target> = Vec::new();
    let mut absent: Vec<(TargetKind, String)> = Vec::new();
    for &kind in &s.targets {
        check_stop()?;
        match start_target(kind, &ctx, s, tollgate_bin.as_deref()) {
            Ok(Some(target)) => {
                eprintln!(
                    "loadtest: {} on 127.0.0.1:{}",
                    target.label, target.endpoint.port
                );
                running.push(target);
            }
            Ok(None) => {
                let why = format!("{kind} skipped: not installed (apt-get install {kind})");
                eprintln!("loadtest: note: {why}");
                notes.push(why.clone());
                absent.push((kind, why));
            }
            Err(e) => {
                eprintln!("loadtest: FAILED to start {kind}: {e}");
                failures.push(format!("{kind} could not start: {e}"));
                absent.push((kind, "could not start".to_owned()));
            }
        }
    }

    let out_dir = output_dir(s).map_err(fatal)?;
    let mut info = RunInfo {
        command: s.command_line.clone(),
        started,
        finished: None,
        complete: false,
        machine: machine_description(),
        postgres: upstream.description.clone(),
        pgbench: pgbench.version(),
        tollgate: tollgate_description(),
        duration_s: s.duration.as_secs(),
        warmup_s: s.warmup.as_secs(),
        reps: s.reps,
        scale: s.scale,
        shards: s.shards,
        pgbench_max_jobs: s.max_jobs,
        targets: running.iter().map(|t| (t.kind, t.label.clone())).collect(),
        notes,
        failures,
    };

    let mut alive = vec![true; running.len()];
    let mut progress = Progress::plan(&cells, &running, s);
    let clock = CpuClock::new();
    let mut summaries: Vec<CellSummary> = Vec::new();
    let mut outcome = Ok(());
    for (index, cell) in cells.iter().enumerate() {
        let mut cell_run = CellRun {
            cell,
            index,
            cells: cells.len(),
            settings: s,
            pgbench: &pgbench,
            clock,
            progress: &mut progress,
            failures: &mut info.failures,
        };
        let acc = match cell_run.run(&mut running, &mut alive, &absent) {
            Ok(acc) => acc,
            Err(stop) => {
                outcome = Err(stop);
                break;
            }
        };
        let summary = report::summarize(&acc);
        eprintln!();
        println!("{}", report::terminal_table(&summary));
        let chart_path = out_dir.join(format!("{}.svg", summary.id));
        if let Err(e) = chart::write(&summary, &chart_path) {
            eprintln!("loadtest: {e}");
        }
        summaries.push(summary);
        write_results(&out_dir, &info, &summaries).map_err(fatal)?;
    }

    info.complete = outcome.is_ok();
    info.finished = Some(now_rfc3339());
    let results = write_results(&out_dir, &info, &summaries).map_err(fatal)?;
    if !results.goals.is_empty() {
        println!("tollgate's targets (reported, not asserted):");
        println!("{}", report::terminal_goals(&results.goals));
    }
    for note in &info.notes {
        eprintln!("loadtest: note: {note}");
    }
    for failure in &info.failures {
        eprintln!("loadtest: FAILURE: {failure}");
    }
    eprintln!(
        "loadtest: results in {} (summary.md, results.json, one SVG per cell)",
        out_dir.display()
    );
    outcome?;
    Ok(info.failures.len())
}

/// Writes results.json and summary.md (again after every cell).
fn write_results(dir: &Path, info: &RunInfo, cells: &[CellSummary]) -> std::io::Result<Results> {
    let results = Results {
        info: info.clone(),
        cells: cells.to_vec(),
        goals: report::goal_checks(cells),
    };
    let json = serde_json::to_string_pretty(&results).map_err(std::io::Error::other)?;
    fs::write(dir.join("results.json"), json + "\n")?;
    fs::write(dir.join("summary.md"), report::markdown(&results))?;
    Ok(results)
}

/// Starts one target; `Ok(None)` when its program is not installed.
fn start_target(
    kind: TargetKind,
    ctx: &StartContext<'_>,
    s: &Settings,
    tollgate_bin: Option<&Path>,
) -> Result<Option<Target>, String> {
    match kind {
        TargetKind::Direct => Ok(Some(targets::direct(ctx))),
        TargetKind::DirectUnix => targets::direct_unix(ctx).map(Some),
        TargetKind::Tollgate
        | TargetKind::TollgateUnixUpstream
        | TargetKind::TollgateMetrics
        | TargetKind::TollgateNopool
        | TargetKind::TollgateReadiness
        | TargetKind::TollgateTx => {
            let bin = tollgate_bin.ok_or("no tollgate binary")?;
            targets::tollgate(ctx, bin, kind).map(Some)
        }
        TargetKind::Pgbouncer | TargetKind::PgbouncerTx => {
            match targets::find_program("pgbouncer") {
                Some(bin) => {
                    let transaction = kind == TargetKind::PgbouncerTx;
                    targets::pgbouncer(ctx, &bin, s.pgbouncer_auth.name(), transaction).map(Some)
                }
                None => Ok(None),
            }
        }
        TargetKind::Relay => {
            let haproxy = match s.relay {
                RelayChoice::Builtin => None,
                RelayChoice::Auto | RelayChoice::Haproxy => targets::find_program("haproxy"),
            };
            match (haproxy, s.relay) {
                (Some(bin), _) => targets::haproxy(ctx, &bin).map(Some),
                (None, RelayChoice::Haproxy) => Ok(None),
                (None, _) => {
                    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
                    targets::builtin_relay(ctx, &exe).map(Some)
                }
            }
        }
    }
}

/// One cell's runs.
struct CellRun<'a> {
    cell: &'a Cell,
    index: usize,
    cells: usize,
    settings: &'a Settings,
    pgbench: &'a Pgbench,
    clock: CpuClock,
    progress: &'a mut Progress,
    failures: &'a mut Vec<String>,
}

impl CellRun<'_> {
    fn run(
        &mut self,
        targets: &mut [Target],
        alive: &mut [bool],
        absent: &[(TargetKind, String)],
    ) -> Result<CellAcc, Stop> {
        let s = self.settings;
        let cell = self.cell;
        let mut accs: Vec<TargetAcc> = targets
            .iter()
            .map(|t| TargetAcc::new(t.kind, &t.label))
            .collect();
        // Which targets run in this cell.
        let mut active: Vec<bool> = alive.to_vec();
        for (i, t) in targets.iter().enumerate() {
            if !alive[i] {
                accs[i].skipped = Some("stopped working earlier in this run".to_owned());
            } else if cell.transport == Transport::Tls {
                if let Some(why) = &t.tls_unsupported {
                    eprintln!("loadtest: note: {why} (skipped in TLS cells)");
                    accs[i].skipped = Some(why.clone());
                    active[i] = false;
                }
            }
        }
        let jobs = jobs_for(cell.clients, s.max_jobs);

        if !s.warmup.is_zero() {
            for (i, target) in targets.iter_mut().enumerate() {
                if !active[i] {
                    continue;
                }
                let what = format!("warm-up · {}", target.kind);
                self.progress.announce(self.index, self.cells, cell, &what);
                let spec = RunSpec {
                    cell,
                    duration: s.warmup,
                    jobs,
                    endpoint: &target.endpoint,
                };
                let t0 = Instant::now();
                let result = self.pgbench.run(&spec, &STOP);
                self.progress.done(s.warmup, t0.elapsed());
                match result {
                    Ok(_) => {}
                    Err(RunError::Interrupted) => return Err(Stop::Interrupted),
                    Err(RunError::Failed(e)) => {
                        self.fail(target, &mut accs[i], "warm-up", &e);
                        active[i] = false;
                        self.progress.forget(s.reps as usize, s.duration);
                    }
                }
            }
        }

        for rep in 1..=s.reps {
            for (i, target) in targets.iter_mut().enumerate() {
                if !active[i] {
                    continue;
                }
                let what = format!("rep {rep}/{} · {}", s.reps, target.kind);
                self.progress.announce(self.index, self.cells, cell, &what);
                let endpoint = target.endpoint.clone();
                let spec = RunSpec {
                    cell,
                    duration: s.duration,
                    jobs,
                    endpoint: &endpoint,
                };
                let t0 = Instant::now();
                let measured = self.measure(target, &spec, rep);
                self.progress.done(s.duration, t0.elapsed());
                match measured {
                    Ok((record, latencies)) => {
                        eprintln!("    {}", run_line(target.kind, &record));
                        accs[i].merged.merge(&latencies);
                        accs[i].runs.push(record);
                    }
                    Err(RunError::Interrupted) => return Err(Stop::Interrupted),
                    Err(RunError::Failed(e)) => {
                        self.fail(target, &mut accs[i], &format!("rep {rep}"), &e);
                        active[i] = false;
                        if target.check_alive().is_err() {
                            alive[i] = false;
                        }
                        let left = (s.reps - rep) as usize;
                        self.progress.forget(left, s.duration);
                    }
                }
            }
        }
        for (kind, why) in absent {
            let mut acc = TargetAcc::new(*kind, kind.name());
            acc.skipped = Some(why.clone());
            accs.push(acc);
        }
        accs.sort_by_key(|a| a.kind);
        Ok(CellAcc {
            cell: *cell,
            targets: accs,
        })
    }

    /// One measured run with the proxy's CPU time around it.
    fn measure(
        &self,
        target: &mut Target,
        spec: &RunSpec<'_>,
        rep: u32,
    ) -> Result<(RunRecord, Latencies), RunError> {
        target.check_alive().map_err(RunError::Failed)?;
        let pids = target.pids();
        let cpu = |when: &str| -> Result<Option<u64>, RunError> {
            if pids.is_empty() {
                return Ok(None);
            }
            self.clock
                .cpu_us(&pids)
                .map(Some)
                .map_err(|e| RunError::Failed(format!("reading CPU time {when} the run: {e}")))
        };
        let before = cpu("before")?;
        let t0 = Instant::now();
        let out = self.pgbench.run(spec, &STOP)?;
        let wall = t0.elapsed();
        let after = cpu("after")?;
        // A proxy that crashed at the very end would otherwise go unnoticed.
        target.check_alive().map_err(RunError::Failed)?;
        let cpu_us = before.zip(after).map(|(b, a)| a.saturating_sub(b));
        let txns = out.summary.transactions;
        Ok((
            RunRecord {
                rep,
                latency: Percentiles::of(&out.latencies),
                cpu_us_per_txn: cpu_us.map(|c| c as f64 / txns.max(1) as f64),
                cpu_us,
                summary: out.summary,
                wall_s: wall.as_secs_f64(),
            },
            out.latencies,
        ))
    }

    fn fail(&mut self, target: &Target, acc: &mut TargetAcc, when: &str, e: &str) {
        let msg = format!("{} · {} · {when}: {e}", self.cell, target.kind);
        eprintln!("loadtest: FAILED: {msg}");
        acc.failures.push(msg.clone());
        self.failures.push(msg);
    }
}

fn run_line(kind: TargetKind, r: &RunRecord) -> String {
    let mut line = format!(
        "{:<22} {:>8.0} tps · p50 {} µs · p99 {} µs · max {} µs",
        kind.name(),
        r.summary.tps,
        r.latency.p50,
        r.latency.p99,
        r.latency.max
    );
    if let Some(c) = r.cpu_us_per_txn {
        line.push_str(&format!(" · proxy CPU {c:.1} µs/txn"));
    }
    // Some clients starved while others ran: worth a look at the max column.
    let (least, most) = (r.latency.client_txns_min, r.latency.client_txns_max);
    if least.saturating_mul(STARVATION_RATIO) < most {
        line.push_str(&format!(
            " · uneven clients: {least} to {most} transactions each"
        ));
    }
    line
}

/// Clients whose transaction counts differ by more than this factor within
/// one run are flagged on stderr (and visible in results.json).
const STARVATION_RATIO: u64 = 10;

/// Progress and time left, on stderr.
struct Progress {
    runs_total: usize,
    runs_done: usize,
    /// Sum of the nominal durations of runs not yet done.
    nominal_left: Duration,
    nominal_done: Duration,
    spent: Duration,
}

impl Progress {
    fn plan(cells: &[Cell], targets: &[Target], s: &Settings) -> Self {
        let mut runs = 0;
        let mut nominal = Duration::ZERO;
        for cell in cells {
            for t in targets {
                if cell.transport == Transport::Tls && t.tls_unsupported.is_some() {
                    continue;
                }
                runs += s.reps as usize;
                nominal += s.duration * s.reps;
                if !s.warmup.is_zero() {
                    runs += 1;
                    nominal += s.warmup;
                }
            }
        }
        Progress {
            runs_total: runs,
            runs_done: 0,
            nominal_left: nominal,
            nominal_done: Duration::ZERO,
            spent: Duration::ZERO,
        }
    }

    fn announce(&self, index: usize, cells: usize, cell: &Cell, what: &str) {
        // Each run costs its nominal length plus start-up, pgbench's vacuum
        // and log parsing; learn that overhead from the runs so far.
        let factor = if self.nominal_done.is_zero() {
            1.2
        } else {
            self.spent.as_secs_f64() / self.nominal_done.as_secs_f64()
        };
        let eta = Duration::from_secs(self.nominal_left.mul_f64(factor).as_secs());
        eprintln!(
            "[run {}/{} · cell {}/{} · {} left] {cell} · {what}",
            self.runs_done + 1,
            self.runs_total,
            index + 1,
            cells,
            humantime::format_duration(eta)
        );
    }

    fn done(&mut self, nominal: Duration, spent: Duration) {
        self.runs_done += 1;
        self.nominal_left = self.nominal_left.saturating_sub(nominal);
        self.nominal_done += nominal;
        self.spent += spent;
    }

    /// Drops runs that will not happen (a target failed).
    fn forget(&mut self, runs: usize, nominal_each: Duration) {
        self.runs_total = self.runs_total.saturating_sub(runs);
        self.nominal_left = self.nominal_left.saturating_sub(nominal_each * runs as u32);
    }
}

/// Postgres: a throwaway cluster tuned for the benchmark, or the given one.
struct Upstream {
    endpoint: Endpoint,
    /// Whether Postgres accepts TLS (for direct and relay TLS cells).
    tls: bool,
    /// Postgres' Unix-domain socket directory (the throwaway cluster's).
    socket_dir: Option<PathBuf>,
    description: String,
    _cluster: Option<Cluster>,
}

impl Upstream {
    fn start(s: &Settings, max_clients: u32, tls: Option<&TlsFiles>) -> Result<Upstream, Stop> {
        if let Some(url) = &s.upstream {
            let endpoint = parse_upstream(url).map_err(Stop::Fatal)?;
            return Ok(Upstream {
                endpoint,
                // Unknown: TLS cells will tell (and fail) if it has none.
                tls: true,
                socket_dir: None,
                description: "given with --upstream".to_owned(),
                _cluster: None,
            });
        }
        eprintln!("loadtest: starting a throwaway Postgres...");
        // Room for every target's connections at once: PgBouncer keeps up to
        // a pool per process open between its runs.
        let max_connections = ((s.shards as u32 + 3) * (max_clients + 4) + 20).max(200);
        let mut extra_conf: Vec<(String, String)> = [
            ("max_connections", max_connections.to_string()),
            ("shared_buffers", "256MB".to_owned()),
            // No checkpoint in the middle of a run.
            ("max_wal_size", "4GB".to_owned()),
            ("checkpoint_timeout", "30min".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        if let Some(files) = tls {
            extra_conf.push(("ssl".into(), "on".into()));
            extra_conf.push(("ssl_cert_file".into(), files.cert.display().to_string()));
            extra_conf.push(("ssl_key_file".into(), files.key.display().to_string()));
        }
        let opts = ClusterOptions {
            password: tollgate::secret::random_hex(16),
            auth: HbaAuth::ScramSha256,
            extra_conf,
            // Each part a service of its own, as in production (see
            // `sys::own_session`).
            own_session: true,
            ..ClusterOptions::default()
        };
        let cluster = Cluster::start(&opts).map_err(fatal)?;
        let version = find_pg_bin("postgres")
            .ok()
            .and_then(|bin| Command::new(bin).arg("--version").output().ok())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        Ok(Upstream {
            endpoint: Endpoint {
                host: cluster.host().to_owned(),
                port: cluster.port(),
                user: cluster.role().to_owned(),
                password: cluster.password().to_owned(),
                database: cluster.database().to_owned(),
            },
            tls: tls.is_some(),
            socket_dir: Some(cluster.socket_dir().to_owned()),
            description: format!(
                "throwaway cluster, {version}, scram-sha-256, fsync off, shared_buffers 256MB"
            ),
            _cluster: Some(cluster),
        })
    }
}

/// `postgres://user:password@host:port/db`, loopback hosts only: the harness
/// generates load, and load stays on this machine.
fn parse_upstream(s: &str) -> Result<Endpoint, String> {
    let url = tollgate::config::pgurl::PgUrl::parse(s, "--upstream")?;
    let host = if url.host == "localhost" {
        "127.0.0.1".to_owned()
    } else {
        url.host
    };
    let loopback = host
        .parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback());
    if !loopback {
        return Err(format!(
            "--upstream host {host} is not a loopback address; the harness only generates load on this machine"
        ));
    }
    Ok(Endpoint {
        host,
        port: url.port,
        user: url.user,
        password: url.password,
        database: url.database,
    })
}

/// The tollgate binary to benchmark. Under cargo it is (re)built first:
/// `cargo run --bin loadtest` builds only the harness, and a stale proxy
/// binary would silently benchmark old code.
fn tollgate_binary(s: &Settings) -> Result<PathBuf, String> {
    if let Some(bin) = &s.tollgate_bin {
        return if bin.is_file() {
            Ok(bin.clone())
        } else {
            Err(format!("--tollgate-bin {}: no such file", bin.display()))
        };
    }
    let exe = std::env::current_exe().map_err(|e| format!("locating this program: {e}"))?;
    let dir = exe.parent().ok_or("this program has no directory")?;
    // target/release/loadtest → target/release/tollgate; a debug harness
    // still benchmarks the release proxy.
    let candidate = if cfg!(debug_assertions) {
        dir.parent().unwrap_or(dir).join("release").join("tollgate")
    } else {
        dir.join("tollgate")
    };
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    if let Some(cargo) = std::env::var_os("CARGO") {
        if manifest.join("Cargo.toml").is_file() {
            eprintln!("loadtest: cargo build --release --bin tollgate ...");
            let status = Command::new(cargo)
                .args(["build", "--release", "--quiet", "--bin", "tollgate"])
                .current_dir(manifest)
                .status()
                .map_err(|e| format!("running cargo: {e}"))?;
            if !status.success() {
                return Err(format!(
                    "cargo build --release --bin tollgate failed ({status})"
                ));
            }
        }
    }
    if candidate.is_file() {
        Ok(candidate)
    } else {
        Err(format!(
            "{} not found: run `cargo build --release --bin tollgate` or pass --tollgate-bin",
            candidate.display()
        ))
    }
}

/// `--out`, or `loadtest/results/<UTC timestamp>/` in the source tree.
fn output_dir(s: &Settings) -> std::io::Result<PathBuf> {
    let dir = match &s.out {
        Some(dir) => dir.clone(),
        None => {
            let stamp: String = now_rfc3339()
                .chars()
                .filter(|c| !matches!(c, '-' | ':'))
                .collect();
            let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
            let base = if manifest.join("loadtest").is_dir() {
                manifest.join("loadtest").join("results")
            } else {
                PathBuf::from("loadtest-results")
            };
            base.join(stamp)
        }
    };
    fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// "2 CPUs (AMD EPYC 7B13), Linux 6.1.0".
fn machine_description() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpus} CPUs ({model}), Linux {}", kernel.trim())
}

/// The commit being measured, so a table can be traced to its code.
fn tollgate_description() -> String {
    let version = env!("CARGO_PKG_VERSION");
    let commit = Command::new("git")
        .args(["describe", "--always", "--dirty=+uncommitted changes"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    match commit {
        Some(c) => format!("{version}, commit {c}"),
        None => version.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_urls() {
        let e = parse_upstream("postgres://app:p%40ss@localhost:5433/appdb").unwrap();
        assert_eq!(
            (
                e.host.as_str(),
                e.port,
                e.user.as_str(),
                e.password.as_str(),
                e.database.as_str()
            ),
            ("127.0.0.1", 5433, "app", "p@ss", "appdb")
        );
        let e = parse_upstream("postgresql://bob@127.0.0.2").unwrap();
        assert_eq!((e.port, e.database.as_str()), (5432, "bob"));
        assert!(parse_upstream("postgres://app:x@db.example.com/appdb").is_err());
        assert!(parse_upstream("postgres://app:x@10.0.0.5/appdb").is_err());
        assert!(parse_upstream("mysql://app@127.0.0.1/x").is_err());
        assert!(parse_upstream("postgres://127.0.0.1/x").is_err());
    }
}
