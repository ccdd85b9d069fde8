//! pgjdbc, the Java driver, through tollgate (Debian's
//! `libpostgresql-jdbc-java`, run as a single-file Java program). `.ci/run`
//! installs it and sets `TOLLGATE_REQUIRE_PGJDBC`, so that CI fails rather
//! than skips when Java or the driver is missing.

use std::path::{Path, PathBuf};

use crate::harness::*;

const JAR: &str = "/usr/share/java/postgresql.jar";

/// What a Java application sees: its backend's pid, its own
/// application_name and NOTIFY pid, Statement.cancel(), server-side
/// prepared statements, pg_terminate_backend on its pid (see
/// `tests/tools/PgjdbcCheck.java`).
#[test]
fn pgjdbc_sees_its_own_backend() {
    let java = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("java"))
            .find(|j| j.exists())
    });
    let (Some(java), true) = (java, Path::new(JAR).exists()) else {
        assert!(
            std::env::var_os("TOLLGATE_REQUIRE_PGJDBC").is_none(),
            "java or {JAR} missing (apt-get install default-jre-headless libpostgresql-jdbc-java)"
        );
        eprintln!("skipped: java or {JAR} missing");
        return;
    };
    let mut env = Env::new();
    let token = env.create_token(&["--user", "app"]);
    let addr = env.start_proxy();
    let source = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/tools/PgjdbcCheck.java");
    let out = std::process::Command::new(java)
        .args(["-cp", JAR])
        .arg(&source)
        .arg(format!(
            "jdbc:postgresql://{}:{}/appdb",
            addr.ip(),
            addr.port()
        ))
        .args(["app", &token])
        .output()
        .unwrap();
    assert_printed_ok(&out);
    env.assert_log_clean();
}
