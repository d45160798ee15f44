//! Leases and Release: a failed send gives back the slot its Admit took. A lease names the
//! exact contact its Admit counted, so releasing it never undoes a later message to the same
//! recipient; and it is signed, so only a lease a sidecar of this store handed out is honoured.

use crate::error::Error;
use crate::metrics;

use super::input::FieldPath;
use super::Limiter;

impl Limiter {
    /// Gives back the slot a lease names; false when it was already released or touched again.
    /// A lease this store's sidecars did not sign is invalid.
    pub async fn release(&self, token: &str) -> Result<bool, Error> {
        let lease = self.leases.verify(token).map_err(|m| FieldPath::TOP.invalid("lease", m))?;
        let released = match self.store.release(&lease).await {
            Ok(released) => released,
            Err(e) => {
                self.store_failed("release", &e).await;
                return Err(e.into());
            }
        };
        metrics::release(released);
        Ok(released)
    }
}
