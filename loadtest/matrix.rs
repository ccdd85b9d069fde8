//! The benchmark matrix: which pgbench runs make up one "cell" of the report.
//!
//! A cell fixes everything but the target (workload, query protocol, client
//! count, transport, connection reuse); within a cell every target runs the
//! same pgbench command, so their rows are directly comparable.

use std::fmt;

use clap::ValueEnum;
use serde::Serialize;

/// pgbench's built-in scripts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// `-S`: one primary-key SELECT per transaction; the proxy's overhead
    /// is the largest share of the work here.
    SelectOnly,
    /// The default TPC-B-like script: 3 UPDATEs, a SELECT and an INSERT.
    TpcbLike,
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::SelectOnly => "select-only",
            Workload::TpcbLike => "tpcb-like",
        }
    }
}

/// pgbench's `-M`: the query protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    Simple,
    Extended,
    Prepared,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Simple => "simple",
            Mode::Extended => "extended",
            Mode::Prepared => "prepared",
        }
    }
}

/// How the client talks to the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    /// `PGSSLMODE=disable`.
    Plain,
    /// `PGSSLMODE=require` (encrypted, certificate not verified).
    Tls,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Plain => "plain",
            Transport::Tls => "tls",
        }
    }

    pub fn sslmode(self) -> &'static str {
        match self {
            Transport::Plain => "disable",
            Transport::Tls => "require",
        }
    }
}

/// One cell of the matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Cell {
    pub workload: Workload,
    pub mode: Mode,
    pub clients: u32,
    pub transport: Transport,
    /// pgbench `-C`: a new connection for every transaction.
    pub connect: bool,
}

impl Cell {
    /// A file-name-safe identifier, e.g. `select-only_prepared_c8_plain`.
    pub fn id(&self) -> String {
        format!(
            "{}_{}_c{}_{}{}",
            self.workload.name(),
            self.mode.name(),
            self.clients,
            self.transport.name(),
            if self.connect { "_connect" } else { "" }
        )
    }
}

impl fmt::Display for Cell {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} · -M {} · {} client{} · {}",
            self.workload.name(),
            self.mode.name(),
            self.clients,
            if self.clients == 1 { "" } else { "s" },
            match self.transport {
                Transport::Plain => "plaintext",
                Transport::Tls => "TLS",
            }
        )?;
        if self.connect {
            write!(f, " · new connection per transaction (-C)")?;
        }
        Ok(())
    }
}

/// What the options ask for.
#[derive(Debug, Clone)]
pub struct MatrixSpec {
    pub workloads: Vec<Workload>,
    pub modes: Vec<Mode>,
    pub clients: Vec<u32>,
    pub tls: bool,
    pub connect: bool,
}

/// Every cell, in run order: transports, then connection reuse, then
/// workload, mode and client count, so related cells sit together.
pub fn cells(spec: &MatrixSpec) -> Vec<Cell> {
    let transports: &[Transport] = if spec.tls {
        &[Transport::Plain, Transport::Tls]
    } else {
        &[Transport::Plain]
    };
    let connects: &[bool] = if spec.connect {
        &[false, true]
    } else {
        &[false]
    };
    let mut cells = Vec::new();
    for &transport in transports {
        for &connect in connects {
            for &workload in &spec.workloads {
                for &mode in &spec.modes {
                    for &clients in &spec.clients {
                        cells.push(Cell {
                            workload,
                            mode,
                            clients,
                            transport,
                            connect,
                        });
                    }
                }
            }
        }
    }
    cells
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matrix_size_and_order() {
        let spec = MatrixSpec {
            workloads: vec![Workload::SelectOnly, Workload::TpcbLike],
            modes: vec![Mode::Prepared, Mode::Simple],
            clients: vec![1, 8],
            tls: true,
            connect: true,
        };
        let cells = cells(&spec);
        assert_eq!(cells.len(), 2 * 2 * 2 * 2 * 2);
        assert_eq!(cells[0].id(), "select-only_prepared_c1_plain");
        assert_eq!(cells[1].id(), "select-only_prepared_c8_plain");
        assert_eq!(cells[8].id(), "select-only_prepared_c1_plain_connect");
        assert_eq!(cells[16].transport, Transport::Tls);
        assert_eq!(
            cells[9].to_string(),
            "select-only · -M prepared · 8 clients · plaintext · new connection per transaction (-C)"
        );
    }
}
