//! CPU time and listening sockets of the processes under test, from `/proc`.
//!
//! CPU time per transaction is the figure that survives a noisy, shared
//! machine: throughput moves with whatever else runs, but the CPU a proxy
//! burns for each transaction it relays barely does. `/proc/<pid>/stat`
//! reports `utime` and `stime` (fields 14 and 15, see proc(5)) in clock ticks,
//! summed over every thread of the process, so one read per process covers
//! tollgate's shards and HAProxy's threads; PgBouncer's processes are summed
//! by the caller. Ticks are 10 ms, so runs must last seconds, not
//! milliseconds, for the figure to mean anything.

use std::fs;
use std::io;

/// User plus system CPU time of one process, in clock ticks.
pub fn parse_stat_ticks(stat: &str) -> Option<u64> {
    // Field 2, the command name, is in parentheses and may itself contain
    // spaces and parentheses: everything after the last ')' is fields 3...
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    // Fields 3 (state) .. 13 (cmajflt) come first; utime is field 14.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Reads CPU time of a set of processes in microseconds.
#[derive(Debug, Clone, Copy)]
pub struct CpuClock {
    ticks_per_second: u64,
}

impl CpuClock {
    pub fn new() -> Self {
        CpuClock {
            ticks_per_second: crate::sys::clock_ticks_per_second(),
        }
    }

    /// Microseconds of CPU the processes have used so far, summed. An error
    /// means one of them is gone, which the caller treats as a crash.
    pub fn cpu_us(&self, pids: &[u32]) -> io::Result<u64> {
        let mut ticks = 0;
        for pid in pids {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
            ticks += parse_stat_ticks(&stat).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unexpected /proc/{pid}/stat: {stat:?}"),
                )
            })?;
        }
        Ok(ticks * 1_000_000 / self.ticks_per_second)
    }
}

/// Socket inodes in LISTEN state on `port` in a `/proc/net/tcp` table.
pub fn listening_inodes(table: &str, port: u16) -> Vec<u64> {
    const TCP_LISTEN: &str = "0A";
    let mut inodes = Vec::new();
    // Columns: sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode ...
    for line in table.lines().skip(1) {
        let cols: Vec<&str> = line.split_ascii_whitespace().collect();
        if cols.len() < 10 || cols[3] != TCP_LISTEN {
            continue;
        }
        let local_port = cols[1]
            .rsplit_once(':')
            .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
        if local_port == Some(port) {
            if let Ok(inode) = cols[9].parse() {
                inodes.push(inode);
            }
        }
    }
    inodes
}

/// Whether process `pid` itself holds a socket listening on TCP `port`.
///
/// A plain connect cannot tell which of several SO_REUSEPORT listeners
/// answered, so to know that *every* PgBouncer process (or every tollgate
/// shard's listener) is up we look at the process's own descriptors.
pub fn is_listening(pid: u32, port: u16) -> bool {
    let table = fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let inodes = listening_inodes(&table, port);
    if inodes.is_empty() {
        return false;
    }
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.filter_map(|fd| fd.ok())
        .filter_map(|fd| fs::read_link(fd.path()).ok())
        .any(|link| {
            link.to_str()
                .and_then(|l| l.strip_prefix("socket:["))
                .and_then(|l| l.strip_suffix(']'))
                .and_then(|inode| inode.parse::<u64>().ok())
                .is_some_and(|inode| inodes.contains(&inode))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_line_with_awkward_command_name() {
        // Real layout (kernel 6.x); comm contains a space and a parenthesis.
        let stat = "4242 (shard 0) x) S 1 4242 4242 0 -1 4194560 1234 0 0 0 \
                    157 43 0 0 20 0 3 0 98765 123456789 2345 18446744073709551615 \
                    1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(parse_stat_ticks(stat), Some(157 + 43));
    }

    #[test]
    fn stat_of_this_process() {
        let stat = fs::read_to_string("/proc/self/stat").unwrap();
        assert!(parse_stat_ticks(&stat).is_some(), "{stat}");
        let clock = CpuClock::new();
        assert!(clock.cpu_us(&[std::process::id()]).is_ok());
    }

    #[test]
    fn truncated_stat_is_rejected() {
        assert_eq!(parse_stat_ticks("1 (x) S 1 2 3"), None);
        assert_eq!(parse_stat_ticks("no parenthesis"), None);
    }

    #[test]
    fn listening_sockets_are_found_by_port() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 111 1 0000000000000000 100 0 0 10 0\n\
   1: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 222 1 0000000000000000 100 0 0 10 0\n\
   2: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 333 1 0000000000000000 20 4 30 10 -1\n\
   3: 0100007F:1F91 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 444 1 0000000000000000 100 0 0 10 0\n";
        assert_eq!(listening_inodes(table, 8080), vec![111, 222]);
        assert_eq!(listening_inodes(table, 8081), vec![444]);
        assert!(listening_inodes(table, 9).is_empty());
    }

    #[test]
    fn own_listener_is_seen() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert!(is_listening(std::process::id(), port));
        drop(listener);
        assert!(!is_listening(std::process::id(), port));
    }
}
