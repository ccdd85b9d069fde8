//! `tollgate quickstart`: see tollgate work in one command.
//!
//! Without `--upstream`, starts a throwaway Postgres cluster (scram-sha-256,
//! a role and a database); writes a config and token store into a temp
//! folder; creates a token; starts the proxy; prints a psql command; and on
//! Ctrl-C removes everything it created.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use clap::Args;

use super::CliError;
use crate::cluster::{Cluster, ClusterOptions, HbaAuth};
use crate::config::pgurl::PgUrl;
use crate::config::{Config, LogFormat};

#[derive(Args)]
pub struct QuickstartArgs {
    /// Front an existing server instead of starting one:
    /// postgres://user:password@host:port/database
    #[arg(long, value_name = "URL")]
    upstream: Option<String>,
    /// Where tollgate listens (falls back to a free port if this one is taken).
    #[arg(long, default_value = "127.0.0.1:6432")]
    listen: String,
    /// Shards (0 = one per CPU).
    #[arg(long, default_value_t = 0)]
    workers: usize,
    /// Lifetime of the printed token.
    #[arg(long, default_value = "24h", value_parser = crate::config::parse_duration)]
    ttl: Duration,
}

/// The upstream to front: role, password, database, address.
type Target = PgUrl;

/// A temp folder removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn run(args: QuickstartArgs) -> Result<(), CliError> {
    crate::logging::init(Some("info"), LogFormat::Text);
    // Install the handler first, so Ctrl-C during set-up still cleans up.
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    ctrlc::set_handler(move || {
        let _ = stop_tx.send(());
    })?;

    let (target, _cluster) = match &args.upstream {
        Some(url) => (PgUrl::parse(url, "--upstream")?, None),
        None => {
            eprintln!("Starting a throwaway PostgreSQL cluster...");
            let opts = ClusterOptions {
                password: crate::secret::random_hex(16),
                auth: HbaAuth::ScramSha256,
                ..ClusterOptions::default()
            };
            let cluster = Cluster::start(&opts)?;
            let target = Target {
                host: cluster.host().to_owned(),
                port: cluster.port(),
                user: cluster.role().to_owned(),
                password: cluster.password().to_owned(),
                database: cluster.database().to_owned(),
            };
            (target, Some(cluster))
        }
    };

    let dir = TempDir(make_temp_dir()?);
    let listen = pick_listen(&args.listen)?;
    let admin = pick_listen(DEFAULT_ADMIN_LISTEN)?;
    let config_path = dir.0.join("tollgate.toml");
    write_config(&config_path, &listen, &admin, args.workers, &target)?;
    let token = super::token::create(
        &crate::config::TokenSource::File(dir.0.join("tokens.toml")),
        &target.user,
        super::token::RuleArgs {
            databases: vec![target.database.clone()],
            ttl: Some(args.ttl),
            comment: Some("quickstart".into()),
            ..Default::default()
        },
    )?;
    let config = Config::load(&config_path)?;
    let (shards, _control) = super::start(config, &config_path)?;
    let addr = shards.local_addr;

    println!();
    println!(
        "tollgate is running on {addr}, in front of {}:{}.",
        target.host, target.port
    );
    println!(
        "Connect with this token (valid for {}):",
        humantime::format_duration(args.ttl)
    );
    println!();
    println!(
        "  psql \"host={} port={} user={} dbname={} password={}\"",
        addr.ip(),
        addr.port(),
        target.user,
        target.database,
        String::from_utf8_lossy(token.token.expose())
    );
    println!();
    println!("Metrics: http://{admin}/metrics   Open sessions: http://{admin}/sessions");
    println!("Config and token store: {}", dir.0.display());
    println!(
        "More tokens: cargo run --release -- token create --config {} --user {}",
        config_path.display(),
        target.user
    );
    println!("Press Ctrl-C to stop and remove everything quickstart created.");

    let _ = stop_rx.recv();
    eprintln!("\nStopping...");
    // The cluster and the temp folder are removed as they drop; the shard
    // threads end with the process.
    Ok(())
}

/// Where quickstart serves the admin API (loopback only, so no bearer
/// token is needed), unless the port is taken.
const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9187";

fn make_temp_dir() -> Result<PathBuf, CliError> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = std::env::temp_dir().join(format!(
        "tollgate-quickstart-{}",
        crate::secret::random_hex(6)
    ));
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    Ok(dir)
}

/// The requested address if free, else the same host with a free port.
fn pick_listen(requested: &str) -> Result<String, CliError> {
    match std::net::TcpListener::bind(requested) {
        Ok(_) => Ok(requested.to_owned()),
        Err(e) => {
            let host = requested.rsplit_once(':').map_or("127.0.0.1", |(h, _)| h);
            let free = std::net::TcpListener::bind((host, 0))?.local_addr()?;
            eprintln!("{requested} is not available ({e}); using {free} instead.");
            Ok(free.to_string())
        }
    }
}

fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

fn write_config(
    path: &Path,
    listen: &str,
    admin: &str,
    workers: usize,
    t: &Target,
) -> Result<(), CliError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    // The upstream password goes into a file readable by its owner only.
    let text = format!(
        "# Written by `tollgate quickstart`.\n\
         listen = {listen}\n\
         workers = {workers}\n\n\
         [upstream]\n\
         host = {host}\n\
         port = {port}\n\n\
         [[upstream.credentials]]\n\
         user = {user}\n\
         password = {password}\n\n\
         [tokens]\n\
         file = \"tokens.toml\"\n\n\
         [admin]\n\
         listen = {admin}\n",
        listen = toml_str(listen),
        admin = toml_str(admin),
        host = toml_str(&t.host),
        port = t.port,
        user = toml_str(&t.user),
        password = toml_str(&t.password),
    );
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())?;
    Ok(())
}
