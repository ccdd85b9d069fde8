//! Token authentication: the token format and the store it is checked against.
#![forbid(unsafe_code)]

pub mod cidr;
pub mod jwt;
pub mod live;
pub mod pool_mode;
pub mod store;
pub mod token;

pub use store::{
    Grant, OnExpiry, Presenter, Rejection, SecretSlot, TokenRecord, TokenStore, Verdict,
};
