//! What the relay learns from the message headers it already reads: where
//! messages end (so tollgate may speak only between them), how many query
//! cycles the client asked for and the server finished, the transaction
//! status, and, when on, each cycle's and transaction's latency and the
//! SQL text for the query audit.
//!
//! A query cycle is what ends in one ReadyForQuery: a simple Query, a
//! FunctionCall, or a run of extended-protocol messages up to Sync. It
//! starts at its first message (Parse, Bind, Describe, Execute, Close,
//! Query, FunctionCall or Sync) and ends when the server's ReadyForQuery
//! arrives. A transaction starts with the first cycle after the session
//! was idle and ends at the ReadyForQuery that makes it idle again.
//!
//! <https://www.postgresql.org/docs/current/protocol-flow.html>

use std::cell::Cell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::Instant;

use tracing::info;

use crate::metrics::{ShardMetrics, TokenLatency, Totals};
use crate::protocol::backend::TAG_READY_FOR_QUERY;
use crate::protocol::{FrameError, FrameVisitor, Framer};
use crate::session::txpool::TxScan;

/// Client messages that belong to a query cycle (and start one when none
/// is open).
const CYCLE_MESSAGES: u128 = mask(b"PBDECQFS");
/// Client messages that each end a cycle: one ReadyForQuery answers each.
const CYCLE_ENDS: u128 = mask(b"QFS");

const fn mask(tags: &[u8]) -> u128 {
    let mut m = 0u128;
    let mut i = 0;
    while i < tags.len() {
        m |= 1 << tags[i];
        i += 1;
    }
    m
}

#[inline]
fn in_mask(mask: u128, tag: u8) -> bool {
    tag < 128 && (mask >> tag) & 1 == 1
}

#[inline]
fn bump(c: &Cell<u64>, n: u64) {
    c.set(c.get() + n);
}

/// A session's numbers, written by its relay and read by the shard (for
/// `/sessions`, scrapes and the session-end audit event). Shard-local.
pub struct SessionStats {
    pub bytes_from_client: Cell<u64>,
    pub bytes_from_server: Cell<u64>,
    /// Query, Sync and FunctionCall messages: each asks for one
    /// ReadyForQuery, so more of these than of those means work in flight.
    pub cycles_asked: Cell<u64>,
    /// ReadyForQuery messages relayed: completed query cycles.
    pub queries: Cell<u64>,
    pub transactions: Cell<u64>,
    /// The last ReadyForQuery's transaction status: `I`, `T` or `E`.
    pub status: Cell<u8>,
}

impl Default for SessionStats {
    fn default() -> Self {
        SessionStats {
            bytes_from_client: Cell::new(0),
            bytes_from_server: Cell::new(0),
            cycles_asked: Cell::new(0),
            queries: Cell::new(0),
            transactions: Cell::new(0),
            // The login's own ReadyForQuery says idle.
            status: Cell::new(b'I'),
        }
    }
}

impl SessionStats {
    pub fn totals(&self) -> Totals {
        Totals {
            bytes_from_client: self.bytes_from_client.get(),
            bytes_from_server: self.bytes_from_server.get(),
            queries: self.queries.get(),
            transactions: self.transactions.get(),
        }
    }

    /// The session's state as pg_stat_activity names it.
    pub fn state(&self) -> &'static str {
        if self.cycles_asked.get() > self.queries.get() {
            return "active";
        }
        match self.status.get() {
            b'T' => "idle in transaction",
            b'E' => "idle in transaction (aborted)",
            _ => "idle",
        }
    }
}

/// Cycles in flight beyond which a pipeline's cycles are counted but not
/// timed, so a client cannot make the relay hold unbounded timestamps.
const MAX_TIMED_CYCLES: usize = 1024;

/// Latency timing for one session: the start of each cycle in flight, in
/// order, matched with ReadyForQuery messages as they come back.
pub struct Timing {
    metrics: Rc<ShardMetrics>,
    token: Option<Rc<TokenLatency>>,
    starts: VecDeque<Instant>,
    /// Cycles opened after `starts` filled up; they are matched (and not
    /// timed) after every timed one, keeping the order.
    untimed: u64,
    in_transaction: bool,
    /// Start of the open transaction's first cycle, when it was timed.
    transaction_start: Option<Instant>,
}

impl Timing {
    pub fn new(metrics: Rc<ShardMetrics>, token: Option<Rc<TokenLatency>>) -> Self {
        Timing {
            metrics,
            token,
            starts: VecDeque::new(),
            untimed: 0,
            in_transaction: false,
            transaction_start: None,
        }
    }

    fn opened(&mut self, cycles: u32, now: Instant) {
        for _ in 0..cycles {
            if self.untimed == 0 && self.starts.len() < MAX_TIMED_CYCLES {
                self.starts.push_back(now);
            } else {
                self.untimed += 1;
            }
        }
    }

    fn ready(&mut self, status: u8, now: Instant) {
        let start = match self.starts.pop_front() {
            Some(s) => Some(s),
            None => {
                self.untimed = self.untimed.saturating_sub(1);
                None
            }
        };
        if let Some(s) = start {
            let took = now.saturating_duration_since(s);
            self.metrics.query.borrow_mut().record(took);
            if let Some(t) = &self.token {
                t.query.borrow_mut().record(took);
            }
        }
        if status == b'I' {
            let first = if self.in_transaction {
                self.transaction_start.take()
            } else {
                start
            };
            self.in_transaction = false;
            if let Some(s) = first {
                let took = now.saturating_duration_since(s);
                self.metrics.transaction.borrow_mut().record(took);
                if let Some(t) = &self.token {
                    t.transaction.borrow_mut().record(took);
                }
            }
        } else if !self.in_transaction {
            self.in_transaction = true;
            self.transaction_start = start;
        }
    }
}

/// The query audit: collects the SQL of Query and Parse messages as their
/// payload passes (never Bind's parameter values) and logs it.
pub struct QueryAudit {
    session: String,
    token_id: String,
    max: usize,
    sql: Vec<u8>,
    state: Capture,
    truncated: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Capture {
    /// Not in a Query or Parse message.
    Off,
    /// In Parse's statement name, before the SQL.
    StatementName,
    Sql,
    /// The SQL's terminating NUL was seen; the rest is not SQL.
    Done,
}

impl QueryAudit {
    pub fn new(session: String, token_id: String, max: usize) -> Self {
        QueryAudit {
            session,
            token_id,
            max,
            sql: Vec::new(),
            state: Capture::Off,
            truncated: false,
        }
    }

    fn start(&mut self, tag: u8) {
        self.state = match tag {
            b'Q' => Capture::Sql,
            b'P' => Capture::StatementName,
            _ => Capture::Off,
        };
        self.sql.clear();
        self.truncated = false;
    }

    fn payload(&mut self, mut bytes: &[u8]) {
        if self.state == Capture::StatementName {
            match memchr::memchr(0, bytes) {
                Some(i) => {
                    bytes = &bytes[i + 1..];
                    self.state = Capture::Sql;
                }
                None => return,
            }
        }
        if self.state != Capture::Sql {
            return;
        }
        let (text, ended) = match memchr::memchr(0, bytes) {
            Some(i) => (&bytes[..i], true),
            None => (bytes, false),
        };
        let room = self.max - self.sql.len();
        if text.len() > room {
            self.sql.extend_from_slice(&text[..room]);
            self.truncated = true;
        } else {
            self.sql.extend_from_slice(text);
        }
        if ended {
            self.state = Capture::Done;
        }
    }

    fn end(&mut self, tag: u8) {
        if self.state == Capture::Off {
            return;
        }
        self.state = Capture::Off;
        // Not `message`: tracing reserves that name for the event's text.
        let message_type = if tag == b'Q' { "Query" } else { "Parse" };
        let sql = utf8_prefix(&self.sql);
        info!(
            target: crate::audit::TARGET,
            parent: None,
            event = "query",
            session = %self.session,
            token_id = %self.token_id,
            message_type,
            sql = %sql,
            truncated = self.truncated,
            "query"
        );
    }
}

/// The text of `bytes`, dropping a character cut in half by truncation
/// and replacing anything else that is not UTF-8.
fn utf8_prefix(bytes: &[u8]) -> std::borrow::Cow<'_, str> {
    match std::str::from_utf8(bytes) {
        Ok(s) => s.into(),
        Err(e) if e.error_len().is_none() => String::from_utf8_lossy(&bytes[..e.valid_up_to()]),
        Err(_) => String::from_utf8_lossy(bytes),
    }
}

/// What the relay tracks of one session.
pub struct Tracks {
    pub client: Framer,
    pub server: Framer,
    pub stats: Rc<SessionStats>,
    cycle_open: bool,
    timing: Option<Timing>,
    audit: Option<Box<QueryAudit>>,
    /// Transaction pooling's reading of the messages.
    pub tx: Option<Box<TxScan>>,
}

impl Tracks {
    pub fn new(
        stats: Rc<SessionStats>,
        timing: Option<Timing>,
        audit: Option<Box<QueryAudit>>,
    ) -> Self {
        Tracks {
            client: Framer::new(),
            server: Framer::new(),
            stats,
            cycle_open: false,
            timing,
            audit,
            tx: None,
        }
    }

    /// Where the relay left the protocol, for the reset of a server
    /// connection that outlives its client. `client_whole` is false when a
    /// write of client bytes to the server was cut short.
    pub fn end_state(
        &self,
        client_whole: bool,
        said_goodbye: bool,
        intact: bool,
    ) -> crate::server::reset::EndState {
        crate::server::reset::EndState {
            client_at_boundary: client_whole && self.client.at_boundary(),
            server_at_boundary: self.server.at_boundary(),
            in_flight: self.in_flight(),
            said_goodbye,
            status: self.stats.status.get(),
            intact,
        }
    }

    /// Query cycles asked for and not answered, or an extended batch
    /// begun without its Sync.
    pub fn in_flight(&self) -> bool {
        self.cycle_open || self.stats.cycles_asked.get() > self.stats.queries.get()
    }

    /// Everything the client asked for is answered, to the last byte.
    pub fn drained(&self) -> bool {
        !self.in_flight() && self.server.at_boundary()
    }

    /// Follows a chunk of client bytes. An error means a corrupt stream:
    /// the session must end.
    #[inline]
    pub fn saw_client(&mut self, chunk: &[u8]) -> Result<(), FrameError> {
        let mut v = ClientVisitor {
            cycle_open: &mut self.cycle_open,
            opened: 0,
            ended: 0,
            audit: self.audit.as_deref_mut(),
            tx: self.tx.as_deref_mut(),
        };
        self.client.scan_with(chunk, &mut v)?;
        let (opened, ended) = (v.opened, v.ended);
        bump(&self.stats.bytes_from_client, chunk.len() as u64);
        if ended > 0 {
            bump(&self.stats.cycles_asked, u64::from(ended));
        }
        if opened > 0 {
            if let Some(t) = &mut self.timing {
                t.opened(opened, Instant::now());
            }
        }
        Ok(())
    }

    /// Follows a chunk of server bytes, likewise.
    #[inline]
    pub fn saw_server(&mut self, chunk: &[u8]) -> Result<(), FrameError> {
        let mut v = ServerVisitor {
            stats: &self.stats,
            timing: self.timing.as_mut(),
            now: None,
            tx: self.tx.as_deref_mut(),
        };
        self.server.scan_with(chunk, &mut v)?;
        bump(&self.stats.bytes_from_server, chunk.len() as u64);
        Ok(())
    }
}

struct ClientVisitor<'a> {
    cycle_open: &'a mut bool,
    opened: u32,
    ended: u32,
    audit: Option<&'a mut QueryAudit>,
    tx: Option<&'a mut TxScan>,
}

impl FrameVisitor for ClientVisitor<'_> {
    #[inline]
    fn start(&mut self, tag: u8) {
        if in_mask(CYCLE_MESSAGES, tag) && !*self.cycle_open {
            *self.cycle_open = true;
            self.opened += 1;
        }
        if in_mask(CYCLE_ENDS, tag) {
            *self.cycle_open = false;
            self.ended += 1;
        }
        if let Some(a) = self.audit.as_deref_mut() {
            a.start(tag);
        }
        if let Some(t) = self.tx.as_deref_mut() {
            t.client_start(tag);
        }
    }

    #[inline]
    fn payload(&mut self, _tag: u8, bytes: &[u8]) {
        if let Some(a) = self.audit.as_deref_mut() {
            a.payload(bytes);
        }
        if let Some(t) = self.tx.as_deref_mut() {
            t.client_payload(bytes);
        }
    }

    #[inline]
    fn end(&mut self, tag: u8, _last_byte: u8) {
        if let Some(a) = self.audit.as_deref_mut() {
            a.end(tag);
        }
        if let Some(t) = self.tx.as_deref_mut() {
            t.client_end();
        }
    }
}

struct ServerVisitor<'a> {
    stats: &'a SessionStats,
    timing: Option<&'a mut Timing>,
    /// Read once per chunk, at its first ReadyForQuery.
    now: Option<Instant>,
    tx: Option<&'a mut TxScan>,
}

impl FrameVisitor for ServerVisitor<'_> {
    #[inline]
    fn start(&mut self, tag: u8) {
        if let Some(t) = self.tx.as_deref_mut() {
            t.server_start(tag);
        }
    }

    #[inline]
    fn payload(&mut self, tag: u8, bytes: &[u8]) {
        if let Some(t) = self.tx.as_deref_mut() {
            t.server_payload(tag, bytes);
        }
    }

    #[inline]
    fn end(&mut self, tag: u8, status: u8) {
        if tag != TAG_READY_FOR_QUERY {
            return;
        }
        bump(&self.stats.queries, 1);
        self.stats.status.set(status);
        if status == b'I' {
            bump(&self.stats.transactions, 1);
        }
        if let Some(t) = self.timing.as_deref_mut() {
            let now = *self.now.get_or_insert_with(Instant::now);
            t.ready(status, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::frame::test_message as msg;
    use std::time::Duration;

    fn ready(status: u8) -> Vec<u8> {
        msg(b'Z', &[status])
    }

    fn tracks(timing: bool) -> (Tracks, Rc<ShardMetrics>) {
        let m = Rc::new(ShardMetrics::new(0, true, None));
        let timing = timing.then(|| Timing::new(m.clone(), None));
        (
            Tracks::new(Rc::new(SessionStats::default()), timing, None),
            m,
        )
    }

    #[test]
    fn extended_cycles_and_transactions_are_counted() {
        let (mut t, m) = tracks(true);
        // BEGIN; two extended cycles; COMMIT: 4 cycles, 1 transaction.
        t.saw_client(&msg(b'Q', b"begin\0")).unwrap();
        t.saw_server(&[msg(b'C', b"BEGIN\0"), ready(b'T')].concat())
            .unwrap();
        assert_eq!(t.stats.state(), "idle in transaction");
        for _ in 0..2 {
            let c = [
                msg(b'P', b"\0select 1\0\0\0"),
                msg(b'B', b"\0\0\0\0\0\0\0\0"),
                msg(b'E', b"\0\0\0\0\0"),
                msg(b'S', b""),
            ]
            .concat();
            t.saw_client(&c).unwrap();
            assert_eq!(t.stats.state(), "active");
            t.saw_server(&ready(b'T')).unwrap();
        }
        t.saw_client(&msg(b'Q', b"commit\0")).unwrap();
        t.saw_server(&ready(b'I')).unwrap();
        assert_eq!(t.stats.queries.get(), 4);
        assert_eq!(t.stats.cycles_asked.get(), 4);
        assert_eq!(t.stats.transactions.get(), 1);
        assert_eq!(t.stats.state(), "idle");
        assert_eq!(m.query.borrow().count(), 4);
        assert_eq!(m.transaction.borrow().count(), 1);
    }

    #[test]
    fn a_pipeline_matches_each_ready_to_its_cycle() {
        let (mut t, m) = tracks(true);
        let one = [msg(b'B', b"x"), msg(b'E', b"y"), msg(b'S', b"")].concat();
        t.saw_client(&[one.clone(), one.clone(), one].concat())
            .unwrap();
        std::thread::sleep(Duration::from_millis(2));
        // The answers come split anywhere.
        let answers = [ready(b'I'), ready(b'I'), ready(b'I')].concat();
        for c in answers.chunks(4) {
            t.saw_server(c).unwrap();
        }
        assert_eq!(t.stats.transactions.get(), 3);
        let q = m.query.borrow();
        assert_eq!(q.count(), 3);
        assert!(q.quantile_us(0.0) >= 2_000, "{}", q.quantile_us(0.0));
    }

    #[test]
    fn copy_data_and_flush_do_not_open_cycles() {
        let (mut t, m) = tracks(true);
        t.saw_client(&msg(b'Q', b"copy t from stdin\0")).unwrap();
        for _ in 0..3 {
            t.saw_client(&msg(b'd', b"1\n")).unwrap();
        }
        t.saw_client(&[msg(b'c', b""), msg(b'H', b"")].concat())
            .unwrap();
        t.saw_server(&ready(b'I')).unwrap();
        assert_eq!(t.stats.state(), "idle");
        assert_eq!(m.query.borrow().count(), 1);
        assert!(t.timing.as_ref().unwrap().starts.is_empty());
    }

    #[test]
    fn deep_pipelines_are_counted_beyond_the_timed_window() {
        let (mut t, m) = tracks(true);
        let n = MAX_TIMED_CYCLES + 10;
        t.saw_client(&msg(b'S', b"").repeat(n)).unwrap();
        t.saw_server(&ready(b'I').repeat(n)).unwrap();
        assert_eq!(t.stats.queries.get(), n as u64);
        assert_eq!(m.query.borrow().count(), MAX_TIMED_CYCLES as u64);
        let timing = t.timing.as_ref().unwrap();
        assert_eq!((timing.starts.len(), timing.untimed), (0, 0));
    }

    #[test]
    fn timing_off_still_counts() {
        let (mut t, m) = tracks(false);
        t.saw_client(&msg(b'Q', b"select 1\0")).unwrap();
        t.saw_server(&ready(b'I')).unwrap();
        assert_eq!(t.stats.queries.get(), 1);
        assert_eq!(m.query.borrow().count(), 0);
    }

    #[test]
    fn query_audit_takes_sql_of_query_and_parse_and_cuts_it() {
        let mut a = QueryAudit::new("0-1".into(), "tok".into(), 8);
        let parse = msg(b'P', b"stmt1\0select 'h\xc3\xa9llo'\0\0\0");
        let mut f = Framer::new();
        let mut v = ClientVisitor {
            cycle_open: &mut false,
            opened: 0,
            ended: 0,
            audit: Some(&mut a),
            tx: None,
        };
        // Split inside the statement name and inside the SQL.
        for c in parse.chunks(3) {
            f.scan_with(c, &mut v).unwrap();
        }
        assert_eq!(a.sql, b"select '");
        assert!(a.truncated);
        a.start(b'Q');
        a.payload(b"sel\xc3");
        assert_eq!(utf8_prefix(&a.sql), "sel");
        a.start(b'B');
        a.payload(b"secret parameter\0");
        assert!(a.sql.is_empty(), "Bind must never be captured");
    }
}
