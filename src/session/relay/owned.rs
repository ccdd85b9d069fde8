//! The pump for sessions with TLS on either side: each direction owns one
//! buffer for the session's life and hands it to the kernel (or rustls)
//! with monoio's rent API. Socket readiness says nothing about plaintext
//! rustls may already hold, so these reads cannot wait buffer-less.

use std::cell::RefCell;

use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, Split, Splitable};

use super::{open, session_ended, EndAction, EndedBy, Pump, Tracks};
use crate::session::kill::KillSwitch;

pub(super) async fn run<C, S, A, F>(mut client: C, mut server: S, pump: Pump<A>) -> EndedBy
where
    C: Split + AsyncReadRent + AsyncWriteRent,
    S: Split + AsyncReadRent + AsyncWriteRent,
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
    } = pump;
    if let Err(e) = open(&mut client, &mut server, for_client, client_pending).await {
        return e;
    }
    let (mut client_r, mut client_w) = client.into_split();
    let (mut server_r, mut server_w) = server.into_split();
    let ended_by = {
        let up = client_to_server(
            &mut client_r,
            &mut server_w,
            Vec::with_capacity(pool.buffer_size()),
            &tracks,
        );
        let down = server_to_client(
            &mut server_r,
            &mut client_w,
            Vec::with_capacity(pool.buffer_size()),
            &tracks,
            &kill,
        );
        // Whichever direction ends first ends the session; dropping the
        // other cancels its pending read.
        monoio::select! {
            e = up => e,
            e = down => e,
        }
    };
    let ended_by = tracks.borrow().attribute(ended_by);
    let action = tracks.borrow().end_action(ended_by);
    match action {
        EndAction::Nothing => {}
        EndAction::TellServer(bytes) => {
            let _ = server_w.write_all(bytes).await;
        }
        EndAction::TellClient(bytes) => {
            let _ = client_w.write_all(bytes).await;
        }
        // Boxed: a cancel connects (maybe over TLS), a large future the
        // pump would otherwise carry for the whole session.
        EndAction::Abandon => Box::pin(abandon()).await,
    }
    ended_by
}

/// Copies client bytes to the server until the client closes or fails.
async fn client_to_server<R: AsyncReadRent, W: AsyncWriteRent>(
    from: &mut R,
    to: &mut W,
    mut buf: Vec<u8>,
    tracks: &RefCell<Tracks>,
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
        let (res, b) = to.write_all(buf).await;
        buf = b;
        if res.is_err() {
            return EndedBy::ServerIo;
        }
    }
}

/// Copies server bytes to the client until either fails or closes, or
/// `kill` fires, in which case it stops at a message boundary and sends
/// the client a FATAL error naming the reason.
async fn server_to_client<R: AsyncReadRent, W: AsyncWriteRent>(
    from: &mut R,
    to: &mut W,
    mut buf: Vec<u8>,
    tracks: &RefCell<Tracks>,
    kill: &KillSwitch,
) -> EndedBy {
    let at_boundary = || tracks.borrow().server.at_boundary();
    let reason = loop {
        if let Some(reason) = kill.fired().filter(|_| at_boundary()) {
            break reason;
        }
        let read = from.read(buf);
        let (res, b) = if at_boundary() {
            // Idle or between messages: a kill may interrupt the wait.
            monoio::select! {
                r = read => r,
                reason = kill.wait() => break reason,
            }
        } else {
            read.await
        };
        buf = b;
        let n = match res {
            Ok(0) => return EndedBy::ServerClosed,
            Ok(n) => n,
            Err(_) => return EndedBy::ServerIo,
        };
        // After a kill, forward only up to the end of the message in flight.
        let scanned = {
            let mut t = tracks.borrow_mut();
            if kill.fired().is_some() {
                buf.truncate(t.server.bytes_to_boundary(&buf).unwrap_or(n));
            }
            t.saw_server(&buf)
        };
        if scanned.is_err() {
            return EndedBy::ServerProtocol;
        }
        let (res, b) = to.write_all(buf).await;
        buf = b;
        if res.is_err() {
            return EndedBy::ClientIo;
        }
    };
    let _ = to.write_all(session_ended(reason)).await;
    EndedBy::Killed(reason)
}
