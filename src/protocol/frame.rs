//! Message framing: every message after start-up is a one-byte tag followed
//! by an Int32 length that counts itself but not the tag.
//!
//! Two tools live here. [`peek_frame`] finds one complete message at the front
//! of a buffer (used during start-up, where tollgate reads messages whole).
//! [`Framer`] follows message boundaries across arbitrary chunks without
//! looking at payloads (used by the relay, which forwards the bytes it read
//! and only needs to know where messages start and end).
//!
//! <https://www.postgresql.org/docs/current/protocol-overview.html#PROTOCOL-MESSAGE-CONCEPTS>

use std::fmt;

/// Tag byte plus the Int32 length.
pub const HEADER_LEN: usize = 5;

/// Why a byte stream cannot be framed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// The length field is below 4, which no valid message can have.
    InvalidLength { tag: u8, len: i32 },
    /// The message is longer than the caller allows at this point.
    TooLong { tag: u8, len: usize, max: usize },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::InvalidLength { tag, len } => {
                write!(
                    f,
                    "invalid message length {len} for message type {}",
                    Tag(*tag)
                )
            }
            FrameError::TooLong { tag, len, max } => write!(
                f,
                "message type {} of {len} bytes exceeds the limit of {max} bytes",
                Tag(*tag)
            ),
        }
    }
}

impl std::error::Error for FrameError {}

/// Prints a tag as a character when printable, as the docs name them.
struct Tag(u8);

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_ascii_graphic() {
            write!(f, "'{}'", self.0 as char)
        } else {
            write!(f, "0x{:02x}", self.0)
        }
    }
}

/// A complete message found at the front of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameInfo {
    pub tag: u8,
    /// Whole message length on the wire, tag included.
    pub total_len: usize,
}

impl FrameInfo {
    /// The payload range inside the buffer the frame was peeked from.
    pub fn body(&self) -> std::ops::Range<usize> {
        HEADER_LEN..self.total_len
    }
}

/// Finds a complete message at the front of `buf`.
///
/// Returns `Ok(None)` when more bytes are needed. `max_len` bounds the whole
/// message so that a peer cannot make us buffer an arbitrary amount before
/// we check it; the length is validated from the header alone, before any
/// payload arrives.
pub fn peek_frame(buf: &[u8], max_len: usize) -> Result<Option<FrameInfo>, FrameError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let tag = buf[0];
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(FrameError::InvalidLength { tag, len });
    }
    let total_len = len as usize + 1;
    if total_len > max_len {
        return Err(FrameError::TooLong {
            tag,
            len: total_len,
            max: max_len,
        });
    }
    if buf.len() < total_len {
        return Ok(None);
    }
    Ok(Some(FrameInfo { tag, total_len }))
}

/// What one call to [`Framer::scan`] saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Scan {
    /// Messages whose last byte was in this chunk.
    pub completed: u32,
    /// Tag of the last message completed in this chunk, if any.
    pub last_completed_tag: Option<u8>,
    /// Messages started in this chunk with a tag given to [`Framer::counting`].
    pub tagged: u32,
}

/// Follows message boundaries over a stream delivered in arbitrary chunks.
///
/// Reads only headers: a payload is skipped by arithmetic, so a 1 GB DataRow
/// costs the same as an empty one. Keeps no reference to the chunks, so the
/// caller can forward and reuse its buffer right after scanning.
#[derive(Debug, Clone, Default)]
pub struct Framer {
    /// Payload bytes still to skip in the current message.
    remaining: usize,
    /// A header split across chunks.
    header: [u8; HEADER_LEN],
    header_len: u8,
    /// Tag of the message in progress (valid while `remaining > 0`).
    tag: u8,
    /// Tags to count, one bit per ASCII tag (e.g. ReadyForQuery, one per
    /// completed query cycle). Every message tag is ASCII.
    count_mask: u128,
    /// Tag of the last message completed so far.
    last_tag: u8,
}

impl Framer {
    pub fn new() -> Self {
        Self::default()
    }

    /// A framer that also counts messages with `tag`.
    pub fn counting(tag: u8) -> Self {
        Self::counting_any(&[tag])
    }

    /// A framer that also counts messages with any of `tags`.
    pub fn counting_any(tags: &[u8]) -> Self {
        let mut count_mask = 0u128;
        for &t in tags {
            assert!(t < 128, "message tags are ASCII");
            count_mask |= 1 << t;
        }
        Framer {
            count_mask,
            ..Self::default()
        }
    }

    /// The tag of the last complete message seen (0 before the first).
    pub fn last_tag(&self) -> u8 {
        self.last_tag
    }

    /// True when the bytes seen so far end exactly at a message boundary:
    /// the only place where tollgate may inject a message of its own.
    pub fn at_boundary(&self) -> bool {
        self.remaining == 0 && self.header_len == 0
    }

    /// How many bytes at the front of `chunk` finish the message in
    /// progress: `Some(0)` at a boundary, `None` if `chunk` does not reach
    /// the end of the current message. Used to stop a stream at a message
    /// boundary without forwarding anything past it.
    pub fn bytes_to_boundary(&self, chunk: &[u8]) -> Option<usize> {
        if self.at_boundary() {
            return Some(0);
        }
        if self.header_len == 0 {
            return (self.remaining <= chunk.len()).then_some(self.remaining);
        }
        let have = self.header_len as usize;
        let need = HEADER_LEN - have;
        let rest = chunk.get(..need)?;
        let mut h = self.header;
        h[have..].copy_from_slice(rest);
        let len = i32::from_be_bytes([h[1], h[2], h[3], h[4]]);
        let total = need + usize::try_from(len).ok()?.checked_sub(4)?;
        (total <= chunk.len()).then_some(total)
    }

    /// Advances over `chunk`. An error means the stream is corrupt and the
    /// connection must be closed; the framer is then unusable.
    #[inline]
    pub fn scan(&mut self, chunk: &[u8]) -> Result<Scan, FrameError> {
        let mut counter = Counter {
            mask: self.count_mask,
            scan: Scan::default(),
        };
        self.scan_with(chunk, &mut counter)?;
        Ok(counter.scan)
    }

    /// Advances over `chunk`, telling `visitor` about each message header,
    /// each piece of payload and each message end, in stream order.
    #[inline]
    pub fn scan_with<V: FrameVisitor>(
        &mut self,
        chunk: &[u8],
        visitor: &mut V,
    ) -> Result<(), FrameError> {
        let mut pos = 0usize;
        while pos < chunk.len() {
            if self.remaining > 0 {
                let skip = self.remaining.min(chunk.len() - pos);
                visitor.payload(self.tag, &chunk[pos..pos + skip]);
                self.remaining -= skip;
                pos += skip;
                if self.remaining == 0 {
                    self.last_tag = self.tag;
                    visitor.end(self.tag, chunk[pos - 1]);
                }
                continue;
            }
            // At a header. Fast path: the whole header is in this chunk.
            let (tag, len) = if self.header_len == 0 && chunk.len() - pos >= HEADER_LEN {
                let h = &chunk[pos..pos + HEADER_LEN];
                pos += HEADER_LEN;
                (h[0], i32::from_be_bytes([h[1], h[2], h[3], h[4]]))
            } else {
                let want = HEADER_LEN - self.header_len as usize;
                let take = want.min(chunk.len() - pos);
                let start = self.header_len as usize;
                self.header[start..start + take].copy_from_slice(&chunk[pos..pos + take]);
                self.header_len += take as u8;
                pos += take;
                if (self.header_len as usize) < HEADER_LEN {
                    break;
                }
                self.header_len = 0;
                let h = self.header;
                (h[0], i32::from_be_bytes([h[1], h[2], h[3], h[4]]))
            };
            if len < 4 {
                return Err(FrameError::InvalidLength { tag, len });
            }
            visitor.start(tag);
            self.tag = tag;
            self.remaining = len as usize - 4;
            if self.remaining == 0 {
                self.last_tag = tag;
                // An empty payload: the last byte is the length's.
                visitor.end(tag, len as u8);
            }
        }
        Ok(())
    }
}

/// What [`Framer::scan_with`] reports, message by message. Every method
/// defaults to nothing, so a visitor pays only for what it listens to.
pub trait FrameVisitor {
    /// A message with `tag` starts (its header was read).
    #[inline]
    fn start(&mut self, _tag: u8) {}
    /// Payload bytes of the message in progress, in order, as they pass.
    #[inline]
    fn payload(&mut self, _tag: u8, _bytes: &[u8]) {}
    /// A message with `tag` ended; `last_byte` is its final byte, which for
    /// a one-byte payload (ReadyForQuery's status) is the whole payload.
    #[inline]
    fn end(&mut self, _tag: u8, _last_byte: u8) {}
}

/// The visitor behind [`Framer::scan`].
struct Counter {
    mask: u128,
    scan: Scan,
}

impl FrameVisitor for Counter {
    #[inline]
    fn start(&mut self, tag: u8) {
        if tag < 128 && (self.mask >> tag) & 1 == 1 {
            self.scan.tagged += 1;
        }
    }

    #[inline]
    fn end(&mut self, tag: u8, _last_byte: u8) {
        self.scan.completed += 1;
        self.scan.last_completed_tag = Some(tag);
    }
}

/// One message on the wire: tag, Int32 length (counting itself), payload.
/// For unit tests here and in the relay.
#[cfg(test)]
pub(crate) fn test_message(tag: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&((payload.len() + 4) as i32).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

#[cfg(test)]
mod tests {
    use super::test_message as msg;
    use super::*;

    fn stream() -> Vec<u8> {
        let mut s = Vec::new();
        s.extend(msg(b'T', b"row description"));
        s.extend(msg(b'D', &[7u8; 300]));
        s.extend(msg(b'C', b"SELECT 1\0"));
        s.extend(msg(b'I', b""));
        s.extend(msg(b'Z', b"I"));
        s
    }

    #[test]
    fn peek_needs_header_then_body() {
        let m = msg(b'p', b"secret\0");
        assert_eq!(peek_frame(&m[..4], 100), Ok(None));
        assert_eq!(peek_frame(&m[..6], 100), Ok(None));
        let f = peek_frame(&m, 100).unwrap().unwrap();
        assert_eq!(f.tag, b'p');
        assert_eq!(f.total_len, m.len());
        assert_eq!(&m[f.body()], b"secret\0");
    }

    #[test]
    fn peek_rejects_bad_and_long_lengths_from_header_alone() {
        let mut bad = vec![b'p'];
        bad.extend_from_slice(&3i32.to_be_bytes());
        assert!(matches!(
            peek_frame(&bad, 100),
            Err(FrameError::InvalidLength { len: 3, .. })
        ));
        let mut neg = vec![b'p'];
        neg.extend_from_slice(&(-1i32).to_be_bytes());
        assert!(peek_frame(&neg, 100).is_err());
        let mut huge = vec![b'p'];
        huge.extend_from_slice(&i32::MAX.to_be_bytes());
        assert!(matches!(
            peek_frame(&huge, 512),
            Err(FrameError::TooLong { .. })
        ));
    }

    #[test]
    fn framer_counts_messages_in_one_chunk() {
        let s = stream();
        let mut f = Framer::counting(b'Z');
        let scan = f.scan(&s).unwrap();
        assert_eq!(scan.tagged, 1);
        assert_eq!(scan.completed, 5);
        assert_eq!(scan.last_completed_tag, Some(b'Z'));
        assert!(f.at_boundary());
    }

    #[test]
    fn framer_counts_a_set_of_tags_and_remembers_the_last() {
        let mut s = msg(b'P', b"stmt\0");
        s.extend(msg(b'B', b"portal"));
        s.extend(msg(b'E', b"\0\0\0\0\0"));
        s.extend(msg(b'S', b""));
        s.extend(msg(b'Q', b"select 1\0"));
        s.extend(msg(b'X', b""));
        let mut f = Framer::counting_any(b"QSF");
        assert_eq!(f.last_tag(), 0);
        let scan = f.scan(&s[..s.len() - 3]).unwrap();
        assert_eq!(scan.tagged, 2);
        assert_eq!(f.last_tag(), b'Q');
        f.scan(&s[s.len() - 3..]).unwrap();
        assert_eq!(f.last_tag(), b'X');
        // High (non-ASCII) tags are framed, never counted.
        let mut f = Framer::counting(b'Z');
        assert_eq!(f.scan(&msg(0xff, b"x")).unwrap().tagged, 0);
    }

    /// Records what a visitor hears, to compare across chunkings.
    #[derive(Default, Debug, PartialEq)]
    struct Log {
        events: Vec<(char, u8, Vec<u8>)>,
    }

    impl FrameVisitor for Log {
        fn start(&mut self, tag: u8) {
            self.events.push(('s', tag, vec![]));
        }
        fn payload(&mut self, tag: u8, bytes: &[u8]) {
            // Pieces of one payload merge, so chunking cannot show.
            match self.events.last_mut() {
                Some(('p', t, b)) if *t == tag => b.extend_from_slice(bytes),
                _ => self.events.push(('p', tag, bytes.to_vec())),
            }
        }
        fn end(&mut self, tag: u8, last_byte: u8) {
            self.events.push(('e', tag, vec![last_byte]));
        }
    }

    #[test]
    fn visitor_hears_the_same_stream_however_it_is_split() {
        let s = stream();
        let mut whole = Log::default();
        Framer::new().scan_with(&s, &mut whole).unwrap();
        // ReadyForQuery's last byte is its status.
        assert_eq!(whole.events.last(), Some(&('e', b'Z', vec![b'I'])));
        assert!(whole.events.contains(&('p', b'C', b"SELECT 1\0".to_vec())));
        // EmptyQueryResponse has no payload: its last byte is the length's.
        assert!(whole.events.contains(&('e', b'I', vec![4])));
        for size in 1..s.len() {
            let mut split = Log::default();
            let mut f = Framer::new();
            for c in s.chunks(size) {
                f.scan_with(c, &mut split).unwrap();
            }
            assert_eq!(split, whole, "chunks of {size}");
        }
    }

    #[test]
    fn framer_is_independent_of_chunking() {
        let s = stream();
        for size in 1..=s.len() {
            let mut f = Framer::new();
            let mut total = 0;
            let mut last = None;
            for chunk in s.chunks(size) {
                let scan = f.scan(chunk).unwrap();
                total += scan.completed;
                if scan.last_completed_tag.is_some() {
                    last = scan.last_completed_tag;
                }
            }
            assert_eq!(total, 5, "chunk size {size}");
            assert_eq!(last, Some(b'Z'));
            assert!(f.at_boundary());
        }
    }

    #[test]
    fn framer_reports_mid_message() {
        let s = stream();
        let mut f = Framer::new();
        f.scan(&s[..21]).unwrap();
        assert!(!f.at_boundary());
        f.scan(&s[21..]).unwrap();
        assert!(f.at_boundary());
        // A header split in two is not a boundary either.
        f.scan(&s[..2]).unwrap();
        assert!(!f.at_boundary());
    }

    #[test]
    fn bytes_to_boundary_finds_the_end_of_the_message_in_flight() {
        let s = stream();
        // Every split point: the bytes to the boundary end exactly at a
        // message end, whatever the state.
        let ends: Vec<usize> = {
            let mut v = vec![0];
            let mut pos = 0;
            while pos < s.len() {
                let len = i32::from_be_bytes(s[pos + 1..pos + 5].try_into().unwrap()) as usize;
                pos += len + 1;
                v.push(pos);
            }
            v
        };
        for split in 0..s.len() {
            let mut f = Framer::new();
            f.scan(&s[..split]).unwrap();
            let rest = &s[split..];
            match f.bytes_to_boundary(rest) {
                Some(n) => {
                    assert!(ends.contains(&(split + n)), "split {split} -> {n}");
                    f.scan(&rest[..n]).unwrap();
                    assert!(f.at_boundary());
                }
                None => panic!("the whole rest reaches a boundary at split {split}"),
            }
        }
        // A chunk too short to finish the message says so.
        let mut f = Framer::new();
        f.scan(&s[..3]).unwrap();
        assert_eq!(f.bytes_to_boundary(&s[3..4]), None);
    }

    #[test]
    fn framer_rejects_corrupt_length_even_when_split() {
        let mut bad = msg(b'Q', b"select 1\0");
        bad.extend_from_slice(&[b'Q', 0, 0, 0, 2]);
        let mut f = Framer::new();
        assert!(f.scan(&bad).is_err());
        let mut f = Framer::new();
        let (a, b) = bad.split_at(bad.len() - 2);
        f.scan(a).unwrap();
        assert!(matches!(
            f.scan(b),
            Err(FrameError::InvalidLength { tag: b'Q', len: 2 })
        ));
    }

    #[test]
    fn framer_skips_huge_payloads_without_holding_them() {
        // A 1 GiB DataRow announced in a header, delivered in 64 KiB chunks.
        let len = (1usize << 30) + 4;
        let mut f = Framer::new();
        let mut head = vec![b'D'];
        head.extend_from_slice(&(len as i32).to_be_bytes());
        assert_eq!(f.scan(&head).unwrap().completed, 0);
        let chunk = vec![0u8; 64 * 1024];
        let mut left = len - 4;
        let mut completed = 0;
        while left > 0 {
            let n = left.min(chunk.len());
            completed += f.scan(&chunk[..n]).unwrap().completed;
            left -= n;
        }
        assert_eq!(completed, 1);
        assert!(f.at_boundary());
    }
}
