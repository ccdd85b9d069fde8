//! Fleets: several tollgate instances sharing a token table in a control
//! database (LISTEN/NOTIFY), cancel requests across instances, routing to
//! several upstreams by database, and PROXY protocol headers from a load
//! balancer. Every instance is the real binary; the control database and
//! the upstreams are real throwaway clusters.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::harness::*;
use tollgate::cluster::{Cluster, ClusterOptions};

const CANCEL_KEY: &str = "fleet-cancel-key-0123456789abcdef-shared";

fn cluster(database: &str) -> Cluster {
    Cluster::start(&ClusterOptions {
        password: "upstream-Pa55-word".into(),
        database: database.into(),
        ..ClusterOptions::default()
    })
    .expect("start throwaway Postgres")
}

/// A control database, an upstream, and instances configured against both.
struct Fleet {
    control: Cluster,
    upstream: Cluster,
    dir: tempfile::TempDir,
    secrets: Vec<String>,
}

/// One running instance.
struct Instance {
    config: PathBuf,
    proxy: Proxy,
    admin: SocketAddr,
}

impl Fleet {
    fn new() -> Fleet {
        Fleet {
            control: cluster("control"),
            upstream: cluster("appdb"),
            dir: tempfile::tempdir().unwrap(),
            secrets: Vec::new(),
        }
    }

    /// Writes `name`'s config: the control database at `control_port`
    /// (the real one, or a relay in front of it), with `tokens_extra` in
    /// `[tokens]`.
    fn config(&self, name: &str, control_port: u16, tokens_extra: &str) -> PathBuf {
        let path = self.dir.path().join(format!("{name}.toml"));
        let (port, admin) = (free_port(), free_port());
        std::fs::write(
            &path,
            format!(
                "listen = \"127.0.0.1:{port}\"\nworkers = 2\n\
                 [upstream]\nhost = \"127.0.0.1\"\nport = {up}\n\
                 [[upstream.credentials]]\nuser = \"app\"\npassword = \"{pw}\"\n\
                 [tokens]\npostgres = \"postgres://app@127.0.0.1:{control_port}/control\"\n\
                 password = \"{pw}\"\n{tokens_extra}\n\
                 [fleet]\ncancel_key = \"{CANCEL_KEY}\"\n\
                 [admin]\nlisten = \"127.0.0.1:{admin}\"\n",
                up = self.upstream.port(),
                pw = self.upstream.password(),
            ),
        )
        .unwrap();
        path
    }

    fn start(&self, config: PathBuf) -> Instance {
        let text = std::fs::read_to_string(&config).unwrap();
        let admin = text
            .lines()
            .skip_while(|l| *l != "[admin]")
            .find_map(|l| l.strip_prefix("listen = "))
            .unwrap()
            .trim_matches('"')
            .parse()
            .unwrap();
        let log = config.with_extension("log");
        Instance {
            proxy: spawn_proxy_logging(&config, &log, Some("info,tollgate=debug")),
            config,
            admin,
        }
    }

    fn instance(&self, name: &str) -> Instance {
        self.start(self.config(name, self.control.port(), ""))
    }

    /// `tollgate token create` against `via`'s config.
    fn create_token(&mut self, via: &Instance, args: &[&str]) -> String {
        let out = token_command(via, "create", args);
        let token = out.trim().to_owned();
        assert!(token.starts_with("tg_"), "{token:?}");
        self.secrets.push(token.clone());
        token
    }

    /// SQL on the control database, as its superuser.
    fn control_sql(&self, sql: &str) -> String {
        self.control.psql("control", sql).unwrap()
    }
}

fn token_command(via: &Instance, command: &str, args: &[&str]) -> String {
    token_cli(&via.config, command, args)
}

/// `tollgate token <command> --config <config> <args>`; its stdout.
fn token_cli(config: &std::path::Path, command: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(BIN)
        .args(["token", command, "--config"])
        .arg(config)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "token {command} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn token_id(token: &str) -> &str {
    &token[3..15]
}

fn conn(addr: SocketAddr, db: &str, token: &str) -> String {
    format!(
        "host={} port={} user=app dbname={db} password={token} connect_timeout=10",
        addr.ip(),
        addr.port()
    )
}

/// Logs in and runs a query; the error's SQLSTATE otherwise.
fn login(addr: SocketAddr, db: &str, token: &str) -> Result<(), String> {
    match raw_login(addr, &[("user", "app"), ("database", db)], token) {
        Ok(mut raw) => raw_query(&mut raw, "SELECT 1").map(|_| ()).map_err(|e| e.0),
        Err((code, _)) => Err(code),
    }
}

fn health(i: &Instance) -> (u16, serde_json::Value) {
    let r = http(i.admin, "GET", "/healthz", None);
    (r.status, serde_json::from_str(&r.body).unwrap())
}

/// Polls `cond` every 20 ms for up to `within`; how long it took.
fn wait_for(what: &str, within: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if cond() {
            return start.elapsed();
        }
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stale(i: &Instance) -> bool {
    health(i).1["token_store"]["stale"] == true
}

#[test]
fn tokens_made_on_one_instance_work_on_another_and_revocation_reaches_open_sessions() {
    let mut fleet = Fleet::new();
    let a = fleet.instance("a");
    let b = fleet.instance("b");
    // The schema was created once, and both instances registered.
    assert_eq!(
        fleet.control_sql("SELECT max(version) FROM tollgate.schema_migrations"),
        tollgate::controldb::schema::current_version().to_string()
    );
    assert_eq!(
        fleet.control_sql("SELECT string_agg(id::text, ',' ORDER BY id) FROM tollgate.instances"),
        "1,2"
    );
    let (status, h) = health(&b);
    assert_eq!(status, 200, "{h}");
    assert_eq!(h["token_store"]["source"], "postgres");
    assert_eq!(h["token_store"]["stale"], false);

    let token = fleet.create_token(&a, &["--user", "app", "--database", "appdb"]);
    let listed = token_command(&b, "list", &[]);
    assert!(listed.contains(token_id(&token)), "{listed}");
    // Created through A's config, usable on B within a second.
    let took = wait_for("the new token on B", Duration::from_secs(1), || {
        login(b.proxy.addr, "appdb", &token).is_ok()
    });
    eprintln!("token created -> usable on B: {took:?}");

    let rt = runtime();
    rt.block_on(async {
        let (client, ended_rx) = connect_watched(&conn(b.proxy.addr, "appdb", &token)).await;
        client.simple_query("SELECT 1").await.unwrap();
        let revoked = Instant::now();
        token_command(&a, "revoke", &[token_id(&token)]);
        let (code, message) = ended(ended_rx, Duration::from_secs(1)).await;
        eprintln!(
            "revoked through A -> B's session ended in {:?}",
            revoked.elapsed()
        );
        assert!(
            revoked.elapsed() < Duration::from_secs(1),
            "{:?}",
            revoked.elapsed()
        );
        assert_eq!(code, "57P01", "{message}");
        assert!(message.contains("revoked"), "{message}");
    });
    assert_eq!(login(b.proxy.addr, "appdb", &token), Err("28P01".into()));
    assert_eq!(login(a.proxy.addr, "appdb", &token), Err("28P01".into()));

    // The documented SQL function, for people with their own tools.
    let other = fleet.create_token(&b, &["--user", "app"]);
    wait_for("the second token on A", Duration::from_secs(1), || {
        login(a.proxy.addr, "appdb", &other).is_ok()
    });
    assert_eq!(
        fleet.control_sql(&format!(
            "SELECT tollgate.revoke_token('{}')",
            token_id(&other)
        )),
        "t"
    );
    let took = wait_for("the SQL revocation on A", Duration::from_secs(1), || {
        login(a.proxy.addr, "appdb", &other) == Err("28P01".into())
    });
    eprintln!("revoked in SQL -> refused on A: {took:?}");

    // Revoked stays revoked: a tool rewriting the row without revoked_at
    // (through the documented function) does not bring it back.
    let other_id = token_id(&other);
    fleet.control_sql(&format!(
        "SELECT tollgate.put_token((SELECT jsonb_build_object('id', id, 'user', role, \
         'secret_sha256', secret_sha256, 'databases', '[\"*\"]'::jsonb, 'comment', 'edited') \
         FROM tollgate.tokens WHERE id = '{other_id}'))"
    ));
    assert_eq!(
        fleet.control_sql(&format!(
            "SELECT revoked_at IS NOT NULL AND rules->>'comment' = 'edited' \
             FROM tollgate.tokens WHERE id = '{other_id}'"
        )),
        "t"
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(login(a.proxy.addr, "appdb", &other), Err("28P01".into()));
    // A time Postgres has but RFC 3339 has not (-infinity: revoked since
    // always) makes the row invalid, and its token refused, never valid.
    let odd = fleet.create_token(&a, &["--user", "app"]);
    wait_for("the odd token on B", Duration::from_secs(1), || {
        login(b.proxy.addr, "appdb", &odd).is_ok()
    });
    fleet.control_sql(&format!(
        "UPDATE tollgate.tokens SET revoked_at = '-infinity' WHERE id = '{}'",
        token_id(&odd)
    ));
    wait_for("the odd token refused on B", Duration::from_secs(1), || {
        login(b.proxy.addr, "appdb", &odd) == Err("28P01".into())
    });

    // A rotation through B: the new secret works on A, the old one stops.
    let third = fleet.create_token(&a, &["--user", "app"]);
    let rotated = token_command(&b, "rotate", &[token_id(&third)])
        .trim()
        .to_owned();
    fleet.secrets.push(rotated.clone());
    assert_eq!(token_id(&rotated), token_id(&third));
    wait_for("the rotation on A", Duration::from_secs(1), || {
        login(a.proxy.addr, "appdb", &rotated).is_ok()
            && login(a.proxy.addr, "appdb", &third) == Err("28P01".into())
    });

    for i in [&a, &b] {
        let log = std::fs::read_to_string(&i.proxy.log).unwrap();
        let found = find_secrets(
            &[("log", &log)],
            &fleet
                .secrets
                .iter()
                .map(|s| (s.clone(), s.as_bytes().to_vec()))
                .collect::<Vec<_>>(),
        );
        assert!(found.is_empty(), "{found:?}");
        assert!(!log.contains(fleet.upstream.password()), "password in log");
    }
}

/// A TCP relay the test can cut, standing between one instance and the
/// control database.
struct Relay {
    port: u16,
    cut: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl Relay {
    fn new(target: u16) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (c, o) = (cut.clone(), open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                if c.load(Ordering::SeqCst) {
                    continue; // dropped: closed at once
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                let mut list = o.lock().unwrap();
                list.push(client.try_clone().unwrap());
                list.push(server.try_clone().unwrap());
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16384];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 || to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Relay { port, cut, open }
    }

    /// Drops every connection through the relay and refuses new ones.
    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for s in self.open.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

#[test]
fn changes_by_hand_reach_instances_row_by_row_or_in_bulk_after_a_schema_upgrade() {
    let mut fleet = Fleet::new();
    // The control database as a tollgate of schema version 1 left it: the
    // instance brings it up to date at start.
    let (version, v1) = tollgate::controldb::schema::MIGRATIONS[0];
    assert_eq!(version, 1);
    fleet.control_sql(&format!(
        "SET ROLE app;\nCREATE SCHEMA tollgate;\n\
         CREATE TABLE tollgate.schema_migrations (version integer PRIMARY KEY, \
         applied_at timestamptz NOT NULL DEFAULT now());\n{v1}\n\
         INSERT INTO tollgate.schema_migrations (version) VALUES (1);"
    ));
    // With JWTs, for the revoked_jwts table (a [jwt] table after [tokens]).
    let jwt = format!(
        "[jwt]\nissuer = \"https://auth.test\"\naudience = \"tollgate\"\n\
         [[jwt.hmac]]\nsecret = \"{HMAC_SECRET}\""
    );
    let config = fleet.config("a", fleet.control.port(), &jwt);
    // Hundreds of refusals below are the test's, not an attack.
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("auth_failure_limit = 0\n{text}")).unwrap();
    let a = fleet.start(config);
    assert_eq!(
        fleet.control_sql("SELECT max(version) FROM tollgate.schema_migrations"),
        tollgate::controldb::schema::current_version().to_string()
    );
    let tokens: Vec<String> = (0..4)
        .map(|_| fleet.create_token(&a, &["--user", "app"]))
        .collect();
    wait_for("the tokens", Duration::from_secs(1), || {
        tokens
            .iter()
            .all(|t| login(a.proxy.addr, "appdb", t).is_ok())
    });
    let refused = |t: &str| login(a.proxy.addr, "appdb", t) == Err("28P01".into());
    // What the instance did about each change, from its log: full loads,
    // and the row-by-row updates.
    let log_lines = |what: &str| -> Vec<String> {
        std::fs::read_to_string(&a.proxy.log)
            .unwrap()
            .lines()
            .filter(|l| l.contains(what))
            .map(str::to_owned)
            .collect()
    };
    let full_loads = || log_lines("token store loaded").len();
    let updates = || log_lines("token store updated");
    let loads = full_loads();

    // One row at a time: an UPDATE that renames a token (both ids are
    // named, and the old one must go), then a DELETE. Each is read back by
    // id, not by a full load.
    let seen = updates().len();
    fleet.control_sql(&format!(
        "UPDATE tollgate.tokens SET id = 'zzzzzzzzzzzz' WHERE id = '{}'",
        token_id(&tokens[0])
    ));
    let took = wait_for("the renamed token refused", Duration::from_secs(1), || {
        refused(&tokens[0])
    });
    eprintln!("renamed in SQL -> refused: {took:?}");
    let renamed = updates();
    assert_eq!(renamed.len(), seen + 1, "{renamed:#?}");
    assert!(renamed[seen].contains("changed=2"), "{}", renamed[seen]);
    fleet.control_sql(&format!(
        "DELETE FROM tollgate.tokens WHERE id = '{}'",
        token_id(&tokens[1])
    ));
    wait_for("the deleted token refused", Duration::from_secs(1), || {
        refused(&tokens[1])
    });
    let deleted = updates();
    assert_eq!(deleted.len(), seen + 2, "{deleted:#?}");
    assert!(
        deleted[seen + 1].contains("changed=1"),
        "{}",
        deleted[seen + 1]
    );
    assert_eq!(login(a.proxy.addr, "appdb", &tokens[2]), Ok(()));
    assert_eq!(full_loads(), loads, "a one-row change loaded everything");

    // Many rows in one statement (more than a notification names): one
    // full load each, with the same effect on every row. Tokens made here,
    // with secrets the test knows, so that each row's fate can be checked.
    let minted: Vec<_> = (0..600)
        .map(|_| tollgate::auth::token::generate())
        .collect();
    let values: Vec<String> = minted
        .iter()
        .map(|t| {
            format!(
                "('{}', 'app', '{}', '{{\"databases\": [\"*\"]}}')",
                t.id,
                hex::encode(t.secret_sha256)
            )
        })
        .collect();
    let minted: Vec<String> = minted
        .iter()
        .map(|t| String::from_utf8(t.token.expose().to_vec()).unwrap())
        .collect();
    fleet.control_sql(&format!(
        "INSERT INTO tollgate.tokens (id, role, secret_sha256, rules) VALUES {}",
        values.join(", ")
    ));
    wait_for("the bulk insert", Duration::from_secs(1), || {
        login(a.proxy.addr, "appdb", &minted[599]).is_ok()
    });
    assert_eq!(login(a.proxy.addr, "appdb", &minted[0]), Ok(()));
    assert_eq!(full_loads(), loads + 1);
    fleet.control_sql(&format!(
        "UPDATE tollgate.tokens SET revoked_at = now() WHERE id <> '{}'",
        token_id(&tokens[3])
    ));
    wait_for("the bulk revocation", Duration::from_secs(1), || {
        refused(&tokens[2])
    });
    assert_eq!(full_loads(), loads + 2);
    let left: Vec<&String> = minted.iter().filter(|t| !refused(t)).collect();
    assert!(
        left.is_empty(),
        "{} bulk-revoked tokens still work",
        left.len()
    );
    assert_eq!(login(a.proxy.addr, "appdb", &tokens[3]), Ok(()));

    // A revoked JWT id ends its open session.
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 60;
    let jwt = hs256(&serde_json::json!({
        "iss": "https://auth.test", "aud": "tollgate", "exp": exp, "jti": "job-7",
        "role": "app", "databases": ["appdb"],
    }));
    runtime().block_on(async {
        let (client, ended_rx) = connect_watched(&conn(a.proxy.addr, "appdb", &jwt)).await;
        client.simple_query("SELECT 1").await.unwrap();
        let revoked = Instant::now();
        fleet.control_sql("SELECT tollgate.revoke_jwt('job-7')");
        let (code, message) = ended(ended_rx, Duration::from_secs(1)).await;
        eprintln!(
            "jti revoked in SQL -> session ended in {:?}",
            revoked.elapsed()
        );
        assert_eq!(code, "57P01", "{message}");
    });
    assert!(refused(&jwt));
    let last = updates().pop().unwrap_or_default();
    assert!(last.contains("revoked_jwts=true"), "{last}");
    assert_eq!(full_loads(), loads + 2, "a revoked jti loaded every token");

    // TRUNCATE names no row: everything is loaded again.
    fleet.control_sql("TRUNCATE tollgate.tokens");
    wait_for("the truncation", Duration::from_secs(1), || {
        refused(&tokens[3])
    });
    assert_eq!(full_loads(), loads + 3);
}

#[test]
fn a_lost_control_database_leaves_the_snapshot_serving_and_a_reconnect_resyncs() {
    let mut fleet = Fleet::new();
    let a = fleet.instance("a");
    let relay = Relay::new(fleet.control.port());
    let b = fleet.start(fleet.config("b", relay.port, "max_staleness = \"3s\""));
    let t1 = fleet.create_token(&a, &["--user", "app"]);
    let t2 = fleet.create_token(&a, &["--user", "app"]);
    for i in [&a, &b] {
        wait_for("tokens everywhere", Duration::from_secs(1), || {
            login(i.proxy.addr, "appdb", &t1).is_ok() && login(i.proxy.addr, "appdb", &t2).is_ok()
        });
    }

    // B loses the control database; A does not.
    relay.cut();
    let took = wait_for("B stale", Duration::from_secs(5), || stale(&b));
    eprintln!("link cut -> B reports stale: {took:?}");
    assert!(!stale(&a));
    let metrics = http(b.admin, "GET", "/metrics", None).body;
    assert!(
        metrics.contains("tollgate_token_store_stale 1\n"),
        "{metrics}"
    );
    // Revoked directly in SQL while B cannot hear of it.
    fleet.control_sql(&format!(
        "UPDATE tollgate.tokens SET revoked_at = now() WHERE id = '{}'",
        token_id(&t1)
    ));
    wait_for("t1 refused on A", Duration::from_secs(1), || {
        login(a.proxy.addr, "appdb", &t1) == Err("28P01".into())
    });
    // B serves its last snapshot: t2 works, and so (for now) does t1.
    assert_eq!(login(b.proxy.addr, "appdb", &t2), Ok(()));
    assert_eq!(login(b.proxy.addr, "appdb", &t1), Ok(()));
    // Past max_staleness, B fails closed, and says so to its probe.
    wait_for("B past max_staleness", Duration::from_secs(6), || {
        login(b.proxy.addr, "appdb", &t2) == Err("57P03".into())
    });
    let (status, h) = health(&b);
    assert_eq!(status, 503, "{h}");
    assert_eq!(h["status"], "token_store_stale");
    assert!(
        h["token_store"]["age_seconds"].as_f64().unwrap() > 3.0,
        "{h}"
    );

    // Back: B reloads everything, so the revocation it missed holds.
    relay.restore();
    let took = wait_for("B fresh again", Duration::from_secs(10), || !stale(&b));
    eprintln!("link restored -> B fresh: {took:?}");
    assert_eq!(login(b.proxy.addr, "appdb", &t1), Err("28P01".into()));
    assert_eq!(login(b.proxy.addr, "appdb", &t2), Ok(()));
    assert_eq!(health(&b).0, 200);

    // The whole control database stops: both keep serving the snapshot.
    fleet.control.stop();
    wait_for("both stale", Duration::from_secs(5), || {
        stale(&a) && stale(&b)
    });
    assert_eq!(login(a.proxy.addr, "appdb", &t2), Ok(()));
    let (status, h) = health(&a);
    assert_eq!(status, 200, "A has no max_staleness: {h}");
    assert_eq!(h["status"], "ok");
    fleet.control.restart().unwrap();
    wait_for("both fresh", Duration::from_secs(10), || {
        !stale(&a) && !stale(&b)
    });
    assert_eq!(login(a.proxy.addr, "appdb", &t1), Err("28P01".into()));
    assert_eq!(login(a.proxy.addr, "appdb", &t2), Ok(()));
    let log = std::fs::read_to_string(&b.proxy.log).unwrap();
    assert!(log.contains("control database unreachable"), "{log}");
    assert!(log.contains("control database reachable again"), "{log}");
}

#[test]
fn a_cancel_request_sent_to_another_instance_reaches_the_query() {
    let mut fleet = Fleet::new();
    let a = fleet.instance("a");
    let b = fleet.instance("b");
    let token = fleet.create_token(&a, &["--user", "app"]);
    wait_for("token on A", Duration::from_secs(1), || {
        login(a.proxy.addr, "appdb", &token).is_ok()
    });
    let rt = runtime();
    rt.block_on(async {
        let client = pg_connect(&conn(a.proxy.addr, "appdb", &token))
            .await
            .unwrap();
        let cancel = client.cancel_token();
        let query = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(30)").await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        // The load balancer picked B for the CancelRequest.
        let started = Instant::now();
        let to_b = tokio::net::TcpStream::connect(b.proxy.addr).await.unwrap();
        cancel
            .cancel_query_raw(to_b, tokio_postgres::NoTls)
            .await
            .unwrap();
        let e = tokio::time::timeout(Duration::from_secs(5), query)
            .await
            .expect("the query was not cancelled")
            .unwrap()
            .unwrap_err();
        eprintln!("cancel via B -> query on A ended: {:?}", started.elapsed());
        assert_eq!(e.as_db_error().unwrap().code().code(), "57014", "{e}");
    });
    let metric = |i: &Instance, result: &str| {
        let m = http(i.admin, "GET", "/metrics", None).body;
        m.lines()
            .filter(|l| {
                l.starts_with("tollgate_cancel_requests_total")
                    && l.contains(&format!("result=\"{result}\""))
            })
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum::<f64>()
    };
    // Counted once each instance's side is over (the query's error can
    // reach the client a moment before).
    wait_for("the cancel counted", Duration::from_secs(2), || {
        metric(&b, "forwarded_to_peer") == 1.0 && metric(&a, "forwarded") == 1.0
    });

    // A key with A's instance id but a tag not made with the fleet key is
    // dropped at B, never passed on.
    let a_id: u32 = fleet
        .control_sql(&format!(
            "SELECT id FROM tollgate.instances WHERE address = '{}'",
            a.proxy.addr
        ))
        .parse()
        .unwrap();
    let mut guess = Vec::new();
    guess.extend_from_slice(&16i32.to_be_bytes());
    guess.extend_from_slice(&80877102i32.to_be_bytes());
    guess.extend_from_slice(&((a_id << 23) | 12345).to_be_bytes());
    guess.extend_from_slice(&[1, 2, 3, 4]);
    let mut raw = Raw::connect(b.proxy.addr);
    raw.send(&guess);
    assert!(raw.read_to_close().is_empty());
    wait_for("the guess counted at B", Duration::from_secs(2), || {
        metric(&b, "unknown_key") == 1.0
    });
    assert_eq!(metric(&a, "unknown_key"), 0.0);
}

#[test]
fn databases_are_routed_to_their_upstreams_and_tokens_may_be_limited_to_some() {
    let one = cluster("appdb");
    let two = cluster("otherdb");
    let files = Files::new();
    let config = files.write(
        "tollgate.toml",
        &format!(
            "listen = \"127.0.0.1:{port}\"\nworkers = 2\n\
             [[upstream]]\nname = \"one\"\ndatabases = [\"appdb\"]\n\
             host = \"127.0.0.1\"\nport = {p1}\n\
             [[upstream.credentials]]\nuser = \"app\"\npassword = \"{pw1}\"\n\
             [[upstream]]\nname = \"two\"\ndatabases = [\"otherdb\"]\n\
             host = \"127.0.0.1\"\nport = {p2}\n\
             [[upstream.credentials]]\nuser = \"app\"\npassword = \"{pw2}\"\n\
             [tokens]\nfile = \"tokens.toml\"\n",
            port = free_port(),
            p1 = one.port(),
            p2 = two.port(),
            pw1 = one.password(),
            pw2 = two.password(),
        ),
        true,
    );
    let create = |args: &[&str]| token_cli(&config, "create", args).trim().to_owned();
    let any = create(&["--user", "app"]);
    let only_one = create(&["--user", "app", "--upstream", "one"]);
    let proxy = spawn_proxy(&config, &files.write("tollgate.log", "", false));
    let addr = proxy.addr;
    let port_of = |db: &str, token: &str| {
        let mut raw = raw_login(addr, &[("user", "app"), ("database", db)], token)
            .unwrap_or_else(|e| panic!("{db}: {e:?}"));
        raw_query(&mut raw, "SHOW port").unwrap()[0][0]
            .clone()
            .unwrap()
    };
    assert_eq!(port_of("appdb", &any), one.port().to_string());
    assert_eq!(port_of("otherdb", &any), two.port().to_string());
    assert_eq!(port_of("appdb", &only_one), one.port().to_string());
    // The token's rule: refused like any other token failure.
    assert_eq!(login(addr, "otherdb", &only_one), Err("28P01".into()));
    // No upstream serves it: said once the token is known good.
    assert_eq!(login(addr, "nosuchdb", &any), Err("3D000".into()));

    // A cancel goes to the server its session was routed to.
    let rt = runtime();
    rt.block_on(async {
        let client = pg_connect(&conn(addr, "otherdb", &any)).await.unwrap();
        let cancel = client.cancel_token();
        let query = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(30)").await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        cancel.cancel_query(tokio_postgres::NoTls).await.unwrap();
        let e = tokio::time::timeout(Duration::from_secs(5), query)
            .await
            .expect("the query was not cancelled")
            .unwrap()
            .unwrap_err();
        assert_eq!(e.as_db_error().unwrap().code().code(), "57014", "{e}");
    });
    drop(proxy);
}

#[test]
fn the_control_database_can_be_reached_over_verified_tls() {
    let files = Files::new();
    let ca = Ca::new("control CA");
    let (cert, key) = ca.leaf(&["localhost", "127.0.0.1"]);
    let cert = files.write("control.crt", &cert, false);
    let key = files.write_server_key("control.key", &key);
    let ca_file = files.write("ca.pem", &ca.pem(), false);
    let other_ca = files.write("other.pem", &Ca::new("another CA").pem(), false);
    let control = Cluster::start(&ClusterOptions {
        password: "upstream-Pa55-word".into(),
        database: "control".into(),
        extra_conf: pg_ssl_conf(&cert, &key),
        ..ClusterOptions::default()
    })
    .unwrap();
    let upstream = cluster("appdb");
    let config = |ca: &std::path::Path| {
        files.write(
            "tollgate.toml",
            &format!(
                "listen = \"127.0.0.1:{}\"\nworkers = 1\n\
                 [upstream]\nhost = \"127.0.0.1\"\nport = {}\n\
                 [[upstream.credentials]]\nuser = \"app\"\npassword = \"{pw}\"\n\
                 [tokens]\npostgres = \"postgres://app@127.0.0.1:{}/control?sslmode=verify-full\"\n\
                 password = \"{pw}\"\nca_file = \"{}\"\n",
                free_port(),
                upstream.port(),
                control.port(),
                ca.display(),
                pw = control.password(),
            ),
            true,
        )
    };
    let good = config(&ca_file);
    let log = files.write("tollgate.log", "", false);
    let proxy = spawn_proxy(&good, &log);
    let token = token_cli(&good, "create", &["--user", "app"])
        .trim()
        .to_owned();
    wait_for("the token", Duration::from_secs(1), || {
        login(proxy.addr, "appdb", &token).is_ok()
    });
    // The control connection is TLS (Postgres says so for its backends).
    assert_eq!(
        control
            .psql(
                "control",
                "SELECT bool_and(ssl) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
                 WHERE application_name = 'tollgate control'"
            )
            .unwrap(),
        "t"
    );
    drop(proxy);
    // A certificate from another CA: no start, and a reason without secrets.
    let bad = config(&other_ca);
    let out = std::process::Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("control database"), "{stderr}");
    assert!(!stderr.contains(control.password()), "{stderr}");
}

/// A raw connection from `source` (a loopback address) to `addr`, with
/// `prefix` sent first.
fn raw_from(source: [u8; 4], addr: SocketAddr, prefix: &[u8]) -> Raw {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.bind(&SocketAddr::from((source, 0)).into()).unwrap();
    socket.connect(&addr.into()).unwrap();
    let stream: TcpStream = socket.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut raw = Raw(stream);
    if !prefix.is_empty() {
        raw.send(prefix);
    }
    raw
}

fn login_from(
    source: [u8; 4],
    addr: SocketAddr,
    prefix: &[u8],
    token: &str,
) -> Result<Raw, (String, String)> {
    raw_login_on(
        raw_from(source, addr, prefix),
        &[
            ("user", "app"),
            ("database", "appdb"),
            ("application_name", "lb-test"),
        ],
        token,
    )
}

#[test]
fn proxy_protocol_headers_are_believed_from_balancers_only() {
    use tollgate::protocol::proxy_header::{encode_v1, encode_v2, ProxyHeader};
    let mut env = Env::with(
        tollgate::cluster::HbaAuth::ScramSha256,
        "proxy_protocol = true\nproxy_trusted = [\"127.0.0.1/32\"]\nauth_failure_limit = 3\n\
         [audit]\ntag_application_name = true",
    );
    let token = env.create_token(&["--user", "app", "--cidr", "203.0.113.0/24"]);
    let addr = env.start_proxy();
    let ours: SocketAddr = addr;
    let v2 = |ip: [u8; 4]| {
        encode_v2(&ProxyHeader::Proxied {
            source: SocketAddr::from((ip, 40001)),
            destination: ours,
        })
    };

    // From the balancer, a v2 header naming a client inside the token's
    // network: the login works, and the server sees the real address (in
    // the tagged application_name).
    let mut raw = login_from([127, 0, 0, 1], addr, &v2([203, 0, 113, 7]), &token).unwrap();
    let rows = raw_query(&mut raw, "SELECT current_setting('application_name')").unwrap();
    assert_eq!(
        rows[0][0].as_deref(),
        Some(format!("lb-test [tg:{}@203.0.113.7]", token_id(&token)).as_str())
    );
    drop(raw);
    // v1 works the same.
    let v1 = encode_v1(SocketAddr::from(([203, 0, 113, 8], 5000)), ours);
    login_from([127, 0, 0, 1], addr, &v1, &token).unwrap();
    // The CIDR rule applies to the real address.
    assert_eq!(
        login_from([127, 0, 0, 1], addr, &v2([198, 51, 100, 1]), &token)
            .unwrap_err()
            .0,
        "28P01"
    );
    // No header (or LOCAL, a health check): the balancer's own address,
    // which the token does not allow.
    assert_eq!(
        login_from([127, 0, 0, 1], addr, &[], &token).unwrap_err().0,
        "28P01"
    );
    assert_eq!(
        login_from(
            [127, 0, 0, 1],
            addr,
            &encode_v2(&ProxyHeader::Local),
            &token
        )
        .unwrap_err()
        .0,
        "28P01"
    );
    // A broken header from the balancer: a protocol violation.
    let mut broken = v2([203, 0, 113, 7]);
    broken[12] = 0x11; // version 1 in the v2 byte
    let mut raw = raw_from([127, 0, 0, 1], addr, &broken);
    let (got, ending) = raw.read_until_end(Duration::from_secs(5));
    let message = assert_fatal("broken header", &got, ending, "08P01");
    assert!(message.contains("PROXY"), "{message}");
    // From anywhere else a header is refused, even a well-formed one.
    let mut raw = raw_from([127, 0, 0, 2], addr, &v2([203, 0, 113, 7]));
    let (got, ending) = raw.read_until_end(Duration::from_secs(5));
    let message = assert_fatal("untrusted header", &got, ending, "08P01");
    assert!(message.contains("trusted"), "{message}");

    // Failure limits count per real client: one client behind the balancer
    // using up its failures does not lock out another.
    for _ in 0..3 {
        assert_eq!(
            login_from([127, 0, 0, 1], addr, &v2([198, 51, 100, 9]), "tg_wrong")
                .unwrap_err()
                .0,
            "28P01"
        );
    }
    assert_eq!(
        login_from([127, 0, 0, 1], addr, &v2([198, 51, 100, 9]), &token)
            .unwrap_err()
            .0,
        "28000"
    );
    login_from([127, 0, 0, 1], addr, &v2([203, 0, 113, 7]), &token).unwrap();

    let log = env.log();
    assert!(log.contains("client=203.0.113.7:40001"), "{log}");
    assert!(log.contains("proxy_untrusted"), "{log}");
}
