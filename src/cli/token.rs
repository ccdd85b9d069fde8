//! `tollgate token ...`: manage the token store from the command line.
//!
//! Every change takes an exclusive lock, reads the store, changes it and
//! writes it atomically, so two commands at once cannot lose a token: for a
//! file, a lock file beside it and an atomic rename; for the control
//! database, a table lock and one transaction, whose commit notifies every
//! running instance.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use std::time::Duration;

use clap::{Args, Subcommand};

use super::CliError;
use crate::auth::cidr::Cidr;
use crate::auth::store::PoolModeRule;
use crate::auth::store::{validate_session_parameter, PreviousSecret, ANY_DATABASE};
use crate::auth::OnExpiry;
use crate::auth::{token, TokenRecord, TokenStore};
use crate::config::{parse_duration, Config, ControlDb, TokenSource};

/// The rules a token carries, as command-line options.
#[derive(Args, Debug, Default, Clone)]
pub struct RuleArgs {
    /// A database the token may connect to (repeat for more; default: any).
    #[arg(long = "database", short = 'd', value_name = "DB")]
    pub databases: Vec<String>,
    /// Lifetime, like 30s, 10m, 1h, 30d (default: no expiry).
    #[arg(long, value_parser = parse_duration)]
    pub ttl: Option<Duration>,
    /// A source network allowed to use the token, like 10.0.0.0/8 (repeat
    /// for more; default: any).
    #[arg(long = "cidr", value_name = "NETWORK", value_parser = parse_cidr)]
    pub cidrs: Vec<Cidr>,
    /// Open sessions at once with this token, across all shards.
    #[arg(long)]
    pub max_connections: Option<u32>,
    /// Allow replication connections (`replication=true|database`, used by
    /// pg_basebackup, pg_receivewal and logical replication clients).
    #[arg(long)]
    pub allow_replication: bool,
    /// A session parameter to inject at login, e.g. statement_timeout=5s or
    /// default_transaction_read_only=on (repeat for more).
    #[arg(long = "set", value_name = "NAME=VALUE", value_parser = parse_setting)]
    pub session: Vec<(String, String)>,
    /// Refuse logins whose start-up sets any parameter this token sets
    /// (with --set), or sends `options`, instead of letting the token's
    /// values win.
    #[arg(long)]
    pub lock_session: bool,
    /// What expiry does to open sessions: terminate (default) or keep.
    #[arg(long, value_name = "terminate|keep")]
    pub on_expiry: Option<OnExpiry>,
    /// How this token's clients share the server connections of a route
    /// that pools them, in place of the route's `[pool] mode`: session
    /// (one connection for the whole session) or transaction (one per
    /// transaction). A route with `mode = "off"` ignores it.
    #[arg(long, value_name = "session|transaction")]
    pub pool_mode: Option<PoolModeRule>,
    /// Not usable before this long from now, like 1h.
    #[arg(long, value_parser = parse_duration)]
    pub starts_in: Option<Duration>,
    /// A note for `token list`, e.g. who or what uses the token.
    #[arg(long)]
    pub comment: Option<String>,
    /// An `[[upstream]]` entry (by name) the token may reach (repeat for
    /// more; default: any).
    #[arg(long = "upstream", value_name = "NAME")]
    pub upstreams: Vec<String>,
}

fn parse_cidr(s: &str) -> Result<Cidr, String> {
    s.parse()
}

fn parse_setting(s: &str) -> Result<(String, String), String> {
    let (name, value) = s
        .split_once('=')
        .ok_or_else(|| format!("\"{s}\" is not NAME=VALUE"))?;
    let (name, value) = (name.trim(), value.trim());
    validate_session_parameter(name, value)?;
    Ok((name.to_owned(), value.to_owned()))
}

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Create a token and print it (only the token) on stdout.
    Create {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// The Postgres role the token logs in as.
        #[arg(long, short)]
        user: String,
        #[command(flatten)]
        rules: RuleArgs,
    },
    /// List tokens: ids, roles, rules, expiry and status, never secrets.
    List {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
    /// Revoke a token by id: new logins are refused and open sessions end
    /// within a second.
    Revoke {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        id: String,
    },
    /// Give a token a new secret (printed on stdout); the old one keeps
    /// working for the grace period, then its sessions end.
    Rotate {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        id: String,
        /// How long the old secret stays valid (default: 0, it stops now).
        #[arg(long, value_parser = parse_duration, default_value = "0s")]
        grace: Duration,
    },
    /// Revoke a JWT by its `jti` claim.
    RevokeJwt {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        jti: String,
    },
}

pub fn run(cmd: TokenCommand) -> Result<(), CliError> {
    match cmd {
        TokenCommand::Create {
            config,
            user,
            rules,
        } => {
            let t = create(&source(&config)?, &user, rules)?;
            println!("{}", String::from_utf8_lossy(t.token.expose()));
            Ok(())
        }
        TokenCommand::List { config } => {
            let store = read(&source(&config)?)?;
            print!("{}", render_list(&store, SystemTime::now()));
            Ok(())
        }
        TokenCommand::Revoke { config, id } => {
            revoke(&source(&config)?, &id)?;
            eprintln!("revoked token {id}");
            Ok(())
        }
        TokenCommand::Rotate { config, id, grace } => {
            let t = rotate(&source(&config)?, &id, grace)?;
            println!("{}", String::from_utf8_lossy(t.token.expose()));
            Ok(())
        }
        TokenCommand::RevokeJwt { config, jti } => {
            with_store(&source(&config)?, |store| {
                store.revoke_jwt(&jti, SystemTime::now());
                Ok(())
            })?;
            eprintln!("revoked JWT {jti}");
            Ok(())
        }
    }
}

fn source(config: &Path) -> Result<TokenSource, CliError> {
    Ok(Config::load_tokens(config)?)
}

/// The store as it is now.
fn read(source: &TokenSource) -> Result<TokenStore, CliError> {
    match source {
        TokenSource::File(path) => Ok(TokenStore::load(path)?),
        TokenSource::Postgres(db) => {
            let (rt, link) = control_db(db)?;
            let (store, problems) = rt.block_on(crate::controldb::tokens::load(&link.client))?;
            for p in problems {
                eprintln!("warning: {p}");
            }
            Ok(store)
        }
    }
}

/// Runs `change` on the store under an exclusive lock and saves it.
fn with_store<T>(
    source: &TokenSource,
    change: impl FnOnce(&mut TokenStore) -> Result<T, CliError>,
) -> Result<T, CliError> {
    match source {
        TokenSource::File(path) => with_file(path, change),
        TokenSource::Postgres(db) => with_control_db(db, change),
    }
}

fn with_file<T>(
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

/// A runtime and a connection to the control database, migrated.
fn control_db(
    db: &ControlDb,
) -> Result<(tokio::runtime::Runtime, crate::controldb::Link), CliError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    let link = rt.block_on(async {
        let mut link = crate::controldb::connect(db, Duration::from_secs(10)).await?;
        crate::controldb::schema::migrate(&mut link.client).await?;
        Ok::<_, String>(link)
    })?;
    Ok((rt, link))
}

/// The change in one transaction with the token tables locked against
/// other writers (readers go on); only changed rows are written, and the
/// commit notifies every instance.
fn with_control_db<T>(
    db: &ControlDb,
    change: impl FnOnce(&mut TokenStore) -> Result<T, CliError>,
) -> Result<T, CliError> {
    let (rt, mut link) = control_db(db)?;
    rt.block_on(async {
        let err = |e: tokio_postgres::Error| crate::controldb::describe(&e);
        let tx = link.client.transaction().await.map_err(err)?;
        tx.batch_execute(
            "LOCK TABLE tollgate.tokens, tollgate.revoked_jwts IN SHARE ROW EXCLUSIVE MODE",
        )
        .await
        .map_err(err)?;
        let (before, _) = crate::controldb::tokens::load(&tx).await?;
        let mut after = before.clone();
        // On an error the transaction is dropped, which rolls it back.
        let out = change(&mut after)?;
        for record in after.records() {
            let old = before.get(&record.id);
            if old == Some(record) {
                continue;
            }
            if old.is_some_and(|o| o.revoked_at.is_none()) && record.revoked_at.is_some() {
                // Stamped with the database's clock, not this machine's: an
                // instance compares it with its own, and a clock ahead here
                // would leave open sessions running until it caught up.
                crate::controldb::tokens::revoke(&tx, &record.id).await?;
            } else {
                crate::controldb::tokens::put(&tx, record).await?;
            }
        }
        for (jti, _) in after.revoked_jwts() {
            if !before.revoked_jwts().any(|(j, _)| j == jti) {
                crate::controldb::tokens::revoke_jwt(&tx, jti).await?;
            }
        }
        tx.commit().await.map_err(err)?;
        Ok(out)
    })
}

/// Creates a token in the store and returns it.
pub fn create(
    source: &TokenSource,
    user: &str,
    rules: RuleArgs,
) -> Result<token::NewToken, CliError> {
    if user.is_empty() {
        return Err("--user must not be empty".into());
    }
    let mut databases = rules.databases;
    if databases.is_empty() {
        databases.push(ANY_DATABASE.to_owned());
    }
    with_store(source, |store| {
        // Ids are random; a clash is astronomically unlikely but cheap to rule out.
        let t = loop {
            let t = token::generate();
            if store.get(&t.id).is_none() {
                break t;
            }
        };
        let now = SystemTime::now();
        let mut record = TokenRecord::new(
            t.id.clone(),
            user.to_owned(),
            databases,
            t.secret_sha256,
            now,
        );
        record.expires_at = rules.ttl.map(|d| now + d);
        record.not_before = rules.starts_in.map(|d| now + d);
        record.cidrs = rules.cidrs;
        record.max_connections = rules.max_connections;
        record.replication = rules.allow_replication;
        record.session = rules.session;
        record.lock_session = rules.lock_session;
        record.on_expiry = rules.on_expiry;
        record.pool_mode = rules.pool_mode;
        record.comment = rules.comment;
        record.upstreams = rules.upstreams;
        store.insert(record);
        Ok(t)
    })
}

/// Gives `id` a new secret; the current one becomes the previous, valid
/// for `grace`. The store holds at most these two.
fn rotate(source: &TokenSource, id: &str, grace: Duration) -> Result<token::NewToken, CliError> {
    with_store(source, |store| {
        let record = store
            .get_mut(id)
            .ok_or_else(|| format!("no token with id {id}"))?;
        if record.revoked_at.is_some() {
            return Err(format!("token {id} is revoked; create a new one").into());
        }
        let t = token::generate_with_id(id, &ring::rand::SystemRandom::new());
        let now = SystemTime::now();
        record.previous = Some(PreviousSecret {
            sha256: record.secret_sha256,
            valid_until: now + grace,
        });
        record.secret_sha256 = t.secret_sha256;
        Ok(t)
    })
}

fn revoke(source: &TokenSource, id: &str) -> Result<(), CliError> {
    with_store(source, |store| {
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
        "RULES".to_owned(),
        "COMMENT".to_owned(),
    ]];
    for r in store.records() {
        let mut rules = Vec::new();
        if !r.cidrs.is_empty() {
            let nets: Vec<String> = r.cidrs.iter().map(|c| c.to_string()).collect();
            rules.push(format!("cidrs={}", nets.join(",")));
        }
        if !r.upstreams.is_empty() {
            rules.push(format!("upstreams={}", r.upstreams.join(",")));
        }
        if let Some(m) = r.max_connections {
            rules.push(format!("max_connections={m}"));
        }
        if r.replication {
            rules.push("replication".into());
        }
        for (k, v) in &r.session {
            rules.push(format!("{k}={v}"));
        }
        if r.lock_session {
            rules.push("lock_session".into());
        }
        if r.on_expiry == Some(OnExpiry::Keep) {
            rules.push("on_expiry=keep".into());
        }
        if let Some(m) = r.pool_mode {
            rules.push(format!("pool_mode={}", m.as_str()));
        }
        if let Some(p) = r.previous.filter(|p| p.valid_until > now) {
            rules.push(format!(
                "old secret valid until {}",
                time(Some(p.valid_until))
            ));
        }
        rows.push([
            r.id.clone(),
            r.user.clone(),
            r.databases.join(","),
            time(Some(r.created_at)),
            time(r.expires_at),
            r.status(now).to_owned(),
            rules.join(" "),
            r.comment.clone().unwrap_or_default(),
        ]);
    }
    let mut widths = [0usize; 8];
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
        let source = TokenSource::File(path.clone());
        let t = create(
            &source,
            "app",
            RuleArgs {
                databases: vec!["appdb".into()],
                comment: Some("ci".into()),
                session: vec![("statement_timeout".into(), "5s".into())],
                cidrs: vec!["10.0.0.0/8".parse().unwrap()],
                ..RuleArgs::default()
            },
        )
        .unwrap();
        let any = create(
            &source,
            "ro",
            RuleArgs {
                ttl: Some(Duration::from_secs(60)),
                ..RuleArgs::default()
            },
        )
        .unwrap();
        let store = TokenStore::load(&path).unwrap();
        assert_eq!(store.len(), 2);
        assert_eq!(store.get(&any.id).unwrap().databases, ["*"]);
        let listing = render_list(&store, SystemTime::now());
        assert!(listing.contains(&t.id) && listing.contains("active"));
        assert!(
            listing.contains("cidrs=10.0.0.0/8 statement_timeout=5s"),
            "{listing}"
        );
        let secret = String::from_utf8_lossy(t.token.expose()).to_string();
        assert!(!listing.contains(&secret[16..]));
        revoke(&source, &t.id).unwrap();
        let store = TokenStore::load(&path).unwrap();
        assert_eq!(
            store.get(&t.id).unwrap().status(SystemTime::now()),
            "revoked"
        );
        assert!(revoke(&source, "nosuchtoken0").is_err());
        assert!(
            rotate(&source, &t.id, Duration::ZERO).is_err(),
            "revoked tokens stay revoked"
        );

        // Rotation keeps the id and rules; the old secret lasts the grace.
        let new = rotate(&source, &any.id, Duration::from_secs(600)).unwrap();
        assert_eq!(new.id, any.id);
        let store = TokenStore::load(&path).unwrap();
        let r = store.get(&any.id).unwrap();
        assert_eq!(r.secret_sha256, new.secret_sha256);
        assert_eq!(r.previous.unwrap().sha256, any.secret_sha256);
        assert!(r.expires_at.is_some());
    }

    #[test]
    fn settings_are_validated() {
        assert_eq!(
            parse_setting("statement_timeout = 5s").unwrap(),
            ("statement_timeout".to_owned(), "5s".to_owned())
        );
        assert!(parse_setting("nothing").is_err());
        assert!(parse_setting("user=postgres").is_err());
        assert!(parse_setting("bad name=1").is_err());
    }
}
