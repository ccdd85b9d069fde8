//! One shard's pools of idle server connections, one per upstream, and
//! the limit on how many connections the shard may have open to each.
//!
//! Shard-local (`!Send`): checkout and return are a scan of a short list
//! and a few counter updates, with no lock and nothing another thread
//! reads. `max_server_connections` is split into fixed per-shard shares
//! ([`PoolConfig::share`]); a shard never borrows another's.
//!
//! Clients that find the shard's share in use wait in arrival order. A
//! connection coming back goes straight to the first waiter of its key;
//! otherwise the first waiter is woken to look when a connection comes
//! back idle or a seat is freed (an idle connection of another key is
//! closed to make room for its own login). The line never waits while
//! something it could use is free: a waiter that looked and took one
//! thing passes the wake on while more is left.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::future::poll_fn;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use super::conn::{LoginMessages, ServerConn};
use super::key::PoolKey;
use super::{Route, Settable};
use crate::config::PoolConfig;
use crate::metrics::latency::Latency;

/// A place under the upstream's limit on this shard; freed when dropped
/// (the connection closed, or the login that took it failed).
pub struct Seat(Rc<RoutePool>);

impl Seat {
    pub fn pool(&self) -> &RoutePool {
        &self.0
    }
}

/// Distinct login message sets, and client parameter sets, kept for
/// sharing per pool (connections of one upstream and role nearly always
/// log in alike, and an application's clients mostly set the same).
const MAX_SHARED: usize = 8;

impl Drop for Seat {
    fn drop(&mut self) {
        let pool = &self.0;
        pool.open.set(pool.open.get() - 1);
        pool.wake_one();
    }
}

/// What a checkout got. Lives for one checkout, moved once: boxing the
/// connection would cost an allocation per checkout for nothing.
#[allow(clippy::large_enum_variant)]
pub enum Claim {
    /// An idle connection with the client's key.
    Idle(ServerConn),
    /// A seat for a new login.
    Login(Seat),
}

/// The shard's share of the upstream is in use and none came free in time.
#[derive(Debug)]
pub struct PoolFull;

/// A client waiting for a connection.
struct Waiter {
    /// The key it waits with: a connection of it coming back is handed
    /// over directly.
    key: Rc<PoolKey>,
    /// Taken from the line: a connection was handed to it, or it is to
    /// look for one (counted in [`RoutePool::looking`] then).
    woken: Cell<bool>,
    /// The connection handed to it as it came back (with `woken`).
    handed: RefCell<Option<ServerConn>>,
    /// Taken from the line at its deadline, unserved.
    expired: Cell<bool>,
    deadline: monoio::time::Instant,
    waker: RefCell<Option<Waker>>,
    /// In `waiters`: leaving the line must look for it there. Not once
    /// woken (taken from the line), which is how nearly every wait ends:
    /// a search of the whole line per checkout would cost as much as the
    /// line is long.
    in_line: Cell<bool>,
}

impl Waiter {
    /// Wakes the claim waiting on it.
    fn wake(&self) {
        let waker = self.waker.borrow_mut().take();
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// Counters of one upstream's pool on one shard.
#[derive(Debug, Clone, Default)]
pub struct PoolCounters {
    pub reused: u64,
    pub logins: u64,
    pub waited: u64,
    pub timeouts: u64,
    pub resets: u64,
    pub reset_failures: u64,
    /// Connections closed, by reason.
    pub closed: crate::metrics::Labeled,
    /// Transaction pooling: connections taken back at a transaction's end.
    pub lends: u64,
    /// Transaction pooling: clients pinned to their connection, by reason.
    pub pins: crate::metrics::Labeled,
    /// Transaction pooling: pinned clients unpinned, having cleared their
    /// session state.
    pub unpins: u64,
    /// Transaction pooling: uses of a prepared statement the lent
    /// connection held, Parses sent because it did not, and statements
    /// closed to stay under `max_prepared_statements`.
    pub statements_hit: u64,
    pub statements_prepared: u64,
    pub statements_evicted: u64,
}

/// A route's pool settings, read through the route that holds them.
pub struct PoolSettings(Arc<Route>);

impl std::ops::Deref for PoolSettings {
    type Target = PoolConfig;

    fn deref(&self) -> &PoolConfig {
        &self.0.config.pool
    }
}

/// One upstream's pool on one shard.
pub struct RoutePool {
    pub name: String,
    route: RefCell<Arc<Route>>,
    /// This shard's share of `max_server_connections` (0: no limit).
    limit: Cell<usize>,
    /// Seats taken: idle, lent, and logins in progress.
    open: Cell<usize>,
    /// Most recently returned last.
    idle: RefCell<VecDeque<ServerConn>>,
    waiters: RefCell<VecDeque<Rc<Waiter>>>,
    /// Waiters woken to look for what came free and not back yet: a new
    /// arrival must not take what was meant for them. Not those handed a
    /// connection: they take nothing else, and counting them would queue
    /// a newcomer behind them while a connection idles.
    looking: Cell<usize>,
    /// Ends the waits that reach their deadline: one timer for the pool,
    /// not one per waiting client (see [`expire_waiters`]).
    expiry: Expiry,
    /// Settable parameter sets shared by the clients that have the same.
    settables: RefCell<Vec<Settable>>,
    pub counters: RefCell<PoolCounters>,
    pub checkout_wait: RefCell<Latency>,
    /// Keys served lately, with when (`None`: foreseen from the config,
    /// kept for good): `min_idle` is kept for these.
    keys: RefCell<HashMap<Rc<PoolKey>, Option<Instant>>>,
    /// Login messages shared by the connections that got the same.
    logins: RefCell<Vec<Rc<LoginMessages>>>,
    /// After a background login (`min_idle`) failed: none is tried again
    /// before this, so a server that is down is not asked every second.
    warm_after: Cell<Option<Instant>>,
    /// Background logins in flight.
    pub warming: Cell<usize>,
    /// Transaction pooling: statements (by server-side name) a server
    /// logged in with a key has accepted a Parse of, with those keys.
    vetted: RefCell<Vetted>,
    /// (statement, key) pairs in `vetted`.
    vetted_pairs: Cell<usize>,
}

/// Server-side statement names, with the keys of the servers that
/// accepted a Parse of each.
type Vetted = HashMap<Rc<[u8]>, Vec<Rc<PoolKey>>>;

/// (Statement, key) pairs [`RoutePool::vet`] remembers at most before
/// starting over.
const MAX_VETTED: usize = 8192;

/// `value` as a shared copy from `shared`, where it is kept (with the
/// [`MAX_SHARED`] latest others) for the next of its kind.
fn intern<T: PartialEq>(shared: &mut Vec<Rc<T>>, value: T) -> Rc<T> {
    if let Some(v) = shared.iter().find(|v| ***v == value) {
        return v.clone();
    }
    let v = Rc::new(value);
    if shared.len() >= MAX_SHARED {
        shared.remove(0);
    }
    shared.push(v.clone());
    v
}

/// Keys are interned ([`RoutePool::intern`]): the same one is usually the
/// same allocation.
fn same_key(a: &PoolKey, b: &PoolKey) -> bool {
    std::ptr::eq(a, b) || a == b
}

impl RoutePool {
    fn new(route: Arc<Route>, limit: usize) -> Rc<RoutePool> {
        Rc::new(RoutePool {
            name: route.config.name.clone(),
            route: RefCell::new(route),
            limit: Cell::new(limit),
            open: Cell::new(0),
            idle: RefCell::default(),
            waiters: RefCell::default(),
            looking: Cell::new(0),
            expiry: Expiry::default(),
            settables: RefCell::default(),
            counters: RefCell::default(),
            checkout_wait: RefCell::new(Latency::new()),
            keys: RefCell::default(),
            logins: RefCell::default(),
            warm_after: Cell::new(None),
            warming: Cell::new(0),
            vetted: RefCell::default(),
            vetted_pairs: Cell::new(0),
        })
    }

    /// Whether background logins may be tried at `now`.
    pub fn may_warm(&self, now: Instant) -> bool {
        self.warming.get() == 0 && self.warm_after.get().is_none_or(|t| now >= t)
    }

    /// A background login failed: hold the others off until `until`.
    pub fn hold_warming(&self, until: Instant) {
        self.warm_after.set(Some(until));
    }

    /// `login` as a shared copy: the same messages as a connection logged
    /// in before got are not kept twice.
    pub fn intern_login(&self, login: LoginMessages) -> Rc<LoginMessages> {
        intern(&mut self.logins.borrow_mut(), login)
    }

    /// `params` as a shared set: clients that set the same parameters
    /// share one, so a connection readied for one of them is known ready
    /// for the next by a pointer comparison
    /// ([`ConnState::readied_with`](super::ConnState::readied_with)).
    pub fn intern_settable(&self, params: Vec<(String, String)>) -> Settable {
        intern(&mut self.settables.borrow_mut(), params)
    }

    /// The upstream as the latest settings have it.
    pub fn route(&self) -> Arc<Route> {
        self.route.borrow().clone()
    }

    /// The pool settings as the latest settings have them: a handle on
    /// the route, not a copy (asked at every lend).
    pub fn config(&self) -> PoolSettings {
        PoolSettings(self.route())
    }

    pub fn open(&self) -> usize {
        self.open.get()
    }

    pub fn idle_count(&self) -> usize {
        self.idle.borrow().len()
    }

    pub fn waiting(&self) -> usize {
        self.waiters.borrow().len()
    }

    pub fn limit(&self) -> usize {
        self.limit.get()
    }

    /// More seats are taken than the limit allows (it was lowered by a
    /// reload): a freed one is not to be used again.
    pub fn over_limit(&self) -> bool {
        let limit = self.limit.get();
        limit != 0 && self.open.get() > limit
    }

    /// The key, shared with the connections made for it, and noted as
    /// served at `now` (`None`: foreseen, kept warm for good).
    pub fn intern(&self, key: PoolKey, now: Option<Instant>) -> Rc<PoolKey> {
        let mut keys = self.keys.borrow_mut();
        let k = match keys.get_key_value(&key) {
            Some((k, _)) => k.clone(),
            None => Rc::new(key),
        };
        let at = keys.entry(k.clone()).or_insert(now);
        if at.is_some() {
            *at = now;
        }
        k
    }

    /// An idle connection with `key`, or a seat to log in a new one, in
    /// arrival order with other waiters, until `deadline`. Also says
    /// whether it had to wait.
    pub async fn claim(
        self: &Rc<Self>,
        key: &Rc<PoolKey>,
        deadline: monoio::time::Instant,
    ) -> Result<(Claim, bool), PoolFull> {
        let mut queued: Option<Queued> = None;
        loop {
            let my_turn = match &queued {
                None => self.waiters.borrow().is_empty() && self.looking.get() == 0,
                Some(q) => q.waiter.woken.get(),
            };
            if my_turn {
                if let Some(q) = &queued {
                    // Its wake is used now, whatever comes of it.
                    q.waiter.woken.set(false);
                    let handed = q.waiter.handed.borrow_mut().take();
                    if let Some(conn) = handed {
                        return Ok((Claim::Idle(conn), true));
                    }
                    self.looking.set(self.looking.get() - 1);
                }
                if let Some(claim) = self.try_claim(key) {
                    if queued.is_some() {
                        // More may have come free while it was woken
                        // (a second connection back, a second seat):
                        // those behind it get their turn now, not at the
                        // next return.
                        self.pass_on();
                    }
                    return Ok((claim, queued.is_some()));
                }
            }
            let waiter = match &queued {
                // Woken, yet nothing free after all (another key's login
                // took the seat): first in line again.
                Some(q) => {
                    q.waiter.in_line.set(true);
                    self.waiters.borrow_mut().push_front(q.waiter.clone());
                    q.waiter.clone()
                }
                None => {
                    let w = Rc::new(Waiter {
                        key: key.clone(),
                        woken: Cell::new(false),
                        handed: RefCell::new(None),
                        expired: Cell::new(false),
                        deadline,
                        waker: RefCell::new(None),
                        in_line: Cell::new(true),
                    });
                    self.waiters.borrow_mut().push_back(w.clone());
                    queued = Some(Queued {
                        pool: self.clone(),
                        waiter: w.clone(),
                    });
                    w
                }
            };
            self.expiry.watch(self, deadline);
            poll_fn(|cx| {
                if waiter.woken.get() || waiter.expired.get() {
                    return Poll::Ready(());
                }
                crate::io_util::remember_waker(&mut waiter.waker.borrow_mut(), cx.waker());
                Poll::Pending
            })
            .await;
            if waiter.expired.get() {
                // Out of the line already: `queued` has nothing to undo.
                self.counters.borrow_mut().timeouts += 1;
                return Err(PoolFull);
            }
        }
    }

    /// Notes that a server logged in with `key` accepted a Parse of the
    /// statement `name`.
    pub fn vet(&self, key: &Rc<PoolKey>, name: &Rc<[u8]>) {
        let mut vetted = self.vetted.borrow_mut();
        if vetted
            .get(name)
            .is_some_and(|keys| keys.iter().any(|k| same_key(k, key)))
        {
            return;
        }
        if self.vetted_pairs.get() >= MAX_VETTED {
            // Only a shortcut is lost: each is vetted again by its next
            // Parse on a server.
            vetted.clear();
            self.vetted_pairs.set(0);
        }
        vetted.entry(name.clone()).or_default().push(key.clone());
        self.vetted_pairs.set(self.vetted_pairs.get() + 1);
    }

    /// A server logged in with `key` refused a Parse of `name` (the
    /// objects it names changed, say).
    pub fn unvet(&self, key: &PoolKey, name: &[u8]) {
        let mut vetted = self.vetted.borrow_mut();
        if let Some(keys) = vetted.get_mut(name) {
            let before = keys.len();
            keys.retain(|k| !same_key(k, key));
            self.vetted_pairs
                .set(self.vetted_pairs.get() - (before - keys.len()));
            if keys.is_empty() {
                vetted.remove(name);
            }
        }
    }

    /// Whether a server logged in with `key` accepted a Parse of `name`.
    pub fn vetted(&self, key: &PoolKey, name: &[u8]) -> bool {
        self.vetted
            .borrow()
            .get(name)
            .is_some_and(|keys| keys.iter().any(|k| same_key(k, key)))
    }

    /// Marks a claim that had to wait, with how long it waited.
    pub fn waited(&self, took: Duration) {
        self.counters.borrow_mut().waited += 1;
        self.checkout_wait.borrow_mut().record(took);
    }

    fn try_claim(self: &Rc<Self>, key: &PoolKey) -> Option<Claim> {
        let mut idle = self.idle.borrow_mut();
        if let Some(i) = idle.iter().rposition(|c| same_key(&c.state.key, key)) {
            return idle.remove(i).map(Claim::Idle);
        }
        let limit = self.limit.get();
        if limit == 0 || self.open.get() < limit {
            self.open.set(self.open.get() + 1);
            return Some(Claim::Login(Seat(self.clone())));
        }
        // Full, but some of it idle under other keys: the oldest idle
        // makes room (its seat passes to this login without waking anyone).
        let victim = idle.pop_front()?;
        drop(idle);
        self.counters.borrow_mut().closed.add("evicted", 1);
        Some(Claim::Login(victim.into_seat()))
    }

    /// Wakes the first waiter, if any, to look for what came free.
    fn wake_one(&self) {
        let Some(w) = self.waiters.borrow_mut().pop_front() else {
            return;
        };
        self.take_turn(&w);
        self.looking.set(self.looking.get() + 1);
        w.wake();
    }

    /// Takes `w` from the line as woken.
    fn take_turn(&self, w: &Waiter) {
        w.in_line.set(false);
        w.woken.set(true);
    }

    /// Wakes the next waiter when more is free (idle connections and free
    /// seats) than the waiters already looking will take.
    fn pass_on(&self) {
        if self.waiters.borrow().is_empty() {
            return;
        }
        let limit = self.limit.get();
        let seats = match limit {
            0 => usize::MAX,
            _ => limit.saturating_sub(self.open.get()),
        };
        let free = seats.saturating_add(self.idle.borrow().len());
        if free > self.looking.get() {
            self.wake_one();
        }
    }

    /// Pools a connection that came back clean, and wakes a waiter.
    pub fn put_idle(&self, mut conn: ServerConn, now: Instant) {
        conn.state.mark_idle(now);
        self.offer(conn);
    }

    /// An idle connection for the first in line: handed straight to it
    /// when it waits with the connection's key (its claim then has nothing
    /// to look for), else kept idle and the first woken to look (it may
    /// close it to log in with its own key).
    fn offer(&self, conn: ServerConn) {
        let first = {
            let mut waiters = self.waiters.borrow_mut();
            match waiters.front() {
                Some(w) if same_key(&w.key, &conn.state.key) => waiters.pop_front(),
                _ => None,
            }
        };
        match first {
            Some(w) => {
                self.take_turn(&w);
                *w.handed.borrow_mut() = Some(conn);
                w.wake();
            }
            None => {
                self.idle.borrow_mut().push_back(conn);
                self.wake_one();
            }
        }
    }

    /// Ends the waits in line whose deadline passed, and returns the
    /// earliest deadline left.
    fn expire_due(&self, now: monoio::time::Instant) -> Option<monoio::time::Instant> {
        let mut next: Option<monoio::time::Instant> = None;
        self.waiters.borrow_mut().retain(|w| {
            let due = w.deadline;
            if due <= now {
                // Only scheduled by the wake: nothing runs while the line
                // is borrowed.
                w.in_line.set(false);
                w.expired.set(true);
                w.wake();
                return false;
            }
            next = Some(next.map_or(due, |n| n.min(due)));
            true
        });
        next
    }

    /// Counts a connection closed for `reason`; dropping it frees its seat.
    pub fn closed(&self, reason: &'static str) {
        self.counters.borrow_mut().closed.add(reason, 1);
    }

    /// Takes the idle connections `retire` picks, oldest first, to close.
    pub fn take_idle_where(&self, mut retire: impl FnMut(&ServerConn) -> bool) -> Vec<ServerConn> {
        let mut idle = self.idle.borrow_mut();
        let mut taken = Vec::new();
        let mut kept = VecDeque::with_capacity(idle.len());
        for c in idle.drain(..) {
            if retire(&c) {
                taken.push(c);
            } else {
                kept.push_back(c);
            }
        }
        *idle = kept;
        taken
    }

    /// Idle connections per key, and the keys served since `since` (the
    /// others are forgotten).
    pub fn recent_keys(&self, since: Instant) -> Vec<(Rc<PoolKey>, usize)> {
        let mut keys = self.keys.borrow_mut();
        keys.retain(|_, at| at.is_none_or(|at| at >= since));
        let idle = self.idle.borrow();
        keys.keys()
            .map(|k| {
                (
                    k.clone(),
                    idle.iter().filter(|c| *c.state.key == **k).count(),
                )
            })
            .collect()
    }

    /// Takes a seat for a background login (`min_idle`), only if one is
    /// free without waiting and nobody waits.
    pub fn spare_seat(self: &Rc<Self>) -> Option<Seat> {
        let limit = self.limit.get();
        let free = limit == 0 || self.open.get() < limit;
        if !free || !self.waiters.borrow().is_empty() || self.looking.get() > 0 {
            return None;
        }
        self.open.set(self.open.get() + 1);
        Some(Seat(self.clone()))
    }
}

/// A claim's place in line; leaves it when dropped (served, timed out, or
/// the claim abandoned), passing on a wake it got and did not use.
struct Queued {
    pool: Rc<RoutePool>,
    waiter: Rc<Waiter>,
}

impl Drop for Queued {
    fn drop(&mut self) {
        let pool = &self.pool;
        if self.waiter.in_line.get() {
            pool.waiters
                .borrow_mut()
                .retain(|x| !Rc::ptr_eq(x, &self.waiter));
        }
        if self.waiter.woken.get() {
            let handed = self.waiter.handed.borrow_mut().take();
            match handed {
                Some(conn) => pool.offer(conn),
                None => {
                    pool.looking.set(pool.looking.get() - 1);
                    pool.wake_one();
                }
            }
        }
    }
}

/// The pool's one timer for its waiters' deadlines: a task that sleeps
/// until the earliest, ends the waits due, and sleeps again. Waiters
/// mostly arrive with `now + checkout_timeout`, so the earliest deadline
/// is nearly always the first in line's and the task wakes about once
/// per `checkout_timeout`, where a timer per wait would be set and
/// cleared at every checkout that waits.
#[derive(Default)]
struct Expiry {
    /// The task runs (started by the first wait; it stays).
    running: Cell<bool>,
    /// When it looks next (`None`: when poked).
    at: Cell<Option<monoio::time::Instant>>,
    /// A wait due before `at` came.
    poked: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl Expiry {
    /// Sees that a wait due at `deadline` ends then.
    fn watch(&self, pool: &Rc<RoutePool>, deadline: monoio::time::Instant) {
        if !self.running.replace(true) {
            monoio::spawn(expire_waiters(pool.clone()));
            return;
        }
        if self.at.get().is_none_or(|at| deadline < at) {
            self.poked.set(true);
            let waker = self.waker.borrow_mut().take();
            if let Some(waker) = waker {
                waker.wake();
            }
        }
    }

    /// Resolves when poked.
    async fn poke(&self) {
        poll_fn(|cx| {
            if self.poked.take() {
                return Poll::Ready(());
            }
            crate::io_util::remember_waker(&mut self.waker.borrow_mut(), cx.waker());
            Poll::Pending
        })
        .await
    }
}

/// The task behind [`Expiry`], for as long as the shard runs.
async fn expire_waiters(pool: Rc<RoutePool>) {
    loop {
        let next = pool.expire_due(monoio::time::Instant::now());
        let expiry = &pool.expiry;
        expiry.at.set(next);
        expiry.poked.set(false);
        match next {
            Some(at) => {
                let sleep = monoio::time::sleep_until(at);
                monoio::select! {
                    _ = sleep => {}
                    _ = expiry.poke() => {}
                }
            }
            None => expiry.poke().await,
        }
    }
}

/// One shard's pools, by upstream name.
pub struct Pools {
    shard: usize,
    shards: usize,
    routes: RefCell<HashMap<String, Rc<RoutePool>>>,
    /// The upstream entries last applied, held so that a reload is noticed
    /// by pointer comparisons (held, an address cannot be reused by a
    /// later snapshot's entry).
    seen: RefCell<Vec<Arc<Route>>>,
}

impl Pools {
    pub fn new(shard: usize, shards: usize) -> Pools {
        Pools {
            shard,
            shards,
            routes: RefCell::default(),
            seen: RefCell::default(),
        }
    }

    pub fn shards(&self) -> usize {
        self.shards
    }

    /// The pool for `route`'s upstream, made on first use.
    pub fn for_route(&self, route: &Arc<Route>) -> Rc<RoutePool> {
        let mut routes = self.routes.borrow_mut();
        if let Some(p) = routes.get(&route.config.name) {
            return p.clone();
        }
        let limit = PoolConfig::share(
            route.config.pool.max_server_connections,
            self.shard,
            self.shards,
        );
        let p = RoutePool::new(route.clone(), limit);
        routes.insert(route.config.name.clone(), p.clone());
        p
    }

    /// What the metrics and `/pools` show of this shard's pools.
    pub fn views(&self) -> Vec<crate::metrics::PoolView> {
        self.all()
            .iter()
            .map(|p| {
                let c = p.counters.borrow();
                let idle = p.idle_count();
                crate::metrics::PoolView {
                    upstream: p.name.clone(),
                    shard: self.shard,
                    mode: p.config().mode.as_str(),
                    limit: p.limit(),
                    idle,
                    active: p.open().saturating_sub(idle),
                    waiting: p.waiting(),
                    waking: p.looking.get(),
                    checkouts_reused: c.reused,
                    checkouts_login: c.logins,
                    checkouts_waited: c.waited,
                    checkout_timeouts: c.timeouts,
                    resets: c.resets,
                    reset_failures: c.reset_failures,
                    closed: c.closed.clone(),
                    transaction_lends: c.lends,
                    pins: c.pins.clone(),
                    unpins: c.unpins,
                    statements: [
                        c.statements_hit,
                        c.statements_prepared,
                        c.statements_evicted,
                    ],
                    checkout_wait: p.checkout_wait.borrow().clone(),
                }
            })
            .collect()
    }

    pub fn all(&self) -> Vec<Rc<RoutePool>> {
        let mut v: Vec<_> = self.routes.borrow().values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Applies a settings snapshot's upstream entries if they are new:
    /// each pool takes its upstream's current entry and limit, and returns
    /// the idle connections that entry no longer allows (another address,
    /// TLS setting or credential), and those of upstreams gone, to close.
    pub fn refresh(&self, routes: &[Arc<Route>]) -> Vec<(Rc<RoutePool>, ServerConn)> {
        {
            let mut seen = self.seen.borrow_mut();
            let same = seen.len() == routes.len()
                && seen.iter().zip(routes).all(|(a, b)| Arc::ptr_eq(a, b));
            if same {
                return Vec::new();
            }
            *seen = routes.to_vec();
        }
        let mut stale = Vec::new();
        for pool in self.all() {
            let current = routes.iter().find(|r| r.config.name == pool.name);
            let Some(current) = current else {
                for c in pool.take_idle_where(|_| true) {
                    stale.push((pool.clone(), c));
                }
                continue;
            };
            let limit = PoolConfig::share(
                current.config.pool.max_server_connections,
                self.shard,
                self.shards,
            );
            pool.limit.set(limit);
            *pool.route.borrow_mut() = current.clone();
            for c in pool.take_idle_where(|c| !c.state.route.same_login(current, &c.state.key.user))
            {
                stale.push((pool.clone(), c));
            }
            // A higher limit may let waiters in.
            pool.wake_one();
        }
        stale
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UpstreamConfig;
    use crate::tls::UpstreamTlsMode;
    use monoio::time::Instant as At;

    fn pool(limit: usize) -> Rc<RoutePool> {
        let config = UpstreamConfig {
            name: "default".into(),
            databases: vec!["*".into()],
            host: "127.0.0.1".into(),
            port: 5432,
            addrs: Vec::new(),
            socket: None,
            connect_timeout: Duration::from_secs(5),
            keepalive: Duration::from_secs(60),
            credentials: Default::default(),
            tls: UpstreamTlsMode::Disable,
            ca_file: None,
            client_cert: None,
            require_auth: crate::config::AuthMethods::ANY,
            pool: Default::default(),
        };
        RoutePool::new(Arc::new(Route { config, tls: None }), limit)
    }

    fn key(pool: &RoutePool) -> Rc<PoolKey> {
        let (key, _) = crate::server::split_params("app", 0, Vec::new(), &[], true);
        pool.intern(key, None)
    }

    fn run(test: impl std::future::Future<Output = ()>) {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap()
            .block_on(test);
    }

    /// A claim that waits, in a task: notes `name` in `served` when it
    /// gets a seat, holds it a little, and says how it ended.
    fn waiting(
        pool: &Rc<RoutePool>,
        name: &'static str,
        within: Duration,
        served: &Rc<RefCell<Vec<&'static str>>>,
    ) -> monoio::task::JoinHandle<Result<(), PoolFull>> {
        waiting_holding(pool, name, within, Duration::from_millis(5), served)
    }

    /// [`waiting`], holding the seat for `hold`.
    fn waiting_holding(
        pool: &Rc<RoutePool>,
        name: &'static str,
        within: Duration,
        hold: Duration,
        served: &Rc<RefCell<Vec<&'static str>>>,
    ) -> monoio::task::JoinHandle<Result<(), PoolFull>> {
        let (pool, served) = (pool.clone(), served.clone());
        monoio::spawn(async move {
            let key = key(&pool);
            let (claim, waited) = pool.claim(&key, At::now() + within).await?;
            assert!(waited, "{name} should have waited");
            assert!(matches!(claim, Claim::Login(_)));
            served.borrow_mut().push(name);
            monoio::time::sleep(hold).await;
            Ok(())
        })
    }

    #[test]
    fn waiters_get_freed_seats_in_arrival_order() {
        run(async {
            let pool = pool(1);
            let k = key(&pool);
            let (first, waited) = pool.claim(&k, At::now()).await.unwrap();
            assert!(!waited);
            let served = Rc::default();
            let tasks: Vec<_> = ["b", "c", "d"]
                .into_iter()
                .map(|n| waiting(&pool, n, Duration::from_secs(5), &served))
                .collect();
            monoio::time::sleep(Duration::from_millis(10)).await;
            assert_eq!(pool.waiting(), 3);
            assert!(served.borrow().is_empty());
            drop(first);
            for t in tasks {
                t.await.unwrap();
            }
            assert_eq!(*served.borrow(), ["b", "c", "d"]);
            assert_eq!(pool.open(), 0);
            assert_eq!(pool.counters.borrow().timeouts, 0);
        });
    }

    #[test]
    fn each_wait_ends_at_its_own_deadline_even_one_due_before_those_ahead() {
        run(async {
            let pool = pool(1);
            let k = key(&pool);
            let (seat, _) = pool.claim(&k, At::now()).await.unwrap();
            let served = Rc::default();
            let patient = waiting(&pool, "patient", Duration::from_secs(5), &served);
            monoio::time::sleep(Duration::from_millis(5)).await;
            // Arrives later, due far sooner than the one ahead of it.
            let began = std::time::Instant::now();
            let hasty = waiting(&pool, "hasty", Duration::from_millis(40), &served);
            assert!(hasty.await.is_err());
            let took = began.elapsed();
            assert!(took >= Duration::from_millis(40), "{took:?}");
            assert!(took < Duration::from_secs(2), "{took:?}");
            assert_eq!(pool.waiting(), 1);
            assert_eq!(pool.counters.borrow().timeouts, 1);
            drop(seat);
            patient.await.unwrap();
            assert_eq!(*served.borrow(), ["patient"]);
        });
    }

    #[test]
    fn a_wait_given_up_after_its_wake_passes_the_wake_on() {
        run(async {
            let pool = pool(1);
            let k = key(&pool);
            let (seat, _) = pool.claim(&k, At::now()).await.unwrap();
            let served = Rc::default();
            let mut first = Box::pin(pool.claim(&k, At::now() + Duration::from_secs(5)));
            // Polled once: in line.
            assert!(futures_poll_once(first.as_mut()).is_pending());
            let second = waiting(&pool, "second", Duration::from_secs(5), &served);
            monoio::time::sleep(Duration::from_millis(5)).await;
            assert_eq!(pool.waiting(), 2);
            // The seat is freed: the first is woken, and gives up before
            // it looks.
            drop(seat);
            drop(first);
            second.await.unwrap();
            assert_eq!(*served.borrow(), ["second"]);
        });
    }

    /// Two seats freed before the first waiter looks, and a client that
    /// arrives meanwhile (behind it: the first was woken for what came
    /// free): the first takes one seat and passes the other on, so the
    /// newcomer is served now, not when the first gives its seat back.
    /// (In transaction pooling the same stranded a client for its whole
    /// `checkout_timeout` beside an idle connection.)
    #[test]
    fn what_a_woken_waiter_leaves_goes_to_the_next() {
        run(async {
            let pool = pool(2);
            let k = key(&pool);
            let (one, _) = pool.claim(&k, At::now()).await.unwrap();
            let (two, _) = pool.claim(&k, At::now()).await.unwrap();
            let served = Rc::default();
            let long = Duration::from_secs(3);
            let first = waiting_holding(&pool, "first", long, long, &served);
            monoio::time::sleep(Duration::from_millis(5)).await;
            drop(one);
            drop(two);
            let mut newcomer = Box::pin(pool.claim(&k, At::now() + Duration::from_secs(1)));
            assert!(futures_poll_once(newcomer.as_mut()).is_pending());
            assert_eq!(pool.waiting(), 1);
            let began = std::time::Instant::now();
            let (claim, waited) = newcomer.await.expect("the seat left free");
            assert!(waited);
            assert!(matches!(claim, Claim::Login(_)));
            assert!(began.elapsed() < Duration::from_millis(500));
            assert_eq!(*served.borrow(), ["first"]);
            drop(claim);
            first.await.unwrap();
            assert_eq!(pool.open(), 0);
        });
    }

    fn futures_poll_once<F: std::future::Future>(f: std::pin::Pin<&mut F>) -> Poll<F::Output> {
        let waker = std::task::Waker::noop();
        f.poll(&mut std::task::Context::from_waker(waker))
    }
}
