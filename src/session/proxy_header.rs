//! The PROXY protocol header (v1 or v2) a trusted load balancer puts before
//! the client's first byte: read only from the balancers' addresses
//! (`proxy_trusted`), before anything else, so that every rule, limit and
//! log line sees the real client. A header from anyone else is refused.
//!
//! <https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt>

use std::net::SocketAddr;

use bytes::BytesMut;

use crate::net::Stream;
use monoio::time::timeout_at;

use crate::error::ClientError;
use crate::io_util::read_append;
use crate::protocol::proxy_header::{self, ProxyHeader};

use super::refusal::{Refusal, Reply};
use super::Start;

/// Whether `start.peer` is one of the load balancers whose headers are
/// believed.
pub(super) fn from_trusted_balancer(start: &Start) -> bool {
    let config = &start.settings.config;
    // A Unix-domain socket peer is a local process, never a balancer,
    // whatever address it counts as.
    config.proxy_protocol
        && !start.peer.is_local()
        && config
            .proxy_trusted
            .iter()
            .any(|c| c.contains(start.peer.ip()))
}

/// Reads a PROXY protocol header from a trusted load balancer: the real
/// client's address, or `None` when the connection has no header (a peer
/// in the balancers' network connecting directly, such as another
/// instance forwarding a cancel) or a LOCAL one (the balancer's health
/// check). Bytes after the header stay in `input` for the start-up.
pub(super) async fn read(
    client: &mut Stream,
    input: &mut BytesMut,
    start: &Start,
) -> Result<Option<SocketAddr>, Refusal> {
    loop {
        match proxy_header::detect(input) {
            Some(false) => return Ok(None),
            Some(true) => match proxy_header::parse(input) {
                Ok(Some((header, len))) => {
                    let _ = input.split_to(len);
                    return Ok(match header {
                        ProxyHeader::Proxied { source, .. } => Some(source),
                        ProxyHeader::Local => None,
                    });
                }
                Ok(None) => {}
                Err(e) => {
                    let mut refusal =
                        Refusal::new(e.as_str(), Reply::Client(ClientError::bad_proxy_header()));
                    refusal.detail = Some(e.to_string());
                    return Err(refusal);
                }
            },
            None => {}
        }
        let read = read_append(client, std::mem::take(input), 256);
        let (res, buf) = timeout_at(start.deadline, read)
            .await
            .map_err(|_| Refusal::from(ClientError::startup_timeout()))?;
        *input = buf;
        match res {
            Ok(0) | Err(_) => return Err(Refusal::gone()),
            Ok(_) => {}
        }
    }
}

/// With the PROXY protocol on, a client that is not a trusted balancer may
/// still send a header (a misconfigured balancer, or someone spoofing an
/// address): it is told so, rather than getting a puzzling start-up error.
/// Reads the client's first bytes into `input` to look.
pub(super) async fn refuse_untrusted(
    client: &mut Stream,
    input: &mut BytesMut,
    start: &Start,
) -> Result<(), Refusal> {
    let read = read_append(client, std::mem::take(input), 1024);
    let Ok((res, buf)) = timeout_at(start.deadline, read).await else {
        return Err(ClientError::startup_timeout().into());
    };
    *input = buf;
    if !matches!(res, Ok(n) if n > 0) {
        return Err(Refusal::gone());
    }
    if proxy_header::detect(input) == Some(true) {
        return Err(Refusal::new(
            "proxy_untrusted",
            Reply::Client(ClientError::untrusted_proxy_header()),
        ));
    }
    Ok(())
}
