//! The pump for sessions with TLS on either side: each direction owns one
//! buffer for the session's life and hands it to the kernel (or rustls)
//! with monoio's rent API. Socket readiness says nothing about plaintext
//! rustls may already hold, so these reads cannot wait buffer-less.
//!
//! An owned read cannot be dropped half-done without losing what it may
//! have read (and a TLS stream whose read is dropped is unusable), so a
//! kept server connection is stopped differently: when the client leaves,
//! the reset's prologue is sent first, and the server-to-client direction
//! stops at the next read it completes, whose bytes become the reset's
//! first input.

use std::cell::{Cell, RefCell};

use bytes::BytesMut;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, Split, Splitable};

use super::{
    before_terminate, goodbye_sent, open, reset_plan, session_ended, EndAction, Ended, EndedBy,
    Kept, Pump, ServerSide, Tracks,
};
use crate::server::reset::{Plan, RESET_TIMEOUT};
use crate::session::kill::KillSwitch;

/// Which direction finished first.
enum Finished {
    Up(EndedBy),
    /// With the bytes it read after being told to stop.
    Down(EndedBy, Option<Vec<u8>>),
}

/// What the two directions share about stopping a kept server.
#[derive(Default)]
struct Stopping {
    /// Client bytes are being written to the server.
    writing: Cell<bool>,
    /// A server read was dropped half-done (the session was ended while
    /// the server was idle): the stream cannot be trusted.
    read_cut: Cell<bool>,
    /// The reset's prologue is sent: the next completed read is the
    /// reset's, not the client's. Set only once the prologue is out
    /// whole, and then at once, so the other direction cannot take the
    /// server's answer to it for the client's.
    stop: Cell<bool>,
    /// The prologue is being written: if the session ends meanwhile, the
    /// server holds part of it. A read that completes meanwhile may hold
    /// the server's first answers to it: the other direction keeps those
    /// and waits (woken through `waiting`) for the write to finish.
    writing_prologue: Cell<bool>,
    waiting: Cell<Option<std::task::Waker>>,
    /// The client left and its connection's reset has begun: a kill must
    /// no longer cut the other direction's read.
    resetting: Cell<bool>,
    /// What the prologue carried out, and how the client ended.
    sent: RefCell<Option<(Plan, EndedBy)>>,
}

pub(super) async fn run<C, S, A, F>(mut client: C, mut server: S, pump: Pump<A>) -> Ended
where
    C: Split + AsyncReadRent + AsyncWriteRent,
    S: Split + AsyncReadRent + AsyncWriteRent + Into<ServerSide>,
    A: FnOnce() -> F,
    F: std::future::Future<Output = ()>,
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
    if let Err(e) = open(&mut client, &mut server, for_client, client_pending).await {
        return Ended { by: e, kept: None };
    }
    let abandon = Cell::new(Some(abandon));
    let stopping = Stopping::default();
    let (mut client_r, mut client_w) = client.into_split();
    let (mut server_r, mut server_w) = server.into_split();
    let finished = {
        let up = async {
            let e = client_to_server(
                &mut client_r,
                &mut server_w,
                Vec::with_capacity(pool.buffer_size()),
                &tracks,
                keep.is_some().then_some(&said_goodbye),
                &stopping.writing,
            )
            .await;
            let shared = (keep.as_deref(), &tracks, &said_goodbye);
            begin_reset(e, &mut server_w, shared, &stopping, &abandon).await;
            Finished::Up(e)
        };
        let down = async {
            let (e, rest) = server_to_client(
                &mut server_r,
                &mut client_w,
                Vec::with_capacity(pool.buffer_size()),
                &tracks,
                &kill,
                &stopping,
                &said_goodbye,
            )
            .await;
            Finished::Down(e, rest)
        };
        // Whichever direction ends first ends the session; dropping the
        // other cancels its pending read.
        monoio::select! {
            f = up => f,
            f = down => f,
        }
    };
    let sent = stopping.sent.take();
    let ended_by = match (&finished, &sent) {
        (_, Some((_, by))) => *by,
        (Finished::Up(e) | Finished::Down(e, _), None) => *e,
    };
    let ended_by = tracks.borrow().attribute(ended_by);
    if stopping.writing_prologue.get() {
        // Ended while half the prologue was out: nothing to keep.
        return Ended {
            by: ended_by,
            kept: None,
        };
    }
    let kept = match (finished, sent) {
        // The prologue is out and the server answered: hand it all over.
        (Finished::Down(_, Some(rest)), Some((plan, _))) => Some((plan, BytesMut::from(&rest[..]))),
        // Or the other direction ended on the client's side of a write,
        // having read nothing of the reset's: its answers are unread.
        (Finished::Down(EndedBy::ClientIo, None), Some((plan, _))) => Some((plan, BytesMut::new())),
        (_, Some(_)) | (Finished::Down(_, Some(_)), None) => None,
        (_, None) => {
            let client_end = (!stopping.writing.get(), said_goodbye.get());
            let intact = !stopping.read_cut.get();
            match reset_plan(keep.as_deref(), &tracks, ended_by, client_end, intact) {
                Some((plan, cancel, prologue)) => {
                    if cancel {
                        abandon_once(&abandon).await;
                    }
                    let (res, _) = server_w.write_all(prologue).await;
                    let plan = if res.is_ok() {
                        plan
                    } else {
                        Plan::Close("broken")
                    };
                    Some((plan, BytesMut::new()))
                }
                None => {
                    end_unkept(&tracks, ended_by, &mut server_w, &mut client_w, &abandon).await;
                    // A TLS client's close_notify; a plain one's FIN.
                    let _ = client_w.shutdown().await;
                    return Ended {
                        by: ended_by,
                        kept: None,
                    };
                }
            }
        }
    };
    let _ = client_w.shutdown().await;
    let kept = kept.and_then(|(plan, leftover)| {
        let server = server_r.reunite(server_w).ok()?;
        Some(Kept {
            server: server.into(),
            plan,
            framer: tracks.borrow().server.clone(),
            leftover,
        })
    });
    Ended { by: ended_by, kept }
}

/// With a kept server, once the client has gone: the reset's plan and, unless
/// it is to close, the cancel (when the client vanished mid-query) and the
/// prologue, written whole before the other direction may stop at its next
/// read (see [`Stopping`]). Then waits for that direction to end the
/// session; if the server says nothing within [`RESET_TIMEOUT`], returns
/// and the connection is closed.
async fn begin_reset<W: AsyncWriteRent, A, F>(
    e: EndedBy,
    server_w: &mut W,
    (keep, tracks, said_goodbye): (Option<&str>, &RefCell<Tracks>, &Cell<bool>),
    stopping: &Stopping,
    abandon: &Cell<Option<A>>,
) where
    A: FnOnce() -> F,
    F: std::future::Future<Output = ()>,
{
    let client_end = (!stopping.writing.get(), said_goodbye.get());
    let Some((plan, cancel, prologue)) = reset_plan(keep, tracks, e, client_end, true) else {
        return;
    };
    if matches!(plan, Plan::Close(_)) {
        return;
    }
    stopping.resetting.set(true);
    // The cancel's answer (the query's error) is relayed to the departed
    // client, i.e. dropped; if that ends the other direction first, the
    // plan is made again after the select.
    if cancel {
        abandon_once(abandon).await;
    }
    stopping.writing_prologue.set(true);
    let (res, _) = server_w.write_all(prologue).await;
    stopping.writing_prologue.set(false);
    if let Some(waker) = stopping.waiting.take() {
        waker.wake();
    }
    if res.is_ok() {
        *stopping.sent.borrow_mut() = Some((plan, e));
        stopping.stop.set(true);
        monoio::time::sleep(RESET_TIMEOUT).await;
    }
}

/// Cancels the running query, once: boxed, as a cancel connects (maybe
/// over TLS), a large future the pump would otherwise carry for the whole
/// session.
async fn abandon_once<A, F>(abandon: &Cell<Option<A>>)
where
    A: FnOnce() -> F,
    F: std::future::Future<Output = ()>,
{
    if let Some(abandon) = abandon.take() {
        Box::pin(abandon()).await;
    }
}

/// The end of a session whose server connection is not kept: what the
/// other side must hear.
async fn end_unkept<SW: AsyncWriteRent, CW: AsyncWriteRent, A, F>(
    tracks: &RefCell<Tracks>,
    ended_by: EndedBy,
    server_w: &mut SW,
    client_w: &mut CW,
    abandon: &Cell<Option<A>>,
) where
    A: FnOnce() -> F,
    F: std::future::Future<Output = ()>,
{
    let action = tracks.borrow().end_action(ended_by);
    match action {
        EndAction::Nothing => {}
        EndAction::TellServer(bytes) => {
            let _ = server_w.write_all(bytes).await;
        }
        EndAction::TellClient(bytes) => {
            let _ = client_w.write_all(bytes).await;
        }
        EndAction::Abandon => abandon_once(abandon).await,
    }
}

/// Copies client bytes to the server until the client closes or fails.
/// With a kept server (`goodbye` given), the client's Terminate stays
/// here and is noted in `goodbye`; if queries are still in flight, the
/// other direction ends the session once they are answered.
async fn client_to_server<R: AsyncReadRent, W: AsyncWriteRent>(
    from: &mut R,
    to: &mut W,
    mut buf: Vec<u8>,
    tracks: &RefCell<Tracks>,
    goodbye: Option<&Cell<bool>>,
    writing: &Cell<bool>,
) -> EndedBy {
    loop {
        // monoio reads into the buffer's whole capacity from the start and
        // sets its length to what was read.
        let (res, b) = from.read(buf).await;
        buf = b;
        match res {
            Ok(0) => return EndedBy::ClientClosed,
            Ok(_) => {}
            Err(_) => return EndedBy::ClientIo,
        };
        if tracks.borrow_mut().saw_client(&buf).is_err() {
            return EndedBy::ClientProtocol;
        }
        let terminate = goodbye.and_then(|_| before_terminate(&tracks.borrow(), &buf));
        if let Some(n) = terminate {
            buf.truncate(n);
        }
        writing.set(true);
        let (res, b) = to.write_all(buf).await;
        writing.set(false);
        buf = b;
        if res.is_err() {
            return EndedBy::ServerIo;
        }
        if let (Some(_), Some(goodbye)) = (terminate, goodbye) {
            return goodbye_sent(goodbye, tracks).await;
        }
    }
}

/// Copies server bytes to the client until either fails or closes, or
/// `kill` fires, in which case it stops at a message boundary and sends
/// the client a FATAL error naming the reason. Once told to stop, returns
/// the next bytes it reads, unrelayed.
async fn server_to_client<R: AsyncReadRent, W: AsyncWriteRent>(
    from: &mut R,
    to: &mut W,
    mut buf: Vec<u8>,
    tracks: &RefCell<Tracks>,
    kill: &KillSwitch,
    stopping: &Stopping,
    goodbye: &Cell<bool>,
) -> (EndedBy, Option<Vec<u8>>) {
    let at_boundary = || tracks.borrow().server.at_boundary();
    let reason = loop {
        if goodbye.get() && !stopping.resetting.get() && tracks.borrow().drained() {
            // The client said goodbye and has every answer it asked for
            // (and the other direction, waiting for that, has not begun
            // the reset itself).
            return (EndedBy::ClientClosed, None);
        }
        if let Some(reason) = kill.fired().filter(|_| at_boundary()) {
            break reason;
        }
        let read = from.read(buf);
        let (res, b) = if at_boundary() && !stopping.resetting.get() {
            // Idle or between messages: a kill may interrupt the wait.
            monoio::select! {
                r = read => r,
                reason = kill.wait() => {
                    stopping.read_cut.set(true);
                    break reason;
                }
            }
        } else {
            read.await
        };
        buf = b;
        let n = match res {
            Ok(0) => return (EndedBy::ServerClosed, None),
            Ok(n) => n,
            Err(_) => return (EndedBy::ServerIo, None),
        };
        if stopping.writing_prologue.get() {
            // Maybe the server's answer to the prologue, whose write has not
            // finished yet: keep it, and wait for the write.
            std::future::poll_fn(|cx| {
                if stopping.writing_prologue.get() {
                    stopping.waiting.set(Some(cx.waker().clone()));
                    std::task::Poll::Pending
                } else {
                    std::task::Poll::Ready(())
                }
            })
            .await;
            return (EndedBy::ClientClosed, Some(buf));
        }
        if stopping.stop.get() {
            return (EndedBy::ClientClosed, Some(buf));
        }
        // After a kill, forward only up to the end of the message in flight.
        let scanned = {
            let mut t = tracks.borrow_mut();
            if kill.fired().is_some() {
                buf.truncate(t.server.bytes_to_boundary(&buf).unwrap_or(n));
            }
            t.saw_server(&buf)
        };
        if scanned.is_err() {
            return (EndedBy::ServerProtocol, None);
        }
        let (res, b) = to.write_all(buf).await;
        buf = b;
        if res.is_err() {
            return (EndedBy::ClientIo, None);
        }
    };
    let _ = to.write_all(session_ended(reason)).await;
    (EndedBy::Killed(reason), None)
}
