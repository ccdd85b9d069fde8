//! The PROXY protocol, versions 1 (text) and 2 (binary): the header a load
//! balancer (HAProxy, AWS NLB, ...) sends before the client's first byte, to
//! say who the client really is and which address it connected to.
//!
//! Sans-IO like the rest of `protocol`: [`parse`] takes the first bytes of a
//! connection and returns `Ok(None)` until a whole header is there, then the
//! header and how many bytes it used; what follows is the client's own stream
//! (an SSLRequest or a StartupMessage). Nothing is buffered here and nothing
//! is allocated while parsing. The spec asks receivers to be told by
//! configuration, never by guessing, whether a header is expected (anyone
//! could otherwise claim any address); [`detect`] exists for diagnostics and
//! for a listener configured to require the header, which can then say
//! "this is not a PROXY header" as soon as the first byte disagrees.
//!
//! Choices where the spec leaves room, all on the strict side:
//! - v1: single spaces, canonical addresses of the announced family, ports
//!   without sign or leading zero, the line ends with CRLF within 107 bytes.
//!   `UNKNOWN` (the connection cannot be described) is [`ProxyHeader::Local`];
//!   whatever follows it up to the CRLF is ignored, as the spec requires.
//! - v2: version 2 only; command LOCAL (the balancer's own connection, e.g. a
//!   health check) is `Local` whatever the family says; PROXY over
//!   AF_UNSPEC is `Local` too; TCP over IPv4/IPv6 is `Proxied`; UDP and
//!   AF_UNIX are refused ([`ProxyError::Unsupported`]) rather than silently
//!   treated as UNSPEC, since a PostgreSQL listener behind them means a
//!   misconfigured balancer; family bytes the spec does not define are
//!   refused. TLVs after the addresses are skipped, not interpreted. The
//!   declared length is capped at [`V2_MAX_ADDRESS_LEN`] so a peer cannot make
//!   the caller buffer much.
//!
//! Every check looks only at bytes at fixed positions (v2) or at a complete
//! line (v1, apart from the protocol word, refused as soon as it cannot be
//! `TCP4`, `TCP6` or `UNKNOWN`), so a verdict never changes when the same
//! bytes arrive in smaller pieces, and bytes after the header never change it.
//!
//! Spec: <https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt>

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

/// What a v1 header starts with: "PROXY" and exactly one space (spec 2.1).
pub const V1_PREFIX: &[u8; 6] = b"PROXY ";
/// The v2 signature (spec 2.2): `\r\n\r\n\0\r\nQUIT\n`.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Longest v1 line, CRLF included (spec 2.1: "PROXY UNKNOWN" with two full
/// IPv6 addresses and two 5-digit ports).
pub const V1_MAX_LEN: usize = 107;
/// Signature, version/command, family/transport, length.
pub const V2_FIXED_LEN: usize = 16;
/// The most address and TLV bytes accepted after the v2 fixed part. The spec
/// allows 65535; balancers send a few dozen bytes of TLVs (AWS's VPC endpoint
/// id, an authority, a CRC), and the spec wants the whole header within one
/// 536-byte segment anyway.
pub const V2_MAX_ADDRESS_LEN: usize = 2048;
/// Longest header [`parse`] accepts, either version.
pub const MAX_HEADER_LEN: usize = V2_FIXED_LEN + V2_MAX_ADDRESS_LEN;

/// v2 version nibble (high four bits of byte 13).
const V2_VERSION: u8 = 0x2;
/// v2 commands (low four bits of byte 13).
const V2_CMD_LOCAL: u8 = 0x0;
const V2_CMD_PROXY: u8 = 0x1;
/// v2 family/transport bytes (byte 14) the spec defines.
const V2_UNSPEC: u8 = 0x00;
const V2_TCP4: u8 = 0x11;
const V2_UDP4: u8 = 0x12;
const V2_TCP6: u8 = 0x21;
const V2_UDP6: u8 = 0x22;
const V2_UNIX_STREAM: u8 = 0x31;
const V2_UNIX_DGRAM: u8 = 0x32;
/// Address block sizes: two addresses and two ports.
const V2_TCP4_LEN: u16 = 2 * 4 + 2 * 2;
const V2_TCP6_LEN: u16 = 2 * 16 + 2 * 2;

/// What a PROXY header says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProxyHeader {
    /// PROXY v2 LOCAL command or v1 "UNKNOWN": a health check or the
    /// balancer's own connection; use the socket's peer address.
    Local,
    /// The real client (source) and the address it connected to
    /// (destination).
    Proxied {
        source: SocketAddr,
        destination: SocketAddr,
    },
}

/// Why a PROXY header was refused. The connection should be closed: the
/// peer is a balancer speaking something else, or not a balancer at all.
/// Messages never quote the peer's bytes beyond a v2 header byte or length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyError {
    /// Neither "PROXY " nor the v2 signature.
    BadSignature,
    /// v2 version nibble other than 2 (the version/command byte).
    BadVersion(u8),
    /// v2 command other than LOCAL or PROXY (the version/command byte).
    BadCommand(u8),
    /// v2 family/transport byte the spec does not define.
    BadFamily(u8),
    /// v2 UDP or AF_UNIX (the family/transport byte): valid, not for us.
    Unsupported(u8),
    /// v2 declared length shorter than the family's address block.
    BadLength { family: u8, len: u16 },
    /// v2 declared length above [`V2_MAX_ADDRESS_LEN`].
    V2TooLong(u16),
    /// v1: no CRLF within [`V1_MAX_LEN`] bytes.
    V1TooLong,
    /// v1 line not of the form `PROXY TCP4|TCP6 <src> <dst> <sport> <dport>`
    /// or `PROXY UNKNOWN[ ...]` (unknown protocol word, missing or extra
    /// fields, spacing).
    Malformed,
    /// v1 field not a canonical address of the announced family, or not a
    /// port; says which field.
    BadAddress(V1Field),
}

/// The v1 fields an address error can point at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum V1Field {
    SourceAddress,
    DestinationAddress,
    SourcePort,
    DestinationPort,
}

impl V1Field {
    fn as_str(self) -> &'static str {
        match self {
            V1Field::SourceAddress => "source address",
            V1Field::DestinationAddress => "destination address",
            V1Field::SourcePort => "source port",
            V1Field::DestinationPort => "destination port",
        }
    }
}

impl ProxyError {
    /// A stable, low-cardinality name for logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            ProxyError::BadSignature => "proxy_bad_signature",
            ProxyError::BadVersion(_) => "proxy_bad_version",
            ProxyError::BadCommand(_) => "proxy_bad_command",
            ProxyError::BadFamily(_) => "proxy_bad_family",
            ProxyError::Unsupported(_) => "proxy_unsupported",
            ProxyError::BadLength { .. } => "proxy_bad_length",
            ProxyError::V2TooLong(_) | ProxyError::V1TooLong => "proxy_too_long",
            ProxyError::Malformed => "proxy_malformed",
            ProxyError::BadAddress(_) => "proxy_bad_address",
        }
    }
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProxyError::BadSignature => {
                f.write_str("connection does not start with a PROXY protocol header")
            }
            ProxyError::BadVersion(b) => write!(
                f,
                "PROXY v2 header has version {} (byte 0x{b:02x}), expected 2",
                b >> 4
            ),
            ProxyError::BadCommand(b) => write!(
                f,
                "PROXY v2 header has command {} (byte 0x{b:02x}), expected LOCAL (0) or PROXY (1)",
                b & 0x0f
            ),
            ProxyError::BadFamily(b) => write!(
                f,
                "PROXY v2 header has an undefined address family/transport byte 0x{b:02x}"
            ),
            ProxyError::Unsupported(b) => {
                let what = match *b {
                    V2_UDP4 => "UDP over IPv4",
                    V2_UDP6 => "UDP over IPv6",
                    V2_UNIX_STREAM => "a UNIX stream socket",
                    V2_UNIX_DGRAM => "a UNIX datagram socket",
                    _ => "an unsupported transport",
                };
                write!(
                    f,
                    "PROXY v2 header forwards {what} (0x{b:02x}); only TCP is supported"
                )
            }
            ProxyError::BadLength { family, len } => write!(
                f,
                "PROXY v2 header declares {len} address bytes, fewer than family 0x{family:02x} needs"
            ),
            ProxyError::V2TooLong(len) => write!(
                f,
                "PROXY v2 header declares {len} address and TLV bytes, more than the {V2_MAX_ADDRESS_LEN} accepted"
            ),
            ProxyError::V1TooLong => write!(
                f,
                "PROXY v1 line has no CRLF within {V1_MAX_LEN} bytes"
            ),
            ProxyError::Malformed => f.write_str(
                "malformed PROXY v1 line: expected \"PROXY TCP4|TCP6 <src> <dst> <sport> <dport>\" or \"PROXY UNKNOWN\", single spaces, CRLF",
            ),
            ProxyError::BadAddress(field) => {
                write!(f, "PROXY v1 line has an invalid {}", field.as_str())
            }
        }
    }
}

impl std::error::Error for ProxyError {}

/// Whether `buf` (the first bytes of a connection, possibly fewer than 12)
/// starts like a PROXY header: `Some(true)`/`Some(false)` once decidable,
/// `None` when more bytes are needed.
///
/// A PostgreSQL start-up packet can never look like either signature: its
/// first byte is the top byte of a length of at most 10000, so 0, while "P"
/// starts v1 and CR starts v2; a TLS ClientHello (direct TLS) starts with
/// 0x16. Those are `Some(false)` from the first byte.
pub fn detect(buf: &[u8]) -> Option<bool> {
    match (
        prefix_match(buf, V1_PREFIX),
        prefix_match(buf, &V2_SIGNATURE),
    ) {
        (Some(true), _) | (_, Some(true)) => Some(true),
        (Some(false), Some(false)) => Some(false),
        _ => None,
    }
}

/// `Some(true)` if `buf` starts with `sig`, `Some(false)` if it cannot,
/// `None` if `buf` is a strict prefix of `sig`.
fn prefix_match(buf: &[u8], sig: &[u8]) -> Option<bool> {
    let n = buf.len().min(sig.len());
    if buf[..n] != sig[..n] {
        Some(false)
    } else if n == sig.len() {
        Some(true)
    } else {
        None
    }
}

/// Parses one header at the start of `buf`.
///
/// `Ok(None)`: need more bytes (never more than [`MAX_HEADER_LEN`] in all).
/// `Ok(Some((header, consumed)))`: `consumed` is the header's whole length
/// (v2: 16 plus the declared length, TLVs included; v1: through the CRLF);
/// the client's own bytes start at `buf[consumed..]`.
pub fn parse(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    match detect(buf) {
        None => Ok(None),
        Some(false) => Err(ProxyError::BadSignature),
        Some(true) if buf[0] == V1_PREFIX[0] => parse_v1(buf),
        Some(true) => parse_v2(buf),
    }
}

// ---------------------------------------------------------------------------
// Version 1
// ---------------------------------------------------------------------------

/// The protocol words a v1 line may carry, with what must follow each.
/// `UNKNOWN` may end the line at once ("PROXY UNKNOWN\r\n").
const V1_WORDS: [&[u8]; 4] = [b"TCP4 ", b"TCP6 ", b"UNKNOWN ", b"UNKNOWN\r"];

fn parse_v1(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    let after_prefix = &buf[V1_PREFIX.len()..];
    // Refuse as soon as the protocol word cannot be one of the three (the
    // spec asks to abort early), rather than waiting for 107 bytes.
    let plausible = V1_WORDS.iter().any(|w| {
        let n = w.len().min(after_prefix.len());
        after_prefix[..n] == w[..n]
    });
    if !plausible {
        return Err(ProxyError::Malformed);
    }
    // The spec: wait for CRLF before decoding; none in the first 107 bytes
    // is invalid; a lone CR or LF does not end the line.
    let window = &buf[..buf.len().min(V1_MAX_LEN)];
    let Some(cr) = window.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX_LEN {
            Err(ProxyError::V1TooLong)
        } else {
            Ok(None)
        };
    };
    // The CRLF cannot overlap "PROXY ", so `cr` >= 6.
    let line = buf.get(V1_PREFIX.len()..cr).ok_or(ProxyError::Malformed)?;
    Ok(Some((parse_v1_line(line)?, cr + 2)))
}

/// The line between "PROXY " and CRLF.
fn parse_v1_line(line: &[u8]) -> Result<ProxyHeader, ProxyError> {
    if line == b"UNKNOWN" || line.starts_with(b"UNKNOWN ") {
        return Ok(ProxyHeader::Local);
    }
    let mut fields = line.split(|&b| b == b' ');
    let ipv6 = match fields.next() {
        Some(b"TCP4") => false,
        Some(b"TCP6") => true,
        _ => return Err(ProxyError::Malformed),
    };
    let (Some(src), Some(dst), Some(sport), Some(dport), None) = (
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
    ) else {
        return Err(ProxyError::Malformed);
    };
    // An empty field is a doubled or trailing space: spacing, not an address.
    if [src, dst, sport, dport].iter().any(|f| f.is_empty()) {
        return Err(ProxyError::Malformed);
    }
    let src = v1_address(src, ipv6).ok_or(ProxyError::BadAddress(V1Field::SourceAddress))?;
    let dst = v1_address(dst, ipv6).ok_or(ProxyError::BadAddress(V1Field::DestinationAddress))?;
    let sport = v1_port(sport).ok_or(ProxyError::BadAddress(V1Field::SourcePort))?;
    let dport = v1_port(dport).ok_or(ProxyError::BadAddress(V1Field::DestinationPort))?;
    Ok(ProxyHeader::Proxied {
        source: SocketAddr::new(src, sport),
        destination: SocketAddr::new(dst, dport),
    })
}

/// An address of the announced family. std's parsers take exactly what the
/// spec calls canonical: IPv4 as four decimal numbers 0-255 without leading
/// zeros; IPv6 as colon-separated groups of up to 4 hex digits with at most
/// one "::" (and, as inet_pton, a trailing dotted IPv4 part); no zone id.
fn v1_address(field: &[u8], ipv6: bool) -> Option<IpAddr> {
    let text = std::str::from_utf8(field).ok()?;
    if ipv6 {
        text.parse::<Ipv6Addr>().ok().map(IpAddr::V6)
    } else {
        text.parse::<Ipv4Addr>().ok().map(IpAddr::V4)
    }
}

/// A decimal port 0-65535: digits only (no sign), no leading zero.
fn v1_port(field: &[u8]) -> Option<u16> {
    if field.is_empty()
        || field.len() > 5
        || !field.iter().all(u8::is_ascii_digit)
        || (field.len() > 1 && field[0] == b'0')
    {
        return None;
    }
    let value = field
        .iter()
        .fold(0u32, |acc, d| acc * 10 + u32::from(d - b'0'));
    u16::try_from(value).ok()
}

// ---------------------------------------------------------------------------
// Version 2
// ---------------------------------------------------------------------------

fn parse_v2(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    // Checks go byte by byte, in order, so a prefix of a refused header is
    // either "need more" or the same refusal.
    let Some(&ver_cmd) = buf.get(12) else {
        return Ok(None);
    };
    if ver_cmd >> 4 != V2_VERSION {
        return Err(ProxyError::BadVersion(ver_cmd));
    }
    let command = ver_cmd & 0x0f;
    if command != V2_CMD_LOCAL && command != V2_CMD_PROXY {
        return Err(ProxyError::BadCommand(ver_cmd));
    }
    let Some(&family) = buf.get(13) else {
        return Ok(None);
    };
    // LOCAL: "the receiver must ... discard the protocol block including the
    // family which is ignored".
    let needed = if command == V2_CMD_LOCAL {
        0
    } else {
        match family {
            V2_UNSPEC => 0,
            V2_TCP4 => V2_TCP4_LEN,
            V2_TCP6 => V2_TCP6_LEN,
            V2_UDP4 | V2_UDP6 | V2_UNIX_STREAM | V2_UNIX_DGRAM => {
                return Err(ProxyError::Unsupported(family))
            }
            _ => return Err(ProxyError::BadFamily(family)),
        }
    };
    let (Some(&hi), Some(&lo)) = (buf.get(14), buf.get(15)) else {
        return Ok(None);
    };
    let len = u16::from_be_bytes([hi, lo]);
    if usize::from(len) > V2_MAX_ADDRESS_LEN {
        return Err(ProxyError::V2TooLong(len));
    }
    if len < needed {
        return Err(ProxyError::BadLength { family, len });
    }
    let total = V2_FIXED_LEN + usize::from(len);
    let Some(block) = buf.get(V2_FIXED_LEN..total) else {
        return Ok(None);
    };
    let header = match (command, family) {
        (V2_CMD_PROXY, V2_TCP4) => {
            let (src, dst, ports) = (&block[0..4], &block[4..8], &block[8..12]);
            ProxyHeader::Proxied {
                source: SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::new(src[0], src[1], src[2], src[3]),
                    u16::from_be_bytes([ports[0], ports[1]]),
                )),
                destination: SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::new(dst[0], dst[1], dst[2], dst[3]),
                    u16::from_be_bytes([ports[2], ports[3]]),
                )),
            }
        }
        (V2_CMD_PROXY, V2_TCP6) => {
            let mut src = [0u8; 16];
            let mut dst = [0u8; 16];
            src.copy_from_slice(&block[0..16]);
            dst.copy_from_slice(&block[16..32]);
            let ports = &block[32..36];
            ProxyHeader::Proxied {
                source: SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::from(src),
                    u16::from_be_bytes([ports[0], ports[1]]),
                    0,
                    0,
                )),
                destination: SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::from(dst),
                    u16::from_be_bytes([ports[2], ports[3]]),
                    0,
                    0,
                )),
            }
        }
        // LOCAL with any family, or PROXY over AF_UNSPEC.
        _ => ProxyHeader::Local,
    };
    Ok(Some((header, total)))
}

// ---------------------------------------------------------------------------
// Encoders
// ---------------------------------------------------------------------------

/// Two endpoints of one family: when they differ (an IPv6 client reaching an
/// IPv4 address through a dual-stack balancer), the IPv4 one is given as an
/// IPv4-mapped IPv6 address, as HAProxy does, since both headers carry a
/// single family. Flow info and scope ids do not travel.
enum Endpoints {
    V4(SocketAddrV4, SocketAddrV4),
    V6(SocketAddrV6, SocketAddrV6),
}

fn endpoints(source: SocketAddr, destination: SocketAddr) -> Endpoints {
    fn v6(a: SocketAddr) -> SocketAddrV6 {
        match a {
            SocketAddr::V4(a) => SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0),
            SocketAddr::V6(a) => SocketAddrV6::new(*a.ip(), a.port(), 0, 0),
        }
    }
    match (source, destination) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => Endpoints::V4(s, d),
        (s, d) => Endpoints::V6(v6(s), v6(d)),
    }
}

/// A v1 line, `PROXY TCP4 ...\r\n` or `PROXY TCP6 ...\r\n` (mixed families:
/// TCP6 with the IPv4 endpoint mapped). At most 104 bytes.
pub fn encode_v1(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let line = match endpoints(source, destination) {
        Endpoints::V4(s, d) => format!(
            "PROXY TCP4 {} {} {} {}\r\n",
            s.ip(),
            d.ip(),
            s.port(),
            d.port()
        ),
        Endpoints::V6(s, d) => format!(
            "PROXY TCP6 {} {} {} {}\r\n",
            s.ip(),
            d.ip(),
            s.port(),
            d.port()
        ),
    };
    line.into_bytes()
}

/// A v2 header without TLVs: LOCAL (family AF_UNSPEC, no addresses) or
/// PROXY with TCP over IPv4 or IPv6 (mixed families: IPv6, the IPv4
/// endpoint mapped).
pub fn encode_v2(header: &ProxyHeader) -> Vec<u8> {
    let mut out = Vec::with_capacity(V2_FIXED_LEN + usize::from(V2_TCP6_LEN));
    out.extend_from_slice(&V2_SIGNATURE);
    match *header {
        ProxyHeader::Local => {
            out.push((V2_VERSION << 4) | V2_CMD_LOCAL);
            out.push(V2_UNSPEC);
            out.extend_from_slice(&0u16.to_be_bytes());
        }
        ProxyHeader::Proxied {
            source,
            destination,
        } => {
            out.push((V2_VERSION << 4) | V2_CMD_PROXY);
            match endpoints(source, destination) {
                Endpoints::V4(s, d) => {
                    out.push(V2_TCP4);
                    out.extend_from_slice(&V2_TCP4_LEN.to_be_bytes());
                    out.extend_from_slice(&s.ip().octets());
                    out.extend_from_slice(&d.ip().octets());
                    out.extend_from_slice(&s.port().to_be_bytes());
                    out.extend_from_slice(&d.port().to_be_bytes());
                }
                Endpoints::V6(s, d) => {
                    out.push(V2_TCP6);
                    out.extend_from_slice(&V2_TCP6_LEN.to_be_bytes());
                    out.extend_from_slice(&s.ip().octets());
                    out.extend_from_slice(&d.ip().octets());
                    out.extend_from_slice(&s.port().to_be_bytes());
                    out.extend_from_slice(&d.port().to_be_bytes());
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::startup::{
        encode_startup_message, parse_startup, FeStartupPacket, ProtocolVersion, SSL_REQUEST_CODE,
    };
    use bytes::BytesMut;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn proxied(source: &str, destination: &str) -> ProxyHeader {
        ProxyHeader::Proxied {
            source: sa(source),
            destination: sa(destination),
        }
    }

    fn ok(buf: &[u8]) -> (ProxyHeader, usize) {
        match parse(buf) {
            Ok(Some(r)) => r,
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(buf)),
        }
    }

    fn err(buf: &[u8]) -> ProxyError {
        match parse(buf) {
            Err(e) => e,
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(buf)),
        }
    }

    /// A v2 header with the given version/command and family bytes and
    /// `block` after a length word that matches it.
    fn v2(ver_cmd: u8, family: u8, block: &[u8]) -> Vec<u8> {
        v2_len(ver_cmd, family, block.len() as u16, block)
    }

    fn v2_len(ver_cmd: u8, family: u8, len: u16, block: &[u8]) -> Vec<u8> {
        let mut v = V2_SIGNATURE.to_vec();
        v.extend_from_slice(&[ver_cmd, family]);
        v.extend_from_slice(&len.to_be_bytes());
        v.extend_from_slice(block);
        v
    }

    fn ssl_request() -> Vec<u8> {
        let mut v = 8i32.to_be_bytes().to_vec();
        v.extend_from_slice(&SSL_REQUEST_CODE.to_be_bytes());
        v
    }

    fn startup_message() -> Vec<u8> {
        let mut b = BytesMut::new();
        encode_startup_message(
            &mut b,
            ProtocolVersion::V3_0,
            [("user", "alice"), ("database", "db")],
        );
        b.to_vec()
    }

    /// Every strict prefix of `header` is "need more"; the whole header,
    /// and the header followed by anything, give `expected`.
    fn assert_every_split(header: &[u8], expected: ProxyHeader) {
        for n in 0..header.len() {
            assert_eq!(parse(&header[..n]), Ok(None), "prefix of {n} bytes");
        }
        assert_eq!(parse(header), Ok(Some((expected, header.len()))));
        for tail in [ssl_request(), startup_message(), b"\r\n\r\n".to_vec()] {
            let mut longer = header.to_vec();
            longer.extend_from_slice(&tail);
            assert_eq!(parse(&longer), Ok(Some((expected, header.len()))));
        }
    }

    // -- round trips -------------------------------------------------------

    #[test]
    fn v1_round_trips_ipv4_and_ipv6() {
        for (s, d) in [
            ("192.168.0.1:56324", "192.168.0.11:443"),
            ("0.0.0.0:0", "255.255.255.255:65535"),
            ("[2001:db8::1]:5432", "[2001:db8::2]:6432"),
            ("[::]:0", "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"),
            ("[::ffff:10.0.0.1]:40000", "[::1]:5432"),
        ] {
            let header = encode_v1(sa(s), sa(d));
            assert!(header.len() <= 104, "{}", header.len());
            assert_every_split(&header, proxied(s, d));
        }
    }

    #[test]
    fn v2_round_trips_ipv4_ipv6_and_local() {
        for (s, d) in [
            ("192.168.0.1:56324", "192.168.0.11:443"),
            ("0.0.0.0:0", "255.255.255.255:65535"),
            ("[2001:db8::1]:5432", "[2001:db8::2]:6432"),
            ("[::ffff:10.0.0.1]:40000", "[::1]:5432"),
        ] {
            assert_every_split(&encode_v2(&proxied(s, d)), proxied(s, d));
        }
        assert_every_split(&encode_v2(&ProxyHeader::Local), ProxyHeader::Local);
    }

    #[test]
    fn encoders_write_the_spec_layout() {
        assert_eq!(
            encode_v1(sa("192.168.0.1:56324"), sa("192.168.0.11:443")),
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
        );
        let v4 = encode_v2(&proxied("10.1.2.3:1025", "10.0.0.1:5432"));
        assert_eq!(
            v4,
            v2(
                0x21,
                0x11,
                &[10, 1, 2, 3, 10, 0, 0, 1, 0x04, 0x01, 0x15, 0x38]
            )
        );
        let v6 = encode_v2(&proxied("[2001:db8::1]:1025", "[::1]:5432"));
        assert_eq!(&v6[12..16], &[0x21, 0x21, 0, 36]);
        assert_eq!(v6.len(), 16 + 36);
        assert_eq!(
            encode_v2(&ProxyHeader::Local),
            b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00"
        );
    }

    /// One header, one family: a mixed pair goes as IPv6 with the IPv4
    /// endpoint mapped, and comes back that way.
    #[test]
    fn mixed_families_are_sent_as_ipv6() {
        let expected = proxied("[::ffff:192.0.2.7]:40000", "[2001:db8::5]:5432");
        let v1 = encode_v1(sa("192.0.2.7:40000"), sa("[2001:db8::5]:5432"));
        assert!(v1.starts_with(b"PROXY TCP6 ::ffff:192.0.2.7 2001:db8::5 "));
        assert_eq!(ok(&v1).0, expected);
        let v2 = encode_v2(&proxied("192.0.2.7:40000", "[2001:db8::5]:5432"));
        assert_eq!(ok(&v2).0, expected);
    }

    // -- what follows the header -------------------------------------------

    #[test]
    fn consumed_stops_where_the_client_stream_starts() {
        for header in [
            b"PROXY TCP4 203.0.113.9 10.0.0.1 51000 5432\r\n".to_vec(),
            b"PROXY UNKNOWN\r\n".to_vec(),
            encode_v2(&proxied("[2001:db8::9]:51000", "[2001:db8::1]:5432")),
            encode_v2(&ProxyHeader::Local),
        ] {
            let mut stream = header.clone();
            stream.extend_from_slice(&startup_message());
            let (_, used) = ok(&stream);
            assert_eq!(used, header.len());
            let (packet, _) = parse_startup(&stream[used..]).unwrap().unwrap();
            assert!(matches!(packet, FeStartupPacket::StartupMessage { .. }));
        }
    }

    #[test]
    fn tlvs_are_skipped() {
        let mut block = vec![198, 51, 100, 7, 10, 0, 0, 1, 0xc3, 0x50, 0x15, 0x38];
        // ALPN "postgresql", an authority, a NOOP, a CRC32C (not checked), an
        // AWS-style custom TLV; then the same as nested SSL TLV.
        block.extend_from_slice(b"\x01\x00\x0apostgresql");
        block.extend_from_slice(b"\x02\x00\x0bdb.internal");
        block.extend_from_slice(b"\x04\x00\x00");
        block.extend_from_slice(b"\x03\x00\x04\xde\xad\xbe\xef");
        block.extend_from_slice(b"\xea\x00\x17\x01vpce-0123456789abcdef0");
        block.extend_from_slice(b"\x20\x00\x0c\x01\x00\x00\x00\x00\x21\x00\x04TLS3");
        let header = v2(0x21, 0x11, &block);
        assert_every_split(&header, proxied("198.51.100.7:50000", "10.0.0.1:5432"));
        assert_eq!(ok(&header).1, 16 + block.len());

        // TLVs (or junk: they are not interpreted) after IPv6 addresses and
        // after a LOCAL command.
        let mut block6 = [0u8; 36].to_vec();
        block6[15] = 1;
        block6[31] = 2;
        block6[32..36].copy_from_slice(&[0, 80, 0, 81]);
        block6.extend_from_slice(&[0xff; 100]);
        assert_every_split(&v2(0x21, 0x21, &block6), proxied("[::1]:80", "[::2]:81"));
        assert_every_split(
            &v2(0x20, 0x00, &[0x04, 0x00, 0x01, 0x00]),
            ProxyHeader::Local,
        );
    }

    #[test]
    fn v2_local_ignores_the_family_and_skips_the_block() {
        // "must use the real connection endpoints and discard the protocol
        // block including the family which is ignored" (spec 2.2).
        assert_every_split(&v2(0x20, 0x11, &[1; 12]), ProxyHeader::Local);
        assert_every_split(&v2(0x20, 0x31, &[0; 216]), ProxyHeader::Local);
        assert_every_split(&v2(0x20, 0xff, &[]), ProxyHeader::Local);
        // PROXY over AF_UNSPEC: use the real endpoints, skip what is there.
        assert_every_split(&v2(0x21, 0x00, &[]), ProxyHeader::Local);
        assert_every_split(&v2(0x21, 0x00, &[7; 12]), ProxyHeader::Local);
    }

    #[test]
    fn v2_length_cap() {
        let at_cap = v2(0x21, 0x11, &[0; V2_MAX_ADDRESS_LEN]);
        assert_eq!(ok(&at_cap).1, MAX_HEADER_LEN);
        // Over the cap: refused from the length word, nothing buffered.
        let over = v2_len(0x21, 0x11, V2_MAX_ADDRESS_LEN as u16 + 1, &[]);
        assert_eq!(err(&over), ProxyError::V2TooLong(2049));
        assert_eq!(
            err(&v2_len(0x20, 0x00, 0xffff, &[])).as_str(),
            "proxy_too_long"
        );
    }

    // -- malformed ----------------------------------------------------------

    #[test]
    fn bad_signature_after_a_partial_match() {
        for buf in [&b"PROXY"[..], b"PROX", b"P", b"\r\n\r\n\0\r\nQUIT", b"\r"] {
            assert_eq!(parse(buf), Ok(None), "{buf:?}");
            assert_eq!(detect(buf), None, "{buf:?}");
        }
        for buf in [
            &b"PROXY\r\n"[..],
            b"PROXY_TCP4",
            b"PROXX ",
            b"proxy TCP4 1.2.3.4 1.2.3.4 1 1\r\n",
            b"\r\n\r\n\0\r\nQUIX\n\x21\x11\x00\x0c",
            b"\r\n\r\n\x01",
            b"\r\n\r\n\0\r\nQUIT\r",
            b"\r\nGET / HTTP/1.1\r\n",
            b"GET / HTTP/1.1\r\n",
        ] {
            assert_eq!(err(buf), ProxyError::BadSignature, "{buf:?}");
            assert_eq!(detect(buf), Some(false), "{buf:?}");
        }
    }

    #[test]
    fn v2_bad_version_and_command() {
        // Version 1 in the version nibble (and others), from byte 13 alone.
        for b in [0x11, 0x01, 0x31, 0xf1, 0x10] {
            let mut buf = V2_SIGNATURE.to_vec();
            buf.push(b);
            assert_eq!(err(&buf), ProxyError::BadVersion(b));
            assert_eq!(err(&v2(b, 0x11, &[0; 12])).as_str(), "proxy_bad_version");
        }
        for b in [0x22, 0x2f] {
            let mut buf = V2_SIGNATURE.to_vec();
            buf.push(b);
            assert_eq!(err(&buf), ProxyError::BadCommand(b));
        }
    }

    #[test]
    fn v2_udp_and_unix_are_unsupported() {
        for (family, len) in [(0x12, 12), (0x22, 36), (0x31, 216), (0x32, 216)] {
            let buf = v2(0x21, family, &vec![0; len]);
            assert_eq!(err(&buf), ProxyError::Unsupported(family));
            // Decided from the family byte, before the addresses arrive.
            assert_eq!(err(&buf[..14]), ProxyError::Unsupported(family));
            assert!(err(&buf).to_string().contains("only TCP"));
        }
    }

    #[test]
    fn v2_undefined_family_bytes_are_refused() {
        for family in [0x01, 0x02, 0x10, 0x13, 0x20, 0x30, 0x41, 0xff] {
            let buf = v2(0x21, family, &[0; 36]);
            assert_eq!(err(&buf), ProxyError::BadFamily(family), "{family:#x}");
        }
    }

    #[test]
    fn v2_declared_length_shorter_than_the_addresses() {
        for (family, len) in [(0x11, 0), (0x11, 11), (0x21, 12), (0x21, 35)] {
            // Refused from the 16 fixed bytes: no waiting for a body.
            let buf = v2_len(0x21, family, len, &[]);
            assert_eq!(err(&buf), ProxyError::BadLength { family, len });
            assert_eq!(err(&buf).as_str(), "proxy_bad_length");
        }
    }

    #[test]
    fn v1_needs_crlf_within_107_bytes() {
        // The spec's worst case is exactly 107 bytes and is accepted.
        let worst = format!(
            "PROXY UNKNOWN {f} {f} 65535 65535\r\n",
            f = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
        );
        assert_eq!(worst.len(), V1_MAX_LEN);
        assert_every_split(worst.as_bytes(), ProxyHeader::Local);
        // One more byte before the CRLF: refused once 107 bytes are in.
        let longer = worst.replacen("UNKNOWN ", "UNKNOWN  ", 1);
        assert_eq!(parse(&longer.as_bytes()[..106]), Ok(None));
        assert_eq!(err(&longer.as_bytes()[..107]), ProxyError::V1TooLong);
        assert_eq!(err(longer.as_bytes()), ProxyError::V1TooLong);
        // No CRLF at all, or only lone CRs and LFs.
        let mut endless = b"PROXY TCP4 ".to_vec();
        endless.extend_from_slice(&[b'1'; 200]);
        assert_eq!(err(&endless), ProxyError::V1TooLong);
        let mut lone = b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n".to_vec();
        assert_eq!(parse(&lone), Ok(None));
        lone.resize(107, b'\r');
        assert_eq!(err(&lone), ProxyError::V1TooLong);
        assert!(ProxyError::V1TooLong.to_string().contains("107"));
    }

    #[test]
    fn v1_bad_ports() {
        for port in [
            "65536", "99999", "100000", "+80", "-1", "080", "00", "0x50", "8a", "１２",
        ] {
            let line = format!("PROXY TCP4 1.2.3.4 5.6.7.8 {port} 5432\r\n");
            assert_eq!(
                err(line.as_bytes()),
                ProxyError::BadAddress(V1Field::SourcePort),
                "{line:?}"
            );
            let line = format!("PROXY TCP4 1.2.3.4 5.6.7.8 5432 {port}\r\n");
            assert_eq!(
                err(line.as_bytes()),
                ProxyError::BadAddress(V1Field::DestinationPort),
                "{line:?}"
            );
        }
        assert_eq!(
            ok(b"PROXY TCP4 1.2.3.4 5.6.7.8 0 65535\r\n").0,
            proxied("1.2.3.4:0", "5.6.7.8:65535")
        );
    }

    #[test]
    fn v1_bad_addresses() {
        const SRC: V1Field = V1Field::SourceAddress;
        const DST: V1Field = V1Field::DestinationAddress;
        for (line, field) in [
            // Leading zeros (octal confusion), wrong part counts, ranges.
            ("PROXY TCP4 192.168.000.1 1.2.3.4 1 2\r\n", SRC),
            ("PROXY TCP4 01.2.3.4 1.2.3.4 1 2\r\n", SRC),
            ("PROXY TCP4 1.2.3 1.2.3.4 1 2\r\n", SRC),
            ("PROXY TCP4 1.2.3.4.5 1.2.3.4 1 2\r\n", SRC),
            ("PROXY TCP4 256.1.1.1 1.2.3.4 1 2\r\n", SRC),
            ("PROXY TCP4 1.2.3.4 1.2.3.-4 1 2\r\n", DST),
            ("PROXY TCP4 1.2.3.4 localhost 1 2\r\n", DST),
            // Family must match the protocol word.
            ("PROXY TCP4 ::1 1.2.3.4 1 2\r\n", SRC),
            ("PROXY TCP4 1.2.3.4 2001:db8::1 1 2\r\n", DST),
            ("PROXY TCP6 1.2.3.4 ::1 1 2\r\n", SRC),
            ("PROXY TCP6 ::1 5.6.7.8 1 2\r\n", DST),
            // Not canonical IPv6: zone ids, brackets, 5-digit groups, two "::".
            ("PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", SRC),
            ("PROXY TCP6 [::1] ::1 1 2\r\n", SRC),
            ("PROXY TCP6 1::2::3 ::1 1 2\r\n", SRC),
            ("PROXY TCP6 ::1 12345::1 1 2\r\n", DST),
            ("PROXY TCP6 ::1 1:2:3:4:5:6:7:8:9 1 2\r\n", DST),
        ] {
            assert_eq!(
                err(line.as_bytes()),
                ProxyError::BadAddress(field),
                "{line:?}"
            );
        }
        assert_eq!(
            err(b"PROXY TCP6 \xff::1 ::1 1 2\r\n"),
            ProxyError::BadAddress(V1Field::SourceAddress)
        );
        let e = err(b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n");
        assert_eq!(e.as_str(), "proxy_bad_address");
        assert_eq!(
            e.to_string(),
            "PROXY v1 line has an invalid destination address"
        );
    }

    #[test]
    fn v1_malformed_lines() {
        for line in [
            &b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n"[..],
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
            b"PROXY TCP4\r\n",
            b"PROXY TCP4 \r\n",
            b"PROXY \r\n",
            b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY UNKNOWNX\r\n",
            b"PROXY UNKNOWN\rX\r\n",
            b"PROXY TCP4\t1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4\t5.6.7.8 1 2\r\n",
        ] {
            assert_eq!(
                err(line).as_str(),
                "proxy_malformed",
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
        // An impossible protocol word is refused at once, not after 107 bytes.
        assert_eq!(err(b"PROXY H"), ProxyError::Malformed);
        assert_eq!(err(b"PROXY TCP4\r"), ProxyError::Malformed);
        assert_eq!(parse(b"PROXY TCP"), Ok(None));
        assert_eq!(parse(b"PROXY UNKNOWN"), Ok(None));
    }

    #[test]
    fn v1_unknown_ignores_the_rest_of_the_line() {
        for line in [
            &b"PROXY UNKNOWN\r\n"[..],
            b"PROXY UNKNOWN \r\n",
            b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n",
            b"PROXY UNKNOWN whatever\0\xff\n\r\r\n",
        ] {
            assert_every_split(line, ProxyHeader::Local);
        }
    }

    #[test]
    fn ipv4_mapped_addresses_stay_as_given() {
        assert_eq!(
            ok(b"PROXY TCP6 ::ffff:10.0.0.1 ::ffff:10.0.0.2 1 2\r\n").0,
            proxied("[::ffff:10.0.0.1]:1", "[::ffff:10.0.0.2]:2")
        );
        let mut block = [0u8; 36];
        block[10..16].copy_from_slice(&[0xff, 0xff, 10, 0, 0, 1]);
        block[26..32].copy_from_slice(&[0xff, 0xff, 10, 0, 0, 2]);
        block[32..36].copy_from_slice(&[0, 1, 0, 2]);
        assert_eq!(
            ok(&v2(0x21, 0x21, &block)).0,
            proxied("[::ffff:10.0.0.1]:1", "[::ffff:10.0.0.2]:2")
        );
    }

    // -- detect --------------------------------------------------------------

    #[test]
    fn detect_postgres_and_tls_at_the_first_byte() {
        let mut cancel = 16i32.to_be_bytes().to_vec();
        cancel.extend_from_slice(&((1234u32 << 16) | 5678).to_be_bytes());
        cancel.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 2]);
        let mut gss = 8i32.to_be_bytes().to_vec();
        gss.extend_from_slice(&((1234u32 << 16) | 5680).to_be_bytes());
        let client_hello = [0x16, 0x03, 0x01, 0x02, 0x00, 0x01];
        for stream in [
            ssl_request(),
            startup_message(),
            cancel,
            gss,
            client_hello.to_vec(),
        ] {
            for n in 1..=stream.len() {
                assert_eq!(detect(&stream[..n]), Some(false), "{:?}", &stream[..n]);
                assert_eq!(parse(&stream[..n]), Err(ProxyError::BadSignature));
            }
        }
        assert_eq!(detect(b""), None);
        assert_eq!(parse(b""), Ok(None));
    }

    #[test]
    fn detect_proxy_headers() {
        let v1 = b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n";
        for n in 0..6 {
            assert_eq!(detect(&v1[..n]), None);
        }
        for n in 6..=v1.len() {
            assert_eq!(detect(&v1[..n]), Some(true));
        }
        let v2 = encode_v2(&ProxyHeader::Local);
        for n in 0..12 {
            assert_eq!(detect(&v2[..n]), None);
        }
        for n in 12..=v2.len() {
            assert_eq!(detect(&v2[..n]), Some(true));
        }
        // "PROXY" then not a space: decided at the sixth byte.
        assert_eq!(detect(b"PROXY:"), Some(false));
    }

    // -- the spec's own examples ---------------------------------------------

    #[test]
    fn spec_examples() {
        // Section 2.1, before an HTTP request.
        let stream = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET / HTTP/1.1\r\nHost: 192.168.0.11\r\n\r\n";
        let (header, used) = ok(stream);
        assert_eq!(header, proxied("192.168.0.1:56324", "192.168.0.11:443"));
        assert_eq!(&stream[used..used + 3], b"GET");
        // The maximum lengths of section 2.1.
        let v4 = b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n";
        assert_eq!(v4.len(), 56);
        assert_eq!(
            ok(v4),
            (
                proxied("255.255.255.255:65535", "255.255.255.255:65535"),
                56
            )
        );
        let f = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
        let v6 = format!("PROXY TCP6 {f} {f} 65535 65535\r\n");
        assert_eq!(v6.len(), 104);
        let all_ones = format!("[{f}]:65535");
        assert_eq!(ok(v6.as_bytes()), (proxied(&all_ones, &all_ones), 104));
        assert_eq!(ok(b"PROXY UNKNOWN\r\n"), (ProxyHeader::Local, 15));
        // Section 2.2: the signature followed by version 2 (13 bytes) is how a
        // receiver tells v2; "\x00" is the mandatory UNSPEC family.
        assert_eq!(
            ok(b"\x0D\x0A\x0D\x0A\x00\x0D\x0A\x51\x55\x49\x54\x0A\x20\x00\x00\x00"),
            (ProxyHeader::Local, 16)
        );
    }

    // -- errors --------------------------------------------------------------

    #[test]
    fn errors_are_short_and_do_not_echo_input() {
        let mut garbage = b"PROXY UNKNOWN ".to_vec();
        garbage.extend_from_slice(b"SECRET".repeat(30).as_slice());
        let mut cases = vec![
            err(&garbage),
            err(b"PROXY TCP4 SECRET 1.2.3.4 1 2\r\n"),
            err(b"PROXY TCP4 1.2.3.4 1.2.3.4 SECRET 2\r\n"),
            err(b"PROXY SECRET"),
            err(b"SECRET"),
        ];
        cases.extend([
            ProxyError::BadVersion(0x11),
            ProxyError::BadCommand(0x2f),
            ProxyError::BadFamily(0x41),
            ProxyError::Unsupported(0x12),
            ProxyError::BadLength {
                family: 0x21,
                len: 12,
            },
            ProxyError::V2TooLong(65535),
        ]);
        for e in cases {
            let text = e.to_string();
            assert!(!text.contains("SECRET") && text.len() < 160, "{text}");
            assert!(e.as_str().starts_with("proxy_"));
            let _: &dyn std::error::Error = &e;
        }
    }
}
