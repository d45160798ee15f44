//! Keyed hashes of recipients: the only form in which a recipient is stored; and the signatures
//! on leases, under a key derived from the same secret.
//!
//! HMAC-SHA256 under `store.hash_key`, truncated to 8 bytes. At 100,000 recipients in one window
//! the chance that two share a hash is about 3 × 10⁻¹⁰; without the key nobody can test whether
//! a given number is in the store. Every sidecar sharing a store must use the same key.
//!
//! A lease token is its text form ([`Lease::encode`]), a `.`, and an HMAC-SHA256 of that text
//! under the lease key, HMAC(hash key, "tiergate lease v2"). So a Release can give back only a
//! slot that a sidecar of the same store handed out, while the hash key itself signs nothing a
//! client sees.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::policy::Lease;
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

    /// A short digest that tells keys apart without revealing them, for comparing the keys of
    /// sidecars that share a store.
    pub fn key_digest(&self) -> String {
        hex::encode(self.hash(&[b"key digest"]))
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

    /// The signer of leases for this store, under a key derived from this hasher's. The label is
    /// length-prefixed like every hashed input, so the lease key is no recipient's hash.
    pub fn lease_signer(&self) -> LeaseSigner {
        let mut mac = self.mac.clone();
        mac.update(&(LEASE_KEY_LABEL.len() as u32).to_be_bytes());
        mac.update(LEASE_KEY_LABEL);
        let key = mac.finalize().into_bytes();
        LeaseSigner { mac: Hmac::<Sha256>::new_from_slice(&key).expect("HMAC takes keys of any length") }
    }
}

/// What the lease key is derived with; a new version of the lease format takes a new label.
const LEASE_KEY_LABEL: &[u8] = b"tiergate lease v2";

/// Signs the leases Admit hands out and checks those Release is given.
#[derive(Clone)]
pub struct LeaseSigner {
    mac: Hmac<Sha256>,
}

impl std::fmt::Debug for LeaseSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LeaseSigner(..)")
    }
}

impl LeaseSigner {
    /// The token for `lease`: its text form, `.`, and the MAC of that text (URL-safe base64).
    pub fn sign(&self, lease: &Lease) -> String {
        let text = lease.encode();
        let mut mac = self.mac.clone();
        mac.update(text.as_bytes());
        format!("{text}.{}", URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()))
    }

    /// The lease a token made by [`LeaseSigner::sign`] under the same key names. A token altered
    /// in any byte, unsigned, or signed under another key is refused; the MAC is compared in
    /// constant time.
    pub fn verify(&self, token: &str) -> Result<Lease, String> {
        if token.is_empty() {
            return Err("must not be empty".into());
        }
        let bad = || "is not a lease issued by a tiergate sharing this store.hash_key".to_string();
        let (text, tag) = token.rsplit_once('.').ok_or_else(bad)?;
        let tag = URL_SAFE_NO_PAD.decode(tag).map_err(|_| bad())?;
        let mut mac = self.mac.clone();
        mac.update(text.as_bytes());
        mac.verify_slice(&tag).map_err(|_| bad())?;
        Lease::decode(text).map_err(|_| bad())
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

    fn lease() -> Lease {
        Lease {
            scope: crate::policy::ScopeKey { portfolio: "acme".into(), sender: None },
            member: vec![1, 2, 3, 4, 5, 6, 7, 8],
            score: 1_800_000_000_000_007,
        }
    }

    #[test]
    fn leases_verify_under_the_same_key_only() {
        let a = RecipientHasher::new(b"0123456789abcdef").unwrap().lease_signer();
        let b = RecipientHasher::new(b"0123456789abcdef").unwrap().lease_signer();
        let other = RecipientHasher::new(b"fedcba9876543210").unwrap().lease_signer();
        let token = a.sign(&lease());
        assert_eq!(b.verify(&token).unwrap(), lease());
        assert!(other.verify(&token).is_err());
        assert!(RecipientHasher::random().lease_signer().verify(&token).is_err());
        assert_eq!(a.verify("").unwrap_err(), "must not be empty");
    }

    #[test]
    fn a_lease_altered_anywhere_or_unsigned_is_refused() {
        let signer = RecipientHasher::new(b"0123456789abcdef").unwrap().lease_signer();
        let token = signer.sign(&lease());
        for i in 0..token.len() {
            let mut altered = token.clone().into_bytes();
            altered[i] = if altered[i] == b'A' { b'B' } else { b'A' };
            assert!(signer.verify(std::str::from_utf8(&altered).unwrap()).is_err(), "byte {i}");
        }
        let (text, tag) = token.split_once('.').unwrap();
        assert!(signer.verify(text).is_err());
        assert!(signer.verify(&format!("{text}.")).is_err());
        assert!(signer.verify(&format!("{text}.{}", &tag[..tag.len() - 2])).is_err(), "a truncated MAC");
        assert!(signer.verify(&format!("{text}.{tag}.{tag}")).is_err());
    }

    #[test]
    fn the_lease_key_is_not_the_hash_key() {
        let key = b"0123456789abcdef";
        let signer = RecipientHasher::new(key).unwrap().lease_signer();
        let text = lease().encode();
        let mut under_hash_key = Hmac::<Sha256>::new_from_slice(key).unwrap();
        under_hash_key.update(text.as_bytes());
        let forged = format!("{text}.{}", URL_SAFE_NO_PAD.encode(under_hash_key.finalize().into_bytes()));
        assert!(signer.verify(&forged).is_err());
    }
}
