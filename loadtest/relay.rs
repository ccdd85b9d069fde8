//! The harness's own TCP relay: the floor reference when HAProxy is not
//! installed.
//!
//! It knows nothing of the Postgres protocol: accept, connect upstream, and
//! copy bytes both ways with one blocking thread per direction — the least
//! any proxy has to do. It runs as a child process of the harness
//! (`loadtest __relay LISTEN UPSTREAM`) so that its CPU time can be read
//! from `/proc/<pid>/stat` like every other target's, and lives until the
//! harness kills it.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::thread;

/// The hidden first argument that turns the harness into the relay.
pub const SUBCOMMAND: &str = "__relay";

/// Bytes per read: enough for a pgbench transaction's messages at once.
const BUFFER: usize = 16 * 1024;

/// Entry point for `loadtest __relay LISTEN UPSTREAM`.
pub fn main(args: &[String]) -> ExitCode {
    let (Some(listen), Some(upstream)) = (args.first(), args.get(1)) else {
        eprintln!("usage: loadtest {SUBCOMMAND} LISTEN_ADDR UPSTREAM_ADDR");
        return ExitCode::from(2);
    };
    let parse = |s: &str| s.parse::<SocketAddr>().map_err(|e| format!("{s}: {e}"));
    let (listen, upstream) = match (parse(listen), parse(upstream)) {
        (Ok(l), Ok(u)) if l.ip().is_loopback() && u.ip().is_loopback() => (l, u),
        (Ok(_), Ok(_)) => {
            eprintln!("relay: loopback addresses only");
            return ExitCode::from(2);
        }
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("relay: {e}");
            return ExitCode::from(2);
        }
    };
    match serve(listen, upstream) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("relay: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(listen: SocketAddr, upstream: SocketAddr) -> io::Result<()> {
    let listener = TcpListener::bind(listen)?;
    for client in listener.incoming() {
        let client = match client {
            Ok(c) => c,
            // e.g. EMFILE under -C load: drop this one, keep serving.
            Err(e) => {
                eprintln!("relay: accept: {e}");
                continue;
            }
        };
        thread::spawn(move || {
            if let Err(e) = relay(client, upstream) {
                eprintln!("relay: session: {e}");
            }
        });
    }
    Ok(())
}

fn relay(client: TcpStream, upstream: SocketAddr) -> io::Result<()> {
    let server = TcpStream::connect(upstream)?;
    // Postgres messages are small and latency-bound: never wait for Nagle.
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let (client_r, server_w) = (client.try_clone()?, server.try_clone()?);
    let upward = thread::spawn(move || pump(client_r, server_w));
    pump(server, client)?;
    upward.join().unwrap_or(Ok(()))
}

/// Copies until EOF, then passes the half-close on.
fn pump(mut from: TcpStream, mut to: TcpStream) -> io::Result<()> {
    let mut buf = vec![0u8; BUFFER];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // A reset from either side ends the session like an EOF.
            Err(_) => break,
        };
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relays_both_ways_and_half_closes() {
        let echo = TcpListener::bind("127.0.0.1:0").unwrap();
        let echo_addr = echo.local_addr().unwrap();
        thread::spawn(move || {
            let (mut s, _) = echo.accept().unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            s.write_all(&got).unwrap();
        });
        let front = TcpListener::bind("127.0.0.1:0").unwrap();
        let front_addr = front.local_addr().unwrap();
        thread::spawn(move || {
            let (c, _) = front.accept().unwrap();
            relay(c, echo_addr).unwrap();
        });
        let mut c = TcpStream::connect(front_addr).unwrap();
        c.write_all(b"hello through the relay").unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let mut back = Vec::new();
        c.read_to_end(&mut back).unwrap();
        assert_eq!(back, b"hello through the relay");
    }
}
