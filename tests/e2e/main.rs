//! End-to-end tests: real sockets on 127.0.0.1:0, the sandbox upstream in-process, and the
//! real `fleetgate` binary (`cargo build --bins` first).

mod access;
mod cli;
mod cluster;
mod device_tls;
mod devices;
mod faults;
mod metering;
mod oauth;
mod quota;
mod rest;
mod security;
mod sse;
mod timeouts;
mod tls;
mod upstream_jwt;
mod ws;
