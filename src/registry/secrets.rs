//! Secrets: random, shown once, stored as SHA-256.
//!
//! Each kind has a prefix so that a leaked secret is recognisable (and so secret
//! scanners can find it), and so that authentication knows where to look it up.

use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};

/// The kinds of bearer secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretKind {
    Admin,
    UserKey,
    DeviceToken,
}

impl SecretKind {
    pub fn prefix(self) -> &'static str {
        match self {
            SecretKind::Admin => "ipa_",
            SecretKind::UserKey => "ipk_",
            SecretKind::DeviceToken => "ipd_",
        }
    }

    /// The kind a secret claims by its prefix.
    pub fn of(secret: &str) -> Option<SecretKind> {
        [
            SecretKind::Admin,
            SecretKind::UserKey,
            SecretKind::DeviceToken,
        ]
        .into_iter()
        .find(|k| secret.starts_with(k.prefix()))
    }
}

/// A new secret: the prefix and 256 bits from the thread-local CSPRNG (seeded and
/// reseeded by the OS), base64url.
pub fn generate(kind: SecretKind) -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!(
        "{}{}",
        kind.prefix(),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// The SHA-256 of a secret.
pub fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// The stored form of a secret's hash.
pub fn hash_hex(secret: &str) -> String {
    hex::encode(digest(secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_random_prefixed_and_long() {
        let a = generate(SecretKind::DeviceToken);
        let b = generate(SecretKind::DeviceToken);
        assert_ne!(a, b);
        assert!(a.starts_with("ipd_"));
        assert_eq!(a.len(), 4 + 43);
        assert_eq!(SecretKind::of(&a), Some(SecretKind::DeviceToken));
        assert_eq!(hash_hex(&a).len(), 64);
        assert_ne!(hash_hex(&a), hash_hex(&b));
    }
}
