//! Who is at the other end of a client connection.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// A client's address: a TCP peer, or a process on this host that
/// connected over the Unix-domain socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    Tcp(SocketAddr),
    /// A Unix-domain socket client, with the credentials the kernel gave
    /// for it at connect (`SO_PEERCRED`): they cannot be forged.
    Local {
        uid: u32,
        pid: Option<i32>,
    },
}

impl Peer {
    /// The address that per-source limits and token source rules see. A
    /// local client counts as 127.0.0.1: it is on this host, and a token
    /// limited to other networks must not be usable through the socket.
    pub fn ip(&self) -> IpAddr {
        match self {
            Peer::Tcp(a) => a.ip(),
            Peer::Local { .. } => IpAddr::V4(Ipv4Addr::LOCALHOST),
        }
    }

    /// The peer's uid and pid, for the audit log (Unix-domain sockets only).
    pub fn credentials(&self) -> (Option<u32>, Option<i32>) {
        match self {
            Peer::Tcp(_) => (None, None),
            Peer::Local { uid, pid } => (Some(*uid), *pid),
        }
    }

    pub fn is_local(&self) -> bool {
        matches!(self, Peer::Local { .. })
    }
}

impl From<SocketAddr> for Peer {
    fn from(a: SocketAddr) -> Self {
        Peer::Tcp(a)
    }
}

/// `[local]` for a Unix-domain socket client, as PostgreSQL logs it.
impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Tcp(a) => a.fmt(f),
            Peer::Local { .. } => f.write_str("[local]"),
        }
    }
}
