//! What the store knows of the Redis clock, so that every writing script can be told, in that
//! clock, when its caller gives up: a script that Redis starts later (it stalled, or the call
//! waited in a queue) writes nothing, and a call answered UNAVAILABLE never spends the limit.
//!
//! Two clocks meet here. This process measures the call's bound, `store.timeout`, on its monotonic
//! clock ([`Instant`]), which no wall-clock step moves. The scripts read the Redis server's wall
//! clock (`TIME`). The store keeps the offset between them from the last reply that carried
//! `TIME` (every script but `portfolio` returns it, and so does a refusal past the deadline, so an
//! offset that erred early cannot keep refusing calls), and the offset follows the server's clock
//! as it moves; before it knows any, it reads the clock once with `clock.lua`. In a Cluster each node
//! has its own clock, so the offset is kept per slot of the call's keys (at most 16,384).
//!
//! **Offset error.** A reply pairs Redis's `TIME`, read as the script started, with the moment
//! the reply reached this process. The reply left Redis after `TIME` was read, so the pairing
//! takes Redis's clock to be earlier than it is, by the script's run time and the reply's one-way
//! trip: a deadline derived from it falls that much *early*, never late. Early only refuses a call
//! that was nearly out of time anyway (the caller can retry it); late would let a script write for
//! a caller that already answered UNAVAILABLE. (Pairing with the moment the call was *sent* would
//! err the other way.)
//!
//! **Margin.** The deadline is when the caller gives up (the call's start plus `store.timeout`)
//! less [`margin`], a fifth of the timeout. A script that starts just before its deadline must
//! still run and send its reply back before the caller gives up, or the caller answers
//! UNAVAILABLE for a call that wrote; the margin covers that run time and trip (a few ms on a
//! local network against 50 ms at the default 250 ms timeout). It also absorbs what the offset
//! cannot see: a Redis clock that stepped since the last reply (corrected by the next one), or a
//! new master after a Sentinel failover whose clock differs from the old one's, as long as those
//! steps are smaller than the margin. A script that started in time but whose reply is held up
//! longer than the margin (a stall in the middle of it) can still write for a caller that gave
//! up: the deadline narrows that race to calls already running when Redis stalls.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use redis::cluster_routing::Slot;

use crate::policy::Micros;

/// The part of `store.timeout` kept between a writing script's deadline and the moment its
/// caller gives up; see the [module docs](self).
pub fn margin(timeout: Duration) -> Duration {
    timeout / 5
}

/// The offset of each Redis server's clock from this process's monotonic clock.
#[derive(Debug)]
pub struct RedisClock {
    /// The origin of this process's side of every offset.
    base: Instant,
    /// Keep one offset per Cluster slot (each node has its own clock), else one for the server.
    per_slot: bool,
    /// Redis microseconds minus microseconds since `base`, by slot (`None` without a Cluster).
    offsets: Mutex<HashMap<Option<Slot>, i64>>,
}

impl RedisClock {
    /// Nothing known yet; `per_slot` for a Cluster.
    pub fn new(per_slot: bool) -> RedisClock {
        RedisClock { base: Instant::now(), per_slot, offsets: Mutex::new(HashMap::new()) }
    }

    fn slot(&self, key: &str) -> Option<Slot> {
        self.per_slot.then(|| Slot::for_key(key))
    }

    fn since_base(&self, at: Instant) -> i64 {
        i64::try_from(at.saturating_duration_since(self.base).as_micros()).unwrap_or(i64::MAX)
    }

    /// A reply of a script on `key`'s server said its clock read `redis_now` when the script
    /// started; the reply arrived here at `received`.
    pub fn observe(&self, key: &str, redis_now: Micros, received: Instant) {
        let offset = i64::try_from(redis_now).unwrap_or(i64::MAX).saturating_sub(self.since_base(received));
        self.offsets.lock().unwrap_or_else(PoisonError::into_inner).insert(self.slot(key), offset);
    }

    /// `at`, by the clock of `key`'s server; `None` while nothing is known of that clock.
    pub fn redis_time(&self, key: &str, at: Instant) -> Option<Micros> {
        let offset = *self.offsets.lock().unwrap_or_else(PoisonError::into_inner).get(&self.slot(key))?;
        Some(u64::try_from(self.since_base(at).saturating_add(offset)).unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_time_is_moved_to_the_clock_of_the_last_reply() {
        let clock = RedisClock::new(false);
        let now = Instant::now();
        assert_eq!(clock.redis_time("k", now), None);
        clock.observe("k", 1_000_000_000, now);
        assert_eq!(clock.redis_time("other", now + Duration::from_millis(5)), Some(1_000_005_000));
        // The server's clock stepped back one second: the next reply says so.
        clock.observe("k", 999_000_000, now);
        assert_eq!(clock.redis_time("k", now), Some(999_000_000));
    }

    #[test]
    fn each_cluster_slot_has_its_own_clock() {
        let clock = RedisClock::new(true);
        let now = Instant::now();
        clock.observe("tg:{a}:w", 1_000_000_000, now);
        assert_eq!(clock.redis_time("tg:{a}:m", now), Some(1_000_000_000));
        assert_eq!(clock.redis_time("tg:{b}:w", now), None);
    }

    #[test]
    fn the_margin_is_a_fifth_of_the_timeout() {
        assert_eq!(margin(Duration::from_millis(250)), Duration::from_millis(50));
    }
}
