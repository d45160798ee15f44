//! Leases and Release: a failed send gives back the slot its Admit took. A lease names the
//! exact contact its Admit counted, so releasing it never undoes a later message to the same
//! recipient.

use crate::error::Error;
use crate::metrics;
use crate::policy::Lease;

use super::input::FieldPath;
use super::Limiter;

impl Limiter {
    /// Gives back the slot a lease names; false when it was already released or touched again.
    pub async fn release(&self, token: &str) -> Result<bool, Error> {
        let lease = Lease::decode(token).map_err(|m| FieldPath::TOP.invalid("lease", m))?;
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
