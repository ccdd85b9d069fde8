//! What transaction pooling reads of the messages the relay already
//! frames: the SQL of the client's Query and Parse messages (for
//! [`PinScan`]), that a FunctionCall came, and the server's
//! ParameterStatus messages (the client's reported parameters follow it
//! from backend to backend). Nothing else is looked at; nothing is
//! rewritten.
//!
//! <https://www.postgresql.org/docs/current/protocol-message-formats.html>

#![forbid(unsafe_code)]

use super::pin::{Found, PinScan};

/// ParameterStatus bytes kept between two drains; a longer one makes the
/// client's parameters unknown (which pins it).
const MAX_REPORTS: usize = 4096;

/// Where the client's message in progress is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Capture {
    Off,
    /// In Parse's statement name.
    Name,
    Sql,
}

/// Transaction pooling's reading of one session's messages.
pub struct TxScan {
    pins: PinScan,
    capture: Capture,
    /// ParameterStatus payloads (`name\0value\0`) since the last drain.
    reports: Vec<u8>,
    report_start: usize,
    overflow: bool,
    /// The ParameterStatus in progress did not fit: the rest is dropped.
    dropping: bool,
}

impl Default for TxScan {
    fn default() -> Self {
        TxScan {
            pins: PinScan::default(),
            capture: Capture::Off,
            reports: Vec::new(),
            report_start: 0,
            overflow: false,
            dropping: false,
        }
    }
}

impl TxScan {
    /// The reasons to pin, and the clears, found since the last call.
    pub fn take_pins(&mut self) -> Found {
        if std::mem::take(&mut self.overflow) {
            self.pins.pin_reports_lost();
        }
        self.pins.take()
    }

    /// A parameter the server reported that tollgate does not follow.
    pub fn pin_unknown(&mut self) {
        self.pins.pin_unknown();
    }

    /// The server reads the session's SQL otherwise than the scan does.
    pub fn pin_unreadable(&mut self) {
        self.pins.pin_unreadable();
    }

    /// The parameters the server reported since the last call, in order.
    pub fn drain_reports(&mut self, mut each: impl FnMut(&str, &str)) {
        if self.reports.is_empty() {
            return;
        }
        let mut parts = self.reports.split(|b| *b == 0);
        while let (Some(k), Some(v)) = (parts.next(), parts.next()) {
            if let (Ok(k), Ok(v)) = (std::str::from_utf8(k), std::str::from_utf8(v)) {
                each(k, v);
            }
        }
        self.reports.clear();
    }

    #[inline]
    pub fn client_start(&mut self, tag: u8) {
        self.pins.message_started();
        self.capture = match tag {
            b'Q' => {
                self.pins.begin(true);
                Capture::Sql
            }
            b'P' => Capture::Name,
            b'F' => {
                self.pins.pin_function_call();
                Capture::Off
            }
            _ => Capture::Off,
        };
    }

    #[inline]
    pub fn client_payload(&mut self, mut bytes: &[u8]) {
        if self.capture == Capture::Name {
            match memchr::memchr(0, bytes) {
                Some(i) => {
                    bytes = &bytes[i + 1..];
                    self.pins.begin(false);
                    self.capture = Capture::Sql;
                }
                None => return,
            }
        }
        if self.capture != Capture::Sql {
            return;
        }
        match memchr::memchr(0, bytes) {
            Some(i) => {
                self.pins.feed(&bytes[..i]);
                self.pins.finish();
                self.capture = Capture::Off;
            }
            None => self.pins.feed(bytes),
        }
    }

    #[inline]
    pub fn client_end(&mut self) {
        if self.capture == Capture::Sql {
            // No NUL: malformed, and the server will say so; still scanned.
            self.pins.finish();
        }
        self.capture = Capture::Off;
    }

    /// Whether a statement dropped all the session's prepared statements
    /// (`DISCARD ALL`, `DEALLOCATE ALL`) since the last call.
    pub fn take_discard(&mut self) -> bool {
        self.pins.take_discard()
    }

    #[inline]
    pub fn server_start(&mut self, tag: u8) {
        if tag == b'S' {
            self.report_start = self.reports.len();
            self.dropping = false;
        }
    }

    #[inline]
    pub fn server_payload(&mut self, tag: u8, bytes: &[u8]) {
        if tag != b'S' || self.dropping {
            return;
        }
        if self.reports.len() + bytes.len() > MAX_REPORTS {
            self.overflow = true;
            self.dropping = true;
            self.reports.truncate(self.report_start);
            return;
        }
        self.reports.extend_from_slice(bytes);
    }
}
