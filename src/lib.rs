//! tiergate: a gRPC sidecar that keeps many WhatsApp sender processes, together, within their
//! business's messaging limit.
//!
//! How a request flows:
//!
//! - [`api`] is the gRPC edge (`tiergate.v1.Limiter`): [`api::convert`] turns protobuf messages
//!   into domain values and back (`From`/`TryFrom`). Nothing else sees protobuf types.
//! - [`webhooks`] is the other edge, on the admin server: it verifies Meta's WhatsApp webhooks
//!   and [`webhooks::parse`] turns them into typed [`limiter::Event`]s, so every sidecar follows
//!   the real tier and quality.
//! - [`error`] is how either edge answers a failure: one table from each kind of error to its
//!   gRPC code and HTTP status.
//! - [`limiter`] is the service both edges call, one file per request's path: [`limiter::input`]
//!   parses fields into checked types, then `admit`, `release`, `read` (usage, portfolio),
//!   `change` (tiers, opt-outs, statuses, service windows, Meta's events) and `simulate`. It
//!   resolves each request's scope and fallback tier, hashes recipients with [`hashing`], asks
//!   the store, and records [`metrics`].
//! - [`store`] holds the windows behind one async trait: [`store::memory`] in this process, or
//!   [`store::redis`], where every decision is one Lua script call shared by every sidecar.
//! - [`policy`] is the rules themselves, pure: what is admitted, what counts, when to retry.
//! - [`config`] reads and validates the configuration; [`server`] runs the gRPC and admin HTTP
//!   servers and shuts them down gracefully. [`shared_policy`] keeps sidecars whose
//!   configurations disagree from sharing one store.
//! - [`status`] is the status page on the admin server: what the limiter reads, as HTML for
//!   people.
#![forbid(unsafe_code)]

pub mod api;
pub mod config;
pub mod error;
pub mod hashing;
pub mod limiter;
pub mod metrics;
pub mod policy;
pub mod server;
pub mod shared_policy;
pub mod status;
pub mod store;
pub mod webhooks;

/// The generated protobuf types and gRPC stubs of `proto/tiergate/v1/limiter.proto`.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("tiergate.v1");

    /// The encoded descriptor set, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tiergate_descriptor");
}
