//! The running process's control side: config reloads (SIGHUP, or
//! `POST /reload` on the admin listener) and the draining flag that
//! `/healthz` reports.
//!
//! A reload reads the config file again and, if it is valid, publishes new
//! [`Settings`]: sessions that connect afterwards get the new upstream
//! address, credentials, TLS settings, limits and timeouts; sessions
//! already open keep the settings they started with and are never dropped.
//! An invalid file changes nothing. What only a restart can change
//! (listeners, shard count, admin listener, log format, token file path, or
//! turning client TLS or JWT on or off) keeps its running value, and the
//! reload says so.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tracing::{error, info, warn};

use crate::config::Config;
use crate::session::{Settings, Shared};

/// Process-wide control state, shared by the signal thread and the admin
/// listener.
pub struct Control {
    config_path: PathBuf,
    shared: Arc<Shared>,
    /// One reload at a time: SIGHUP and `POST /reload` may race.
    reloading: Mutex<()>,
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
    draining: AtomicBool,
}

/// What a successful reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    /// Settings that changed in the file but need a restart to apply; they
    /// keep their running values.
    pub restart_required: Vec<&'static str>,
}

impl Control {
    pub fn new(config_path: &Path, shared: Arc<Shared>) -> Arc<Control> {
        Arc::new(Control {
            config_path: config_path.to_owned(),
            shared,
            reloading: Mutex::new(()),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
            draining: AtomicBool::new(false),
        })
    }

    /// Reloads the config file, logging the outcome. The error text names
    /// the problem, never a value from the file (see `Config::load`).
    pub fn reload(&self) -> Result<Reloaded, String> {
        let _one = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        match self.apply() {
            Ok(r) => {
                self.reloads_ok.fetch_add(1, Ordering::Relaxed);
                if r.restart_required.is_empty() {
                    info!(file = %self.config_path.display(), "configuration reloaded");
                } else {
                    warn!(
                        file = %self.config_path.display(),
                        restart_required = ?r.restart_required,
                        "configuration reloaded; some changes need a restart and were not applied"
                    );
                }
                Ok(r)
            }
            Err(e) => {
                self.reloads_failed.fetch_add(1, Ordering::Relaxed);
                error!(error = %e, "configuration reload failed; the running configuration stays");
                Err(e)
            }
        }
    }

    fn apply(&self) -> Result<Reloaded, String> {
        let mut new = Config::load(&self.config_path).map_err(|e| e.to_string())?;
        let current = self.shared.settings.get();
        let restart_required = keep_fixed(&current.config, &mut new);

        // Everything that can fail comes first, so a failure changes nothing.
        let settings = Settings::new(new).map_err(|e| e.to_string())?;
        let new = &settings.config;
        if let (Some(tls), Some(t)) = (&self.shared.server_tls, &new.tls) {
            tls.use_files(&t.cert, &t.key).map_err(|e| e.to_string())?;
        }

        if let (Some(live), Some(jwt)) = (&self.shared.jwt, &new.jwt) {
            live.replace(jwt.clone());
        }
        self.shared
            .failures
            .set_limits(new.auth_failure_limit, new.auth_failure_window);
        self.shared.pending.set_limit(new.max_pending_per_source);
        if let Err(e) = crate::logging::set_level(new.log_level.as_deref()) {
            // Checked when the file was loaded; only a logic slip gets here.
            warn!(error = %e, "log level not changed");
        }
        // Pick up token and key file changes now rather than at the next poll.
        self.shared.store.reload_if_changed();
        if let Some(live) = &self.shared.jwt {
            live.reload_if_changed();
        }
        self.shared.settings.publish(settings);
        Ok(Reloaded { restart_required })
    }

    /// Marks the process as draining: `/healthz` answers 503 from now on.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// The drain timeout in force (reloadable).
    pub fn shutdown_timeout(&self) -> std::time::Duration {
        self.shared.settings.get().config.shutdown_timeout
    }

    /// Successful and failed reloads since start.
    pub fn reloads(&self) -> (u64, u64) {
        (
            self.reloads_ok.load(Ordering::Relaxed),
            self.reloads_failed.load(Ordering::Relaxed),
        )
    }
}

/// Puts back, in `new`, the running value of every setting a reload cannot
/// change, and names those that differed.
fn keep_fixed(running: &Config, new: &mut Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    macro_rules! fixed {
        ($field:ident, $name:literal) => {
            if new.$field != running.$field {
                changed.push($name);
                new.$field = running.$field.clone();
            }
        };
    }
    fixed!(listen, "listen");
    fixed!(listen_tcp, "listen_tcp");
    fixed!(unix_socket, "unix_socket_dir or unix_socket_permissions");
    fixed!(workers, "workers");
    fixed!(pin_cpus, "pin_cpus");
    fixed!(io_driver, "io_driver");
    fixed!(plain_relay, "plain_relay");
    fixed!(buffer_size, "buffer_size");
    fixed!(tokens, "[tokens] file or postgres");
    fixed!(fleet, "[fleet]");
    fixed!(log_format, "[log] format");
    if !same_admin(running.admin.as_ref(), new.admin.as_ref()) {
        changed.push("[admin]");
        new.admin = running.admin.clone();
    }
    if new.tls.is_some() != running.tls.is_some() {
        // The acceptor (and its session tickets) is built at start.
        changed.push("[tls] on or off");
        new.tls = running.tls.clone();
    }
    if new.jwt.is_some() != running.jwt.is_some() {
        changed.push("[jwt] on or off");
        new.jwt = running.jwt.clone();
    }
    changed
}

fn same_admin(
    a: Option<&crate::config::AdminConfig>,
    b: Option<&crate::config::AdminConfig>,
) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => {
            a.listen == b.listen
                && a.latency_histograms == b.latency_histograms
                && a.per_token_series == b.per_token_series
                && a.token.as_ref().map(|t| t.expose()) == b.token.as_ref().map(|t| t.expose())
        }
        _ => false,
    }
}
