//! Helpers shared by the integration tests and the benchmarks: ports, real Redis servers and
//! clusters, store fixtures and store-level ops, the sidecar, gRPC request builders and calls, and
//! Meta webhook deliveries.
//!
//! Each test binary uses a subset of these helpers.
#![allow(dead_code)]

pub mod calls;
pub mod ops;
pub mod ports;
pub mod redis;
pub mod requests;
pub mod server;
pub mod stores;
pub mod webhooks;
