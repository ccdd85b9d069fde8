//! A throwaway self-signed certificate for the TLS cells.
//!
//! Postgres (`ssl = on`) and PgBouncer (`client_tls_*`) terminate TLS with
//! it; clients use `sslmode=require`, which encrypts without verifying, so
//! the certificate only has to exist. It is made with the `openssl` command
//! line tool (present wherever Postgres' own packages are) to avoid a crate
//! for a file we never inspect. ECDSA P-256, as a modern deployment would use.

use std::path::PathBuf;
use std::process::Command;

use crate::util::TempDir;

/// A certificate and its private key, in a directory removed on drop.
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    _dir: TempDir,
}

impl TlsFiles {
    /// Generates the pair, readable only by `owner` (the servers' user):
    /// Postgres refuses a key file that others can read.
    pub fn generate(owner: Option<(u32, u32)>) -> Result<TlsFiles, String> {
        let dir = TempDir::new("loadtest-tls", owner).map_err(|e| format!("TLS: {e}"))?;
        let cert = dir.path().join("server.crt");
        let key = dir.path().join("server.key");
        let out = Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec"])
            .args(["-pkeyopt", "ec_paramgen_curve:prime256v1"])
            .args(["-nodes", "-days", "2", "-subj", "/CN=127.0.0.1"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .map_err(|e| format!("TLS: running openssl: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "TLS: openssl req failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        for path in [&cert, &key] {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| format!("TLS: chmod {}: {e}", path.display()))?;
            if let Some((uid, gid)) = owner {
                std::os::unix::fs::chown(path, Some(uid), Some(gid))
                    .map_err(|e| format!("TLS: chown {}: {e}", path.display()))?;
            }
        }
        Ok(TlsFiles {
            cert,
            key,
            _dir: dir,
        })
    }
}
