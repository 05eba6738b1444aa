//! Integration tests of the server: real sockets on loopback, real SQLite files in temp
//! directories. One binary (faster to build), one module per area of PROTOCOL.md.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::ok_expect,
    clippy::too_many_arguments,
    missing_docs,
    unreachable_pub
)]

mod audit;
mod auth;
mod bus;
mod chaos;
mod common;
mod dashboard;
mod http;
mod memory;
mod reconcile;
mod restart;
mod tail;
mod timeouts;
mod transactions;
mod ws;
