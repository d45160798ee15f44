//! Keyed hashes of recipients: the only form in which a recipient is stored.
//!
//! HMAC-SHA256 under `store.hash_key`, truncated to 8 bytes. At 100,000 recipients in one window
//! the chance that two share a hash is about 3 × 10⁻¹⁰; without the key nobody can test whether
//! a given number is in the store. Every sidecar sharing a store must use the same key.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::store::Member;

/// Bytes of each stored hash.
pub const MEMBER_LEN: usize = 8;

/// Bytes of each stored idempotency key hash: twice a recipient's, since two keys of one scope
/// that shared a hash would give one message the other's answer, and it would go out uncounted.
pub const IDEMPOTENCY_KEY_LEN: usize = 16;

/// The shortest hash key accepted.
pub const MIN_KEY_LEN: usize = 16;

/// Hashes normalised recipients under a secret key.
#[derive(Clone)]
pub struct RecipientHasher {
    mac: Hmac<Sha256>,
}

impl std::fmt::Debug for RecipientHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RecipientHasher(..)")
    }
}

impl RecipientHasher {
    /// A hasher under `key`, which must be at least [`MIN_KEY_LEN`] bytes.
    pub fn new(key: &[u8]) -> Result<RecipientHasher, String> {
        if key.len() < MIN_KEY_LEN {
            return Err(format!("must be at least {MIN_KEY_LEN} bytes, got {}", key.len()));
        }
        let mac = Hmac::<Sha256>::new_from_slice(key).map_err(|e| e.to_string())?;
        Ok(RecipientHasher { mac })
    }

    /// A hasher under a random key, for a memory store that nobody else shares.
    pub fn random() -> RecipientHasher {
        let key: [u8; 32] = rand::random();
        RecipientHasher::new(&key).expect("32 bytes is long enough")
    }

    fn hash(&self, parts: &[&[u8]]) -> Member {
        self.hash_to(parts, MEMBER_LEN)
    }

    fn hash_to(&self, parts: &[&[u8]], len: usize) -> Member {
        let mut mac = self.mac.clone();
        for part in parts {
            mac.update(&(part.len() as u32).to_be_bytes());
            mac.update(part);
        }
        mac.finalize().into_bytes()[..len].to_vec()
    }

    /// The stored form of a normalised recipient.
    pub fn recipient(&self, normalized: &str) -> Member {
        self.hash(&[b"recipient", normalized.as_bytes()])
    }

    /// The stored name of the (sender, recipient) service window.
    pub fn service_window(&self, sender: &str, normalized: &str) -> Member {
        self.hash(&[b"service", sender.as_bytes(), normalized.as_bytes()])
    }

    /// The stored form of an Admit's idempotency key ([`IDEMPOTENCY_KEY_LEN`] bytes).
    pub fn idempotency_key(&self, key: &str) -> Member {
        self.hash_to(&[b"idempotency", key.as_bytes()], IDEMPOTENCY_KEY_LEN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_key_same_hash_other_key_other_hash() {
        let a = RecipientHasher::new(b"0123456789abcdef").unwrap();
        let b = RecipientHasher::new(b"0123456789abcdef").unwrap();
        let c = RecipientHasher::new(b"fedcba9876543210").unwrap();
        assert_eq!(a.recipient("14155550100"), b.recipient("14155550100"));
        assert_ne!(a.recipient("14155550100"), c.recipient("14155550100"));
        assert_ne!(a.recipient("14155550100"), a.recipient("14155550101"));
        assert_eq!(a.recipient("14155550100").len(), MEMBER_LEN);
    }

    #[test]
    fn service_windows_and_recipients_do_not_collide() {
        let h = RecipientHasher::new(b"0123456789abcdef").unwrap();
        assert_ne!(h.service_window("", "14155550100"), h.recipient("14155550100"));
        assert_ne!(h.service_window("a", "b1234567"), h.service_window("ab", "1234567"));
        assert_ne!(h.idempotency_key("14155550100")[..MEMBER_LEN], h.recipient("14155550100"));
        assert_eq!(h.idempotency_key("order-1").len(), IDEMPOTENCY_KEY_LEN);
    }

    #[test]
    fn short_keys_are_refused() {
        assert!(RecipientHasher::new(b"too short").is_err());
    }
}
