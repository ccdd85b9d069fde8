//! TLS on both sides, end to end: real clients with verify-full through
//! tollgate, direct TLS, plaintext injection, policy, upstream verification
//! and channel binding, and certificate reload.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use crate::harness::*;

fn psql(conn: &str, sql: &str) -> std::process::Output {
    pg_tool("psql")
        .args([conn, "-XAt", "-c", sql])
        .output()
        .unwrap()
}

/// Everything TLS at once: clients verify tollgate's certificate, tollgate
/// verifies the server's (verify-full) and binds the SCRAM login to it.
#[test]
fn verified_tls_on_both_legs_with_channel_binding() {
    let ca = Ca::new("tollgate test CA");
    let files = Files::new();
    let (options, ca_file) = tls_on_both_legs(&ca, &files, "allow");
    let mut env = Env::build(options);
    let token = env.create_token(&["--user", "app", "--database", "appdb"]);
    env.start_proxy();
    let port = env.addr().port();

    // psql, verifying tollgate's certificate by name.
    let conn = format!(
        "host=localhost hostaddr=127.0.0.1 port={port} user=app dbname=appdb password={token} \
         sslmode=verify-full sslrootcert={}",
        ca_file.display()
    );
    let out = psql(
        &conn,
        "select ssl, version from pg_stat_ssl where pid = pg_backend_pid()",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let upstream_leg = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        upstream_leg.starts_with("t|TLSv1."),
        "upstream leg: {upstream_leg}"
    );
    let info = pg_tool("psql")
        .args([&conn, "-X", "-c", "\\conninfo"])
        .output()
        .unwrap();
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(info.contains("SSL connection (protocol: TLSv1.3"), "{info}");

    // Plaintext from loopback is allowed under the default policy.
    let plain = psql(&env.conn_str("app", "appdb", &token), "select 1");
    assert!(
        plain.status.success(),
        "{}",
        String::from_utf8_lossy(&plain.stderr)
    );

    // tokio-postgres with a rustls connector.
    runtime().block_on(async {
        let tls = tokio_postgres_rustls::MakeRustlsConnect::new((*rustls_client(&ca, None)).clone());
        let conn = format!(
            "host=localhost hostaddr=127.0.0.1 port={port} user=app dbname=appdb password={token} sslmode=require"
        );
        let (client, connection) = tokio_postgres::connect(&conn, tls).await.unwrap();
        tokio::spawn(connection);
        let r = client.query_one("select $1::text || 'k'", &[&"o"]).await.unwrap();
        assert_eq!(r.get::<_, String>(0), "ok");
    });

    // The upstream login used channel binding.
    let log = env.log();
    assert!(
        log.contains("SCRAM-SHA-256-PLUS"),
        "channel binding not used"
    );
    env.assert_log_clean();
}

/// OpenSSL (libpq) as the client, TLS 1.2 and 1.3: a 300 KB query in
/// (full 16 KiB records, longer than the relay's buffers once sealed)
/// and a 4 MB result out, through tollgate's own record layer.
#[test]
fn openssl_clients_move_large_data_over_tls_1_2_and_1_3() {
    let serving = ServingCert::new("openssl CA", &["localhost"]);
    let mut env = Env::build(EnvOptions {
        tables: serving.table("require"),
        ..EnvOptions::default()
    });
    let token = env.create_token(&["--user", "app", "--database", "appdb"]);
    env.start_proxy();
    let port = env.addr().port();
    let long = "y".repeat(300_000);
    let sql = format!(
        "select length('{long}');\n\
         select repeat('x', 4000000);\n\
         select version from pg_stat_ssl where pid = pg_backend_pid();\n"
    );
    for version in ["TLSv1.2", "TLSv1.3"] {
        let conn = format!(
            "host=localhost hostaddr=127.0.0.1 port={port} user=app dbname=appdb \
             password={token} sslmode=require ssl_min_protocol_version={version} \
             ssl_max_protocol_version={version}"
        );
        let stdout = psql_script(&conn, &sql);
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(lines[0], "300000", "{version}");
        assert!(
            lines[1].len() == 4_000_000 && lines[1].bytes().all(|b| b == b'x'),
            "{version}"
        );
        // The upstream leg is plain here: the client's version is in the log.
    }
    let log = env.log();
    assert!(log.contains("tls=\"TLSv1_2\""), "a TLS 1.2 session");
    assert!(log.contains("tls=\"TLSv1_3\""), "a TLS 1.3 session");
    env.assert_log_clean();
}

/// Direct TLS (no SSLRequest) works with ALPN `postgresql`, not without.
#[test]
fn direct_tls_requires_alpn() {
    let serving = ServingCert::new("direct CA", &["localhost"]);
    let mut env = Env::build(EnvOptions {
        tables: serving.table("require"),
        ..EnvOptions::default()
    });
    let ca = &serving.ca;
    let token = env.create_token(&["--user", "app"]);
    env.start_proxy();

    let session = |alpn: Option<&[u8]>| -> Vec<u8> {
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let conn = rustls::ClientConnection::new(rustls_client(ca, alpn), name).unwrap();
        let sock = TcpStream::connect(env.addr()).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut tls = rustls::StreamOwned::new(conn, sock);
        let mut bytes = startup_message(&[("user", "app"), ("database", "appdb")]);
        bytes.extend(password_message(&token));
        if tls.write_all(&bytes).is_err() {
            return Vec::new();
        }
        let mut got = vec![0u8; 9 + 9];
        match tls.read_exact(&mut got) {
            Ok(()) => got,
            Err(_) => Vec::new(),
        }
    };
    let ok = session(Some(b"postgresql"));
    // AuthenticationCleartextPassword, then AuthenticationOk.
    assert_eq!(&ok[..9], b"R\0\0\0\x08\0\0\0\x03");
    assert_eq!(&ok[9..], b"R\0\0\0\x08\0\0\0\x00");
    let refused = session(None);
    assert_ne!(refused.get(9..), Some(&b"R\0\0\0\x08\0\0\0\x00"[..]));
    assert!(env.log().contains("direct_tls_without_alpn"));
}

/// Bytes sent in the clear right after SSLRequest are refused, unprocessed.
#[test]
fn plaintext_injected_after_ssl_request_is_refused() {
    let serving = ServingCert::new("inject CA", &["localhost"]);
    let mut env = Env::build(EnvOptions {
        tables: serving.table("allow"),
        ..EnvOptions::default()
    });
    let token = env.create_token(&["--user", "app"]);
    env.start_proxy();

    let mut raw = Raw::connect(env.addr());
    let mut bytes = [8i32.to_be_bytes(), 80877103i32.to_be_bytes()].concat();
    bytes.extend(startup_message(&[("user", "app")]));
    bytes.extend(password_message(&token));
    raw.send(&bytes);
    let got = raw.read_to_close();
    assert_eq!(got.first(), Some(&b'E'), "{got:?}");
    let (code, message) = error_fields(&got[5..]);
    assert_eq!(code, "08P01");
    assert!(message.contains("unencrypted data after SSL request"));
    assert!(
        !env.log().contains("session started"),
        "the injected login went through"
    );
}

/// `mode = "require"` refuses plaintext even from loopback, before the
/// client sends its token.
#[test]
fn plaintext_refused_when_tls_required() {
    let serving = ServingCert::new("require CA", &["localhost"]);
    let mut env = Env::build(EnvOptions {
        tables: serving.table("require"),
        ..EnvOptions::default()
    });
    let token = env.create_token(&["--user", "app"]);
    env.start_proxy();
    runtime().block_on(async {
        let (code, message) = connect_error(&env.conn_str("app", "appdb", &token)).await;
        assert_eq!(code, "28000");
        assert!(message.contains("TLS is required"), "{message}");
    });
    // With TLS it works.
    let conn = format!(
        "host=localhost hostaddr=127.0.0.1 port={} user=app dbname=appdb password={token} sslmode=verify-full sslrootcert={}",
        env.addr().port(),
        serving
            .files
            .write("ca.crt", &serving.ca.pem(), false)
            .display()
    );
    let out = psql(&conn, "select 1");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    env.assert_log_clean();
}

/// verify-full against a certificate for another name fails with 08001 and
/// a logged reason; verify-ca accepts the same server; require accepts a
/// self-signed one.
#[test]
fn upstream_verification_modes() {
    let ca = Ca::new("upstream CA");
    let files = Files::new();
    let (pg_cert, pg_key) = ca.leaf(&["db.internal.example"]);
    let pg_cert = files.write("pg.crt", &pg_cert, false);
    let pg_key = files.write_server_key("pg.key", &pg_key);
    let ca_file = files.write("ca.crt", &ca.pem(), false);
    let mut env = Env::build(EnvOptions {
        cluster_conf: pg_ssl_conf(&pg_cert, &pg_key),
        upstream: format!("tls = \"verify-full\"\nca_file = \"{}\"", ca_file.display()),
        ..EnvOptions::default()
    });
    let token = env.create_token(&["--user", "app"]);
    env.start_proxy();
    runtime().block_on(async {
        let (code, message) = connect_error(&env.conn_str("app", "appdb", &token)).await;
        assert_eq!(code, "08001");
        assert!(message.contains("secure connection"), "{message}");
    });
    let log = env.log();
    let failures: Vec<&str> = log.lines().filter(|l| l.contains("login failed")).collect();
    assert!(
        failures.iter().any(|l| l.contains("not valid for name")),
        "the log does not say why: {failures:?}"
    );
    drop(env);

    // The same server under verify-ca, and a self-signed server under require.
    let (self_cert, self_key) = Ca::new("self").leaf(&["whatever"]);
    let self_cert = files.write("self.crt", &self_cert, false);
    let self_key = files.write_server_key("self.key", &self_key);
    for (mode, cert, key) in [
        ("verify-ca", &pg_cert, &pg_key),
        ("require", &self_cert, &self_key),
    ] {
        let mut env = Env::build(EnvOptions {
            cluster_conf: pg_ssl_conf(cert, key),
            upstream: format!("tls = \"{mode}\"\nca_file = \"{}\"", ca_file.display()),
            ..EnvOptions::default()
        });
        let token = env.create_token(&["--user", "app"]);
        env.start_proxy();
        let out = psql(
            &env.conn_str("app", "appdb", &token),
            "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
        );
        assert!(
            out.status.success(),
            "{mode}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "t", "{mode}");
        assert!(
            env.log().contains("SCRAM-SHA-256-PLUS"),
            "{mode}: no channel binding"
        );
    }
}

/// Replacing the certificate files takes effect for new connections while
/// open sessions keep working.
#[test]
fn certificate_reload_without_downtime() {
    let old_ca = Ca::new("old CA");
    let new_ca = Ca::new("new CA");
    let files = Files::new();
    let (cert, key) = old_ca.leaf(&["localhost"]);
    let cert_path = files.write("tg.crt", &cert, false);
    let key_path = files.write("tg.key", &key, true);
    let old_ca_file = files.write("old-ca.crt", &old_ca.pem(), false);
    let new_ca_file = files.write("new-ca.crt", &new_ca.pem(), false);
    let mut env = Env::build(EnvOptions {
        tables: tls_table(&cert_path, &key_path, "require"),
        ..EnvOptions::default()
    });
    let token = env.create_token(&["--user", "app"]);
    env.start_proxy();
    let port = env.addr().port();
    let conn = |ca: &Path| {
        format!(
            "host=localhost hostaddr=127.0.0.1 port={port} user=app dbname=appdb password={token} \
             sslmode=verify-full sslrootcert={}",
            ca.display()
        )
    };
    runtime().block_on(async {
        let tls = tokio_postgres_rustls::MakeRustlsConnect::new((*rustls_client(&old_ca, None)).clone());
        let (open, connection) = tokio_postgres::connect(
            &format!("host=localhost hostaddr=127.0.0.1 port={port} user=app dbname=appdb password={token} sslmode=require"),
            tls,
        )
        .await
        .unwrap();
        tokio::spawn(connection);
        open.simple_query("select 1").await.unwrap();

        // A broken pair is refused and the old one stays in force.
        std::fs::write(&cert_path, "not a certificate").unwrap();
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert!(psql(&conn(&old_ca_file), "select 1").status.success());

        // Rotate: key first, then the certificate, each replaced atomically.
        let (cert, key) = new_ca.leaf(&["localhost"]);
        let tmp = files.write("tg.key.new", &key, true);
        std::fs::rename(&tmp, &key_path).unwrap();
        let tmp = files.write("tg.crt.new", &cert, false);
        std::fs::rename(&tmp, &cert_path).unwrap();
        tokio::time::sleep(Duration::from_millis(2500)).await;

        let new = psql(&conn(&new_ca_file), "select 1");
        assert!(new.status.success(), "{}", String::from_utf8_lossy(&new.stderr));
        assert!(!psql(&conn(&old_ca_file), "select 1").status.success());
        // The session opened before the rotation is untouched.
        open.simple_query("select 2").await.unwrap();
    });
    let log = env.log();
    assert!(log.contains("keeping the previous pair"));
    assert!(log.contains("TLS certificate reloaded"));
    env.assert_log_clean();
}
