pub mod redis;
pub mod server;
