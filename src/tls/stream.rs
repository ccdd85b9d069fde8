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
use crate::net::ready::Readable;
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
    /// Plaintext a rent-API reader had no room for (start-up only); the
    /// next read of either kind returns it first.
    spill: RefCell<Option<(Vec<u8>, std::ops::Range<usize>)>>,
    /// A record was sealed and not wholly sent (a write cut short): the
    /// stream is broken, and nothing more may follow on it.
    torn: Cell<bool>,
    /// The alert owed to the peer after a record it sent was refused.
    alert: Cell<Option<u8>>,
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
            torn: Cell::new(false),
            alert: Cell::new(None),
            pool,
        }
    }

    /// Waits for plaintext, then returns it at the start of a pool buffer
    /// (give it back with [`BufferPool::put`]); `None` at the end of the
    /// stream (close_notify, or the socket's end between records).
    pub async fn read_lent(&self) -> io::Result<Option<(Vec<u8>, usize)>> {
        self.read_lent_on(None).await
    }

    /// The socket under the records, for a [`Standing`](crate::net::ready::Standing)
    /// wait on it.
    pub fn socket(&self) -> &ReadyStream {
        &self.io
    }

    /// As [`read_lent`](Self::read_lent), waiting for the socket on
    /// `standing` when one is given.
    pub async fn read_lent_on(
        &self,
        standing: Option<&dyn Readable>,
    ) -> io::Result<Option<(Vec<u8>, usize)>> {
        if let Some((mut plain, range)) = self.spill.borrow_mut().take() {
            plain.copy_within(range.clone(), 0);
            return Ok(Some((plain, range.len())));
        }
        loop {
            if !self.unopened.get() && self.records.borrow().peer_closed() {
                // Whatever came after close_notify does not count.
                if let Some((buf, _)) = self.held.borrow_mut().take() {
                    self.pool.put(buf);
                }
                return Ok(None);
            }
            if !self.unopened.get() {
                // Anything held stays in `self` while waiting, so a read
                // dropped here (a `select!`) loses nothing.
                self.io.ready_on(standing).await?;
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
                        self.alert.set(e.alert());
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
                    self.alert.set(e.alert());
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
        if self.torn.get() {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "TLS stream cut in the middle of a record",
            ));
        }
        let mut out = self.pool.take();
        // Room for the records' overhead too, so that a buffer's worth of
        // plaintext goes out as one full record, not one and a crumb.
        let room = plaintext.len().min(out.len()) + 2 * self.records.borrow().overhead();
        if room > out.len() {
            out.resize(room, 0);
        }
        // Set until every sealed byte is sent: a write dropped in between
        // (the other direction ended the relay) leaves half a record.
        self.torn.set(true);
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
        self.torn.set(res.is_err());
        self.pool.put(out);
        res
    }

    /// Nothing received and not handed out, the peer has not closed, and
    /// the stream is whole: what a connection waiting in a pool must be
    /// (a look at the socket alone misses bytes the stream holds).
    pub fn is_quiet(&self) -> bool {
        self.held.borrow().is_none()
            && self.spill.borrow().is_none()
            && !self.records.borrow().peer_closed()
            && !self.torn.get()
            && self.alert.get().is_none()
    }

    /// See [`RecordLayer::key_wearing_out`].
    pub fn key_wearing_out(&self) -> bool {
        self.records.borrow().key_wearing_out()
    }

    /// Ends the TLS connection as a PostgreSQL server does when it closes:
    /// close_notify, so that the client's TLS library sees a clean end
    /// and not a truncation; or, after a record of the peer's was
    /// refused, the fatal alert that says why. Then the sending side shuts
    /// down. Never waits: a peer that reads nothing does not hold the
    /// session, and the connection is closing either way; after a write
    /// cut short nothing can be added.
    pub fn close(&self) {
        if !self.torn.get() {
            let mut out = [0; 64];
            let mut records = self.records.borrow_mut();
            let sealed = match self.alert.get() {
                Some(alert) => records.seal_fatal_alert(alert, &mut out),
                None => records.seal_close_notify(&mut out),
            };
            if let Ok(n) = sealed {
                let _ = self.io.try_send(&out[..n]);
            }
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
