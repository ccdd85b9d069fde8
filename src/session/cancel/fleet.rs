//! A fleet's cancel keys: the owner's instance id in the process id, and a
//! tag made with the fleet's shared cancel key in the secret, so that any
//! instance can tell a key some instance issued from a guess and forward
//! it to the owner, and only to the owner.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;

use ring::hmac;
use subtle::ConstantTimeEq;

use crate::upstream::login::ISSUED_KEY_LEN;

/// Process-id bits for the instance id (bits 23..30; bit 31 stays clear
/// for clients that read the id as a signed Int32).
pub(super) const INSTANCE_SHIFT: u32 = 23;
/// The rest of a fleet process id: the shard and a random slot.
pub(super) const LOCAL_MASK: u32 = (1 << INSTANCE_SHIFT) - 1;
/// Set on a CancelRequest one instance forwards to another: the receiver
/// acts on it locally and never forwards it again, so no two instances with
/// different views of the registry can pass a cancel back and forth.
pub const FORWARDED: u32 = 1 << 31;

/// Where a CancelRequest goes.
#[derive(Debug, PartialEq, Eq)]
pub enum Destination {
    /// A session of this instance (process id without the forward mark).
    Here(u32),
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

    /// Whether `ip` is the advertised address of another instance.
    pub fn is_peer(&self, ip: std::net::IpAddr) -> bool {
        let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        peers.values().any(|a| a.ip() == ip)
    }

    pub fn set_peers(&self, peers: std::collections::HashMap<u8, std::net::SocketAddr>) {
        *self.peers.lock().unwrap_or_else(|e| e.into_inner()) = peers;
    }

    /// The tag of a secret's random part. Two tags per secret, one for the
    /// 4 bytes a protocol 3.0 client gets and one for the 32 of 3.2, as the
    /// key is drawn before the server's protocol version is known.
    fn tag(&self, process_id: u32, random: &[u8], out: &mut [u8]) {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(&[random.len() as u8]);
        ctx.update(&process_id.to_be_bytes());
        ctx.update(random);
        let tag = ctx.sign();
        out.copy_from_slice(&tag.as_ref()[..out.len()]);
    }

    /// Fills in the tags of a fresh secret whose other bytes are random.
    pub(super) fn seal(&self, process_id: u32, secret: &mut [u8; ISSUED_KEY_LEN]) {
        let mut short = [0u8; 2];
        self.tag(process_id, &secret[..2], &mut short);
        secret[2..4].copy_from_slice(&short);
        let mut long = [0u8; 8];
        self.tag(process_id, &secret[..ISSUED_KEY_LEN - 8], &mut long);
        secret[ISSUED_KEY_LEN - 8..].copy_from_slice(&long);
    }

    /// Whether `secret` carries a valid tag for `process_id`.
    fn verify(&self, process_id: u32, secret: &[u8]) -> bool {
        let (random, tag) = match secret.len() {
            4 => secret.split_at(2),
            ISSUED_KEY_LEN => secret.split_at(ISSUED_KEY_LEN - 8),
            _ => return false,
        };
        let mut expected = [0u8; 8];
        let expected = &mut expected[..tag.len()];
        self.tag(process_id, random, expected);
        bool::from(expected.ct_eq(tag))
    }

    /// Where a CancelRequest for `process_id` with `secret` goes.
    pub fn destination(&self, process_id: u32, secret: &[u8]) -> Destination {
        if process_id & FORWARDED != 0 {
            return Destination::Here(process_id & !FORWARDED);
        }
        let owner = (process_id >> INSTANCE_SHIFT) as u8;
        let own = self.instance_id();
        if owner == own || owner == 0 {
            return Destination::Here(process_id);
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
