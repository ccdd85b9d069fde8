//! Turning runs into numbers people compare: the terminal table, the raw
//! JSON, and `summary.md` (which the README's Performance section is pasted
//! from).
//!
//! Per cell and target: TPS as the median and range across repetitions;
//! latency percentiles from the histogram merged over all repetitions;
//! comparisons against direct (TPS ratio, added p50/p99) and against the
//! other proxies (CPU per transaction). CPU per transaction is total proxy
//! CPU over total transactions, so short and long repetitions weigh by
//! their work.

use std::fmt::Write as _;

use serde::Serialize;

use crate::matrix::{Cell, Mode, Transport, Workload};
use crate::pgbench::{Latencies, Summary};
use crate::targets::TargetKind;

/// Latency summary of one run or of merged runs, µs.
#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub mean: f64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p99_9: u64,
    pub p99_99: u64,
    pub max: u64,
    /// Fewest and most transactions any one client completed.
    pub client_txns_min: u64,
    pub client_txns_max: u64,
}

impl Percentiles {
    pub fn of(l: &Latencies) -> Self {
        Percentiles {
            count: l.count(),
            mean: l.hist.mean(),
            p50: l.at(50.0),
            p90: l.at(90.0),
            p99: l.at(99.0),
            p99_9: l.at(99.9),
            p99_99: l.at(99.99),
            max: l.max_us,
            client_txns_min: l.client_txns.iter().copied().min().unwrap_or(0),
            client_txns_max: l.client_txns.iter().copied().max().unwrap_or(0),
        }
    }

    /// The columns of the tables: p50, p90, p99, p99.9, max.
    fn table_values(&self) -> [u64; 5] {
        [self.p50, self.p90, self.p99, self.p99_9, self.max]
    }
}

/// One measured pgbench run.
#[derive(Debug, Clone, Serialize)]
pub struct RunRecord {
    pub rep: u32,
    pub summary: Summary,
    pub latency: Percentiles,
    /// The proxy's CPU time during the run (all its processes), if a proxy.
    pub cpu_us: Option<u64>,
    pub cpu_us_per_txn: Option<f64>,
    pub wall_s: f64,
}

/// Everything collected for one target in one cell.
#[derive(Debug)]
pub struct TargetAcc {
    pub kind: TargetKind,
    pub label: String,
    pub runs: Vec<RunRecord>,
    pub merged: Latencies,
    pub failures: Vec<String>,
    /// Why the target did not run in this cell (e.g. no TLS).
    pub skipped: Option<String>,
}

impl TargetAcc {
    pub fn new(kind: TargetKind, label: &str) -> Self {
        TargetAcc {
            kind,
            label: label.to_owned(),
            runs: Vec::new(),
            merged: Latencies::new(),
            failures: Vec::new(),
            skipped: None,
        }
    }
}

/// Everything collected for one cell.
#[derive(Debug)]
pub struct CellAcc {
    pub cell: Cell,
    pub targets: Vec<TargetAcc>,
}

/// A target's row, as serialised and printed.
#[derive(Debug, Clone, Serialize)]
pub struct TargetSummary {
    pub target: TargetKind,
    pub label: String,
    pub skipped: Option<String>,
    pub failures: Vec<String>,
    pub reps: usize,
    pub tps_median: Option<f64>,
    pub tps_min: Option<f64>,
    pub tps_max: Option<f64>,
    /// Merged over all repetitions.
    pub latency: Option<Percentiles>,
    pub cpu_us_per_txn: Option<f64>,
    pub tps_vs_direct: Option<f64>,
    pub tps_vs_pgbouncer: Option<f64>,
    pub added_p50_us: Option<i64>,
    pub added_p99_us: Option<i64>,
    pub cpu_vs_pgbouncer: Option<f64>,
    pub cpu_vs_relay: Option<f64>,
    /// `[percentile, µs]` along the chart's x axis, to re-plot without rerunning.
    pub percentile_curve: Vec<(f64, u64)>,
    pub runs: Vec<RunRecord>,
}

/// A cell's rows.
#[derive(Debug, Clone, Serialize)]
pub struct CellSummary {
    pub id: String,
    pub title: String,
    pub cell: Cell,
    pub targets: Vec<TargetSummary>,
}

impl CellSummary {
    pub fn target(&self, kind: TargetKind) -> Option<&TargetSummary> {
        self.targets
            .iter()
            .find(|t| t.target == kind && t.tps_median.is_some())
    }
}

pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    })
}

/// Percentile at chart position `x` = -log10(1 - p): 0 → 0 %, 1 → 90 %,
/// 2 → 99 %, 3 → 99.9 %…
pub fn percentile_at_nines(x: f64) -> f64 {
    100.0 * (1.0 - 10f64.powf(-x))
}

/// The largest chart position worth drawing: 99.99 %, or fewer nines when
/// there are too few samples to tell them apart.
pub fn max_nines(count: u64) -> f64 {
    (count.max(10) as f64).log10().clamp(1.0, 4.0)
}

pub fn summarize(acc: &CellAcc) -> CellSummary {
    let mut rows: Vec<TargetSummary> = acc.targets.iter().map(row).collect();
    let base = |kind: TargetKind, rows: &[TargetSummary]| {
        rows.iter()
            .find(|r| r.target == kind && r.tps_median.is_some())
            .cloned()
    };
    let direct = base(TargetKind::Direct, &rows);
    let pgbouncer = base(TargetKind::Pgbouncer, &rows);
    let relay = base(TargetKind::Relay, &rows);
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    for r in &mut rows {
        if r.tps_median.is_none() {
            continue;
        }
        if let Some(d) = &direct {
            r.tps_vs_direct = ratio(r.tps_median, d.tps_median);
            if let (Some(l), Some(dl)) = (&r.latency, &d.latency) {
                r.added_p50_us = Some(l.p50 as i64 - dl.p50 as i64);
                r.added_p99_us = Some(l.p99 as i64 - dl.p99 as i64);
            }
        }
        if let Some(p) = &pgbouncer {
            r.tps_vs_pgbouncer = ratio(r.tps_median, p.tps_median);
            r.cpu_vs_pgbouncer = ratio(r.cpu_us_per_txn, p.cpu_us_per_txn);
        }
        if let Some(rl) = &relay {
            r.cpu_vs_relay = ratio(r.cpu_us_per_txn, rl.cpu_us_per_txn);
        }
    }
    CellSummary {
        id: acc.cell.id(),
        title: acc.cell.to_string(),
        cell: acc.cell,
        targets: rows,
    }
}

fn row(t: &TargetAcc) -> TargetSummary {
    let tps: Vec<f64> = t.runs.iter().map(|r| r.summary.tps).collect();
    let has_runs = !t.runs.is_empty();
    let cpu_total: Option<u64> = t.runs.iter().map(|r| r.cpu_us).sum();
    let txns: u64 = t.runs.iter().map(|r| r.summary.transactions).sum();
    let count = t.merged.count();
    let curve = if count > 0 {
        let top = max_nines(count);
        let steps = (top * 20.0).round() as usize;
        (0..=steps)
            .map(|i| {
                let p = percentile_at_nines(top * i as f64 / steps as f64);
                (p, t.merged.at(p))
            })
            .collect()
    } else {
        Vec::new()
    };
    TargetSummary {
        target: t.kind,
        label: t.label.clone(),
        skipped: t.skipped.clone(),
        failures: t.failures.clone(),
        reps: t.runs.len(),
        tps_median: median(&tps),
        tps_min: tps.iter().copied().reduce(f64::min),
        tps_max: tps.iter().copied().reduce(f64::max),
        latency: has_runs.then(|| Percentiles::of(&t.merged)),
        cpu_us_per_txn: match cpu_total {
            Some(cpu) if has_runs && txns > 0 => Some(cpu as f64 / txns as f64),
            _ => None,
        },
        tps_vs_direct: None,
        tps_vs_pgbouncer: None,
        added_p50_us: None,
        added_p99_us: None,
        cpu_vs_pgbouncer: None,
        cpu_vs_relay: None,
        percentile_curve: curve,
        runs: t.runs.clone(),
    }
}

// ---- formatting -----------------------------------------------------------

const HEADERS: [&str; 14] = [
    "target",
    "TPS median",
    "TPS min–max",
    "p50 µs",
    "p90 µs",
    "p99 µs",
    "p99.9 µs",
    "max µs",
    "TPS vs direct",
    "+p50 µs",
    "+p99 µs",
    "CPU µs/txn",
    "CPU vs pgbouncer",
    "CPU vs relay",
];

fn fmt_ratio(r: Option<f64>) -> String {
    r.map_or_else(|| "–".to_owned(), |r| format!("{r:.2}×"))
}

fn fmt_added(d: Option<i64>) -> String {
    d.map_or_else(|| "–".to_owned(), |d| format!("{d:+}"))
}

fn fmt_tps(t: f64) -> String {
    format!("{t:.0}")
}

/// The cells of one row; `None` when the target has no result (the reason
/// then fills the row).
fn cells_of(t: &TargetSummary) -> Result<Vec<String>, String> {
    if let Some(reason) = &t.skipped {
        return Err(format!("skipped: {reason}"));
    }
    let (Some(med), Some(min), Some(max), Some(lat)) =
        (t.tps_median, t.tps_min, t.tps_max, &t.latency)
    else {
        return Err(format!(
            "FAILED ({} failure(s), see above)",
            t.failures.len()
        ));
    };
    let mut cells = vec![
        t.target.name().to_owned(),
        fmt_tps(med),
        format!("{}–{}", fmt_tps(min), fmt_tps(max)),
    ];
    cells.extend(lat.table_values().map(|v| v.to_string()));
    cells.push(fmt_ratio(t.tps_vs_direct));
    cells.push(fmt_added(t.added_p50_us));
    cells.push(fmt_added(t.added_p99_us));
    cells.push(
        t.cpu_us_per_txn
            .map_or_else(|| "–".to_owned(), |c| format!("{c:.1}")),
    );
    cells.push(fmt_ratio(t.cpu_vs_pgbouncer));
    cells.push(fmt_ratio(t.cpu_vs_relay));
    Ok(cells)
}

/// An aligned plain-text table for the terminal.
pub fn terminal_table(cell: &CellSummary) -> String {
    let mut rows: Vec<Result<Vec<String>, String>> = vec![Ok(HEADERS.map(str::to_owned).to_vec())];
    rows.extend(cell.targets.iter().map(cells_of));
    let mut widths = [0usize; HEADERS.len()];
    for r in rows.iter().flatten() {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = format!("{}\n", cell.title);
    for (r, t) in rows
        .iter()
        .zip(std::iter::once(None).chain(cell.targets.iter().map(Some)))
    {
        match r {
            Ok(cells) => {
                let line: Vec<String> = cells
                    .iter()
                    .zip(widths)
                    .enumerate()
                    .map(|(i, (c, w))| {
                        let pad = w - c.chars().count();
                        if i == 0 {
                            format!("{c}{}", " ".repeat(pad))
                        } else {
                            format!("{}{c}", " ".repeat(pad))
                        }
                    })
                    .collect();
                let _ = writeln!(out, "  {}", line.join("  "));
            }
            Err(reason) => {
                let name = t.map_or("", |t| t.target.name());
                let _ = writeln!(out, "  {name:<w$}  {reason}", w = widths[0]);
            }
        }
    }
    out
}

/// A Markdown table for one cell.
pub fn markdown_table(cell: &CellSummary) -> String {
    let mut out = format!("### {}\n\n", cell.title);
    let _ = writeln!(out, "| {} |", HEADERS.join(" | "));
    let align: Vec<&str> = (0..HEADERS.len())
        .map(|i| if i == 0 { "---" } else { "---:" })
        .collect();
    let _ = writeln!(out, "| {} |", align.join(" | "));
    for t in &cell.targets {
        match cells_of(t) {
            Ok(cells) => {
                let _ = writeln!(out, "| {} |", cells.join(" | "));
            }
            Err(reason) => {
                let empty = vec![""; HEADERS.len() - 2];
                let _ = writeln!(
                    out,
                    "| {} | {reason} | {} |",
                    t.target.name(),
                    empty.join(" | ")
                );
            }
        }
    }
    out
}

/// One of the targets, checked against a cell (report, don't assert).
#[derive(Debug, Clone, Serialize)]
pub struct GoalCheck {
    pub cell: String,
    pub goal: String,
    pub measured: String,
    pub met: Option<bool>,
}

/// tollgate's stated targets: on select-only, plaintext, `-M prepared` and
/// `-M simple`, at 8 clients CPU/txn ≤ 0.6× PgBouncer and ≤ 1.15× the relay,
/// TPS ≥ 1.15× PgBouncer and ≥ 0.8× direct; at 1 client, added p50/p99 no
/// worse than PgBouncer's.
pub fn goal_checks(cells: &[CellSummary]) -> Vec<GoalCheck> {
    let mut checks = Vec::new();
    for c in cells {
        let cell = &c.cell;
        let relevant = cell.workload == Workload::SelectOnly
            && cell.transport == Transport::Plain
            && !cell.connect
            && matches!(cell.mode, Mode::Prepared | Mode::Simple);
        if !relevant {
            continue;
        }
        let name = format!("select-only -M {} {}c", cell.mode.name(), cell.clients);
        let tg = c.target(TargetKind::Tollgate);
        let mut check = |goal: &str, measured: Option<(f64, String)>, limit: f64, le: bool| {
            let (met, measured) = match measured {
                Some((v, text)) => (Some(if le { v <= limit } else { v >= limit }), text),
                None => (None, "n/a".to_owned()),
            };
            checks.push(GoalCheck {
                cell: name.clone(),
                goal: goal.to_owned(),
                measured,
                met,
            });
        };
        let as_ratio = |r: Option<f64>| r.map(|r| (r, format!("{r:.2}×")));
        // Metrics on against off, when both ran: the cost must stay < 2 %.
        if let (Some(on), Some(off)) = (c.target(TargetKind::TollgateMetrics), tg) {
            let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
                (Some(a), Some(b)) if b > 0.0 => Some((a / b, format!("{:.3}×", a / b))),
                _ => None,
            };
            check(
                "metrics on: CPU/txn ≤ 1.02× metrics off",
                ratio(on.cpu_us_per_txn, off.cpu_us_per_txn),
                1.02,
                true,
            );
            check(
                "metrics on: TPS ≥ 0.98× metrics off",
                ratio(on.tps_median, off.tps_median),
                0.98,
                false,
            );
        }
        match cell.clients {
            8 => {
                check(
                    "tollgate CPU/txn ≤ 0.6× pgbouncer",
                    as_ratio(tg.and_then(|t| t.cpu_vs_pgbouncer)),
                    0.6,
                    true,
                );
                check(
                    "tollgate CPU/txn ≤ 1.15× relay",
                    as_ratio(tg.and_then(|t| t.cpu_vs_relay)),
                    1.15,
                    true,
                );
                check(
                    "tollgate TPS ≥ 1.15× pgbouncer",
                    as_ratio(tg.and_then(|t| t.tps_vs_pgbouncer)),
                    1.15,
                    false,
                );
                check(
                    "tollgate TPS ≥ 0.8× direct",
                    as_ratio(tg.and_then(|t| t.tps_vs_direct)),
                    0.8,
                    false,
                );
            }
            1 => {
                let pgb = c.target(TargetKind::Pgbouncer);
                for (what, get) in [
                    (
                        "p50",
                        (|t: &TargetSummary| t.added_p50_us) as fn(&TargetSummary) -> Option<i64>,
                    ),
                    ("p99", |t: &TargetSummary| t.added_p99_us),
                ] {
                    let measured = match (tg.and_then(get), pgb.and_then(get)) {
                        (Some(a), Some(b)) => Some((
                            (a - b) as f64,
                            format!("tollgate {a:+} µs, pgbouncer {b:+} µs"),
                        )),
                        _ => None,
                    };
                    check(
                        &format!("tollgate added {what} ≤ pgbouncer's"),
                        measured,
                        0.0,
                        true,
                    );
                }
            }
            _ => {}
        }
    }
    checks
}

pub fn markdown_goals(checks: &[GoalCheck]) -> String {
    if checks.is_empty() {
        return String::new();
    }
    let mut out = String::from(
        "### tollgate's targets (reported, not asserted)\n\n\
         | cell | target | measured | met |\n|---|---|---:|:---:|\n",
    );
    for c in checks {
        let met = match c.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "n/a",
        };
        let _ = writeln!(out, "| {} | {} | {} | {met} |", c.cell, c.goal, c.measured);
    }
    out
}

pub fn terminal_goals(checks: &[GoalCheck]) -> String {
    let mut out = String::new();
    for c in checks {
        let met = match c.met {
            Some(true) => "met",
            Some(false) => "NOT met",
            None => "n/a",
        };
        let _ = writeln!(
            out,
            "  {:<24} {:<36} {:<40} {met}",
            c.cell, c.goal, c.measured
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgbench::LogEntry;

    fn acc(kind: TargetKind, tps: &[f64], lat_us: u64, cpu: Option<u64>) -> TargetAcc {
        let mut t = TargetAcc::new(kind, kind.name());
        for (i, &tps) in tps.iter().enumerate() {
            let mut l = Latencies::new();
            for _ in 0..100 {
                l.record(0, LogEntry::Done(lat_us));
            }
            t.merged.merge(&l);
            t.runs.push(RunRecord {
                rep: i as u32 + 1,
                summary: Summary {
                    tps,
                    tps_basis: String::new(),
                    transactions: 100,
                    failed: 0,
                    latency_avg_ms: None,
                    connection_time_ms: None,
                },
                latency: Percentiles::of(&l),
                cpu_us: cpu,
                cpu_us_per_txn: cpu.map(|c| c as f64 / 100.0),
                wall_s: 1.0,
            });
        }
        t
    }

    fn cell(clients: u32) -> Cell {
        Cell {
            workload: Workload::SelectOnly,
            mode: Mode::Prepared,
            clients,
            transport: Transport::Plain,
            connect: false,
        }
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }

    #[test]
    fn nines_axis() {
        assert!((percentile_at_nines(0.0)).abs() < 1e-9);
        assert!((percentile_at_nines(2.0) - 99.0).abs() < 1e-9);
        assert!((percentile_at_nines(3.0) - 99.9).abs() < 1e-9);
        assert_eq!(max_nines(1_000_000), 4.0);
        assert!((max_nines(1_000) - 3.0).abs() < 1e-9);
    }

    #[test]
    fn comparisons_and_goals() {
        let mut skipped = TargetAcc::new(TargetKind::Relay, "relay");
        skipped.skipped = Some("not installed".into());
        let c = summarize(&CellAcc {
            cell: cell(8),
            targets: vec![
                acc(TargetKind::Direct, &[1000.0, 900.0, 1100.0], 100, None),
                acc(
                    TargetKind::Tollgate,
                    &[850.0, 800.0, 900.0],
                    120,
                    Some(2_000),
                ),
                acc(
                    TargetKind::Pgbouncer,
                    &[700.0, 700.0, 700.0],
                    150,
                    Some(4_000),
                ),
                skipped,
            ],
        });
        let tg = c.target(TargetKind::Tollgate).unwrap();
        assert_eq!(tg.tps_median, Some(850.0));
        assert_eq!((tg.tps_min, tg.tps_max), (Some(800.0), Some(900.0)));
        assert!((tg.tps_vs_direct.unwrap() - 0.85).abs() < 1e-9);
        assert_eq!(tg.added_p50_us, Some(20));
        assert_eq!(tg.cpu_us_per_txn, Some(20.0));
        assert_eq!(tg.cpu_vs_pgbouncer, Some(0.5));
        assert_eq!(tg.cpu_vs_relay, None);
        assert!(c
            .target(TargetKind::Direct)
            .unwrap()
            .cpu_us_per_txn
            .is_none());

        let checks = goal_checks(std::slice::from_ref(&c));
        assert_eq!(checks.len(), 4);
        assert_eq!(checks[0].met, Some(true)); // 0.5× ≤ 0.6×
        assert_eq!(checks[1].met, None); // no relay
        assert_eq!(checks[2].met, Some(true)); // 1.21× ≥ 1.15×
        assert_eq!(checks[3].met, Some(true)); // 0.85× ≥ 0.8×

        let table = terminal_table(&c);
        assert!(table.contains("skipped: not installed"), "{table}");
        assert!(table.contains("0.85×"), "{table}");
        let md = markdown_table(&c);
        assert_eq!(md.lines().filter(|l| l.starts_with('|')).count(), 2 + 4);
        assert!(md.contains("| tollgate | 850 | 800–900 |"), "{md}");
    }

    #[test]
    fn one_client_goals_compare_added_latency() {
        let c = summarize(&CellAcc {
            cell: cell(1),
            targets: vec![
                acc(TargetKind::Direct, &[1000.0], 100, None),
                acc(TargetKind::Tollgate, &[900.0], 130, Some(1)),
                acc(TargetKind::Pgbouncer, &[800.0], 125, Some(1)),
            ],
        });
        let checks = goal_checks(&[c]);
        assert_eq!(checks.len(), 2);
        assert_eq!(checks[0].met, Some(false)); // +30 vs +25
        assert!(checks[0].measured.contains("tollgate +30 µs"));
    }
}

// ---- the whole run ----------------------------------------------------------

/// How the run was set up, for results.json and summary.md.
#[derive(Debug, Clone, Serialize)]
pub struct RunInfo {
    pub command: String,
    pub started: String,
    pub finished: Option<String>,
    /// False while cells are still running or after Ctrl-C.
    pub complete: bool,
    pub machine: String,
    pub postgres: String,
    pub pgbench: String,
    pub tollgate: String,
    pub duration_s: u64,
    pub warmup_s: u64,
    pub reps: u32,
    pub scale: u32,
    pub shards: usize,
    pub pgbench_max_jobs: u32,
    /// `[kind, what exactly ran]`, in run order.
    pub targets: Vec<(TargetKind, String)>,
    pub notes: Vec<String>,
    pub failures: Vec<String>,
}

/// Everything results.json holds.
#[derive(Debug, Clone, Serialize)]
pub struct Results {
    pub info: RunInfo,
    pub cells: Vec<CellSummary>,
    pub goals: Vec<GoalCheck>,
}

/// summary.md: set-up, one table per cell, and the goal checks.
pub fn markdown(r: &Results) -> String {
    let i = &r.info;
    let mut out = String::from("## Load test results\n\n");
    let _ = writeln!(out, "Command: `{}`\n", i.command);
    let _ = writeln!(
        out,
        "- started {}{}",
        i.started,
        if i.complete { "" } else { " (incomplete run)" }
    );
    let _ = writeln!(out, "- machine: {}", i.machine);
    let _ = writeln!(out, "- Postgres: {}; pgbench scale {}", i.postgres, i.scale);
    let _ = writeln!(
        out,
        "- {}; -j = min(clients, {}); {} s per run, {} repetition(s), targets interleaved in the order below; {} s warm-up per target and cell, discarded",
        i.pgbench, i.pgbench_max_jobs, i.duration_s, i.reps, i.warmup_s
    );
    let _ = writeln!(out, "- tollgate: {}", i.tollgate);
    let labels: Vec<&str> = i.targets.iter().map(|(_, label)| label.as_str()).collect();
    let _ = writeln!(out, "- targets: {}", labels.join("; "));
    for note in &i.notes {
        let _ = writeln!(out, "- note: {note}");
    }
    out.push_str(
        "\nTPS: median and range across repetitions. Latency: from pgbench's \
         per-transaction log, all repetitions merged, in µs. \"+p50\"/\"+p99\": \
         added over direct. CPU µs/txn: the proxy's user+system CPU time (all its \
         processes, from /proc) divided by transactions; \"CPU vs …\" is the ratio \
         of those (lower is better). Postgres and pgbench share the same cores, so \
         the CPU columns are the steadier comparison.\n\n",
    );
    for c in &r.cells {
        out.push_str(&markdown_table(c));
        out.push('\n');
    }
    out.push_str(&markdown_goals(&r.goals));
    if !i.failures.is_empty() {
        out.push_str("\n### Failures\n\n");
        for f in &i.failures {
            let _ = writeln!(out, "- {}", f.lines().next().unwrap_or(""));
        }
    }
    out
}
