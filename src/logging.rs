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

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber. Safe to call more than once (later calls
/// are ignored), which the CLI's subcommands rely on.
pub fn init(level: Option<&str>, format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level.unwrap_or("info")))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal, never in files or pipes.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_thread_names(true);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
}
