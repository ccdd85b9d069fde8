//! Log set-up: `tracing` events to stderr, as text or JSON.
//!
//! The level comes from `RUST_LOG` when set, else from `[log] level`, else
//! `info`. Secrets never reach these events: they are [`crate::secret::Secret`]s,
//! which print as a redaction.
//!
//! JSON lines carry the event's fields at the top level and the innermost
//! span's fields (session id, shard, client address) under `span`. Audit
//! events (target `tollgate::audit`, see [`crate::audit`]) carry all their
//! identifying fields themselves.

use std::sync::OnceLock;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Swaps the installed filter: set once by [`init`], used by reloads.
type SetFilter = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;
static SET_FILTER: OnceLock<SetFilter> = OnceLock::new();

/// Whether `RUST_LOG` chose the level at start; it then outranks the
/// config file, on reloads too.
static FROM_ENV: OnceLock<bool> = OnceLock::new();

/// Installs the global subscriber. Safe to call more than once (later calls
/// are ignored), which the CLI's subcommands rely on.
pub fn init(level: Option<&str>, format: LogFormat) {
    let env = EnvFilter::try_from_default_env().ok();
    let _ = FROM_ENV.set(env.is_some());
    let filter = env
        .or_else(|| EnvFilter::try_new(level.unwrap_or("info")).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal, never in files or pipes.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_thread_names(true);
    // The reload layer costs one uncontended read lock per event that
    // reaches the filter; events are per connection, not per message.
    let installed = match format {
        LogFormat::Text => {
            let b = builder.with_filter_reloading();
            let handle = b.reload_handle();
            b.try_init().map(|()| keep(move |f| handle.reload(f)))
        }
        LogFormat::Json => {
            let b = builder
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(false)
                .with_filter_reloading();
            let handle = b.reload_handle();
            b.try_init().map(|()| keep(move |f| handle.reload(f)))
        }
    };
    let _ = installed;
}

fn keep<E: std::fmt::Display>(set: impl Fn(EnvFilter) -> Result<(), E> + Send + Sync + 'static) {
    let _ = SET_FILTER.set(Box::new(move |f| set(f).map_err(|e| e.to_string())));
}

/// Applies `[log] level` from a reloaded config. `Ok(false)` when nothing
/// changed because `RUST_LOG` set the level at start (or no subscriber of
/// ours is installed).
pub fn set_level(level: Option<&str>) -> Result<bool, String> {
    if FROM_ENV.get().copied().unwrap_or(true) {
        return Ok(false);
    }
    let Some(set) = SET_FILTER.get() else {
        return Ok(false);
    };
    let filter =
        EnvFilter::try_new(level.unwrap_or("info")).map_err(|e| format!("[log] level: {e}"))?;
    set(filter)?;
    Ok(true)
}
