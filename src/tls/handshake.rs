//! A TLS handshake driven through rustls's unbuffered API, either side,
//! ending in the keys [`super::record`] protects records with.
//!
//! Sans-IO: the caller appends what the peer sent to [`Handshake::incoming`],
//! sends [`Handshake::outgoing`] when asked, and calls
//! [`Handshake::advance`] again, until it says the handshake is done.
//!
//! rustls is shown one more record at a time, never more: once the
//! handshake completes, the records behind it (the client's first
//! messages often arrive with its Finished) must reach the record layer
//! untouched, not be decrypted into rustls's own buffers.
//!
//! <https://www.rfc-editor.org/rfc/rfc8446#section-4>

#![forbid(unsafe_code)]

use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
use rustls::{CommonState, ExtractedSecrets};

use super::record::{Kernel, RecordError, RecordLayer, HEADER_LEN};

/// rustls's two unbuffered connections, as the driver needs them.
pub trait Side {
    type Data;
    fn common(&self) -> &CommonState;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
    fn into_kernel(self) -> Result<(ExtractedSecrets, Kernel), rustls::Error>;
}

/// rustls gives both connections the same inherent methods but no trait
/// over them: one impl, written once.
macro_rules! side {
    ($conn:ty, $data:ty, $kernel:ident) => {
        impl Side for $conn {
            type Data = $data;

            fn common(&self) -> &CommonState {
                self
            }

            fn process<'c, 'i>(
                &'c mut self,
                incoming: &'i mut [u8],
            ) -> UnbufferedStatus<'c, 'i, Self::Data> {
                self.process_tls_records(incoming)
            }

            fn into_kernel(self) -> Result<(ExtractedSecrets, Kernel), rustls::Error> {
                let (secrets, kernel) = self.dangerous_into_kernel_connection()?;
                Ok((secrets, Kernel::$kernel(kernel)))
            }
        }
    };
}

side!(UnbufferedServerConnection, ServerConnectionData, Server);
side!(UnbufferedClientConnection, ClientConnectionData, Client);

/// What the handshake needs next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// Send [`Handshake::outgoing`], then [`Handshake::sent`] and advance.
    Send,
    /// More bytes from the peer, appended to [`Handshake::incoming`].
    Receive,
    /// Done: [`Handshake::finish`].
    Done,
}

/// Why a handshake failed, with the alert for the peer when rustls made
/// one (send it, then close).
#[derive(Debug)]
pub struct Failed {
    pub error: rustls::Error,
    pub alert: Vec<u8>,
}

/// One handshake in progress.
pub struct Handshake<C> {
    conn: C,
    /// Bytes from the peer that rustls has not discarded.
    pub incoming: Vec<u8>,
    /// Of `incoming`, the bytes rustls has been shown.
    shown: usize,
    /// rustls waits for another record.
    blocked: bool,
    /// Encoded records for the peer.
    pub outgoing: Vec<u8>,
}

/// The most handshake bytes one record can hold.
const MAX_HANDSHAKE_RECORD: usize = HEADER_LEN + (1 << 14) + 2048;

impl<C: Side> Handshake<C> {
    /// A handshake whose peer already sent `prefix` (a direct-TLS
    /// ClientHello read while looking at the start-up packet).
    pub fn new(conn: C, prefix: Vec<u8>) -> Handshake<C> {
        Handshake {
            conn,
            incoming: prefix,
            shown: 0,
            blocked: true,
            outgoing: Vec::new(),
        }
    }

    pub fn connection(&self) -> &CommonState {
        self.conn.common()
    }

    /// The outgoing bytes were sent.
    pub fn sent(&mut self) {
        self.outgoing.clear();
    }

    /// Runs rustls on what has arrived.
    pub fn advance(&mut self) -> Result<Want, Failed> {
        loop {
            // Only when rustls waits for more is it shown the next whole
            // record: after a flight it sent, the handshake may be over.
            let mut end = self.shown;
            if self.blocked {
                match next_record_end(&self.incoming[self.shown..]) {
                    Ok(Some(n)) => {
                        end += n;
                        self.blocked = false;
                    }
                    Ok(None) => {}
                    Err(()) => {
                        return Err(Failed {
                            error: rustls::Error::General("oversized TLS record".into()),
                            alert: Vec::new(),
                        })
                    }
                }
            }
            let UnbufferedStatus { discard, state } = self.conn.process(&mut self.incoming[..end]);
            let step = match state {
                Ok(ConnectionState::EncodeTlsData(mut data)) => {
                    encode(&mut self.outgoing, |out| data.encode(out));
                    Step::Again
                }
                Ok(ConnectionState::TransmitTlsData(data)) => {
                    // The caller sends `outgoing` before it reads again.
                    data.done();
                    Step::Return(Want::Send)
                }
                Ok(ConnectionState::BlockedHandshake) => Step::NeedMore,
                Ok(ConnectionState::WriteTraffic(_)) => {
                    // A TLS 1.3 server may send before the client's
                    // Finished; only a finished handshake is done.
                    if self.conn.common().is_handshaking() {
                        Step::NeedMore
                    } else if self.outgoing.is_empty() {
                        Step::Return(Want::Done)
                    } else {
                        Step::Return(Want::Send)
                    }
                }
                Ok(ConnectionState::ReadTraffic(_)) | Ok(ConnectionState::ReadEarlyData(_)) => {
                    Step::Fail(rustls::Error::General(
                        "application data during the TLS handshake".into(),
                    ))
                }
                Ok(ConnectionState::PeerClosed) | Ok(ConnectionState::Closed) => Step::Fail(
                    rustls::Error::General("peer closed TLS during the handshake".into()),
                ),
                Ok(_) => Step::Fail(rustls::Error::General("unexpected TLS state".into())),
                Err(e) => Step::Fail(e),
            };
            self.incoming.drain(..discard);
            self.shown = end - discard;
            match step {
                Step::Again => {}
                Step::Return(want) => return Ok(want),
                Step::NeedMore => {
                    self.blocked = true;
                    if !matches!(next_record_end(&self.incoming[self.shown..]), Ok(Some(_))) {
                        return Ok(Want::Receive);
                    }
                }
                Step::Fail(error) => return Err(self.fail(error)),
            }
        }
    }

    /// After an error rustls may have an alert queued: it comes out as
    /// records to encode.
    fn fail(&mut self, error: rustls::Error) -> Failed {
        let mut alert = Vec::new();
        for _ in 0..4 {
            let UnbufferedStatus { state, .. } = self.conn.process(&mut []);
            match state {
                Ok(ConnectionState::EncodeTlsData(mut data)) => {
                    encode(&mut alert, |out| data.encode(out));
                }
                _ => break,
            }
        }
        Failed { error, alert }
    }

    /// The record layer for the rest of the connection, and the bytes the
    /// peer sent after its last handshake record.
    pub fn finish(self) -> Result<(RecordLayer, Vec<u8>), RecordError> {
        // Every record shown was a handshake record, so all were taken.
        if self.shown != 0 {
            return Err(RecordError::Unexpected("handshake left unfinished records"));
        }
        let (secrets, kernel) = self.conn.into_kernel()?;
        Ok((RecordLayer::new(secrets, kernel)?, self.incoming))
    }
}

enum Step {
    Again,
    NeedMore,
    Return(Want),
    Fail(rustls::Error),
}

/// Appends what `encode` writes to `out`, growing it as rustls asks.
fn encode(out: &mut Vec<u8>, mut encode: impl FnMut(&mut [u8]) -> Result<usize, EncodeError>) {
    let start = out.len();
    let mut room = 4096;
    loop {
        out.resize(start + room, 0);
        match encode(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return;
            }
            Err(EncodeError::InsufficientSize(e)) => room = e.required_size,
            Err(EncodeError::AlreadyEncoded) => {
                out.truncate(start);
                return;
            }
        }
    }
}

/// The length of the whole record at the start of `bytes`, if it is all
/// there; an error for a record no handshake can send.
fn next_record_end(bytes: &[u8]) -> Result<Option<usize>, ()> {
    let Some(header) = bytes.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let len = HEADER_LEN + u16::from_be_bytes([header[3], header[4]]) as usize;
    if len > MAX_HANDSHAKE_RECORD {
        return Err(());
    }
    Ok((bytes.len() >= len).then_some(len))
}
