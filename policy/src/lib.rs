//! fleetgate's pure decisions: device tokens, routes, access policies, rate limits, quota
//! ledger, meters.
//!
//! This crate decides; the `gateway` crate does. The purity contract: no I/O, no sockets, no
//! tokio, no pingora, no clock reads, no globals. Time comes in as an argument (`now`, unix
//! seconds or milliseconds as named); streaming parsers are fed bytes and keep their own
//! state; answers go out as typed values ([`decision::Denial`], [`token::TokenError`], ...).
//! That makes every rule testable with a manual clock and no sleeps.
//!
//! What it does not do: I/O of any kind, logging, metrics, or holding locks across calls. The
//! gateway owns shared state and calls in here with plain values.

pub mod access;
pub mod credential;
pub mod decision;
pub mod fleet;
pub mod ids;
pub mod metering;
pub mod quota;
pub mod route;
pub mod token;
