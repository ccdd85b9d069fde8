//! `tollgate token ...`: manage the token store from the command line.
//!
//! Every change takes an exclusive lock beside the store, reads it, changes
//! it and writes it atomically, so two commands at once cannot lose a token.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use clap::Subcommand;

use super::CliError;
use crate::auth::store::ANY_DATABASE;
use crate::auth::{token, TokenRecord, TokenStore};
use crate::config::{parse_duration, Config};

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Create a token and print it (only the token) on stdout.
    Create {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// The Postgres role the token logs in as.
        #[arg(long, short)]
        user: String,
        /// A database the token may connect to (repeat for more; default: any).
        #[arg(long = "database", short = 'd', value_name = "DB")]
        databases: Vec<String>,
        /// Lifetime, like 30s, 10m, 1h, 30d (default: no expiry).
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<std::time::Duration>,
        /// A note for `token list`, e.g. who or what uses the token.
        #[arg(long)]
        comment: Option<String>,
    },
    /// List tokens: ids, roles, databases, expiry and status, never secrets.
    List {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
    /// Revoke a token by id.
    Revoke {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        id: String,
    },
}

pub fn run(cmd: TokenCommand) -> Result<(), CliError> {
    match cmd {
        TokenCommand::Create {
            config,
            user,
            databases,
            ttl,
            comment,
        } => {
            let path = store_path(&config)?;
            let t = create(&path, &user, databases, ttl, comment)?;
            println!("{}", String::from_utf8_lossy(t.token.expose()));
            Ok(())
        }
        TokenCommand::List { config } => {
            let store = TokenStore::load(&store_path(&config)?)?;
            print!("{}", render_list(&store, SystemTime::now()));
            Ok(())
        }
        TokenCommand::Revoke { config, id } => {
            let path = store_path(&config)?;
            revoke(&path, &id)?;
            eprintln!("revoked token {id}");
            Ok(())
        }
    }
}

fn store_path(config: &Path) -> Result<PathBuf, CliError> {
    Ok(Config::load(config)?.tokens_file)
}

/// Runs `change` on the store under an exclusive lock and saves it.
fn with_store<T>(
    path: &Path,
    change: impl FnOnce(&mut TokenStore) -> Result<T, CliError>,
) -> Result<T, CliError> {
    let mut lock_name = path.as_os_str().to_owned();
    lock_name.push(".lock");
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_name)
        .map_err(|e| {
            format!(
                "cannot open lock file {}: {e}",
                PathBuf::from(&lock_name).display()
            )
        })?;
    lock.lock()?;
    let mut store = TokenStore::load(path)?;
    let out = change(&mut store)?;
    store.save(path)?;
    Ok(out)
}

/// Creates a token in the store at `path` and returns it.
pub fn create(
    path: &Path,
    user: &str,
    mut databases: Vec<String>,
    ttl: Option<std::time::Duration>,
    comment: Option<String>,
) -> Result<token::NewToken, CliError> {
    if user.is_empty() {
        return Err("--user must not be empty".into());
    }
    if databases.is_empty() {
        databases.push(ANY_DATABASE.to_owned());
    }
    with_store(path, |store| {
        // Ids are random; a clash is astronomically unlikely but cheap to rule out.
        let t = loop {
            let t = token::generate();
            if store.get(&t.id).is_none() {
                break t;
            }
        };
        let now = SystemTime::now();
        store.insert(TokenRecord {
            id: t.id.clone(),
            user: user.to_owned(),
            databases,
            secret_sha256: t.secret_sha256,
            created_at: now,
            not_before: None,
            expires_at: ttl.map(|d| now + d),
            revoked_at: None,
            comment,
        });
        Ok(t)
    })
}

fn revoke(path: &Path, id: &str) -> Result<(), CliError> {
    with_store(path, |store| {
        let record = store
            .get_mut(id)
            .ok_or_else(|| format!("no token with id {id}"))?;
        if record.revoked_at.is_none() {
            record.revoked_at = Some(SystemTime::now());
        }
        Ok(())
    })
}

fn render_list(store: &TokenStore, now: SystemTime) -> String {
    let time = |t: Option<SystemTime>| {
        t.map_or_else(
            || "never".to_owned(),
            |t| humantime::format_rfc3339_seconds(t).to_string(),
        )
    };
    let mut rows = vec![[
        "ID".to_owned(),
        "USER".to_owned(),
        "DATABASES".to_owned(),
        "CREATED".to_owned(),
        "EXPIRES".to_owned(),
        "STATUS".to_owned(),
        "COMMENT".to_owned(),
    ]];
    for r in store.records() {
        rows.push([
            r.id.clone(),
            r.user.clone(),
            r.databases.join(","),
            time(Some(r.created_at)),
            time(r.expires_at),
            r.status(now).to_owned(),
            r.comment.clone().unwrap_or_default(),
        ]);
    }
    let mut widths = [0usize; 7];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_list_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        let t = create(&path, "app", vec!["appdb".into()], None, Some("ci".into())).unwrap();
        let any = create(
            &path,
            "ro",
            vec![],
            Some(std::time::Duration::from_secs(60)),
            None,
        )
        .unwrap();
        let store = TokenStore::load(&path).unwrap();
        assert_eq!(store.len(), 2);
        assert_eq!(store.get(&any.id).unwrap().databases, ["*"]);
        let listing = render_list(&store, SystemTime::now());
        assert!(listing.contains(&t.id) && listing.contains("active"));
        let secret = String::from_utf8_lossy(t.token.expose()).to_string();
        assert!(!listing.contains(&secret[16..]));
        revoke(&path, &t.id).unwrap();
        let store = TokenStore::load(&path).unwrap();
        assert_eq!(
            store.get(&t.id).unwrap().status(SystemTime::now()),
            "revoked"
        );
        assert!(revoke(&path, "nosuchtoken0").is_err());
    }
}
