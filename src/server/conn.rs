//! One logged-in server connection and what tollgate knows of its
//! session: the login messages every client of it is shown, the parameters
//! the server reports, its real cancel key, and its age.

use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use ring::rand::{SecureRandom, SystemRandom};

use super::key::PoolKey;
use super::pool::Seat;
use super::statements::StatementCache;
use super::wire::parameter_status;
use super::{Route, Settable, REPORTED};
use crate::protocol::backend::{self, BackendKey, MAX_LOGIN_MESSAGE_LEN};
use crate::protocol::frame::peek_frame;
use crate::upstream::{Upstream, UpstreamStream};

/// A logged-in server connection, lent to one client at a time: the
/// stream, which the relay takes while a client is served, and the rest.
/// The state is boxed: a connection changes hands (pool, lend, relay and
/// back) several times a transaction, and each move copied all of it.
pub struct ServerConn {
    pub stream: UpstreamStream,
    pub state: Box<ConnState>,
}

/// What tollgate knows of a server connection's session.
pub struct ConnState {
    /// The socket under the stream (under TLS too), for a look at whether
    /// the server closed it while it was idle.
    fd: RawFd,
    /// The upstream as it was when this connection logged in.
    pub route: Arc<Route>,
    pub key: Rc<PoolKey>,
    /// What each client is shown of the login (shared by the pool's
    /// connections that logged in alike).
    login: Rc<LoginMessages>,
    /// The server's own key for this backend, for cancels.
    pub upstream_key: Option<BackendKey>,
    /// The protocol minor version in force.
    pub minor: u16,
    pub auth_method: &'static str,
    created: Instant,
    /// When it is closed instead of pooled: `max_lifetime` less a random
    /// part of up to a fifth, so that a pool opened at once is not closed
    /// at once.
    retire_at: Instant,
    idle_since: Instant,
    /// The reported parameters as they are, when any changed since the
    /// login or the last reset (transaction pooling carries a client's
    /// values from lend to lend without a reset). Boxed: most idle
    /// connections have none, and each pooled one pays for the field.
    changed: Option<Box<Changed>>,
    /// Transaction pooling: the prepared statements it holds (boxed, as
    /// `changed`).
    statements: Option<Box<StatementCache>>,
    /// The client parameters it was last readied with, while no reported
    /// parameter changed since: a lend with the same set (the same
    /// allocation: [`RoutePool::intern_settable`](super::RoutePool::intern_settable)
    /// shares one among the clients that have it) needs no look at them.
    /// Held, so the address cannot be reused by another set.
    readied: Option<Settable>,
    /// Clients served before the current one.
    pub served: u64,
    /// Its place under the upstream's limit, given back when it closes.
    pub(super) seat: Seat,
}

/// What each client of a connection is shown of its login, as the server
/// sent it: NegotiateProtocolVersion (when there was one) and
/// AuthenticationOk (the first `greeting_len` bytes), then the
/// ParameterStatus messages as the login left them, which the reset
/// restores. Shared by the pool's connections that logged in alike (see
/// [`RoutePool::intern_login`](super::RoutePool::intern_login)).
#[derive(PartialEq, Eq)]
pub struct LoginMessages {
    bytes: Box<[u8]>,
    greeting_len: usize,
    /// The values of the [`REPORTED`] parameters among them, by place:
    /// looked up at every lend, so read once.
    reported: Reported,
}

/// Values of the [`REPORTED`] parameters, by their place in it.
type Reported = [Option<Rc<str>>; REPORTED.len()];

impl LoginMessages {
    fn new(bytes: Vec<u8>, greeting_len: usize) -> LoginMessages {
        let mut reported = Reported::default();
        for (k, v) in params(&bytes[greeting_len..]) {
            // The first, as a lookup by name finds it (a server reports
            // each once).
            if let Some(i) = reported_slot(k).filter(|&i| reported[i].is_none()) {
                reported[i] = Some(v.into());
            }
        }
        LoginMessages {
            bytes: bytes.into(),
            greeting_len,
            reported,
        }
    }

    fn status(&self) -> &[u8] {
        &self.bytes[self.greeting_len..]
    }
}

/// A connection's parameters that changed since its login.
struct Changed {
    /// All of the [`REPORTED`] ones, as they are now.
    reported: Reported,
    /// Any other the server reported, in order.
    other: Vec<(String, String)>,
}

/// The place of `name` (case-insensitive) in [`REPORTED`].
fn reported_slot(name: &str) -> Option<usize> {
    REPORTED.iter().position(|r| r.eq_ignore_ascii_case(name))
}

/// How long a connection must have been idle before it is peeked at on
/// its way to a client (see [`ServerConn::closed_by_server_lately`]).
pub const PEEK_AFTER: Duration = Duration::from_millis(1);

/// The login did not leave the connection in a state to pool.
#[derive(Debug)]
pub struct NotPoolable(pub &'static str);

impl ServerConn {
    /// Closes the connection (its socket, as the rest drops), keeping its
    /// place under the upstream's limit for a new login: a client handed
    /// a connection that turned out dead logs in on its seat, keeping its
    /// turn, instead of freeing it to the next waiter and queueing anew.
    pub fn into_seat(self) -> Seat {
        self.state.seat
    }

    /// Takes over a fresh login. Its messages for the client are kept to
    /// show each client (less the notices, which were for the first, and
    /// the key, which each client gets its own of).
    pub fn from_login(
        up: Upstream,
        route: Arc<Route>,
        key: Rc<PoolKey>,
        seat: Seat,
        max_lifetime: Duration,
    ) -> Result<ServerConn, NotPoolable> {
        let quiet = match &up.stream {
            UpstreamStream::Plain(_) => true,
            UpstreamStream::Tls(s) => s.is_quiet(),
        };
        if !up.leftover.is_empty() || !quiet {
            return Err(NotPoolable("server sent more after ReadyForQuery"));
        }
        let mut greeting = Vec::new();
        let mut status = Vec::new();
        let mut rest = &up.for_client[..];
        while !rest.is_empty() {
            let frame = peek_frame(rest, MAX_LOGIN_MESSAGE_LEN)
                .ok()
                .flatten()
                .ok_or(NotPoolable("malformed login messages"))?;
            let (msg, tail) = rest.split_at(frame.total_len);
            match frame.tag {
                backend::TAG_NEGOTIATE_PROTOCOL_VERSION | backend::TAG_AUTHENTICATION => {
                    greeting.extend_from_slice(msg)
                }
                backend::TAG_PARAMETER_STATUS => {
                    parameter_status(&msg[frame.body()])
                        .ok_or(NotPoolable("malformed ParameterStatus"))?;
                    status.extend_from_slice(msg);
                }
                backend::TAG_READY_FOR_QUERY if msg.get(5) != Some(&b'I') => {
                    return Err(NotPoolable("login left a transaction open"));
                }
                _ => {}
            }
            rest = tail;
        }
        let greeting_len = greeting.len();
        greeting.extend_from_slice(&status);
        let login = seat
            .pool()
            .intern_login(LoginMessages::new(greeting, greeting_len));
        let now = Instant::now();
        let state = Box::new(ConnState {
            fd: up.fd,
            route,
            key,
            login,
            upstream_key: up.ready.upstream_key,
            minor: up.ready.minor,
            auth_method: up.ready.auth_method,
            created: now,
            retire_at: now + jittered(max_lifetime),
            idle_since: now,
            changed: None,
            statements: None,
            readied: None,
            served: 0,
            seat,
        });
        Ok(ServerConn {
            stream: up.stream,
            state,
        })
    }

    /// Whether the server has closed the connection, or sent anything while
    /// it was idle (a FATAL before a shutdown, say): either way it cannot
    /// serve a client. One non-blocking peek, no round trip.
    pub fn closed_by_server(&self) -> bool {
        self.stream_holds_more() || crate::io_util::peer_closed_or_spoke(self.state.fd)
    }

    /// As [`closed_by_server`](Self::closed_by_server), without the peek
    /// (a syscall) for a connection idle less than [`PEEK_AFTER`]: the
    /// peek narrows a race, it cannot close it (the server may close a
    /// moment later), and the window it would narrow for a connection
    /// taken back that recently is under a millisecond long. Under load
    /// every lend is of such a connection: a syscall per transaction.
    pub fn closed_by_server_lately(&self, now: Instant) -> bool {
        if self.state.idle_for(now) < PEEK_AFTER {
            return self.stream_holds_more();
        }
        self.closed_by_server()
    }

    /// TLS: the stream holds bytes (a record, or part of one) the server
    /// sent since it was last read.
    fn stream_holds_more(&self) -> bool {
        match &self.stream {
            UpstreamStream::Plain(_) => false,
            UpstreamStream::Tls(s) => !s.is_quiet(),
        }
    }

    /// Past its lifetime, or on a TLS 1.2 key near its limit (which would
    /// end the connection in some client's transaction).
    pub fn worn_out(&self, now: Instant) -> bool {
        self.state.retired(now)
            || matches!(&self.stream, UpstreamStream::Tls(s) if s.key_wearing_out())
    }

    /// Sends Terminate, best effort, and closes: the server logs a clean
    /// disconnection rather than an unexpected EOF.
    pub async fn terminate(mut self) {
        let mut bye = BytesMut::with_capacity(5);
        postgres_protocol::message::frontend::terminate(&mut bye);
        let write = super::wire::write(&mut self.stream, bye);
        let _ = monoio::time::timeout(Duration::from_millis(200), write).await;
    }
}

impl ConnState {
    /// The backend's process id.
    pub fn pid(&self) -> Option<u32> {
        self.upstream_key.as_ref().map(|k| k.process_id)
    }

    /// The reported value of `name` (case-insensitive) as it is now.
    pub fn param(&self, name: &str) -> Option<&str> {
        if let Some(i) = reported_slot(name) {
            return self.reported(i);
        }
        let changed = self.changed.iter().flat_map(|c| c.other.iter());
        if let Some((_, v)) = changed.rev().find(|(k, _)| k.eq_ignore_ascii_case(name)) {
            return Some(v);
        }
        self.login_param(name)
    }

    /// The value of [`REPORTED`]`[i]` as it is now.
    pub fn reported(&self, i: usize) -> Option<&str> {
        match &self.changed {
            Some(c) => c.reported[i].as_deref(),
            None => self.login.reported[i].as_deref(),
        }
    }

    /// The value of [`REPORTED`]`[i]` the server reported at login.
    pub fn login_reported(&self, i: usize) -> Option<&str> {
        self.login.reported[i].as_deref()
    }

    /// The value of `name` (case-insensitive) the server reported at
    /// login, whatever was set since.
    pub fn login_param(&self, name: &str) -> Option<&str> {
        if let Some(i) = reported_slot(name) {
            return self.login.reported[i].as_deref();
        }
        params(self.login.status())
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// Whether a reported parameter changed since the login or the last
    /// reset (else every value is the login's).
    pub fn changed_since_login(&self) -> bool {
        self.changed.is_some()
    }

    /// Notes a ParameterStatus the server sent after the login.
    pub fn note_reported(&mut self, name: &str, value: &str) {
        let slot = reported_slot(name);
        if slot.is_some_and(|i| self.reported(i) == Some(value)) {
            return;
        }
        self.readied = None;
        let login = &self.login;
        let changed = self.changed.get_or_insert_with(|| {
            Box::new(Changed {
                reported: login.reported.clone(),
                other: Vec::new(),
            })
        });
        if let Some(i) = slot {
            changed.reported[i] = Some(value.into());
            return;
        }
        match changed.other.iter_mut().find(|(k, _)| k == name) {
            Some((_, v)) if v == value => {}
            Some((_, v)) => {
                v.clear();
                v.push_str(value);
            }
            None => changed.other.push((name.to_owned(), value.to_owned())),
        }
    }

    /// After a reset: the parameters are the login's again, and no
    /// prepared statement is left.
    pub fn forget_session(&mut self) {
        self.changed = None;
        self.statements = None;
        self.readied = None;
    }

    /// Whether it was readied with `settable` (this very set) and nothing
    /// it reports changed since.
    pub fn readied_with(&self, settable: &Settable) -> bool {
        self.readied
            .as_ref()
            .is_some_and(|r| Rc::ptr_eq(r, settable))
    }

    /// Notes that its parameters are now as `settable` says, and the
    /// login's for every other reported one.
    pub fn mark_readied(&mut self, settable: &Settable) {
        self.readied = Some(settable.clone());
    }

    /// The prepared statements it holds.
    pub fn statements(&mut self) -> &mut StatementCache {
        self.statements.get_or_insert_with(Default::default)
    }

    /// What a client is shown of the login: the greeting, the parameters
    /// with `changed` (what the server reported on checkout) applied, its
    /// own BackendKeyData (when the server gave one), and ReadyForQuery.
    pub fn greeting_for(
        &self,
        changed: &[(String, String)],
        issued: Option<&BackendKey>,
        out: &mut BytesMut,
    ) {
        let (greeting, status) = self.login.bytes.split_at(self.login.greeting_len);
        out.extend_from_slice(greeting);
        write_with_changes(status, changed, out);
        if let Some(k) = issued {
            backend::backend_key_data(out, k.process_id, &k.secret_key);
        }
        backend::ready_for_query(out, b'I');
    }

    pub fn retired(&self, now: Instant) -> bool {
        now >= self.retire_at
    }

    pub fn idle_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.idle_since)
    }

    pub fn age(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.created)
    }

    pub fn mark_idle(&mut self, now: Instant) {
        self.idle_since = now;
    }
}

/// The parameters in a run of ParameterStatus messages.
fn params(status: &[u8]) -> impl Iterator<Item = (&str, &str)> {
    let mut rest = status;
    std::iter::from_fn(move || {
        let frame = peek_frame(rest, MAX_LOGIN_MESSAGE_LEN).ok().flatten()?;
        let (msg, tail) = rest.split_at(frame.total_len);
        rest = tail;
        let mut parts = msg[frame.body()].split(|b| *b == 0);
        let name = std::str::from_utf8(parts.next()?).ok()?;
        let value = std::str::from_utf8(parts.next()?).ok()?;
        Some((name, value))
    })
}

/// The ParameterStatus messages of `status` with `changed` applied (in
/// place, or added at the end for a parameter the login did not report).
fn write_with_changes(status: &[u8], changed: &[(String, String)], out: &mut BytesMut) {
    let change = |k: &str| changed.iter().rev().find(|(c, _)| c == k);
    for (k, v) in params(status) {
        let v = change(k).map_or(v, |(_, new)| new.as_str());
        backend::parameter_status(out, k, v);
    }
    for (k, v) in changed {
        let already = params(status).any(|(s, _)| s == k);
        let later = changed.iter().rev().find(|(c, _)| c == k).map(|(_, v)| v);
        if !already && later == Some(v) {
            backend::parameter_status(out, k, v);
        }
    }
}

/// `d` less a random part of up to a fifth of it.
fn jittered(d: Duration) -> Duration {
    let mut r = [0u8; 4];
    let _ = SystemRandom::new().fill(&mut r);
    let fraction = f64::from(u32::from_be_bytes(r)) / f64::from(u32::MAX);
    d.mul_f64(1.0 - 0.2 * fraction)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_is_shown_the_login_parameters_with_its_own_changes() {
        let mut status = BytesMut::new();
        backend::parameter_status(&mut status, "TimeZone", "UTC");
        backend::parameter_status(&mut status, "application_name", "");
        let changed = [
            ("TimeZone".to_owned(), "Europe/Paris".to_owned()),
            ("search_path".to_owned(), "x".to_owned()),
            ("TimeZone".to_owned(), "Asia/Tokyo".to_owned()),
            ("search_path".to_owned(), "public".to_owned()),
        ];
        let mut out = BytesMut::new();
        write_with_changes(&status, &changed, &mut out);
        let all: Vec<_> = params(&out).collect();
        assert_eq!(
            all,
            [
                ("TimeZone", "Asia/Tokyo"),
                ("application_name", ""),
                ("search_path", "public")
            ]
        );
    }

    #[test]
    fn lifetimes_are_spread_over_the_last_fifth() {
        let d = Duration::from_secs(100);
        for _ in 0..100 {
            let j = jittered(d);
            assert!(j <= d && j >= Duration::from_secs(80), "{j:?}");
        }
    }
}

#[cfg(test)]
mod size {
    use super::*;

    /// What an idle pooled connection costs tollgate beyond its socket:
    /// this struct (in the pool's list) with its boxed state, and a cancel
    /// secret of 4 or 32 bytes; the login messages are shared
    /// (`RoutePool::intern_login`).
    #[test]
    fn an_idle_connection_is_small() {
        // The state is boxed (moved often, the box only), and counted too.
        let size = std::mem::size_of::<ServerConn>() + std::mem::size_of::<ConnState>();
        eprintln!("ServerConn with its state: {size} bytes");
        assert!(size <= 256, "ServerConn grew to {size} bytes");
    }
}
