//! tiergate: a gRPC sidecar that keeps many WhatsApp sender processes, together, within their
//! business's messaging limit.
//!
//! How a request flows:
//!
//! - [`api`] is the gRPC edge (`tiergate.v1.Limiter`): it turns protobuf messages into domain
//!   values and back, and errors into statuses. Nothing else sees protobuf types.
//! - [`limiter`] validates the request, resolves its limit scope and fallback tier, hashes the
//!   recipient with [`hashing`], asks the store, and records [`metrics`].
//! - [`store`] holds the windows behind one async trait: [`store::memory`] in this process, or
//!   [`store::redis`], where every decision is one Lua script call shared by every sidecar.
//! - [`policy`] is the rules themselves, pure: what is admitted, what counts, when to retry.
//! - [`webhooks`] receives Meta's WhatsApp webhooks on the admin server and turns them into
//!   store changes through the same limiter, so every sidecar follows the real tier and quality.
//! - [`config`] reads and validates the configuration; [`server`] runs the gRPC and admin HTTP
//!   servers and shuts them down gracefully.
#![forbid(unsafe_code)]

pub mod api;
pub mod config;
pub mod hashing;
pub mod limiter;
pub mod metrics;
pub mod policy;
pub mod server;
pub mod store;
pub mod webhooks;

/// The generated protobuf types and gRPC stubs of `proto/tiergate/v1/limiter.proto`.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("tiergate.v1");

    /// The encoded descriptor set, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tiergate_descriptor");
}
