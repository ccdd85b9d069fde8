//! Token authentication: the token format and the store it is checked against.
#![forbid(unsafe_code)]

pub mod store;
pub mod token;

pub use store::{Rejection, TokenRecord, TokenStore, Verdict};
