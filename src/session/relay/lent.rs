//! The pump for every session the relay ring does not serve: TLS on
//! either side, or plain without a relay ring (the epoll driver,
//! `plain_relay = "readiness"`). It waits for readiness holding no
//! buffer, and borrows one from the shard's [`BufferPool`] only while
//! bytes are in flight.
//!
//! An idle session therefore holds no relay memory at all; the kernel
//! keeps the unread bytes. A TLS side is a [`TlsStream`], which opens and
//! seals records in the lent buffer itself. Plain sockets switch to
//! monoio's poll-io mode (readiness from the driver, then a non-blocking
//! `recv`/`send`): a read that finds nothing hands the buffer straight
//! back, which io_uring's owned-buffer reads cannot do (the kernel holds
//! the buffer until data comes).

use std::cell::{Cell, RefCell};
use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::task::Poll;

use monoio::io::poll_io::{AsyncRead, AsyncWrite, ReadBuf};
use monoio::io::AsyncWriteRent;

use bytes::BytesMut;

use super::{
    before_terminate, goodbye_sent, open, reset_plan, session_ended, BufferPool, EndAction, Ended,
    EndedBy, Kept, Pump, ServerSide, Tracks,
};
use crate::net::{ReadyStream, Stream, StreamPoll};
use crate::server::reset::Plan;
use crate::session::kill::KillSwitch;
use crate::tls::stream::TlsStream;

/// Reads in a row that found data before a pump lets other sessions of the
/// shard run: with non-blocking syscalls nothing else yields, and a bulk
/// COPY must not starve its neighbours.
const READS_PER_TURN: u32 = 16;

/// The pump's future; a plain function around one `async move` block,
/// for the reason `ringed::run` gives (an `async fn` would keep
/// the sockets and the `Pump` twice in the future an idle session holds).
pub(super) fn run<C, S, A, F>(
    mut client: C,
    mut server: S,
    pump: Pump<A>,
) -> impl Future<Output = Ended>
where
    C: Opener,
    S: Opener,
    A: FnOnce() -> F,
    F: Future<Output = ()>,
{
    let Pump {
        for_client,
        client_pending,
        tracks,
        pool,
        kill,
        abandon,
        keep,
        said_goodbye,
    } = pump;
    async move {
        let gone = |by| Ended { by, kept: None };
        if let Err(e) = open(&mut client, &mut server, for_client, client_pending).await {
            return gone(e);
        }
        let Some(client) = client.into_wire() else {
            return gone(EndedBy::ClientIo);
        };
        let Some(server) = server.into_wire() else {
            return gone(EndedBy::ServerIo);
        };
        // Set while client bytes are being written to the server: if the
        // relay stops then, the server holds part of a message.
        let writing = Cell::new(false);
        let ended_by = {
            let keeping = keep.is_some().then_some(&said_goodbye);
            let up = client_to_server(&client, &server, &pool, &tracks, keeping, &writing);
            let down = server_to_client(&server, &client, &pool, &tracks, &kill, &said_goodbye);
            monoio::select! {
                e = up => e,
                e = down => e,
            }
        };
        let ended_by = tracks.borrow().attribute(ended_by);
        // Lent reads hold no data when dropped (a TLS stream keeps what it
        // read in itself): the server stream is whole unless a write to it
        // was cut.
        let client_end = (!writing.get(), said_goodbye.get());
        let kept = reset_plan(keep.as_deref(), &tracks, ended_by, client_end, true);
        if let Some((mut plan, cancel, prologue)) = kept {
            if cancel {
                Box::pin(abandon()).await;
            }
            if server.write_all(&prologue).await.is_err() {
                plan = Plan::Close("broken");
            }
            let kept = S::kept(server).map(|server| Kept {
                server,
                plan,
                framer: tracks.borrow().server.clone(),
                leftover: BytesMut::new(),
            });
            client.goodbye();
            return Ended { by: ended_by, kept };
        }
        let action = tracks.borrow().end_action(ended_by);
        match action {
            EndAction::Nothing => {}
            EndAction::TellServer(bytes) => {
                let _ = server.write_all(&bytes).await;
            }
            EndAction::TellClient(bytes) => {
                let _ = client.write_all(&bytes).await;
            }
            // Boxed: a cancel connects (maybe over TLS), a large future the
            // pump would otherwise carry for the whole session.
            EndAction::Abandon => Box::pin(abandon()).await,
        }
        client.goodbye();
        gone(ended_by)
    }
}

/// A socket as the pump reads and writes it, on either side: plain in
/// poll-io mode, or TLS (records opened in the lent buffer).
pub(in crate::session) trait Wire {
    /// Waits for bytes, then returns them at the start of a lent buffer;
    /// `None` at the end of the stream.
    async fn read_lent(&self, pool: &BufferPool) -> io::Result<Option<(Vec<u8>, usize)>>;
    async fn write_all(&self, bytes: &[u8]) -> io::Result<()>;
    /// The relay is over: anything to say before the socket closes.
    fn goodbye(&self) {}
}

impl Wire for RefCell<StreamPoll> {
    async fn read_lent(&self, pool: &BufferPool) -> io::Result<Option<(Vec<u8>, usize)>> {
        read_lent(self, pool).await
    }

    async fn write_all(&self, bytes: &[u8]) -> io::Result<()> {
        write_all(self, bytes).await
    }
}

/// A socket that becomes a [`Wire`] once the opening bytes are written
/// with the rent API.
pub(in crate::session) trait Opener: AsyncWriteRent {
    type Wire: Wire;
    fn into_wire(self) -> Option<Self::Wire>;
    /// A server's wire, as a pooled connection keeps it.
    fn kept(wire: Self::Wire) -> Option<ServerSide>;
}

impl Opener for Stream {
    type Wire = RefCell<StreamPoll>;

    fn into_wire(self) -> Option<Self::Wire> {
        self.try_into_poll_io().ok().map(RefCell::new)
    }

    fn kept(wire: Self::Wire) -> Option<ServerSide> {
        wire.into_inner().try_into_comp_io().map(ServerSide::Plain)
    }
}

impl Opener for TlsStream {
    type Wire = TlsStream;

    fn into_wire(self) -> Option<Self::Wire> {
        Some(self)
    }

    fn kept(wire: Self::Wire) -> Option<ServerSide> {
        Some(ServerSide::Tls(Box::new(wire)))
    }
}

impl Wire for ReadyStream {
    async fn read_lent(&self, pool: &BufferPool) -> io::Result<Option<(Vec<u8>, usize)>> {
        let (buf, n) = self
            .read_with(|| pool.take(), |b| pool.put(b), None)
            .await?;
        if n == 0 {
            pool.put(buf);
            return Ok(None);
        }
        Ok(Some((buf, n)))
    }

    async fn write_all(&self, bytes: &[u8]) -> io::Result<()> {
        ReadyStream::write_all(self, bytes).await
    }
}

impl Wire for TlsStream {
    async fn read_lent(&self, _: &BufferPool) -> io::Result<Option<(Vec<u8>, usize)>> {
        TlsStream::read_lent(self).await
    }

    async fn write_all(&self, bytes: &[u8]) -> io::Result<()> {
        TlsStream::write_all(self, bytes).await
    }

    fn goodbye(&self) {
        self.close();
    }
}

/// Waits until `from` has bytes, then reads them into a lent buffer.
/// `Ok(None)` is end of stream. While waiting, no buffer is held.
pub(in crate::session) async fn read_lent(
    from: &RefCell<StreamPoll>,
    pool: &BufferPool,
) -> io::Result<Option<(Vec<u8>, usize)>> {
    poll_fn(|cx| {
        let mut buf = pool.take();
        let mut read = ReadBuf::new(&mut buf);
        match Pin::new(&mut *from.borrow_mut()).poll_read(cx, &mut read) {
            Poll::Ready(Ok(())) => {
                let n = read.filled().len();
                if n == 0 {
                    pool.put(buf);
                    Poll::Ready(Ok(None))
                } else {
                    Poll::Ready(Ok(Some((buf, n))))
                }
            }
            Poll::Ready(Err(e)) => {
                pool.put(buf);
                Poll::Ready(Err(e))
            }
            Poll::Pending => {
                pool.put(buf);
                Poll::Pending
            }
        }
    })
    .await
}

/// Writes all of `bytes`, waiting for the peer to read when its socket
/// buffer is full: backpressure, with this one buffer as the only memory
/// held meanwhile.
pub(in crate::session) async fn write_all(
    to: &RefCell<StreamPoll>,
    mut bytes: &[u8],
) -> io::Result<()> {
    while !bytes.is_empty() {
        let n = poll_fn(|cx| Pin::new(&mut *to.borrow_mut()).poll_write(cx, bytes)).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        bytes = &bytes[n..];
    }
    Ok(())
}

/// Copies client bytes to the server until the client closes or fails.
/// With a kept server (`goodbye` given), the client's Terminate stays
/// here and is noted in `goodbye`; if queries are still in flight, the
/// other direction ends the session once they are answered.
async fn client_to_server(
    from: &impl Wire,
    to: &impl Wire,
    pool: &BufferPool,
    tracks: &RefCell<Tracks>,
    goodbye: Option<&Cell<bool>>,
    writing: &Cell<bool>,
) -> EndedBy {
    let turn = Turn::new();
    loop {
        let (buf, n) = match turn.read(from.read_lent(pool)).await {
            Ok(Some(read)) => read,
            Ok(None) => return EndedBy::ClientClosed,
            Err(_) => return EndedBy::ClientIo,
        };
        if tracks.borrow_mut().saw_client(&buf[..n]).is_err() {
            pool.put(buf);
            return EndedBy::ClientProtocol;
        }
        let terminate = goodbye.and_then(|_| before_terminate(&tracks.borrow(), &buf[..n]));
        writing.set(true);
        let res = to.write_all(&buf[..terminate.unwrap_or(n)]).await;
        writing.set(false);
        pool.put(buf);
        if res.is_err() {
            return EndedBy::ServerIo;
        }
        if let (Some(_), Some(goodbye)) = (terminate, goodbye) {
            return goodbye_sent(goodbye, tracks).await;
        }
        turn.take().await;
    }
}

/// Copies server bytes to the client until either fails or closes, or
/// `kill` fires, in which case it stops at a message boundary and sends
/// the client a FATAL error naming the reason.
async fn server_to_client(
    from: &impl Wire,
    to: &impl Wire,
    pool: &BufferPool,
    tracks: &RefCell<Tracks>,
    kill: &KillSwitch,
    goodbye: &Cell<bool>,
) -> EndedBy {
    let turn = Turn::new();
    let at_boundary = || tracks.borrow().server.at_boundary();
    let reason = loop {
        if goodbye.get() && tracks.borrow().drained() {
            // The client said goodbye and has every answer it asked for.
            return EndedBy::ClientClosed;
        }
        if let Some(reason) = kill.fired().filter(|_| at_boundary()) {
            break reason;
        }
        let read = turn.read(from.read_lent(pool));
        let res = if at_boundary() {
            // Idle or between messages: a kill may interrupt the wait.
            monoio::select! {
                r = read => r,
                reason = kill.wait() => break reason,
            }
        } else {
            read.await
        };
        let (buf, n) = match res {
            Ok(Some(read)) => read,
            Ok(None) => return EndedBy::ServerClosed,
            Err(_) => return EndedBy::ServerIo,
        };
        // After a kill, forward only up to the end of the message in flight.
        let (n, scanned) = {
            let mut tracks = tracks.borrow_mut();
            let n = match kill.fired() {
                Some(_) => tracks.server.bytes_to_boundary(&buf[..n]).unwrap_or(n),
                None => n,
            };
            (n, tracks.saw_server(&buf[..n]))
        };
        if scanned.is_err() {
            pool.put(buf);
            return EndedBy::ServerProtocol;
        }
        let res = to.write_all(&buf[..n]).await;
        pool.put(buf);
        if res.is_err() {
            return EndedBy::ClientIo;
        }
        turn.take().await;
    };
    let _ = to.write_all(&session_ended(reason)).await;
    EndedBy::Killed(reason)
}

/// A pump's reads that found data without waiting, in a row: after
/// [`READS_PER_TURN`] of them it lets the shard's other tasks run. A read
/// that waited ends the run (the others ran meanwhile), so a session that
/// trades queries and answers never yields; one streaming a bulk COPY or
/// a large result does, every `READS_PER_TURN` reads.
pub(in crate::session) struct Turn(Cell<u32>);

impl Turn {
    pub(in crate::session) fn new() -> Turn {
        Turn(Cell::new(0))
    }

    /// `read`, noting whether it had to wait.
    pub(in crate::session) async fn read<F: Future>(&self, read: F) -> F::Output {
        let mut read = std::pin::pin!(read);
        poll_fn(|cx| {
            let res = read.as_mut().poll(cx);
            if res.is_pending() {
                self.0.set(0);
            }
            res
        })
        .await
    }

    /// After a read that found data: yields every [`READS_PER_TURN`] in
    /// a row.
    pub(in crate::session) async fn take(&self) {
        let n = self.0.get() + 1;
        if n < READS_PER_TURN {
            self.0.set(n);
            return;
        }
        self.0.set(0);
        crate::shard::turns::yield_now().await;
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::future::Future;
    use std::rc::Rc;

    use super::{Turn, READS_PER_TURN};

    fn run(test: impl Future<Output = ()>) {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .expect("runtime")
            .block_on(test);
    }

    /// Pending once (after asking to be polled again), then ready: a read
    /// that had to wait.
    async fn waits() {
        let mut asked = false;
        std::future::poll_fn(|cx| {
            if asked {
                return std::task::Poll::Ready(());
            }
            asked = true;
            cx.waker().wake_by_ref();
            std::task::Poll::Pending
        })
        .await
    }

    /// How many reads the pump does before a task that became ready at
    /// the start gets to run (`None`: not within `reads`).
    async fn reads_before_others_run(reads: u32, wait: impl Fn(u32) -> bool) -> Option<u32> {
        let ran = Rc::new(Cell::new(false));
        let other = {
            let ran = ran.clone();
            monoio::spawn(async move { ran.set(true) })
        };
        let turn = Turn::new();
        let mut seen = None;
        for i in 0..reads {
            if wait(i) {
                turn.read(waits()).await;
            } else {
                turn.read(async {}).await;
            }
            if ran.get() && seen.is_none() {
                seen = Some(i);
            }
            turn.take().await;
        }
        other.await;
        seen
    }

    #[test]
    fn reads_that_find_data_in_a_row_yield_every_turn() {
        run(async {
            let seen = reads_before_others_run(READS_PER_TURN * 2, |_| false).await;
            assert_eq!(
                seen,
                Some(READS_PER_TURN),
                "the other task ran after a turn's reads"
            );
        });
    }

    #[test]
    fn a_read_that_waits_starts_the_count_again() {
        run(async {
            // Every eighth read waits: never READS_PER_TURN in a row, and
            // monoio polls a self-woken task again at once, so nothing
            // else runs during those waits either.
            let seen = reads_before_others_run(READS_PER_TURN * 4, |i| i % 8 == 7).await;
            assert_eq!(seen, None, "no yield without a full turn in a row");
        });
    }
}
