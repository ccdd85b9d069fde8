// pgjdbc through tollgate: what a Java application can observe. Run by
// tests/it/pgjdbc.rs as `java -cp postgresql.jar PgjdbcCheck.java <url>
// <user> <password>`; prints "ok", or the first failed check and exits 1.
//
// Checks: getBackendPID() equals pg_backend_pid(); the ApplicationName it
// set is what SHOW reports; its own NOTIFY arrives with its own pid;
// Statement.cancel() stops a running query (57014) and the session goes on;
// server-side prepared statements (prepareThreshold=1) run; and
// pg_terminate_backend(<its pid>) from another session ends it with 57P01.

import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.Properties;

import org.postgresql.PGConnection;
import org.postgresql.PGNotification;

public class PgjdbcCheck {
    static void check(boolean ok, String what) {
        if (!ok) {
            System.out.println("FAILED: " + what);
            System.exit(1);
        }
    }

    static String one(Connection c, String sql) throws SQLException {
        try (Statement s = c.createStatement(); ResultSet r = s.executeQuery(sql)) {
            check(r.next(), "no row for " + sql);
            return r.getString(1);
        }
    }

    public static void main(String[] args) throws Exception {
        Properties props = new Properties();
        props.setProperty("user", args[1]);
        props.setProperty("password", args[2]);
        props.setProperty("sslmode", "disable");
        props.setProperty("ApplicationName", "jdbc check");
        props.setProperty("prepareThreshold", "1");
        try (Connection c = DriverManager.getConnection(args[0], props)) {
            int pid = c.unwrap(PGConnection.class).getBackendPID();
            String serverPid = one(c, "select pg_backend_pid()");
            check(Integer.toString(pid).equals(serverPid), "getBackendPID " + pid + " != " + serverPid);
            String name = one(c, "show application_name");
            check("jdbc check".equals(name), "application_name " + name);

            try (Statement s = c.createStatement()) {
                s.execute("listen tg_self");
                s.execute("notify tg_self, 'hello'");
            }
            PGNotification[] got = c.unwrap(PGConnection.class).getNotifications(5000);
            check(got != null && got.length == 1 && got[0].getPID() == pid, "own NOTIFY pid");

            try (PreparedStatement p = c.prepareStatement("select ?::int + 1")) {
                for (int i = 0; i < 5; i++) {
                    p.setInt(1, i);
                    try (ResultSet r = p.executeQuery()) {
                        check(r.next() && r.getInt(1) == i + 1, "prepared statement run " + i);
                    }
                }
            }

            try (Statement s = c.createStatement()) {
                Thread canceller = new Thread(() -> {
                    try {
                        Thread.sleep(300);
                        s.cancel();
                    } catch (Exception e) {
                        throw new RuntimeException(e);
                    }
                });
                canceller.start();
                long started = System.nanoTime();
                try {
                    s.execute("select pg_sleep(30)");
                    check(false, "the query was not cancelled");
                } catch (SQLException e) {
                    check("57014".equals(e.getSQLState()), "cancel gave " + e.getSQLState());
                }
                canceller.join();
                check(System.nanoTime() - started < 5_000_000_000L, "cancel was slow");
            }
            check("1".equals(one(c, "select 1")), "session unusable after the cancel");

            try (Connection other = DriverManager.getConnection(args[0], props)) {
                check("t".equals(one(other, "select pg_terminate_backend(" + pid + ")")),
                        "pg_terminate_backend found no backend");
            }
            try {
                one(c, "select 1");
                check(false, "the terminated session still answered");
            } catch (SQLException e) {
                check("57P01".equals(e.getSQLState()), "after terminate: " + e.getSQLState());
            }
        }
        System.out.println("ok");
    }
}
