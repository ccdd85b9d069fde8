//! The few exchanges tollgate has with a server connection on its own
//! (checks, `SET`s on checkout, the reset): simple queries out, whole
//! messages in. Messages tollgate has no use for (a departed client's
//! DataRows) are skipped as they stream past, never buffered whole.

use std::io;

use bytes::{Buf, BufMut, BytesMut};
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};

use crate::protocol::frame::{Framer, HEADER_LEN};
use crate::upstream::UpstreamStream;

/// Longest message kept whole; longer ones are skipped.
const MAX_KEPT: usize = 64 * 1024;

/// Why an exchange with the server failed: the connection is unusable.
#[derive(Debug)]
pub enum WireError {
    Io(io::Error),
    Closed,
    /// Not a PostgreSQL message stream.
    Framing,
    TimedOut,
}

impl WireError {
    pub fn as_str(&self) -> &'static str {
        match self {
            WireError::Io(_) | WireError::Closed => "broken",
            WireError::Framing => "protocol",
            WireError::TimedOut => "timeout",
        }
    }
}

/// Appends a simple Query.
pub fn query(out: &mut BytesMut, sql: &str) {
    out.put_u8(b'Q');
    out.put_i32((4 + sql.len() + 1) as i32);
    out.put_slice(sql.as_bytes());
    out.put_u8(0);
}

/// Writes all of `bytes` to the server.
pub async fn write(stream: &mut UpstreamStream, bytes: BytesMut) -> Result<(), WireError> {
    let res = match stream {
        UpstreamStream::Plain(s) => s.write_all(bytes).await.0.map(|_| ()),
        UpstreamStream::Tls(s) => s.write_all(&bytes).await,
    };
    res.map_err(WireError::Io)
}

/// One message as read: its tag and, unless it was too long to keep, its
/// body.
pub struct Message {
    pub tag: u8,
    pub body: BytesMut,
}

/// Reads whole messages from a server connection.
#[derive(Default)]
pub struct Reader {
    buf: BytesMut,
    /// Bytes of a skipped message still to discard.
    skipping: usize,
    /// The relay's view of a message it was in the middle of when it
    /// stopped: its rest is discarded first.
    resume: Option<Framer>,
}

impl Reader {
    /// A reader that first finishes the message `framer` was in the middle
    /// of, starting with `leftover` (bytes already read and not relayed).
    pub fn resuming(framer: Framer, leftover: BytesMut) -> Reader {
        Reader {
            buf: leftover,
            skipping: 0,
            resume: (!framer.at_boundary()).then_some(framer),
        }
    }

    /// The next message; `body` is empty for one longer than [`MAX_KEPT`].
    pub async fn next(&mut self, stream: &mut UpstreamStream) -> Result<Message, WireError> {
        loop {
            self.discard();
            if self.resume.is_none() && self.skipping == 0 {
                if let Some(m) = self.take()? {
                    return Ok(m);
                }
            }
            self.fill(stream).await?;
        }
    }

    /// Drops what belongs to the unfinished or skipped message.
    fn discard(&mut self) {
        if let Some(framer) = &mut self.resume {
            match framer.bytes_to_boundary(&self.buf) {
                Some(n) => {
                    self.buf.advance(n);
                    self.resume = None;
                }
                None => {
                    // All of it belongs to the unfinished message; scanning
                    // cannot fail where it did not before.
                    let _ = framer.scan(&self.buf);
                    self.buf.clear();
                }
            }
        }
        if self.skipping > 0 {
            let n = self.skipping.min(self.buf.len());
            self.buf.advance(n);
            self.skipping -= n;
        }
    }

    /// A whole message from the buffer, or the start of one to skip.
    fn take(&mut self) -> Result<Option<Message>, WireError> {
        if self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let tag = self.buf[0];
        let len = i32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
        let len = usize::try_from(len)
            .ok()
            .filter(|l| *l >= 4)
            .ok_or(WireError::Framing)?;
        let total = 1 + len;
        if len > MAX_KEPT {
            self.buf.advance(HEADER_LEN);
            self.skipping = total - HEADER_LEN;
            return Ok(Some(Message {
                tag,
                body: BytesMut::new(),
            }));
        }
        if self.buf.len() < total {
            return Ok(None);
        }
        let mut msg = self.buf.split_to(total);
        msg.advance(HEADER_LEN);
        Ok(Some(Message { tag, body: msg }))
    }

    async fn fill(&mut self, stream: &mut UpstreamStream) -> Result<(), WireError> {
        let buf = std::mem::take(&mut self.buf);
        let (res, buf) = match stream {
            UpstreamStream::Plain(s) => read_more(s, buf).await,
            UpstreamStream::Tls(s) => read_more(&mut **s, buf).await,
        };
        self.buf = buf;
        match res {
            Ok(0) => Err(WireError::Closed),
            Ok(_) => Ok(()),
            Err(e) => Err(WireError::Io(e)),
        }
    }
}

async fn read_more<S: AsyncReadRent>(s: &mut S, buf: BytesMut) -> (io::Result<usize>, BytesMut) {
    crate::io_util::read_append(s, buf, 4096).await
}

/// Reads a ParameterStatus body: name, value.
pub fn parameter_status(body: &[u8]) -> Option<(String, String)> {
    let mut parts = body.split(|b| *b == 0);
    let name = std::str::from_utf8(parts.next()?).ok()?;
    let value = std::str::from_utf8(parts.next()?).ok()?;
    Some((name.to_owned(), value.to_owned()))
}

/// An ErrorResponse body made FATAL (fields S and V), as the same failure
/// at start-up would be: a `SET` on checkout that the server refuses is a
/// start-up parameter a direct login would have refused.
pub fn as_fatal(body: &[u8]) -> BytesMut {
    let mut out = BytesMut::with_capacity(body.len() + 16);
    out.put_u8(b'E');
    out.put_i32(0);
    let mut rest = body;
    while let Some((&kind, tail)) = rest.split_first() {
        if kind == 0 {
            break;
        }
        let end = memchr::memchr(0, tail).unwrap_or(tail.len());
        out.put_u8(kind);
        match kind {
            b'S' | b'V' => out.put_slice(b"FATAL"),
            _ => out.put_slice(&tail[..end]),
        }
        out.put_u8(0);
        rest = tail.get(end + 1..).unwrap_or(&[]);
    }
    out.put_u8(0);
    let len = (out.len() - 1) as i32;
    out[1..5].copy_from_slice(&len.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::frame::test_message as msg;

    #[test]
    fn an_error_becomes_fatal_and_keeps_its_other_fields() {
        let body = b"SERROR\0VERROR\0C22023\0Minvalid value for parameter \"TimeZone\": \"x\"\0\0";
        let out = as_fatal(body);
        assert_eq!(out[0], b'E');
        let len = i32::from_be_bytes([out[1], out[2], out[3], out[4]]) as usize;
        assert_eq!(len, out.len() - 1);
        let fields = crate::protocol::backend::parse_error_response(&out[5..]).unwrap();
        assert_eq!(fields.severity, "FATAL");
        assert_eq!(fields.code, "22023");
        assert!(fields.message.contains("TimeZone"));
        assert!(memchr::memmem::find(&out, b"VFATAL\0").is_some());
    }

    #[test]
    fn a_resumed_reader_skips_the_rest_of_the_message_in_flight() {
        // The relay saw the header and 3 bytes of a 10-byte DataRow body.
        let row = msg(b'D', b"0123456789");
        let mut framer = Framer::new();
        framer.scan(&row[..8]).unwrap();
        let mut rest = BytesMut::from(&row[8..]);
        rest.extend_from_slice(&msg(b'Z', b"I"));
        let mut r = Reader::resuming(framer, rest);
        r.discard();
        let m = r.take().unwrap().unwrap();
        assert_eq!((m.tag, &m.body[..]), (b'Z', &b"I"[..]));
    }

    #[test]
    fn long_messages_are_skipped_not_kept() {
        let big = msg(b'D', &vec![7u8; MAX_KEPT + 10]);
        let mut r = Reader {
            buf: BytesMut::from(&big[..100]),
            ..Reader::default()
        };
        let m = r.take().unwrap().unwrap();
        assert_eq!(m.tag, b'D');
        assert!(m.body.is_empty());
        r.buf.extend_from_slice(&big[100..]);
        r.buf.extend_from_slice(&msg(b'Z', b"T"));
        r.discard();
        assert_eq!(r.take().unwrap().unwrap().tag, b'Z');
        assert!(r.take().unwrap().is_none());
    }
}
