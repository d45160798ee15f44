//! How the Redis store packs a rolling window (the layout itself is at the top of
//! `scripts/window.lua`): recipients in hash buckets, their scores again in a time log, both exact
//! to the microsecond. These are its sizes; each sidecar passes them to the admit script, and
//! sidecars that pass different ones still read each other's windows (they only decide when a
//! bucket splits or a chunk is full).

use std::time::Duration;

use crate::policy::{self, Micros};

/// Bits a bucket entry keeps (5 bytes) for a contact's offset from the bucket's base score.
const BUCKET_OFFSET_BITS: u32 = 40;
/// Bits a time-log entry keeps (5 bytes) for a contact's offset from its chunk's base score.
const CHUNK_OFFSET_BITS: u32 = 40;

/// The sizes of a window's buckets and time-log chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowLayout {
    /// Entries a bucket holds on average before the buckets split (and a quarter of it, below
    /// which they merge back).
    pub load: u32,
    /// Contacts per time-log chunk.
    pub chunk: u32,
    /// The longest time (us) between a chunk's first and last contact (at most 2^40).
    pub chunk_span: Micros,
    /// The longest time (us) between a bucket's base and its newest contact (at most 2^40); the
    /// window may be at most half of it.
    pub bucket_span: Micros,
}

impl Default for WindowLayout {
    /// About 64 recipients per bucket (13 bytes each, under 1 KB), and chunks of 99 contacts (5
    /// bytes each) that with the 7-byte base and Redis' string header fill a 512-byte allocation.
    /// Smaller fields pay Redis' per-field overhead more often; larger ones cost more to copy, and
    /// a script copies a field whole each time it reads or writes it (a bucket and a chunk per
    /// Admit, at about a nanosecond a byte each way).
    fn default() -> Self {
        WindowLayout { load: 64, chunk: 99, chunk_span: 1 << CHUNK_OFFSET_BITS, bucket_span: 1 << BUCKET_OFFSET_BITS }
    }
}

impl WindowLayout {
    /// The longest rolling window this layout keeps: half a bucket's span, so a bucket rebased on
    /// its oldest contact always holds the newest one, even with scores ahead of the clock.
    pub fn max_window(&self) -> Duration {
        Duration::from_micros(self.bucket_span / 2)
    }

    /// Checks the layout, and that it keeps `window`.
    pub fn check(&self, window: Duration) -> Result<(), String> {
        if self.load == 0 || self.chunk == 0 || self.chunk_span == 0 {
            return Err("a window layout needs buckets, chunks and a chunk span above zero".into());
        }
        if self.chunk_span > 1 << CHUNK_OFFSET_BITS || self.bucket_span > 1 << BUCKET_OFFSET_BITS {
            return Err("a window layout's spans must fit its offsets (2^40 us)".into());
        }
        if policy::micros(window) > self.bucket_span / 2 {
            return Err(format!(
                "policy.window is {}; the Redis store keeps windows of at most {}",
                humantime::format_duration(window),
                humantime::format_duration(Duration::from_secs(self.max_window().as_secs()))
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_layout_keeps_windows_up_to_six_days() {
        let layout = WindowLayout::default();
        assert!(layout.check(Duration::from_secs(24 * 3600)).is_ok());
        assert!(layout.check(Duration::from_secs(6 * 24 * 3600)).is_ok());
        let e = layout.check(Duration::from_secs(7 * 24 * 3600)).unwrap_err();
        assert!(e.contains("policy.window is 7days") && e.contains("at most 6days"), "{e}");
        assert!(WindowLayout { chunk_span: (1 << 40) + 1, ..layout }.check(Duration::from_secs(1)).is_err());
        assert!(WindowLayout { load: 0, ..layout }.check(Duration::from_secs(1)).is_err());
    }
}
