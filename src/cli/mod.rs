//! The command line: `serve`, `token create|list|revoke`, `quickstart`.

mod quickstart;
mod token;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use crate::config::Config;

pub type CliError = Box<dyn std::error::Error>;

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "A PostgreSQL proxy that lets clients log in with API tokens"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Serve {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
    /// Create, list and revoke API tokens.
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// Run tollgate in front of a throwaway Postgres (or --upstream) and
    /// print a ready-to-paste psql command.
    Quickstart(quickstart::QuickstartArgs),
}

/// Entry point used by `main`.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { config } => serve(&config),
        Command::Token(cmd) => token::run(cmd),
        Command::Quickstart(args) => quickstart::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tollgate: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(config_path: &std::path::Path) -> Result<(), CliError> {
    let config = Config::load(config_path)?;
    crate::logging::init(config.log_level.as_deref(), config.log_format);
    // Before the shards start, so that no signal finds the default action
    // (which for SIGHUP is to exit).
    let signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
    ])?;
    let (shards, control) = start(config, config_path)?;
    wait_and_drain(signals, &shards, &control);
    Ok(())
}

/// What ends `serve`.
enum Stop {
    Signal(i32),
    Drained(usize),
}

/// Runs until SIGTERM or SIGINT, reloading the config on SIGHUP, then
/// drains: listeners close at once, open sessions get `shutdown_timeout`
/// to finish, the rest are ended with FATAL 57P01, and `serve` returns
/// (exit status 0). A second SIGTERM or SIGINT during the drain returns at
/// once.
fn wait_and_drain(
    mut signals: signal_hook::iterator::Signals,
    shards: &crate::shard::Shards,
    control: &Arc<crate::control::Control>,
) {
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let tx = tx.clone();
        let control = control.clone();
        std::thread::Builder::new()
            .name("tg-signals".into())
            .spawn(move || {
                for s in signals.forever() {
                    if s == signal_hook::consts::SIGHUP {
                        // Logged by `reload`, success or not.
                        let _ = control.reload();
                    } else if tx.send(Stop::Signal(s)).is_err() {
                        break;
                    }
                }
            })
            .expect("spawning the signal thread");
    }
    let Ok(Stop::Signal(signal)) = rx.recv() else {
        return;
    };
    control.start_draining();
    shards.release_unix_socket();
    if std::fs::read_to_string("/proc/sys/net/ipv4/tcp_migrate_req").is_ok_and(|v| v.trim() == "0")
    {
        // Matters only when another process listens on the same port (an
        // in-place upgrade); README "Upgrading without downtime".
        tracing::info!(
            "net.ipv4.tcp_migrate_req is 0: connections already queued on the closing \
             listeners are reset, not handed to another process on this port"
        );
    }
    // Read now: a reload may have changed it.
    let timeout = control.shutdown_timeout();
    tracing::info!(
        signal,
        timeout = %humantime::format_duration(timeout),
        "shutting down: no new connections; open sessions may finish"
    );
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let _ = tx.send(Stop::Drained(shards.drain(timeout)));
        });
        match rx.recv() {
            Ok(Stop::Drained(ended)) => {
                tracing::info!(ended, "drained; exiting");
                // Not waiting for the scope: the drain thread is done.
            }
            Ok(Stop::Signal(signal)) => {
                tracing::warn!(signal, "second signal: exiting now");
                std::process::exit(0);
            }
            Err(_) => {}
        }
    });
}

/// Loads the token store and starts the shards and the admin listener.
fn start(
    config: Config,
    config_path: &std::path::Path,
) -> Result<(crate::shard::Shards, Arc<crate::control::Control>), CliError> {
    let fleet = config.fleet.as_ref().map(|f| {
        Arc::new(crate::session::cancel::Fleet::new(
            f.cancel_key.expose(),
            f.advertise.clone(),
        ))
    });
    let store = match &config.tokens {
        crate::config::TokenSource::File(path) => {
            let store = crate::auth::live::LiveStore::load(path)?;
            store.watch();
            tracing::info!(
                tokens = store.published.get().len(),
                file = %path.display(),
                "token store loaded"
            );
            store
        }
        crate::config::TokenSource::Postgres(db) => {
            use crate::tls::UpstreamTlsMode;
            if matches!(
                db.tls,
                UpstreamTlsMode::Disable | UpstreamTlsMode::Prefer | UpstreamTlsMode::Require
            ) {
                // The control database decides who logs in everywhere.
                let what = if matches!(db.tls, UpstreamTlsMode::Disable) {
                    "the control database connection is not encrypted"
                } else {
                    "the control database's certificate is not verified"
                };
                tracing::warn!(
                    sslmode = db.tls.as_str(),
                    "{what}: whoever can intercept the connection could serve forged tokens; \
                     use sslmode=verify-full and ca_file"
                );
            }
            let store = crate::auth::live::LiveStore::for_postgres(db.max_staleness);
            let fleet = fleet
                .clone()
                .map(|f| (f, config.fleet.as_ref().and_then(|c| c.instance_id)));
            crate::controldb::sync::start(db.clone(), store.clone(), fleet)?;
            tracing::info!(
                tokens = store.published.get().len(),
                control_database = %db.describe(),
                "token store loaded; following changes"
            );
            store
        }
    };
    let server_tls = match &config.tls {
        Some(t) => {
            let tls = crate::tls::ServerTls::load(&t.cert, &t.key)?;
            tls.watch();
            Some(tls)
        }
        None => {
            if !config.listen.ip().is_loopback() {
                tracing::warn!(
                    listen = %config.listen,
                    "TLS is not configured: tokens from the network travel in the clear"
                );
            }
            None
        }
    };
    let jwt = config.jwt.clone().map(crate::auth::live::LiveJwt::new);
    if let Some(j) = &jwt {
        j.watch();
    }
    let admin = config.admin.clone();
    let settings = crate::session::Settings::new(config)?;
    let shared = Arc::new(crate::session::Shared::new(
        settings, store, jwt, server_tls, fleet,
    ));
    let store = shared.store.clone();
    let started = std::time::Instant::now();
    let control = crate::control::Control::new(config_path, shared.clone());
    let shards = crate::shard::start(shared)?;
    if let Some(a) = admin {
        crate::admin::start(
            a.listen,
            crate::admin::AdminState {
                bus: shards.bus(),
                store,
                started,
                driver: shards.driver,
                bearer: a.token,
                control: control.clone(),
            },
        )?;
    }
    // Last: a start that fails before this never takes the socket path
    // from a running process.
    shards.publish_unix_socket()?;
    Ok((shards, control))
}
