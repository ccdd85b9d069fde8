//! Running out of file descriptors without leaving clients in silence.
//!
//! accept(2), and io_uring's accept alike, take a free fd *before* they look
//! at the queue, so once the process is out of fds every accept fails with
//! EMFILE at once, whether or not a client is waiting. A client the kernel
//! has queued (the handshake is done, its StartupMessage may have been sent)
//! would then wait until some session ends. Each shard holds one reserve fd
//! for that: it frees it only when a client is really queued, and in the
//! same step, with nothing else on the thread running in between, accepts
//! that client to tell it why it cannot be served.
//!
//! Freeing the reserve first and then awaiting an accept would not work: the
//! accept fails at once, and while it waits for a client the freed fd goes
//! to whatever asks next (a session's upstream socket, another shard), so the
//! reserve is lost and the next queued client waits after all.

use crate::net::{Peer, Stream};
use std::os::fd::{BorrowedFd, RawFd};
use std::time::Duration;

/// How often a shard that is out of fds looks again at its queue and for
/// free fds. A queued client waits this long when the shard has its
/// reserve; the refusal that spent it holds the fd until that client has
/// read the error and closed (a lingering close, up to 500 ms), and the next
/// queued client waits for that. One reserve per shard refuses one client at
/// a time: enough to tell a burst why, not to serve it.
pub const RETRY: Duration = Duration::from_millis(10);

pub fn out_of_fds(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// One file descriptor held back so that, when the process runs out, the
/// shard can still accept a waiting client to send it an error.
pub struct Reserve(Option<std::fs::File>);

impl Reserve {
    pub fn open() -> Self {
        let mut reserve = Reserve(None);
        // Out of fds at start: the accept loop tries again.
        let _ = reserve.refill();
        reserve
    }

    /// Opens the reserve again if it was used (or could not be opened).
    /// Err only when the process is out of fds: the shard must then not
    /// wait for a client, since an fd freed between this call and the
    /// accept would go to some session and the client after it would find
    /// no reserve to be told with. Any other failure (no /dev/null in a
    /// chroot) leaves the shard without a reserve, as before this existed.
    pub fn refill(&mut self) -> Result<(), std::io::Error> {
        if self.0.is_none() {
            match std::fs::File::open("/dev/null") {
                Ok(f) => self.0 = Some(f),
                Err(e) if out_of_fds(&e) => return Err(e),
                Err(_) => {}
            }
        }
        Ok(())
    }

    /// Spends the reserve on one queued client: frees the fd and accepts at
    /// once. None if there was no reserve, no client queued, or another
    /// thread took the fd in between (the client stays queued, and is
    /// served or refused once some fd is free again and the shard's loop
    /// refills the reserve or accepts).
    pub fn accept_queued(&mut self, listener: RawFd) -> Option<(Stream, Peer)> {
        if self.0.is_none() || !client_queued(listener) {
            return None;
        }
        self.0 = None;
        // SAFETY: `listener` is the shard's listening socket, which the
        // caller keeps open for this whole call; the borrow ends with it.
        let listener = unsafe { BorrowedFd::borrow_raw(listener) };
        let (socket, addr) = socket2::SockRef::from(&listener).accept().ok()?;
        socket.set_nonblocking(true).ok()?;
        if let Some(addr) = addr.as_socket() {
            let stream = monoio::net::TcpStream::from_std(socket.into()).ok()?;
            return Some((Stream::Tcp(stream), Peer::Tcp(addr)));
        }
        let stream = monoio::net::UnixStream::from_std(socket.into()).ok()?;
        let cred = stream.peer_cred().ok()?;
        let peer = Peer::Local {
            uid: cred.uid(),
            pid: cred.pid(),
        };
        Some((Stream::Unix(stream), peer))
    }
}

/// Whether the listener has a connection waiting to be accepted.
pub(super) fn client_queued(listener: RawFd) -> bool {
    let mut pfd = libc::pollfd {
        fd: listener,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, a zero timeout: poll(2) only writes revents.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n > 0 && pfd.revents & libc::POLLIN != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_queued_client_is_seen_and_accepted_with_the_reserve() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let fd = listener.as_raw_fd();
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut reserve = Reserve::open();
            // Nobody waiting: the reserve is kept.
            assert!(!client_queued(fd));
            assert!(reserve.accept_queued(fd).is_none());
            assert!(reserve.0.is_some());

            let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while !client_queued(fd) {
                assert!(std::time::Instant::now() < deadline, "never queued");
                std::thread::sleep(Duration::from_millis(1));
            }
            let (_stream, peer) = reserve.accept_queued(fd).expect("accepted");
            assert_eq!(peer, Peer::Tcp(client.local_addr().unwrap()));
            assert!(reserve.0.is_none(), "the reserve was spent");
            reserve.refill().unwrap();
            assert!(reserve.0.is_some());
        });
    }
}
