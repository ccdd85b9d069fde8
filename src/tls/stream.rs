//! A TLS connection over a plain socket that holds no buffer while idle.
//!
//! The socket is read by readiness ([`ReadyStream`]): only once bytes are
//! there is a buffer taken from the shard's [`BufferPool`]; records are
//! opened in it, in place ([`RecordLayer::open`]), and the plaintext goes
//! on from that same buffer. Writes seal into a pool buffer and send from
//! it. So between messages a session holds only its keys: no receive
//! buffer, no send buffer, no plaintext queue. Only a record cut in two by
//! the network keeps a buffer until its rest arrives.
//!
//! One reader and one writer at a time: records are numbered when sealed,
//! so two writers interleaving on the socket would corrupt the stream.

use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;

use monoio::buf::{IoBuf, IoBufMut, IoVecBuf, IoVecBufMut};
use monoio::io::{AsyncReadRent, AsyncWriteRent, Split};
use monoio::BufResult;

use super::record::{RecordError, RecordLayer};
use crate::net::{BufferPool, ReadyStream, Stream};

pub struct TlsStream {
    io: ReadyStream,
    /// Boxed: the keys are 1.7 KiB, and futures that hold the stream
    /// (a session's relay) should not carry them inline, maybe twice.
    records: RefCell<Box<RecordLayer>>,
    /// Received bytes not yet given out: the start of a record (at the
    /// start of a pool buffer), or, when `unopened` is set, whole records
    /// that came with the end of the handshake. `None` while idle.
    held: RefCell<Option<(Vec<u8>, usize)>>,
    unopened: Cell<bool>,
    /// Plaintext a rent-API reader had no room for (start-up only).
    spill: RefCell<Option<(Vec<u8>, std::ops::Range<usize>)>>,
    pool: Rc<BufferPool>,
}

// SAFETY: reads and writes share only the record layer, borrowed for the
// length of one open or seal and never across an await; the socket's
// recv and send are independent.
unsafe impl Split for TlsStream {}

impl TlsStream {
    /// The connection after its handshake; `leftover` is what the peer
    /// sent after its last handshake record.
    pub fn new(
        socket: Stream,
        records: RecordLayer,
        leftover: Vec<u8>,
        pool: Rc<BufferPool>,
    ) -> TlsStream {
        let held = (!leftover.is_empty()).then(|| {
            let mut buf = pool.take();
            if buf.len() < leftover.len() {
                buf.resize(leftover.len(), 0);
            }
            buf[..leftover.len()].copy_from_slice(&leftover);
            (buf, leftover.len())
        });
        TlsStream {
            io: ReadyStream::new(socket),
            records: RefCell::new(Box::new(records)),
            unopened: Cell::new(held.is_some()),
            held: RefCell::new(held),
            spill: RefCell::new(None),
            pool,
        }
    }

    /// Waits for plaintext, then returns it at the start of a pool buffer
    /// (give it back with [`BufferPool::put`]); `None` at the end of the
    /// stream (close_notify, or the socket's end between records).
    pub async fn read_lent(&self) -> io::Result<Option<(Vec<u8>, usize)>> {
        loop {
            if !self.unopened.get() {
                if self.held.borrow().is_none() && self.records.borrow().peer_closed() {
                    return Ok(None);
                }
                // Anything held stays in `self` while waiting, so a read
                // dropped here (a `select!`) loses nothing.
                self.io.ready().await?;
            }
            let (mut buf, mut filled) = match self.held.borrow_mut().take() {
                Some(held) => held,
                None => (self.pool.take(), 0),
            };
            if self.unopened.replace(false) {
                // Whole records may be there already: open them first.
            } else {
                // A record longer than the buffer gets the room it needs.
                match self.records.borrow().record_len(&buf[..filled]) {
                    Ok(Some(len)) if len > buf.len() => buf.resize(len, 0),
                    Ok(_) => {}
                    Err(e) => {
                        self.pool.put(buf);
                        return Err(e.into());
                    }
                }
                match self.io.try_recv(&mut buf[filled..]) {
                    Ok(Some(0)) => {
                        self.pool.put(buf);
                        if filled > 0 {
                            return Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "TLS record cut short by the end of the connection",
                            ));
                        }
                        return Ok(None);
                    }
                    Ok(Some(n)) => filled += n,
                    Ok(None) => {
                        self.keep(buf, filled);
                        continue;
                    }
                    Err(e) => {
                        self.pool.put(buf);
                        return Err(e);
                    }
                }
            }
            let opened = match self.records.borrow_mut().open(&mut buf[..filled]) {
                Ok(opened) => opened,
                Err(e) => {
                    self.pool.put(buf);
                    return Err(e.into());
                }
            };
            let rest = opened.consumed..filled;
            if opened.plaintext == 0 {
                // Only the start of a record, or records with no data
                // (an alert, a key update): keep what is unfinished.
                buf.copy_within(rest.clone(), 0);
                self.keep(buf, rest.len());
                continue;
            }
            if !rest.is_empty() {
                // Plaintext to hand out, and the start of the next record
                // to keep: it moves to a buffer of its own.
                let mut next = self.pool.take();
                if next.len() < rest.len() {
                    next.resize(rest.len(), 0);
                }
                next[..rest.len()].copy_from_slice(&buf[rest.clone()]);
                *self.held.borrow_mut() = Some((next, rest.len()));
            }
            return Ok(Some((buf, opened.plaintext)));
        }
    }

    /// Holds `filled` bytes of `buf` for the next read, or gives the
    /// buffer back when there are none.
    fn keep(&self, buf: Vec<u8>, filled: usize) {
        if filled == 0 {
            self.pool.put(buf);
        } else {
            *self.held.borrow_mut() = Some((buf, filled));
        }
    }

    /// Seals and sends all of `plaintext`, from one pool buffer, waiting
    /// for room when the socket buffer is full.
    pub async fn write_all(&self, mut plaintext: &[u8]) -> io::Result<()> {
        let mut out = self.pool.take();
        let res = async {
            loop {
                let (taken, written) = self.records.borrow_mut().seal(plaintext, &mut out)?;
                self.io.write_all(&out[..written]).await?;
                plaintext = &plaintext[taken..];
                if plaintext.is_empty() {
                    return Ok(());
                }
                if taken == 0 && written == 0 {
                    return Err(RecordError::Unexpected("no room to seal a record").into());
                }
            }
        }
        .await;
        self.pool.put(out);
        res
    }

    /// Says goodbye the TLS way, as a PostgreSQL server does when it
    /// closes (close_notify, so that a client's TLS library sees a clean
    /// end and not a truncation), then shuts the sending side down. Never
    /// waits: a peer that reads nothing does not hold the session, and the
    /// connection is closing either way.
    pub fn close(&self) {
        let mut out = [0; 64];
        let sealed = self.records.borrow_mut().seal_close_notify(&mut out);
        if let Ok(n) = sealed {
            let _ = self.io.try_send(&out[..n]);
        }
        self.io.shutdown_write();
    }
}

impl AsRawFd for TlsStream {
    fn as_raw_fd(&self) -> RawFd {
        self.io.as_raw_fd()
    }
}

impl AsyncReadRent for TlsStream {
    async fn read<T: IoBufMut>(&mut self, mut buf: T) -> BufResult<usize, T> {
        let spilled = self.spill.borrow_mut().take();
        let (plain, range) = match spilled {
            Some(spill) => spill,
            None => match self.read_lent().await {
                Ok(Some((plain, n))) => (plain, 0..n),
                Ok(None) => return (Ok(0), buf),
                Err(e) => return (Err(e), buf),
            },
        };
        let n = range.len().min(buf.bytes_total());
        // SAFETY: `n` bytes fit in the buffer's total capacity, the source
        // is another allocation, and exactly those bytes are marked
        // initialised.
        unsafe {
            std::ptr::copy_nonoverlapping(plain[range.start..].as_ptr(), buf.write_ptr(), n);
            buf.set_init(n);
        }
        if n < range.len() {
            *self.spill.borrow_mut() = Some((plain, range.start + n..range.end));
        } else {
            self.pool.put(plain);
        }
        (Ok(n), buf)
    }

    async fn readv<T: IoVecBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        // Nothing in tollgate reads a client with readv.
        (Err(io::ErrorKind::Unsupported.into()), buf)
    }
}

impl AsyncWriteRent for TlsStream {
    async fn write<T: IoBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        // SAFETY: an `IoBuf` is `bytes_init` readable bytes at `read_ptr`.
        let bytes = unsafe { std::slice::from_raw_parts(buf.read_ptr(), buf.bytes_init()) };
        let res = TlsStream::write_all(self, bytes).await;
        let n = buf.bytes_init();
        (res.map(|()| n), buf)
    }

    async fn writev<T: IoVecBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        (Err(io::ErrorKind::Unsupported.into()), buf)
    }

    async fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        self.close();
        Ok(())
    }
}
