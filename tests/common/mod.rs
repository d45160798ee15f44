//! Helpers shared by the integration tests and the benchmarks.
//!
//! Each test binary uses a subset of these helpers.
#![allow(dead_code)]

pub mod ports;
pub mod redis;
pub mod server;
