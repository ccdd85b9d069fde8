//! The pump for plain sockets (TCP or Unix-domain) on both sides when the
//! shard has its relay ring ([`crate::net::ring`]): each direction keeps
//! one receive posted, which takes a buffer from the shard's provided
//! buffers only when data arrives, and sends each chunk on with one send
//! from that same buffer. An idle session holds no buffer; a busy one at
//! most two per direction (the chunk being sent, and the next one
//! received meanwhile).
//!
//! Semantics are [`super::lent`]'s: the same tracking, the same ends.

use std::cell::Cell;
use std::future::Future;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;

use bytes::BytesMut;
use monoio::io::AsyncWriteRentExt;

use super::lent::Turn;
use super::{
    before_terminate, goodbye_sent, open, reset_plan, session_ended, EndAction, Ended, EndedBy,
    Kept, Pump, ServerSide, Tracks,
};
use crate::net::ring::{send_all, Receiver, RelayRing};
use crate::net::Stream;
use crate::server::reset::Plan;
use crate::session::kill::KillSwitch;
use std::cell::RefCell;

/// The pump's future. A plain function around an `async move` block, and
/// the pump taken apart before it: an `async fn` keeps its arguments and
/// the locals they are moved into side by side for its whole life (the
/// sockets and `Pump` twice, 500 bytes), and this future, boxed per
/// session, is what an idle session holds.
pub(super) fn run<A, F>(
    mut client: Stream,
    mut server: Stream,
    pump: Pump<A>,
    ring: Rc<RelayRing>,
) -> impl Future<Output = Ended>
where
    A: FnOnce() -> F,
    F: Future<Output = ()>,
{
    let Pump {
        for_client,
        client_pending,
        tracks,
        pool: _,
        kill,
        abandon,
        keep,
        said_goodbye,
    } = pump;
    async move {
        let ring = &*ring;
        let gone = |by| Ended { by, kept: None };
        if let Err(e) = open(&mut client, &mut server, for_client, client_pending).await {
            return gone(e);
        }
        let (client_fd, server_fd) = (client.as_raw_fd(), server.as_raw_fd());
        let mut from_client = Receiver::new(ring, client_fd);
        let mut from_server = Receiver::new(ring, server_fd);
        // Set while client bytes are being sent to the server: if the relay
        // stops then, the server may hold part of a message.
        let writing = Cell::new(false);
        let ended_by = {
            let keeping = keep.is_some().then_some(&said_goodbye);
            let up = client_to_server(
                ring,
                &mut from_client,
                server_fd,
                &tracks,
                keeping,
                &writing,
            );
            let down = server_to_client(
                ring,
                &mut from_server,
                client_fd,
                &tracks,
                &kill,
                &said_goodbye,
            );
            monoio::select! {
                e = up => e,
                e = down => e,
            }
        };
        drop(from_client);
        if let EndedBy::Killed(reason) = ended_by {
            let _ = client.write_all(session_ended(reason)).await;
        }
        let ended_by = tracks.borrow().attribute(ended_by);
        let client_end = (!writing.get(), said_goodbye.get());
        let kept = reset_plan(keep.as_deref(), &tracks, ended_by, client_end, true);
        if let Some((mut plan, cancel, prologue)) = kept {
            // What the server sent after the client left is the reset's to
            // read: take back the posted receive with whatever it got.
            let mut leftover = BytesMut::new();
            match from_server.withdraw().await {
                Ok(Some(chunk)) => leftover.extend_from_slice(chunk.bytes()),
                Ok(None) => {}
                Err(_) => plan = Plan::Close("broken"),
            }
            if cancel {
                Box::pin(abandon()).await;
            }
            let (res, _) = server.write_all(prologue).await;
            if res.is_err() {
                plan = Plan::Close("broken");
            }
            return Ended {
                by: ended_by,
                kept: Some(Kept {
                    server: ServerSide::Plain(server),
                    plan,
                    framer: tracks.borrow().server.clone(),
                    leftover,
                }),
            };
        }
        drop(from_server);
        let action = tracks.borrow().end_action(ended_by);
        match action {
            EndAction::Nothing => {}
            EndAction::TellServer(bytes) => {
                let _ = server.write_all(bytes).await;
            }
            EndAction::TellClient(bytes) => {
                let _ = client.write_all(bytes).await;
            }
            // Boxed: a cancel connects (maybe over TLS), a large future the
            // pump would otherwise carry for the whole session.
            EndAction::Abandon => Box::pin(abandon()).await,
        }
        gone(ended_by)
    }
}

/// Copies client bytes to the server until the client closes or fails.
/// With a kept server (`goodbye` given), the client's Terminate stays
/// here and is noted in `goodbye`; if queries are still in flight, the
/// other direction ends the session once they are answered.
async fn client_to_server(
    ring: &RelayRing,
    from: &mut Receiver<'_>,
    to: RawFd,
    tracks: &RefCell<Tracks>,
    goodbye: Option<&Cell<bool>>,
    writing: &Cell<bool>,
) -> EndedBy {
    // A receive or send that completes inside the enter that submits it
    // never makes this loop wait: without a budget, a bulk COPY would
    // keep the shard's thread (see `lent::Turn`).
    let turn = Turn::new();
    loop {
        let mut chunk = match turn.read(from.next()).await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => return EndedBy::ClientClosed,
            Err(_) => return EndedBy::ClientIo,
        };
        if tracks.borrow_mut().saw_client(chunk.bytes()).is_err() {
            return EndedBy::ClientProtocol;
        }
        let terminate = goodbye.and_then(|_| before_terminate(&tracks.borrow(), chunk.bytes()));
        match terminate {
            Some(n) => chunk.truncate(n),
            // Take the next bytes while these are sent.
            None => from.post_ahead(),
        }
        writing.set(true);
        let res = send_all(ring, to, chunk).await;
        writing.set(false);
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
/// `kill` fires, in which case it stops at a message boundary (and
/// [`run`] sends the client a FATAL error naming the reason).
async fn server_to_client(
    ring: &RelayRing,
    from: &mut Receiver<'_>,
    to: RawFd,
    tracks: &RefCell<Tracks>,
    kill: &KillSwitch,
    goodbye: &Cell<bool>,
) -> EndedBy {
    let at_boundary = || tracks.borrow().server.at_boundary();
    let turn = Turn::new();
    let reason = loop {
        if goodbye.get() && tracks.borrow().drained() {
            // The client said goodbye and has every answer it asked for.
            return EndedBy::ClientClosed;
        }
        if let Some(reason) = kill.fired().filter(|_| at_boundary()) {
            break reason;
        }
        let res = if at_boundary() {
            // Idle or between messages: a kill may interrupt the wait
            // (the receive stays posted).
            monoio::select! {
                r = turn.read(from.next()) => r,
                reason = kill.wait() => break reason,
            }
        } else {
            turn.read(from.next()).await
        };
        let mut chunk = match res {
            Ok(Some(chunk)) => chunk,
            Ok(None) => return EndedBy::ServerClosed,
            Err(_) => return EndedBy::ServerIo,
        };
        // After a kill, forward only up to the end of the message in flight.
        let scanned = {
            let mut tracks = tracks.borrow_mut();
            if kill.fired().is_some() {
                if let Some(n) = tracks.server.bytes_to_boundary(chunk.bytes()) {
                    chunk.truncate(n);
                }
            }
            tracks.saw_server(chunk.bytes())
        };
        if scanned.is_err() {
            return EndedBy::ServerProtocol;
        }
        if kill.fired().is_none() {
            from.post_ahead();
        }
        if send_all(ring, to, chunk).await.is_err() {
            return EndedBy::ClientIo;
        }
        turn.take().await;
    };
    EndedBy::Killed(reason)
}
