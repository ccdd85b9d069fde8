//! The control database: PostgreSQL as the shared token store of a fleet.
//!
//! Every instance keeps a full snapshot of `tollgate.tokens` and LISTENs on
//! `tollgate_tokens`; a trigger NOTIFYs on every committed change, whoever
//! made it, and each instance reloads and publishes the new snapshot to its
//! shards the same way a file change is published. When the database is out
//! of reach, the last snapshot stays in force (marked stale, with its age),
//! the connection is retried with backoff, and a reconnect reloads
//! everything, so a change made meanwhile is not missed.
//!
//! This runs on one thread of its own with a current-thread tokio runtime
//! (tokio-postgres); shards never wait on it.

pub mod instances;
pub mod schema;
pub mod sync;
pub mod tokens;

use std::future::poll_fn;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, Notification};

use crate::config::ControlDb;
use crate::tls::UpstreamTls;

/// A connection and the notifications it receives.
pub struct Link {
    pub client: Client,
    pub notifications: mpsc::UnboundedReceiver<Notification>,
    /// Ends when the connection does.
    pub closed: tokio::task::JoinHandle<()>,
}

/// Errors are described without the URL or any secret: tokio-postgres
/// never puts the password in its messages, and the address comes from
/// [`ControlDb::describe`].
pub type Error = String;

pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => e.to_string(),
    }
}

/// Opens a connection, within `timeout`, on the current tokio runtime
/// (which must be able to spawn the connection's driver).
pub async fn connect(db: &ControlDb, timeout: Duration) -> Result<Link, Error> {
    let mut config = String::from_utf8_lossy(db.url.expose())
        .parse::<tokio_postgres::Config>()
        .map_err(|_| "[tokens] postgres is not a valid connection URL".to_owned())?;
    if let Some(p) = &db.password {
        config.password(p.expose());
    }
    config
        .connect_timeout(timeout)
        .keepalives_idle(Duration::from_secs(10))
        .application_name("tollgate control");
    let at = db.describe();
    let tls = UpstreamTls::new(db.tls, db.ca_file.as_deref(), None)
        .map_err(|e| format!("control database TLS: {e}"))?;
    let connecting = async {
        match tls {
            None => {
                let (client, conn) = config.connect(tokio_postgres::NoTls).await?;
                Ok::<_, tokio_postgres::Error>((client, drive(conn)))
            }
            Some(tls) => {
                let mut c = (*tls.client_config()).clone();
                // Negotiated through SSLRequest, where ALPN is optional.
                c.alpn_protocols.clear();
                // tokio-postgres-rustls keeps its own records: no secrets
                // to hand over.
                c.enable_secret_extraction = false;
                let make = tokio_postgres_rustls::MakeRustlsConnect::new(c);
                let (client, conn) = config.connect(make).await?;
                Ok((client, drive(conn)))
            }
        }
    };
    let (client, (notifications, closed)) = tokio::time::timeout(timeout, connecting)
        .await
        .map_err(|_| format!("control database {at}: no connection within {timeout:?}"))?
        .map_err(|e| format!("control database {at}: {}", describe(&e)))?;
    Ok(Link {
        client,
        notifications,
        closed,
    })
}

type Driven = (
    mpsc::UnboundedReceiver<Notification>,
    tokio::task::JoinHandle<()>,
);

/// Runs the connection on its own task, passing notifications on.
fn drive<S, T>(mut conn: tokio_postgres::Connection<S, T>) -> Driven
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            match poll_fn(|cx| conn.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    let _ = tx.send(n);
                }
                // Notices (e.g. from CREATE ... IF NOT EXISTS) say nothing
                // an operator needs.
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::debug!(error = %describe(&e), "control database connection ended");
                    return;
                }
                None => return,
            }
        }
    });
    (rx, task)
}
