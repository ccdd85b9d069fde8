//! Which client statements leave state in a server session beyond their
//! transaction, found from the statement text as it passes.
//!
//! Under transaction pooling a client's next transaction may run on
//! another backend. State that outlives a transaction (a session-level
//! `SET` of a parameter the server does not report, `LISTEN`, a session
//! advisory lock, a `WITH HOLD` cursor, a temporary table, SQL `PREPARE`,
//! a role change) would then either be lost
//! to the client or, worse, be found by the next client of that backend.
//! A client that makes any of it is pinned to its backend instead, until
//! it clears that state itself ([`Pins`]): `DISCARD ALL`, or `RESET ALL`
//! for parameters it set by name, in a simple Query outside any
//! transaction block that is the last thing the client sent and that the
//! server answers without an error. That is what a driver's pool sends
//! when it takes a connection back (asyncpg's reset query, say), so a
//! client that made state for a while is pinned only for that while.
//! Nothing else clears: a clear the lexer could misread (a quoted `"all"`,
//! a function's name mentioned but not run) would leak state, a pin kept
//! too long only costs pooling.
//!
//! The scan is a small incremental lexer over the SQL of Query and Parse
//! messages, fed in whatever pieces the socket delivers, holding at most
//! one word: it skips string literals, quoted identifiers, comments and
//! dollar-quoted bodies (in which it still sees function names), splits
//! on top-level `;`, and looks at each statement's leading words. It errs
//! towards pinning: a false alarm costs pooling for one client, a miss
//! could leak state. What it cannot see (a function that runs `SET` by
//! `EXECUTE` of a string, say) is listed in the README.
//!
//! <https://www.postgresql.org/docs/current/sql-commands.html>

#![forbid(unsafe_code)]

use crate::server::is_reported;

/// Why a client keeps its server connection (until it clears the state,
/// see [`Pins`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pin {
    /// `SET` (not `LOCAL`) of a parameter the server does not report.
    Set,
    /// `SET ROLE`, `SET SESSION AUTHORIZATION`.
    Role,
    /// `set_config(...)`, which may be session-wide.
    SetConfig,
    Listen,
    /// SQL-level `PREPARE`.
    Prepare,
    CursorWithHold,
    TempTable,
    AdvisoryLock,
    Load,
    /// A ParameterStatus tollgate could not follow.
    UnknownParameter,
    /// A FunctionCall message: a function called by its OID, unseen.
    FunctionCall,
    /// The server reads the session's SQL otherwise than the scan does:
    /// backslashes escape quotes in plain strings
    /// (`standard_conforming_strings` off), or the client encoding has
    /// characters whose second byte is a backslash. Words the scan takes
    /// for a clear may be inside a string, and the reverse.
    UnreadableSql,
}

impl Pin {
    pub fn as_str(self) -> &'static str {
        match self {
            Pin::Set => "set",
            Pin::Role => "set_role",
            Pin::SetConfig => "set_config",
            Pin::Listen => "listen",
            Pin::Prepare => "sql_prepare",
            Pin::CursorWithHold => "cursor_with_hold",
            Pin::TempTable => "temp_table",
            Pin::AdvisoryLock => "advisory_lock",
            Pin::Load => "load",
            Pin::UnknownParameter => "unknown_parameter",
            Pin::FunctionCall => "function_call",
            Pin::UnreadableSql => "unreadable_sql",
        }
    }
}

/// A set of reasons to pin, and of the reasons a statement clears.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pins(u16);

impl Pins {
    pub const NONE: Pins = Pins(0);
    /// State the lexer knows the kind of but not enough to clear it with
    /// anything short of `DISCARD ALL`: a `SET` in a function body (which
    /// may be `SET ROLE`), a `set_config` whose parameter is not a literal
    /// or is one `RESET ALL` leaves (`role`, `session_authorization`), a
    /// parameter reported that tollgate does not follow.
    const OPAQUE: Pins = Pins(1 << 15);
    /// State a function body seen in the session makes: the function
    /// outlives any clear, and each call makes the state again unseen.
    /// Never cleared.
    const FOREVER: Pins = Pins(1 << 14);
    /// What `RESET ALL` clears: parameters set by name.
    const PARAMETERS: Pins = Pins(1 << Pin::Set as u16 | 1 << Pin::SetConfig as u16);
    /// What `DISCARD ALL` clears: everything but a library loaded and
    /// what functions make.
    const ALL_BUT_LOAD: Pins = Pins(!(1 << Pin::Load as u16 | Pins::FOREVER.0));

    pub fn of(p: Pin) -> Pins {
        Pins(1 << p as u16)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn with(self, other: Pins) -> Pins {
        Pins(self.0 | other.0)
    }

    pub fn without(self, other: Pins) -> Pins {
        Pins(self.0 & !other.0)
    }
}

/// What the scan found since it was last asked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Found {
    /// The first reason to pin found.
    pub first: Option<Pin>,
    /// Every reason found.
    pub pins: Pins,
    /// What statements of simple Queries cleared after the last pin of
    /// each reason: cleared indeed once the server has run them without
    /// an error and the session is outside a transaction block.
    pub clears: Pins,
}

impl Found {
    /// Both, `other` found after `self`.
    pub fn merge(self, other: Found) -> Found {
        Found {
            first: self.first.or(other.first),
            pins: self.pins.with(other.pins),
            clears: self.clears.without(other.pins).with(other.clears),
        }
    }
}

/// Parameters `RESET ALL` leaves as they are (`GUC_NO_RESET_ALL`): a
/// session that set one keeps it.
const NOT_RESET_BY_RESET_ALL: [&str; 6] = [
    "role",
    "session_authorization",
    "seed",
    "transaction_isolation",
    "transaction_read_only",
    "transaction_deferrable",
];

/// Client encodings in which a character's second byte may be a
/// backslash (`0x5c`): the server reads such a character whole, a scan of
/// bytes takes its backslash for an escape in `E'...'`. Postgres accepts
/// them only as client encodings, for this reason (CVE-2006-2314).
const BACKSLASH_IN_CHARACTERS: [&str; 7] = [
    "BIG5",
    "GB18030",
    "GBK",
    "JOHAB",
    "SHIFT_JIS_2004",
    "SJIS",
    "UHC",
];

/// Whether a session where the server reports `name` as `value` has its
/// SQL read otherwise than [`PinScan`] reads it: plain strings with
/// backslash escapes (`standard_conforming_strings` off), or a client
/// encoding in [`BACKSLASH_IN_CHARACTERS`]. Such a session is pinned for
/// good ([`PinScan::pin_unreadable`]).
pub fn reads_sql_otherwise(name: &str, value: &str) -> bool {
    if name.eq_ignore_ascii_case("standard_conforming_strings") {
        return !value.eq_ignore_ascii_case("on");
    }
    name.eq_ignore_ascii_case("client_encoding")
        && BACKSLASH_IN_CHARACTERS
            .iter()
            .any(|e| value.eq_ignore_ascii_case(e))
}

/// Statements that begin, end or mark transactions: a message with one
/// may roll back what it clears.
const TRANSACTION_CONTROL: [&str; 8] = [
    "begin",
    "start",
    "commit",
    "end",
    "rollback",
    "abort",
    "savepoint",
    "release",
];

/// Longest parameter name `set_config` is followed for.
const MAX_ARG: usize = 64;

/// `set_config(`'name'`, ...)`, byte by byte: which parameter it sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arg {
    Off,
    /// After the function's name.
    Name,
    /// After `(`.
    Open,
    /// In the first argument's string literal.
    Literal,
    /// After it: only `,` ends the argument there (`'ro' || 'le'` does
    /// not).
    AfterLiteral,
}

/// Longest word kept: a name qualified by database and schema, each part
/// at most 63 bytes (`NAMEDATALEN`), fits. Longer ones are compared by
/// their first bytes only.
const MAX_WORD: usize = 192;

/// The shortest name [`PinScan::function_name`] looks for
/// (`set_config`): shorter words are none of them.
const SHORTEST_FUNCTION: usize = 10;

/// Longest dollar-quote tag kept. A longer one pins for good: its body's
/// end could not be told from a shorter tag's, and words after it would
/// be read as in the body or the reverse.
const MAX_TAG: usize = 64;

/// Where the lexer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lex {
    Normal,
    /// In a word (identifier or keyword).
    Word,
    /// In '...'; `escapes` for E'...' (backslash escapes).
    Quote {
        escapes: bool,
    },
    /// After a backslash in E'...'.
    QuoteEscape,
    /// Saw the closing quote: another quote right after is an escaped one.
    QuoteEnd {
        escapes: bool,
    },
    /// In "...": a quoted identifier, kept as a word.
    Ident,
    IdentEnd,
    /// After `-`: a comment if another follows.
    Dash,
    LineComment,
    /// After `/`: a comment if `*` follows.
    Slash,
    /// In /* */, nested `depth` deep; `star`/`slash` just seen.
    Block {
        depth: u32,
        star: bool,
        slash: bool,
    },
    /// After `$` at a token start: `$1` or `$tag$`; the tag so far.
    DollarOpen,
    /// In a dollar-quoted body; how much of the closing `$tag$` matched.
    Dollar {
        matched: usize,
    },
}

/// What the statement in progress is, as far as its leading words tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stmt {
    /// Nothing looked for (or already decided).
    Other,
    Start,
    Set,
    SetSession,
    Declare,
    /// `temp`: TEMP before the object's kind; `named`: the kind seen
    /// (TABLE, VIEW, ...); `on_commit`: words of ON COMMIT DROP matched.
    Create {
        temp: bool,
        named: bool,
        on_commit: u8,
    },
    /// DISCARD: ALL clears everything.
    Discard,
    /// DEALLOCATE [PREPARE]: ALL drops every prepared statement.
    Deallocate,
    Reset,
    Select,
}

/// The incremental scan of one client's statement text.
pub struct PinScan {
    lex: Lex,
    word: [u8; MAX_WORD],
    word_len: usize,
    tag: [u8; MAX_TAG],
    tag_len: usize,
    /// The word before, for two-word phrases (`WITH HOLD`, `INTO TEMP`).
    prev: Prev,
    stmt: Stmt,
    found: Found,
    /// A statement dropped every prepared statement of the session.
    discard: bool,
    /// The message is a simple Query (run as it arrives), not a Parse.
    query: bool,
    /// What the message's statements clear so far.
    message_clears: Pins,
    /// The message controls transactions (BEGIN, COMMIT, SAVEPOINT, ...):
    /// what it clears may be rolled back, so it clears nothing.
    controls_transactions: bool,
    arg: Arg,
    arg_name: [u8; MAX_ARG],
    arg_len: usize,
    /// The word in progress is a quoted identifier (`"all"` is no ALL).
    quoted: bool,
    /// The statement in progress says `UPDATE`, and `pg_settings`: an
    /// update of that view runs `set_config`.
    says_update: bool,
    says_pg_settings: bool,
    /// The next word follows `U&`: a name spelled with escapes.
    unicode_next: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Prev {
    Other,
    Without,
    Into,
}

impl Default for PinScan {
    fn default() -> Self {
        PinScan {
            lex: Lex::Normal,
            word: [0; MAX_WORD],
            word_len: 0,
            tag: [0; MAX_TAG],
            tag_len: 0,
            prev: Prev::Other,
            stmt: Stmt::Start,
            found: Found::default(),
            discard: false,
            query: false,
            message_clears: Pins::NONE,
            controls_transactions: false,
            arg: Arg::Off,
            arg_name: [0; MAX_ARG],
            arg_len: 0,
            quoted: false,
            says_update: false,
            says_pg_settings: false,
            unicode_next: false,
        }
    }
}

fn is_word_byte(b: u8) -> bool {
    WORD_BYTES[usize::from(b)]
}

/// [`is_word_byte`] as a table: the scan asks it of every byte of every
/// statement.
static WORD_BYTES: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c == b'.' || c >= 0x80;
        b += 1;
    }
    t
};

impl PinScan {
    /// What a prepared statement's text pins, each time it runs.
    pub fn statement(sql: &[u8]) -> Found {
        let mut scan = PinScan::default();
        scan.begin(false);
        scan.feed(sql);
        scan.finish();
        scan.take()
    }

    /// What was found since the last call.
    pub fn take(&mut self) -> Found {
        std::mem::take(&mut self.found)
    }

    /// Whether a statement since the last call dropped every prepared
    /// statement (`DISCARD ALL`, `DEALLOCATE [PREPARE] ALL`).
    pub fn take_discard(&mut self) -> bool {
        std::mem::take(&mut self.discard)
    }

    /// Notes a reason to pin (the first one found is the one told).
    pub fn pin(&mut self, p: Pin) {
        self.pin_set(p, Pins::of(p));
    }

    /// A parameter the server reported that tollgate does not follow.
    pub fn pin_unknown(&mut self) {
        self.pin_opaque(Pin::UnknownParameter);
    }

    /// A FunctionCall message: what the function does is unseen.
    pub fn pin_function_call(&mut self) {
        self.pin_opaque(Pin::FunctionCall);
    }

    /// The server reads the session's SQL otherwise than the scan does
    /// (see [`reads_sql_otherwise`]), or the scan lost its place (a
    /// dollar-quote tag longer than it keeps): no clear the scan finds can
    /// be trusted any more.
    pub fn pin_unreadable(&mut self) {
        self.pin_forever(Pin::UnreadableSql);
    }

    /// ParameterStatus messages were dropped unread: one may have said
    /// what [`reads_sql_otherwise`] looks for.
    pub fn pin_reports_lost(&mut self) {
        self.pin_forever(Pin::UnknownParameter);
    }

    /// A reason to pin nothing clears (see [`Pins::FOREVER`]).
    fn pin_forever(&mut self, p: Pin) {
        self.pin_set(p, Pins::of(p).with(Pins::OPAQUE).with(Pins::FOREVER));
    }

    /// A client message starts: a clear before it in the same bytes may
    /// be undone by it (a `ROLLBACK` after `BEGIN; RESET ALL`), so only a
    /// clear in the last message counts.
    pub fn message_started(&mut self) {
        self.found.clears = Pins::NONE;
    }

    /// A reason to pin only `DISCARD ALL` clears (see [`Pins::OPAQUE`]).
    fn pin_opaque(&mut self, p: Pin) {
        self.pin_set(p, Pins::of(p).with(Pins::OPAQUE));
    }

    fn pin_set(&mut self, p: Pin, pins: Pins) {
        let f = &mut self.found;
        f.first.get_or_insert(p);
        f.pins = f.pins.with(pins);
        // A clear before it in the text does not clear it.
        f.clears = f.clears.without(pins);
        self.message_clears = self.message_clears.without(pins);
    }

    /// A statement that clears `what`, if the message may clear.
    fn clear(&mut self, what: Pins) {
        self.message_clears = self.message_clears.with(what);
    }

    /// Starts the text of a new message: a simple Query (`query`), whose
    /// statements run as they arrive, or a Parse, whose do not.
    pub fn begin(&mut self, query: bool) {
        self.lex = Lex::Normal;
        self.word_len = 0;
        self.query = query;
        self.message_clears = Pins::NONE;
        self.controls_transactions = false;
        self.arg = Arg::Off;
        self.new_statement();
    }

    /// The message's text ended.
    pub fn finish(&mut self) {
        self.end_word();
        self.end_statement();
        self.lex = Lex::Normal;
        self.arg_failed();
        if self.query && !self.controls_transactions {
            let f = &mut self.found;
            f.clears = f.clears.with(self.message_clears);
        }
        self.message_clears = Pins::NONE;
    }

    fn new_statement(&mut self) {
        self.stmt = Stmt::Start;
        self.prev = Prev::Other;
        self.says_update = false;
        self.says_pg_settings = false;
    }

    fn end_statement(&mut self) {
        if let Stmt::Create {
            temp: true,
            on_commit,
            ..
        } = self.stmt
        {
            // ON COMMIT DROP: gone with the transaction.
            if on_commit != 3 {
                self.pin(Pin::TempTable);
            }
        }
        self.new_statement();
    }

    /// Feeds statement text.
    pub fn feed(&mut self, bytes: &[u8]) {
        let mut rest = bytes;
        while let Some((&b, tail)) = rest.split_first() {
            // Runs that change nothing but the position are taken at once:
            // the rest of a word, of a plain string literal, of a line
            // comment. Their ends go through `byte` as any byte does.
            let run = match self.lex {
                Lex::Word => rest.iter().position(|&c| !is_word_byte(c)),
                Lex::Quote { escapes: false } if self.arg != Arg::Literal => {
                    memchr::memchr(b'\'', rest)
                }
                Lex::LineComment => memchr::memchr(b'\n', rest),
                _ => {
                    self.byte(b);
                    rest = tail;
                    continue;
                }
            };
            let run = run.unwrap_or(rest.len());
            if self.lex == Lex::Word {
                self.push_run(&rest[..run]);
            }
            rest = &rest[run..];
            if let Some((&b, tail)) = rest.split_first() {
                self.byte(b);
                rest = tail;
            }
        }
    }

    fn byte(&mut self, b: u8) {
        match self.lex {
            Lex::Normal => self.token_start(b),
            Lex::Word => {
                if is_word_byte(b) {
                    self.push_word(b);
                } else if b == b'&' && self.ends_in_unicode_prefix() {
                    // U&"...": the name that follows may be spelled with
                    // escapes (qualified too: `pg_catalog.U&"..."`).
                    self.end_word();
                    self.unicode_next = true;
                    self.lex = Lex::Normal;
                    self.token_start(b);
                } else if b == b'\''
                    && self.word_len == 1
                    && self.word[0].eq_ignore_ascii_case(&b'e')
                {
                    // E'...': an escape string, not a word.
                    self.word_len = 0;
                    self.lex = Lex::Quote { escapes: true };
                } else {
                    self.end_word();
                    self.lex = Lex::Normal;
                    self.token_start(b);
                }
            }
            Lex::Quote { escapes } => match b {
                b'\'' => self.lex = Lex::QuoteEnd { escapes },
                b'\\' if escapes => self.lex = Lex::QuoteEscape,
                _ if self.arg == Arg::Literal => {
                    if self.arg_len < MAX_ARG {
                        self.arg_name[self.arg_len] = b;
                    }
                    self.arg_len += 1;
                }
                _ => {}
            },
            Lex::QuoteEscape => self.lex = Lex::Quote { escapes: true },
            Lex::QuoteEnd { escapes } => {
                if b == b'\'' {
                    // A quote in set_config's parameter name: no name.
                    self.arg_failed();
                    self.lex = Lex::Quote { escapes };
                } else {
                    if self.arg == Arg::Literal {
                        self.arg_done();
                    }
                    self.lex = Lex::Normal;
                    self.token_start(b);
                }
            }
            Lex::Ident => {
                if b == b'"' {
                    self.lex = Lex::IdentEnd;
                } else {
                    self.push_word(b);
                }
            }
            Lex::IdentEnd => {
                if b == b'"' {
                    self.push_word(b);
                    self.lex = Lex::Ident;
                } else {
                    self.end_word();
                    self.lex = Lex::Normal;
                    self.token_start(b);
                }
            }
            Lex::Dash => {
                if b == b'-' {
                    self.lex = Lex::LineComment;
                } else {
                    self.lex = Lex::Normal;
                    self.token_start(b);
                }
            }
            Lex::LineComment => {
                if b == b'\n' {
                    self.lex = Lex::Normal;
                }
            }
            Lex::Slash => {
                if b == b'*' {
                    self.lex = Lex::Block {
                        depth: 1,
                        star: false,
                        slash: false,
                    };
                } else {
                    self.lex = Lex::Normal;
                    self.token_start(b);
                }
            }
            Lex::Block { depth, star, slash } => {
                self.lex = if star && b == b'/' {
                    if depth == 1 {
                        Lex::Normal
                    } else {
                        Lex::Block {
                            depth: depth - 1,
                            star: false,
                            slash: false,
                        }
                    }
                } else if slash && b == b'*' {
                    Lex::Block {
                        depth: depth.saturating_add(1),
                        star: false,
                        slash: false,
                    }
                } else {
                    Lex::Block {
                        depth,
                        star: b == b'*',
                        slash: b == b'/',
                    }
                };
            }
            Lex::DollarOpen => {
                if b == b'$' {
                    if self.tag_len > MAX_TAG {
                        self.pin_unreadable();
                    }
                    self.lex = Lex::Dollar { matched: 0 };
                } else if (b.is_ascii_alphanumeric() || b == b'_' || b >= 0x80)
                    && !(self.tag_len == 0 && b.is_ascii_digit())
                {
                    if self.tag_len < MAX_TAG {
                        self.tag[self.tag_len] = b;
                    }
                    self.tag_len += 1;
                } else {
                    // `$1` (a parameter) or a stray `$`.
                    self.lex = Lex::Normal;
                    self.token_start(b);
                }
            }
            Lex::Dollar { matched } => self.dollar_body(b, matched),
        }
    }

    /// The closing `$tag$` is `$`, the tag, `$`; `matched` bytes of it
    /// are behind. Words in the body are looked at for function names.
    fn dollar_body(&mut self, b: u8, matched: usize) {
        let tag_len = self.tag_len.min(MAX_TAG);
        let want = if matched == 0 || matched == tag_len + 1 {
            b'$'
        } else {
            self.tag[matched - 1]
        };
        if b == want {
            if matched == tag_len + 1 {
                self.word_len = 0;
                self.lex = Lex::Normal;
                return;
            }
            self.lex = Lex::Dollar {
                matched: matched + 1,
            };
            return;
        }
        self.lex = Lex::Dollar {
            matched: usize::from(b == b'$'),
        };
        if is_word_byte(b) && b != b'$' {
            self.push_word(b);
        } else if self.word_len > 0 {
            self.body_word();
        }
    }

    fn token_start(&mut self, b: u8) {
        match (self.arg, b) {
            (Arg::Off, _) | (_, b' ' | b'\t' | b'\n' | b'\r') => {}
            (Arg::Name, b'(') => {
                self.arg = Arg::Open;
                return;
            }
            (Arg::Open, b'\'') => {
                self.arg = Arg::Literal;
                self.arg_len = 0;
            }
            (Arg::AfterLiteral, b',') => self.arg = Arg::Off,
            _ => self.arg_failed(),
        }
        match b {
            b'\'' => self.lex = Lex::Quote { escapes: false },
            b'"' => {
                self.word_len = 0;
                self.quoted = true;
                self.lex = Lex::Ident;
            }
            b'-' => self.lex = Lex::Dash,
            b'/' => self.lex = Lex::Slash,
            b'$' => {
                self.tag_len = 0;
                self.lex = Lex::DollarOpen;
            }
            b';' => self.end_statement(),
            _ if is_word_byte(b) => {
                self.word_len = 0;
                self.quoted = false;
                self.push_word(b);
                self.lex = Lex::Word;
            }
            _ => {}
        }
    }

    /// The word so far is `U`, or ends in `.U`: with a `&` next, the
    /// start of a name spelled with escapes.
    fn ends_in_unicode_prefix(&self) -> bool {
        if self.word_len > MAX_WORD {
            return false;
        }
        let w = &self.word[..self.word_len];
        let u = w.last().is_some_and(|c| c.eq_ignore_ascii_case(&b'u'));
        u && (w.len() == 1 || w[w.len() - 2] == b'.')
    }

    fn push_word(&mut self, b: u8) {
        if self.word_len < MAX_WORD {
            self.word[self.word_len] = b;
        }
        self.word_len += 1;
    }

    /// [`push_word`](Self::push_word) for each of `run`.
    fn push_run(&mut self, run: &[u8]) {
        let kept = self.word_len.min(MAX_WORD);
        let room = (MAX_WORD - kept).min(run.len());
        self.word[kept..kept + room].copy_from_slice(&run[..room]);
        self.word_len += run.len();
    }

    fn end_word(&mut self) {
        if self.word_len == 0 {
            return;
        }
        let len = self.word_len.min(MAX_WORD);
        // A copy of the whole array, of a size known when compiled: fewer
        // instructions than zeroing a buffer and copying the word into it.
        let w = self.word;
        self.word_len = 0;
        self.word(&w[..len]);
    }

    /// A word inside a dollar-quoted body (a DO block's or a function's,
    /// which may run now): function names, and the words of statements
    /// that make session state, pin whatever surrounds them. A function
    /// definition that mentions them pins too, wrongly but safely.
    fn body_word(&mut self) {
        let len = self.word_len.min(MAX_WORD);
        let w = self.word;
        self.word_len = 0;
        let w = &w[..len];
        self.function_name(w, true);
        let is = |k: &str| w.eq_ignore_ascii_case(k.as_bytes());
        if is("temp")
            || is("temporary")
            || (w.len() > 8 && w[..8].eq_ignore_ascii_case(b"pg_temp."))
        {
            self.pin_forever(Pin::TempTable);
        } else if is("listen") {
            self.pin_forever(Pin::Listen);
        } else if is("set") {
            // Any SET, `UPDATE ... SET` too: erring towards pinning.
            self.pin_forever(Pin::Set);
        }
    }

    /// `set_config`'s first argument was not a string literal.
    fn arg_failed(&mut self) {
        if self.arg != Arg::Off {
            self.arg = Arg::Off;
            self.pin_opaque(Pin::SetConfig);
        }
    }

    /// `set_config`'s first argument, a string literal, ended: a parameter
    /// `RESET ALL` leaves makes its pin opaque.
    fn arg_done(&mut self) {
        self.arg = Arg::Off;
        let name = &self.arg_name[..self.arg_len.min(MAX_ARG)];
        let kept = NOT_RESET_BY_RESET_ALL
            .iter()
            .any(|k| name.eq_ignore_ascii_case(k.as_bytes()));
        if kept || self.arg_len > MAX_ARG {
            self.pin_opaque(Pin::SetConfig);
        } else {
            self.arg = Arg::AfterLiteral;
        }
    }

    fn function_name(&mut self, w: &[u8], in_body: bool) {
        if w.len() < SHORTEST_FUNCTION {
            return;
        }
        // Schema-qualified or not.
        let name = match w.iter().rposition(|b| *b == b'.') {
            Some(i) => &w[i + 1..],
            None => w,
        };
        const LOCKS: [&[u8]; 4] = [
            b"pg_advisory_lock",
            b"pg_advisory_lock_shared",
            b"pg_try_advisory_lock",
            b"pg_try_advisory_lock_shared",
        ];
        if name.eq_ignore_ascii_case(b"set_config") {
            if in_body {
                self.pin_forever(Pin::SetConfig);
            } else {
                // Which parameter: its literal follows.
                self.pin(Pin::SetConfig);
                self.arg = Arg::Name;
            }
        } else if LOCKS.iter().any(|l| name.eq_ignore_ascii_case(l)) {
            if in_body {
                self.pin_forever(Pin::AdvisoryLock);
            } else {
                self.pin(Pin::AdvisoryLock);
            }
        }
    }

    /// A word at the top level of the statement in progress.
    fn word(&mut self, w: &[u8]) {
        self.function_name(w, false);
        let is = |k: &str| w.eq_ignore_ascii_case(k.as_bytes());
        self.pg_settings_word(w);
        match self.stmt {
            Stmt::Start => {
                self.stmt = Stmt::Other;
                if is("set") {
                    self.stmt = Stmt::Set;
                } else if is("listen") {
                    self.pin(Pin::Listen);
                } else if is("prepare") {
                    self.pin(Pin::Prepare);
                } else if is("load") {
                    self.pin(Pin::Load);
                } else if is("declare") {
                    self.stmt = Stmt::Declare;
                } else if is("create") {
                    self.stmt = Stmt::Create {
                        temp: false,
                        named: false,
                        on_commit: 0,
                    };
                } else if is("select") || is("with") {
                    self.stmt = Stmt::Select;
                } else if is("discard") {
                    self.stmt = Stmt::Discard;
                } else if is("deallocate") {
                    self.stmt = Stmt::Deallocate;
                } else if is("reset") {
                    self.stmt = Stmt::Reset;
                } else if TRANSACTION_CONTROL.iter().any(|k| is(k)) {
                    self.controls_transactions = true;
                }
            }
            Stmt::Set => {
                self.stmt = Stmt::Other;
                if is("local") || is("transaction") || is("constraints") || is("time") {
                    // Ends with the transaction, or TimeZone (reported).
                } else if is("session") {
                    self.stmt = Stmt::SetSession;
                } else if is("role") {
                    self.pin(Pin::Role);
                } else {
                    self.set_parameter(w);
                }
            }
            Stmt::SetSession => {
                self.stmt = Stmt::Other;
                if is("authorization") || is("role") {
                    self.pin(Pin::Role);
                } else if is("characteristics") {
                    self.pin(Pin::Set);
                } else if !is("time") {
                    self.set_parameter(w);
                }
            }
            Stmt::Declare => {
                if is("hold") && self.prev != Prev::Without {
                    self.pin(Pin::CursorWithHold);
                }
            }
            Stmt::Create {
                temp,
                named,
                on_commit,
            } => {
                // CREATE [OR REPLACE] [LOCAL|GLOBAL] TEMP[ORARY] TABLE ...
                let in_pg_temp = w.len() > 8 && w[..8].eq_ignore_ascii_case(b"pg_temp.");
                let temp = temp || (!named && (is("temp") || is("temporary"))) || in_pg_temp;
                let named = named || !(is("or") || is("replace") || is("local") || is("global"));
                // ON COMMIT DROP, word by word.
                let on_commit = match on_commit {
                    3 => 3,
                    1 if is("commit") => 2,
                    2 if is("drop") => 3,
                    _ if is("on") => 1,
                    _ => 0,
                };
                self.stmt = Stmt::Create {
                    temp,
                    named,
                    on_commit,
                };
            }
            Stmt::Discard => {
                self.stmt = Stmt::Other;
                if is("all") && !self.quoted {
                    self.discard = true;
                    self.clear(Pins::ALL_BUT_LOAD);
                }
            }
            Stmt::Deallocate => {
                // DEALLOCATE [PREPARE] ALL (`"all"` is a statement's name).
                if is("all") && !self.quoted {
                    self.discard = true;
                    self.stmt = Stmt::Other;
                } else if !is("prepare") || self.quoted {
                    self.stmt = Stmt::Other;
                }
            }
            Stmt::Reset => {
                self.stmt = Stmt::Other;
                if is("all") && !self.quoted {
                    self.clear(Pins::PARAMETERS);
                }
            }
            Stmt::Select => {
                if self.prev == Prev::Into && (is("temp") || is("temporary")) {
                    self.pin(Pin::TempTable);
                }
            }
            Stmt::Other => {}
        }
        self.prev = if is("without") {
            Prev::Without
        } else if is("into") {
            Prev::Into
        } else {
            Prev::Other
        };
    }

    /// `UPDATE pg_settings SET setting = ...` is `set_config` (the view's
    /// rule calls it), for any parameter: `UPDATE` and `pg_settings` in
    /// one statement (a CTE's update too) pin as `set_config` of an
    /// unknown name does.
    fn pg_settings_word(&mut self, w: &[u8]) {
        // `U&"pg\005fsettings"` may be it.
        let escaped = std::mem::take(&mut self.unicode_next) && self.quoted;
        if !escaped && w.len() < b"update".len() {
            return;
        }
        let name = match w.iter().rposition(|b| *b == b'.') {
            Some(i) => &w[i + 1..],
            None => w,
        };
        if !self.quoted && w.eq_ignore_ascii_case(b"update") {
            self.says_update = true;
        } else if escaped || name.eq_ignore_ascii_case(b"pg_settings") {
            self.says_pg_settings = true;
        } else {
            return;
        }
        if self.says_update && self.says_pg_settings {
            self.pin_opaque(Pin::SetConfig);
        }
    }

    fn set_parameter(&mut self, name: &[u8]) {
        // A quoted name may be spelled with escapes: `U&"rol\0065"` (whose
        // first word is `U`).
        if self.quoted
            || name.eq_ignore_ascii_case(b"u")
            || NOT_RESET_BY_RESET_ALL
                .iter()
                .any(|k| name.eq_ignore_ascii_case(k.as_bytes()))
        {
            self.pin_opaque(Pin::Set);
            return;
        }
        let reported = std::str::from_utf8(name).is_ok_and(is_reported);
        if !reported {
            self.pin(Pin::Set);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a simple Query of `sql` is found to pin and clear.
    fn found(sql: &str) -> Found {
        // Fed byte by byte: the pieces a socket delivers can split anything.
        let mut s = PinScan::default();
        s.begin(true);
        for b in sql.as_bytes() {
            s.feed(std::slice::from_ref(b));
        }
        s.finish();
        let whole = {
            let mut w = PinScan::default();
            w.begin(true);
            w.feed(sql.as_bytes());
            w.finish();
            w.take()
        };
        let piecewise = s.take();
        assert_eq!(piecewise, whole, "{sql}");
        piecewise
    }

    fn scan(sql: &str) -> Option<Pin> {
        found(sql).first
    }

    /// What [`PinScan::feed`] finds, fed `pieces`, against the scan one
    /// byte at a time through `byte` alone: the runs `feed` takes at once
    /// must change nothing.
    fn against_bytewise(sql: &[u8], cuts: &[usize]) {
        let mut reference = PinScan::default();
        reference.begin(true);
        for &b in sql {
            reference.byte(b);
        }
        reference.finish();
        let mut fed = PinScan::default();
        fed.begin(true);
        let mut at = 0;
        for &cut in cuts.iter().chain([&sql.len()]) {
            let cut = cut.clamp(at, sql.len());
            fed.feed(&sql[at..cut]);
            at = cut;
        }
        fed.finish();
        assert_eq!(
            fed.take(),
            reference.take(),
            "{}",
            String::from_utf8_lossy(sql)
        );
        assert_eq!(fed.take_discard(), reference.take_discard());
    }

    proptest::proptest! {
        #[test]
        fn runs_taken_at_once_scan_as_bytes_do(
            tokens in proptest::collection::vec(proptest::sample::select(vec![
                "select", "set", "session", "create", "temp", "table", "on", "commit",
                "drop", "discard", "all", "listen", "declare", "with", "hold",
                "set_config", "pg_advisory_lock", "update", "pg_settings", "U&",
                "pg_catalog.", "search_path", "'", "''", "e'", "\\", "\"", "--",
                "\n", "/*", "*/", "$$", "$t$", "$1", "(", ",", ";", " ", "x", "é",
            ]), 0..40),
            cuts in proptest::collection::vec(0usize..200, 0..6),
        ) {
            let sql: String = tokens.concat();
            let mut cuts = cuts;
            cuts.sort_unstable();
            against_bytewise(sql.as_bytes(), &cuts);
        }
    }

    #[test]
    fn a_word_longer_than_kept_scans_as_bytes_do() {
        let long = format!(
            "set {} = 1; set_config('a', 'b', false)",
            "x".repeat(MAX_WORD + 9)
        );
        against_bytewise(long.as_bytes(), &[3, 7, MAX_WORD, MAX_WORD + 20]);
    }

    /// The reasons a client pinned by `pins` (simple Queries, one by one)
    /// is still pinned for after `clears` ran.
    fn left_after(pins: &[&str], clears: &str) -> Pins {
        let made = pins
            .iter()
            .fold(Pins::NONE, |all, sql| all.with(found(sql).pins));
        made.without(found(clears).clears)
    }

    #[test]
    fn a_client_that_clears_what_it_made_is_pinned_no_more() {
        // asyncpg's type introspection, then its pool's reset query.
        let introspection = [
            "SELECT current_setting('jit') AS cur, set_config('jit', 'off', false) AS new",
            "SELECT set_config('jit', $1, false)",
        ];
        let reset = "SELECT pg_advisory_unlock_all();\nCLOSE ALL;\nUNLISTEN *;\nRESET ALL;";
        assert!(left_after(&introspection, reset).is_empty());
        let cases: [(&[&str], &str); 7] = [
            (&["set work_mem = '1MB'"], "reset all"),
            (
                &["select set_config('app.tenant', '7', false)"],
                "RESET ALL",
            ),
            (
                &["listen jobs", "select pg_advisory_lock(1)"],
                "discard all",
            ),
            (&["declare c cursor with hold for select 1"], "discard all"),
            (
                &["prepare p as select 1", "create temp table t(x int)"],
                "discard all",
            ),
            (
                &["set role other", "listen x", "set work_mem = 1"],
                "DISCARD ALL",
            ),
            (
                &["select set_config('role', 'other', false)"],
                "discard all",
            ),
        ];
        for (pins, clears) in cases {
            assert!(!found(pins[0]).pins.is_empty(), "{pins:?}");
            assert_eq!(
                left_after(pins, clears),
                Pins::NONE,
                "{pins:?} then {clears}"
            );
        }
    }

    #[test]
    fn what_a_clear_leaves_keeps_the_client_pinned() {
        let cases: [(&str, &str); 22] = [
            // RESET ALL leaves the role, and so what may have set it.
            ("set role other", "reset all"),
            ("set session authorization other", "reset all"),
            ("select set_config('role', 'other', false)", "reset all"),
            ("select set_config('ROLE', 'other', false)", "reset all"),
            ("select set_config($1, 'other', false)", "reset all"),
            (
                "select set_config('ro' || 'le', 'other', false)",
                "reset all",
            ),
            ("select set_config('ro'\n'le', 'other', false)", "reset all"),
            ("select set_config(E'role', 'other', false)", "reset all"),
            ("set session_authorization = 'other'", "reset all"),
            ("set U&\"rol\\0065\" = 'other'", "reset all"),
            // Only RESET ALL and DISCARD ALL clear.
            ("listen jobs", "reset all"),
            ("listen jobs", "unlisten *"),
            (
                "select pg_advisory_lock(7)",
                "select pg_advisory_unlock_all()",
            ),
            ("declare c cursor with hold for select 1", "close all"),
            ("prepare p as select 1", "deallocate all"),
            ("create temp table t(x int)", "discard temp"),
            // A quoted "all" is a name.
            ("set work_mem = 1", "reset \"all\""),
            ("listen x", "discard \"all\""),
            // Nothing unloads a library, or a function seen made.
            ("load 'auto_explain'", "discard all"),
            (
                "create function f() returns void language sql as $$ select pg_advisory_lock(7) $$",
                "discard all",
            ),
            ("do $$ begin set role other; end $$", "discard all"),
            // Cleared, then made again in the same message.
            ("set work_mem = 1", "reset all; set work_mem = 2"),
        ];
        for (pin, clears) in cases {
            assert!(!found(pin).pins.is_empty(), "{pin}");
            assert!(
                !left_after(&[pin], clears).is_empty(),
                "{pin} then {clears}"
            );
        }
    }

    #[test]
    fn only_a_clear_in_the_last_message_counts() {
        // BEGIN, RESET ALL, ROLLBACK as three pipelined Queries.
        let mut s = PinScan::default();
        for sql in ["begin", "reset all", "rollback"] {
            s.message_started();
            s.begin(true);
            s.feed(sql.as_bytes());
            s.finish();
        }
        assert_eq!(s.take().clears, Pins::NONE);
        let mut s = PinScan::default();
        s.message_started();
        s.begin(true);
        s.feed(b"reset all");
        s.finish();
        assert_eq!(s.take().clears, Pins::PARAMETERS);
    }

    #[test]
    fn only_a_simple_query_outside_transaction_control_clears() {
        for sql in [
            "begin; reset all",
            "reset all; rollback",
            "savepoint s; discard all",
            "select 'reset all'",
            "/* reset all */ select 1",
        ] {
            assert_eq!(found(sql).clears, Pins::NONE, "{sql}");
        }
        // A Parse runs nothing: its statement may never be executed.
        let mut s = PinScan::default();
        s.begin(false);
        s.feed(b"discard all");
        s.finish();
        assert_eq!(s.take().clears, Pins::NONE);
        // A clear made before a pin of its kind in the same text does not
        // clear it.
        let f = found("reset all; set work_mem = 1");
        assert_eq!(f.clears, Pins::PARAMETERS.without(Pins::of(Pin::Set)));
        assert_eq!(f.pins, Pins::of(Pin::Set));
    }

    #[test]
    fn session_state_pins() {
        let cases = [
            ("set statement_timeout = 0", Pin::Set),
            ("SET search_path TO app, public", Pin::Set),
            ("set session work_mem = '1MB'", Pin::Set),
            ("set myapp.tenant = 7", Pin::Set),
            ("set \"work_mem\" = '1MB'", Pin::Set),
            (
                "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
                Pin::Set,
            ),
            ("set role other", Pin::Role),
            ("set session authorization other", Pin::Role),
            ("select set_config('x.y', '1', false)", Pin::SetConfig),
            ("select pg_catalog.pg_advisory_lock(1)", Pin::AdvisoryLock),
            (
                "SELECT PG_TRY_ADVISORY_LOCK_SHARED(1, 2)",
                Pin::AdvisoryLock,
            ),
            ("listen jobs", Pin::Listen),
            ("prepare p as select 1", Pin::Prepare),
            ("load 'auto_explain'", Pin::Load),
            (
                "declare c cursor with hold for select 1",
                Pin::CursorWithHold,
            ),
            ("create temp table t(x int)", Pin::TempTable),
            ("CREATE LOCAL TEMPORARY TABLE t AS SELECT 1", Pin::TempTable),
            ("create or replace temp view v as select 1", Pin::TempTable),
            ("select 1 into temp t", Pin::TempTable),
            ("select 1; set work_mem = '2MB'", Pin::Set),
            (
                "do $$ begin perform pg_advisory_lock(1); end $$",
                Pin::AdvisoryLock,
            ),
            (
                "do $f$ begin perform set_config('a.b', '1', false); end $f$",
                Pin::SetConfig,
            ),
            // The view's update rule calls set_config.
            (
                "update pg_settings set setting = 'x' where name = 'role'",
                Pin::SetConfig,
            ),
            (
                "UPDATE pg_catalog.\"pg_settings\" SET setting = '0' WHERE name = 'jit'",
                Pin::SetConfig,
            ),
            (
                "with u as (update pg_settings set setting = '1' where name = 'jit' returning 1) select * from u",
                Pin::SetConfig,
            ),
        ];
        for (sql, want) in cases {
            assert_eq!(scan(sql), Some(want), "{sql}");
        }
        // A name spelled with escapes may be pg_settings.
        for sql in [
            "update U&\"pg\\005fsettings\" set setting = 'x' where name = 'role'",
            "update pg_catalog.U&\"pg\\005fsettings\" set setting = 'x' where name = 'role'",
            "update \"pg_catalog\".u&\"pg\\005fsettings\" set setting = 'x' where name = 'role'",
        ] {
            assert_eq!(scan(sql), Some(Pin::SetConfig), "{sql}");
        }
        // A name qualified with a long database name is read whole.
        let long = format!("select {}.pg_catalog.pg_advisory_lock(1)", "d".repeat(63));
        assert_eq!(scan(&long), Some(Pin::AdvisoryLock));
        // As opaque as a set_config of an unknown name: RESET ALL leaves
        // it (it may have been `role`).
        assert!(!left_after(
            &["update pg_settings set setting = 'x' where name = 'role'"],
            "reset all"
        )
        .is_empty());
        assert!(left_after(
            &["update pg_settings set setting = 'x' where name = 'role'"],
            "discard all"
        )
        .is_empty());
    }

    #[test]
    fn sessions_whose_sql_the_scan_cannot_read_are_told_apart() {
        for (name, value, otherwise) in [
            ("standard_conforming_strings", "on", false),
            ("standard_conforming_strings", "off", true),
            ("client_encoding", "UTF8", false),
            ("client_encoding", "LATIN1", false),
            ("client_encoding", "SJIS", true),
            ("CLIENT_ENCODING", "big5", true),
            ("client_encoding", "GB18030", true),
            ("client_encoding", "SHIFT_JIS_2004", true),
            ("TimeZone", "off", false),
        ] {
            assert_eq!(
                reads_sql_otherwise(name, value),
                otherwise,
                "{name} {value}"
            );
        }
        // What it would hide: with backslashes escaping quotes, the
        // server runs this DISCARD ALL nowhere, the scan sees it run.
        let mut s = PinScan::default();
        s.pin(Pin::Listen);
        s.pin_unreadable();
        let made = s.take().pins;
        assert!(!made
            .without(found("select 'a\\'; discard all; --'").clears)
            .is_empty());
        // A dollar-quote tag longer than the scan keeps: where its body
        // ends cannot be told, so nothing the message clears is trusted.
        let tag = "t".repeat(70);
        let sql = format!("select ${tag}$ x ${}$; discard all; ${tag}$", &tag[..64]);
        let f = found(&sql);
        assert_eq!(f.first, Some(Pin::UnreadableSql));
        assert!(!f.pins.without(f.clears).is_empty());
    }

    #[test]
    fn what_ends_with_the_transaction_does_not() {
        let cases = [
            "select 1",
            "set local work_mem = '1MB'",
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "set constraints all deferred",
            "set application_name = 'x'",
            "SET TimeZone TO 'UTC'",
            "set time zone 'UTC'",
            "set session timezone = 'UTC'",
            "set datestyle = 'ISO, DMY'",
            "select pg_advisory_xact_lock(1)",
            "declare c cursor without hold for select 1",
            "create temp table t(x int) on commit drop",
            "create table temp(x int)",
            "update t set x = 1",
            "select name, setting from pg_settings where name = 'jit'",
            "alter role app set work_mem = '1MB'",
            "select 'set work_mem = 0; listen x'",
            "select E'it\\'s; listen x'",
            "select 'a''; listen x'",
            "select 1 -- ; listen x\n",
            "select /* ; listen /* nested */ x */ 1",
            "select \"listen\" from t",
            "create function f() returns int language sql set search_path = public as $b$ select 1 $b$",
            "select $1::int",
            "reset all",
            "discard all",
            "unlisten *",
            "deallocate all",
            "select pg_advisory_lock_fake(1)",
        ];
        for sql in cases {
            assert_eq!(scan(sql), None, "{sql}");
        }
    }

    #[test]
    fn discard_all_and_deallocate_all_are_seen() {
        for (sql, want) in [
            ("discard all", true),
            ("DEALLOCATE PREPARE ALL", true),
            ("deallocate all", true),
            ("deallocate s1", false),
            ("discard plans", false),
            ("select 'discard all'", false),
        ] {
            let mut s = PinScan::default();
            s.begin(true);
            s.feed(sql.as_bytes());
            s.finish();
            assert_eq!(s.take_discard(), want, "{sql}");
        }
    }

    #[test]
    fn statements_restart_after_each_message() {
        let mut s = PinScan::default();
        s.begin(true);
        s.feed(b"select 'unterminated");
        s.finish();
        s.begin(true);
        s.feed(b"listen x");
        s.finish();
        assert_eq!(s.take().first, Some(Pin::Listen));
        assert_eq!(s.take().first, None);
    }
}
