//! Running out of file descriptors without leaving clients in silence.
//!
//! accept(2), and io_uring's accept alike, take a free fd *before* they look
//! at the queue, so once the process is out of fds every accept fails with
//! EMFILE at once, whether or not a client is waiting. A client the kernel
//! has queued (the handshake is done, its StartupMessage may have been sent)
//! would then wait until some session ends. Each accept loop holds one
//! reserve fd for that: it frees it only when a client is really queued,
//! and in the same step, with nothing else on the thread running in
//! between, accepts that client to tell it why it cannot be served.
//!
//! Freeing the reserve first and then awaiting an accept would not work: the
//! accept fails at once, and while it waits for a client the freed fd goes
//! to whatever asks next (a session's upstream socket, another shard), so the
//! reserve is lost and the next queued client waits after all. For the same
//! reason the refused client's fd is never closed: once the client has
//! read its error, dup3(2) turns that very fd into the reserve again, in one
//! step no other thread can come between. Closed, it would go to whichever
//! shard asks first, maybe to let one more session in, and this loop would
//! be left without a reserve for as long as the process is out of fds.

use crate::net::Peer;
use std::cell::Cell;
use std::io::ErrorKind;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How often a shard that is out of fds looks again at its queue and for
/// free fds. A queued client waits this long when the shard has its
/// reserve; the refusal that spent it holds the fd until that client has
/// read the error and closed (up to [`LINGER`]), and the next queued client
/// waits for that. One reserve per accept loop refuses one client at a
/// time: enough to tell a burst why, not to serve it.
pub const RETRY: Duration = Duration::from_millis(10);

/// How long a refused client has to read its error and close before its
/// fd is taken back regardless.
const LINGER: Duration = Duration::from_millis(500);
/// And the most it reads from it meanwhile.
const LINGER_BYTES: usize = 64 * 1024;

pub fn out_of_fds(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// One file descriptor held back so that, when the process runs out, the
/// accept loop can still accept a waiting client to send it an error.
/// Shared with the refusal that spent it, which hands the fd back.
pub struct Reserve(Rc<Cell<Option<OwnedFd>>>);

impl Reserve {
    pub fn open() -> Self {
        let reserve = Reserve(Rc::new(Cell::new(None)));
        // Out of fds at start: the accept loop tries again.
        let _ = reserve.refill();
        reserve
    }

    fn is_held(&self) -> bool {
        let fd = self.0.take();
        let held = fd.is_some();
        self.0.set(fd);
        held
    }

    /// Opens the reserve again if it was spent (or could not be opened).
    /// Err only when the process is out of fds: the loop must then not
    /// wait for a client, since an fd freed between this call and the
    /// accept would go to some session and the client after it would find
    /// no reserve to be told with. Any other failure (no /dev/null in a
    /// chroot) leaves the loop without a reserve, as before this existed.
    pub fn refill(&self) -> Result<(), std::io::Error> {
        if self.is_held() {
            return Ok(());
        }
        match null_fd().map(|null| null.try_clone_to_owned()) {
            Some(Ok(fd)) => self.0.set(Some(fd)),
            Some(Err(e)) if out_of_fds(&e) => return Err(e),
            _ => {}
        }
        Ok(())
    }

    /// Spends the reserve on one queued client: frees the fd and accepts at
    /// once. None if there was no reserve, no client queued, or another
    /// thread took the fd in between (the client stays queued, and is
    /// served or refused once some fd is free again and the loop refills
    /// the reserve or accepts).
    pub fn accept_queued(&self, listener: RawFd) -> Option<Refused> {
        if !self.is_held() || !client_queued(listener) {
            return None;
        }
        drop(self.0.take());
        // SAFETY: `listener` is the shard's listening socket, which the
        // caller keeps open for this whole call; the borrow ends with it.
        let listener = unsafe { BorrowedFd::borrow_raw(listener) };
        let (socket, addr) = socket2::SockRef::from(&listener).accept().ok()?;
        socket.set_nonblocking(true).ok()?;
        let peer = match addr.as_socket() {
            Some(a) => Peer::Tcp(a),
            None => local_peer(&socket),
        };
        Some(Refused {
            socket,
            peer,
            reserve: self.0.clone(),
        })
    }
}

/// The fd every reserve is a copy of: one /dev/null for the process,
/// opened at first use (at start, when fds are free), and tried again
/// later if that failed. Copies share its open file, so a reserve frees a
/// slot in the process's fd table, not in the system's file table: at the
/// system-wide limit (ENFILE) clients wait for a free file instead.
fn null_fd() -> Option<BorrowedFd<'static>> {
    static NULL: OnceLock<OwnedFd> = OnceLock::new();
    if NULL.get().is_none() {
        let _ = NULL.set(std::fs::File::open("/dev/null").ok()?.into());
    }
    NULL.get().map(|fd| fd.as_fd())
}

/// A client accepted with the reserve fd, to be told why it cannot be
/// served.
pub struct Refused {
    socket: socket2::Socket,
    pub peer: Peer,
    reserve: Rc<Cell<Option<OwnedFd>>>,
}

impl Refused {
    /// Sends `response` and closes without a reset: our side shuts down,
    /// then what the client still sends is read until it closes (or for
    /// [`LINGER`]), so that unread bytes in the receive queue do not turn
    /// the close into an RST that could destroy the error before the client
    /// reads it. The socket is never registered with the runtime: a few
    /// hundred bytes fit a fresh socket's send buffer, and a 10 ms poll of
    /// one socket costs nothing next to a process out of fds.
    pub async fn tell_and_close(self, response: &[u8]) {
        if self
            .socket
            .send_with_flags(response, libc::MSG_NOSIGNAL)
            .is_ok()
        {
            let _ = self.socket.shutdown(std::net::Shutdown::Write);
            let until = Instant::now() + LINGER;
            let mut sink = [std::mem::MaybeUninit::<u8>::uninit(); 1024];
            // Bounded in time and bytes: a client that keeps sending must
            // not hold the shard's thread.
            let mut budget = LINGER_BYTES;
            while Instant::now() < until && budget > 0 {
                match self.socket.recv_with_flags(&mut sink, libc::MSG_DONTWAIT) {
                    Ok(0) => break,
                    Ok(n) => budget = budget.saturating_sub(n),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => monoio::time::sleep(RETRY).await,
                    Err(_) => break,
                }
            }
        }
        self.give_back();
    }

    /// Makes the client's fd the reserve again, closing the connection in
    /// the same step (see the module's comment); just closes it if the
    /// loop found a free fd for its reserve meanwhile.
    fn give_back(self) {
        let Refused {
            socket, reserve, ..
        } = self;
        let held = reserve.take();
        if held.is_some() {
            reserve.set(held);
            return;
        }
        let Some(null) = null_fd() else { return };
        let fd = socket.into_raw_fd();
        // SAFETY: `fd` is the socket's own fd, ours since into_raw_fd; dup3
        // closes the socket and leaves `fd` open on /dev/null, which the
        // OwnedFd then owns. On failure `fd` is still the socket, and the
        // OwnedFd closes it at once; the loop refills its reserve when an
        // fd is free.
        let fd = unsafe {
            let ok = libc::dup3(null.as_raw_fd(), fd, libc::O_CLOEXEC) == fd;
            (ok, OwnedFd::from_raw_fd(fd))
        };
        if let (true, fd) = fd {
            reserve.set(Some(fd));
        }
    }
}

/// A Unix-domain socket client, with its credentials where the kernel has
/// them (for the log line only).
fn local_peer(socket: &socket2::Socket) -> Peer {
    let mut cred = libc::ucred {
        pid: 0,
        uid: u32::MAX,
        gid: u32::MAX,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, a ucred.
    let ok = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    } == 0;
    Peer::Local {
        uid: cred.uid,
        pid: (ok && cred.pid > 0).then_some(cred.pid),
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
    use std::io::Read;

    fn held_fd(reserve: &Reserve) -> Option<RawFd> {
        let fd = reserve.0.take();
        let raw = fd.as_ref().map(|f| f.as_raw_fd());
        reserve.0.set(fd);
        raw
    }

    fn queued_client(listener: &std::net::TcpListener) -> std::net::TcpStream {
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !client_queued(listener.as_raw_fd()) {
            assert!(Instant::now() < deadline, "never queued");
            std::thread::sleep(Duration::from_millis(1));
        }
        client
    }

    #[test]
    fn the_refused_clients_fd_becomes_the_reserve_again() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let fd = listener.as_raw_fd();
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap();
        rt.block_on(async {
            let reserve = Reserve::open();
            // Nobody waiting: the reserve is kept.
            assert!(!client_queued(fd));
            assert!(reserve.accept_queued(fd).is_none());
            assert!(held_fd(&reserve).is_some());

            // The client has sent its StartupMessage, which is never read.
            let mut client = queued_client(&listener);
            std::io::Write::write_all(&mut client, b"\0\0\0\x08\x04\xd2\x16\x2f").unwrap();
            let refused = reserve.accept_queued(fd).expect("accepted");
            assert_eq!(refused.peer, Peer::Tcp(client.local_addr().unwrap()));
            assert!(held_fd(&reserve).is_none(), "the reserve was spent");
            let socket_fd = refused.socket.as_raw_fd();
            let reader = std::thread::spawn(move || {
                let mut got = Vec::new();
                // EOF, not a reset: the error arrives whole.
                client.read_to_end(&mut got).map(|_| got)
            });
            refused.tell_and_close(b"Egone").await;
            assert_eq!(reader.join().unwrap().unwrap(), b"Egone");
            assert_eq!(held_fd(&reserve), Some(socket_fd), "the same fd came back");

            // A loop that refilled its reserve meanwhile keeps that one; the
            // refused client's fd is just closed.
            let client = queued_client(&listener);
            let refused = reserve.accept_queued(fd).expect("accepted");
            reserve.refill().unwrap();
            let refilled = held_fd(&reserve);
            drop(client);
            refused.tell_and_close(b"E").await;
            assert_eq!(held_fd(&reserve), refilled);
        });
    }
}
