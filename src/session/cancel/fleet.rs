//! A fleet's cancel keys: the owner's instance id in the secret's first
//! byte, and a tag made with the fleet's shared cancel key over the
//! backend's process id and the secret's start, so that any instance can
//! tell a key some instance issued from a guess and forward it to the
//! owner, and only to the owner. Both sit in the first 4 bytes for a
//! protocol 3.0 client (instance, one random byte, a 2-byte tag), and the
//! 32-byte key of 3.2 adds its own 8-byte tag over its first 24 bytes.
//!
//! A forwarded request is marked out of band, by one byte appended to the
//! secret ([`FORWARD_MARK`]), believed only from another instance's
//! address: a process id may use any of its 32 bits (not every server is
//! Postgres on Linux).

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;

use ring::hmac;
use subtle::ConstantTimeEq;

use crate::upstream::login::ISSUED_KEY_LEN;

/// Appended to the secret of a CancelRequest one instance forwards to
/// another: the receiver acts on it locally and never forwards it again, so
/// no two instances with different views of the registry can pass a cancel
/// back and forth. Issued secrets are 4 or 32 bytes, so a marked one (5 or
/// 33) is never a client's.
pub const FORWARD_MARK: u8 = 0xf0;

/// Where a CancelRequest goes.
#[derive(Debug, PartialEq, Eq)]
pub enum Destination {
    /// A session of this instance.
    Here,
    /// Another instance, at this address.
    Peer(std::net::SocketAddr),
    /// A key no instance of the fleet issued, or an owner not known.
    Nowhere,
}

/// The fleet's shared cancel key and the instance registry's view.
pub struct Fleet {
    key: hmac::Key,
    /// Claimed in the control database before the shards start; renewed
    /// (possibly changed) after a reconnect.
    instance_id: AtomicU8,
    /// Other instances' advertised addresses, by id, resolved by the
    /// control thread.
    peers: Mutex<std::collections::HashMap<u8, std::net::SocketAddr>>,
    pub advertise: String,
}

impl Fleet {
    pub fn new(cancel_key: &[u8], advertise: String) -> Self {
        Fleet {
            key: hmac::Key::new(hmac::HMAC_SHA256, cancel_key),
            instance_id: AtomicU8::new(0),
            peers: Mutex::default(),
            advertise,
        }
    }

    pub fn instance_id(&self) -> u8 {
        self.instance_id.load(Ordering::Relaxed)
    }

    pub fn set_instance_id(&self, id: u8) {
        self.instance_id.store(id, Ordering::Relaxed);
    }

    /// A request forwarded by another instance: its secret without the
    /// mark, if `from` is an instance's address and the secret carries it.
    pub fn forwarded<'a>(&self, from: std::net::IpAddr, secret: &'a [u8]) -> Option<&'a [u8]> {
        let (mark, original) = secret.split_last()?;
        let marked = *mark == FORWARD_MARK && matches!(original.len(), 4 | ISSUED_KEY_LEN);
        (marked && self.is_peer(from)).then_some(original)
    }

    /// Whether `ip` is the advertised address of another instance.
    pub fn is_peer(&self, ip: std::net::IpAddr) -> bool {
        let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        peers.values().any(|a| a.ip() == ip)
    }

    pub fn set_peers(&self, peers: std::collections::HashMap<u8, std::net::SocketAddr>) {
        *self.peers.lock().unwrap_or_else(|e| e.into_inner()) = peers;
    }

    /// The tag of the start of a secret (its instance byte and random
    /// bytes). Two tags per secret, one for the 4 bytes a protocol 3.0
    /// client gets and one for the 32 of 3.2, as the key is drawn before
    /// the server's protocol version is known.
    fn tag(&self, process_id: u32, start: &[u8], out: &mut [u8]) {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(&[start.len() as u8]);
        ctx.update(&process_id.to_be_bytes());
        ctx.update(start);
        let tag = ctx.sign();
        out.copy_from_slice(&tag.as_ref()[..out.len()]);
    }

    /// Marks a fresh random secret as `instance`'s and fills in its tags
    /// for the backend's `process_id`.
    pub(super) fn seal(&self, instance: u8, process_id: u32, secret: &mut [u8; ISSUED_KEY_LEN]) {
        secret[0] = instance;
        let mut short = [0u8; 2];
        self.tag(process_id, &secret[..2], &mut short);
        secret[2..4].copy_from_slice(&short);
        let mut long = [0u8; 8];
        self.tag(process_id, &secret[..ISSUED_KEY_LEN - 8], &mut long);
        secret[ISSUED_KEY_LEN - 8..].copy_from_slice(&long);
    }

    /// Whether `secret` carries a valid tag for `process_id`.
    fn verify(&self, process_id: u32, secret: &[u8]) -> bool {
        let (start, tag) = match secret.len() {
            4 => secret.split_at(2),
            ISSUED_KEY_LEN => secret.split_at(ISSUED_KEY_LEN - 8),
            _ => return false,
        };
        let mut expected = [0u8; 8];
        let expected = &mut expected[..tag.len()];
        self.tag(process_id, start, expected);
        bool::from(expected.ct_eq(tag))
    }

    /// Where a CancelRequest for `process_id` with `secret` goes (one not
    /// forwarded by another instance).
    pub fn destination(&self, process_id: u32, secret: &[u8]) -> Destination {
        let owner = secret.first().copied().unwrap_or(0);
        let own = self.instance_id();
        if owner == own || owner == 0 {
            return Destination::Here;
        }
        if !self.verify(process_id, secret) {
            return Destination::Nowhere;
        }
        let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        match peers.get(&owner) {
            Some(addr) if self.advertise.parse() != Ok(*addr) => Destination::Peer(*addr),
            _ => Destination::Nowhere,
        }
    }
}
