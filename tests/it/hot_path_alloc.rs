//! The relay allocates nothing per message: the proxy runs in this process
//! under a counting allocator, and a steady stream of queries through it,
//! plain or over TLS, session- or transaction-pooled (a connection lent
//! and taken back per query), must not raise the count (house style rule
//! 4). The
//! client's own allocations (its TLS library's) are not counted: the
//! client thread marks itself.
//!
//! The allocator is the whole test binary's, and the other areas' tests
//! allocate on their own threads meanwhile, so the measurement runs in a
//! process of its own: the test re-runs this binary for itself alone, and
//! that process, told so by its environment, measures, with counting
//! switched on there only.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tollgate::auth::live::LiveStore;
use tollgate::auth::{token, TokenRecord, TokenStore};
use tollgate::cluster::{Cluster, ClusterOptions};
use tollgate::config::Config;
use tollgate::protocol::Framer;
use tollgate::session::{Settings, Shared};

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
/// On only in the measuring process: elsewhere the allocator is the
/// system's plus one relaxed load.
static COUNTING: AtomicBool = AtomicBool::new(false);

/// Set in the environment of the process that measures.
const MEASURE_ENV: &str = "TOLLGATE_TEST_COUNT_ALLOCATIONS";

thread_local! {
    /// Set on the client's thread: its allocations are not the proxy's.
    static CLIENT_THREAD: Cell<bool> = const { Cell::new(false) };
}

fn count() {
    if COUNTING.load(Ordering::Relaxed) && !CLIENT_THREAD.with(Cell::get) {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: defers to the system allocator; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// Reads until `want` ReadyForQuery messages have arrived, into `buf`;
/// returns whether `needle` was in one read.
fn read_until_ready(
    s: &mut dyn Read,
    framer: &mut Framer,
    buf: &mut [u8],
    mut want: u32,
    needle: &[u8],
) -> bool {
    let mut seen = false;
    while want > 0 {
        let n = match s.read(buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => panic!("read: {e}"),
        };
        assert!(n > 0, "proxy closed the connection");
        let scan = framer.scan(&buf[..n]).unwrap();
        want = want.saturating_sub(scan.tagged);
        seen |= !needle.is_empty() && buf[..n].windows(needle.len()).any(|w| w == needle);
    }
    seen
}

#[test]
fn relaying_queries_allocates_nothing() {
    in_a_process_of_its_own("relaying_queries_allocates_nothing", false, false);
}

#[test]
fn relaying_queries_over_tls_allocates_nothing() {
    in_a_process_of_its_own("relaying_queries_over_tls_allocates_nothing", true, false);
}

/// Under transaction pooling every query is a transaction of its own: a
/// connection lent and taken back per round trip, which must not
/// allocate either.
#[test]
fn lending_a_connection_per_transaction_allocates_nothing() {
    in_a_process_of_its_own(
        "lending_a_connection_per_transaction_allocates_nothing",
        false,
        true,
    );
}

/// The same with TLS on both legs: the client's records and the lent
/// server connection's.
#[test]
fn lending_a_tls_connection_per_transaction_allocates_nothing() {
    in_a_process_of_its_own(
        "lending_a_tls_connection_per_transaction_allocates_nothing",
        true,
        true,
    );
}

fn in_a_process_of_its_own(test: &str, tls: bool, transaction: bool) {
    if std::env::var_os(MEASURE_ENV).is_some() {
        // This is the process of its own: measure here.
        return measure(tls, transaction);
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            &format!("hot_path_alloc::{test}"),
            "--nocapture",
            "--test-threads=1",
        ])
        .env(MEASURE_ENV, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprint!("{stderr}");
    assert!(out.status.success(), "{stdout}{stderr}");
    // The filter matched this test, and the process of its own measured.
    assert!(stdout.contains("1 passed"), "{stdout}");
    assert!(stderr.contains("allocations for"), "{stderr}");
}

/// Runs the proxy in this process, sends a steady stream of queries
/// through it, and counts the allocations the stream makes.
fn measure(tls: bool, transaction: bool) {
    CLIENT_THREAD.with(|c| c.set(true));
    let serving = crate::harness::ServingCert::new("alloc CA", &["localhost"]);
    // Over TLS, TLS on both legs: the server's records go through the
    // same record layer as the client's.
    let (pg_cert, pg_key) = serving.ca.leaf(&["localhost"]);
    let pg_cert = serving.files.write("pg.crt", &pg_cert, false);
    let pg_key = serving.files.write_server_key("pg.key", &pg_key);
    let cluster = Cluster::start(&ClusterOptions {
        extra_conf: if tls {
            crate::harness::pg_ssl_conf(&pg_cert, &pg_key)
        } else {
            Vec::new()
        },
        ..ClusterOptions::default()
    })
    .unwrap();
    let (tls_table, upstream_tls) = if tls {
        (serving.table("require"), "tls = \"require\"\n")
    } else {
        (String::new(), "")
    };
    let pool = if transaction {
        "[pool]\nmode = \"transaction\"\nmax_server_connections = 1\n"
    } else {
        ""
    };
    let dir = tempfile::tempdir().unwrap();
    let t = token::generate();
    let mut store = TokenStore::default();
    store.insert(TokenRecord::new(
        t.id.clone(),
        "app".into(),
        vec!["*".into()],
        t.secret_sha256,
        SystemTime::now(),
    ));
    store.save(&dir.path().join("tokens.toml")).unwrap();
    let config_path = dir.path().join("tollgate.toml");
    std::fs::write(
        &config_path,
        format!(
            "listen = \"127.0.0.1:0\"\nworkers = 1\n[upstream]\nhost = \"127.0.0.1\"\nport = {}\n{upstream_tls}\
             [[upstream.credentials]]\nuser = \"app\"\npassword = \"{}\"\n[tokens]\nfile = \"tokens.toml\"\n\
             [admin]\nlisten = \"127.0.0.1:0\"\nper_token_metrics = true\n{pool}{tls_table}",
            cluster.port(),
            cluster.password()
        ),
    )
    .unwrap();
    let config = Config::load(&config_path).unwrap();
    let live = LiveStore::load(config.tokens_file().unwrap()).unwrap();
    // Latency histograms and per-token series on: timing must not
    // allocate per message either.
    assert!(config.admin.as_ref().is_some_and(|a| a.latency_histograms));
    let server_tls = config
        .tls
        .as_ref()
        .map(|t| tollgate::tls::ServerTls::load(&t.cert, &t.key).unwrap());
    let settings = Settings::new(config).unwrap();
    let shared = Shared::new(settings, live, None, server_tls, None);
    let shards = tollgate::shard::start(Arc::new(shared)).unwrap();

    let mut s: Box<dyn ReadWrite> = if tls {
        Box::new(crate::harness::tls_connect(shards.local_addr, &serving.ca))
    } else {
        let sock = TcpStream::connect(shards.local_addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Box::new(sock)
    };
    let mut startup = bytes::BytesMut::new();
    tollgate::protocol::startup::encode_startup_message(
        &mut startup,
        tollgate::protocol::startup::ProtocolVersion::V3_0,
        [("user", "app"), ("database", "appdb")],
    );
    s.write_all(&startup).unwrap();
    s.flush().unwrap();
    let mut head = [0u8; 9];
    s.read_exact(&mut head).unwrap(); // AuthenticationCleartextPassword
    let mut password = bytes::BytesMut::new();
    postgres_protocol::message::frontend::password_message(t.token.expose(), &mut password)
        .unwrap();
    s.write_all(&password).unwrap();
    s.flush().unwrap();
    let mut framer = Framer::counting(b'Z');
    let mut buf = vec![0u8; 64 * 1024];
    read_until_ready(&mut *s, &mut framer, &mut buf, 1, b"");

    // The server leg is what the test says it is.
    let mut ssl = bytes::BytesMut::new();
    postgres_protocol::message::frontend::query(
        "select ssl::text from pg_stat_ssl where pid = pg_backend_pid()",
        &mut ssl,
    )
    .unwrap();
    s.write_all(&ssl).unwrap();
    s.flush().unwrap();
    let row = |v: &[u8]| {
        [
            &b"D\0\0\0"[..],
            &[10 + v.len() as u8],
            b"\0\x01\0\0\0",
            &[v.len() as u8],
            v,
        ]
        .concat()
    };
    let expected = if tls { row(b"true") } else { row(b"false") };
    assert!(
        read_until_ready(&mut *s, &mut framer, &mut buf, 1, &expected),
        "the server leg's TLS is not {tls}"
    );

    // A simple query whose answer spans several messages.
    let mut query = bytes::BytesMut::new();
    postgres_protocol::message::frontend::query("select g from generate_series(1,5) g", &mut query)
        .unwrap();
    let mut round_trips = |n: u32| {
        for _ in 0..n {
            s.write_all(&query).unwrap();
            s.flush().unwrap();
            read_until_ready(&mut *s, &mut framer, &mut buf, 1, b"");
        }
    };
    round_trips(500); // warm up buffers, slabs and caches
    COUNTING.store(true, Ordering::Relaxed);
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    let began = std::time::Instant::now();
    const N: u32 = 5000;
    round_trips(N);
    let allocations = ALLOCATIONS.load(Ordering::Relaxed) - before;
    // Measured: 0. A little room for the runtime's own bookkeeping (timer
    // wheel, the shard watcher), which runs by time, not by message: a
    // loaded machine (CI beside a build) stretches the window. One
    // allocation per message would be ≥ N.
    let allowed = 10 + 4 * began.elapsed().as_secs();
    assert!(
        allocations <= allowed,
        "{allocations} allocations for {N} round trips (at most {allowed})"
    );
    eprintln!(
        "{allocations} allocations for {N} round trips (tls: {tls}, transaction pooling: {transaction})"
    );
}
