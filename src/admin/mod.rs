//! The admin listener: `/metrics` (Prometheus), `/healthz` (readiness),
//! `/livez` (liveness), `/sessions`, `/pools` (server connection pools)
//! and `DELETE /sessions/{id}`, served by hyper on its own thread with a
//! current-thread tokio runtime, so nothing it does competes with a shard
//! for a core's event loop. It reads shard state only by asking the shards
//! over the [`Bus`].
//!
//! Off unless `[admin] listen` is set. Off loopback, everything but
//! `/metrics`, `/healthz` and `/livez` needs the configured bearer token.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tracing::{info, warn};

use crate::auth::live::LiveStore;
use crate::metrics::{self, ProcessFacts, ShardSnapshot};
use crate::secret::Secret;
use crate::session::watch::SessionView;
use crate::shard::bus::{self, Bus};

/// How long a scrape waits for a shard. A shard that cannot answer in this
/// time is not healthy, and a scrape without it says so
/// (`tollgate_shards_responding`).
const SHARD_ANSWER_TIMEOUT: Duration = Duration::from_secs(2);
/// A client must send its request head within this time.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// What the admin handlers share.
pub struct AdminState {
    pub bus: Arc<Bus>,
    pub store: Arc<LiveStore>,
    pub started: Instant,
    pub driver: crate::shard::driver::Driver,
    /// Required for `/sessions` when set (always set off loopback; the
    /// configuration refuses otherwise).
    pub bearer: Option<Secret>,
    /// Reloads, and whether the process is draining.
    pub control: Arc<crate::control::Control>,
}

/// The running listener.
pub struct Admin {
    pub local_addr: SocketAddr,
}

/// Binds `listen` now (so a port in use is reported at start) and serves
/// it on a new thread for the life of the process.
pub fn start(listen: SocketAddr, state: AdminState) -> std::io::Result<Admin> {
    let listener = std::net::TcpListener::bind(listen)
        .map_err(|e| std::io::Error::new(e.kind(), format!("admin listener {listen}: {e}")))?;
    listener.set_nonblocking(true)?;
    let local_addr = listener.local_addr()?;
    let state = Arc::new(state);
    std::thread::Builder::new()
        .name("tg-admin".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .enable_time()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    warn!(error = %e, "admin runtime failed to start");
                    return;
                }
            };
            rt.block_on(serve(listener, state));
        })?;
    info!(addr = %local_addr, "admin listener up");
    Ok(Admin { local_addr })
}

async fn serve(listener: std::net::TcpListener, state: Arc<AdminState>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            warn!(error = %e, "admin listener could not start");
            return;
        }
    };
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

type Reply = Response<Full<Bytes>>;

async fn route(state: &AdminState, req: Request<Incoming>) -> Reply {
    let path = req.uri().path();
    match (req.method(), path) {
        (&Method::GET, "/metrics") => metrics(state).await,
        (&Method::GET, "/healthz") => healthz(state).await,
        (&Method::GET, "/livez") => livez(state).await,
        (&Method::GET, "/sessions") if authorized(state, &req) => sessions(state).await,
        (&Method::GET, "/pools") if authorized(state, &req) => pools(state).await,
        (&Method::GET, "/pools") => unauthorized(),
        (&Method::POST, "/reload") if authorized(state, &req) => reload(state).await,
        (&Method::POST, "/reload") => unauthorized(),
        (&Method::DELETE, p) if p.starts_with("/sessions/") && authorized(state, &req) => {
            terminate(state, &p["/sessions/".len()..]).await
        }
        (&Method::GET, "/sessions") | (&Method::DELETE, _) if path.starts_with("/sessions") => {
            unauthorized()
        }
        (_, "/metrics" | "/healthz" | "/livez" | "/sessions" | "/pools" | "/reload") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Checks the bearer token, when one is configured, in constant time.
fn authorized(state: &AdminState, req: &Request<Incoming>) -> bool {
    let Some(bearer) = &state.bearer else {
        return true;
    };
    let given = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .unwrap_or(b"");
    bool::from(subtle::ConstantTimeEq::ct_eq(given, bearer.expose()))
}

fn unauthorized() -> Reply {
    let mut r = text(
        StatusCode::UNAUTHORIZED,
        "a valid admin bearer token is required\n",
    );
    r.headers_mut()
        .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

/// Sends `make(reply)` to every shard and collects the answers that come
/// within [`SHARD_ANSWER_TIMEOUT`].
async fn ask_all<T: Send + 'static>(
    bus: &Bus,
    make: impl Fn(flume::Sender<T>) -> bus::Request,
) -> Vec<T> {
    let mut waiting = Vec::with_capacity(bus.shards());
    for shard in 0..bus.shards() {
        let (tx, rx) = flume::bounded(1);
        if bus.send(shard, make(tx)) {
            waiting.push(rx);
        }
    }
    let deadline = tokio::time::Instant::now() + SHARD_ANSWER_TIMEOUT;
    let mut answers = Vec::with_capacity(waiting.len());
    for rx in waiting {
        if let Ok(Ok(a)) = tokio::time::timeout_at(deadline, rx.recv_async()).await {
            answers.push(a);
        }
    }
    answers
}

async fn metrics(state: &AdminState) -> Reply {
    let mut snapshots: Vec<ShardSnapshot> = ask_all(&state.bus, bus::Request::Metrics).await;
    snapshots.sort_by_key(|s| s.shard);
    let facts = ProcessFacts {
        version: env!("CARGO_PKG_VERSION"),
        shards: state.bus.shards(),
        tokens_loaded: state.store.published.get().len() as u64,
        uptime: state.started.elapsed(),
        driver: state.driver,
        reloads: state.control.reloads(),
        draining: state.control.is_draining(),
        token_store: state
            .store
            .freshness()
            .map(|f| (f.is_stale(), f.age(std::time::SystemTime::now()))),
    };
    let body = metrics::render(&snapshots, &facts);
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static(metrics::CONTENT_TYPE),
    );
    r
}

/// `POST /reload`: the same as SIGHUP. 200 with what needs a restart, or
/// 422 with why the file was refused (the running config stays).
async fn reload(state: &AdminState) -> Reply {
    let control = state.control.clone();
    // Reading files and building TLS configs blocks; keep it off the
    // admin runtime's only thread.
    let result = tokio::task::spawn_blocking(move || control.reload()).await;
    let (status, body) = match result {
        Ok(Ok(r)) => (
            StatusCode::OK,
            serde_json::json!({ "reloaded": true, "restart_required": r.restart_required }),
        ),
        Ok(Err(e)) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            serde_json::json!({ "reloaded": false, "error": e }),
        ),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            serde_json::json!({ "reloaded": false, "error": "reload did not finish" }),
        ),
    };
    json(status, &body)
}

/// Ready when every shard answers, the token store is usable, and the
/// process is not draining: a load balancer's readiness probe then stops
/// sending new clients before the listeners close. A stale snapshot from
/// the control database still serves (and says so) until it is older than
/// `max_staleness`, when logins are refused and the instance is not ready.
async fn healthz(state: &AdminState) -> Reply {
    let up = ask_all(&state.bus, bus::Request::Ping).await.len();
    let shards = state.bus.shards();
    let draining = state.control.is_draining();
    let now = std::time::SystemTime::now();
    let freshness = state.store.freshness();
    let too_stale = freshness.is_some_and(|f| f.too_stale(now));
    let ready = up == shards && !draining && !too_stale;
    let status_word = if draining {
        "draining"
    } else if too_stale {
        "token_store_stale"
    } else if ready {
        "ok"
    } else {
        "unavailable"
    };
    let mut body = serde_json::json!({
        "status": status_word,
        "shards": shards,
        "shards_up": up,
        "tokens_loaded": state.store.published.get().len(),
    });
    body["token_store"] = match freshness {
        None => serde_json::json!({ "source": "file" }),
        Some(f) => serde_json::json!({
            "source": "postgres",
            "stale": f.is_stale(),
            "age_seconds": f.age(now).as_secs_f64(),
        }),
    };
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json(status, &body)
}

/// Alive when every shard answers. Unlike `/healthz` it ignores draining
/// and a stale token store: a liveness probe that restarted every instance
/// of a fleet whose control database is down would end their open
/// sessions, and the restarted ones could not start without it.
async fn livez(state: &AdminState) -> Reply {
    let up = ask_all(&state.bus, bus::Request::Ping).await.len();
    let shards = state.bus.shards();
    let body = serde_json::json!({ "shards": shards, "shards_up": up });
    let status = if up == shards {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json(status, &body)
}

async fn sessions(state: &AdminState) -> Reply {
    let mut all: Vec<SessionView> = ask_all(&state.bus, bus::Request::Sessions)
        .await
        .into_iter()
        .flatten()
        .collect();
    all.sort_by(|a, b| (a.shard, &a.id).cmp(&(b.shard, &b.id)));
    json(StatusCode::OK, &all)
}

/// `/pools`: each upstream's server connection pool on each shard.
async fn pools(state: &AdminState) -> Reply {
    let mut all: Vec<crate::metrics::PoolView> = ask_all(&state.bus, bus::Request::Metrics)
        .await
        .into_iter()
        .flat_map(|s| s.pools)
        .collect();
    all.sort_by(|a, b| (&a.upstream, a.shard).cmp(&(&b.upstream, b.shard)));
    json(StatusCode::OK, &all)
}

/// `DELETE /sessions/{shard}-{n}`: the session's client gets FATAL 57P01
/// at the next message boundary, as after pg_terminate_backend.
async fn terminate(state: &AdminState, id: &str) -> Reply {
    let Some((shard, number)) = parse_session_id(id) else {
        return text(StatusCode::NOT_FOUND, "no such session\n");
    };
    let (tx, rx) = flume::bounded(1);
    if !state
        .bus
        .send(shard, bus::Request::Terminate { number, reply: tx })
    {
        return text(StatusCode::NOT_FOUND, "no such session\n");
    }
    match tokio::time::timeout(SHARD_ANSWER_TIMEOUT, rx.recv_async()).await {
        Ok(Ok(true)) => {
            info!(session = id, "session terminated through the admin API");
            json(StatusCode::OK, &serde_json::json!({ "terminated": id }))
        }
        Ok(Ok(false)) => text(StatusCode::NOT_FOUND, "no such session\n"),
        _ => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "the session's shard did not answer\n",
        ),
    }
}

/// Session ids are `{shard}-{n}`.
fn parse_session_id(id: &str) -> Option<(usize, u64)> {
    let (shard, n) = id.split_once('-')?;
    Some((shard.parse().ok()?, n.parse().ok()?))
}

fn text(status: StatusCode, body: &'static str) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json<T: serde::Serialize>(status: StatusCode, v: &T) -> Reply {
    let body = serde_json::to_vec_pretty(v).unwrap_or_default();
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_parse() {
        assert_eq!(parse_session_id("3-17"), Some((3, 17)));
        assert_eq!(parse_session_id("3-"), None);
        assert_eq!(parse_session_id("x-1"), None);
        assert_eq!(parse_session_id("1-2-3"), None);
    }
}
