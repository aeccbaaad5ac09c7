//! Read and write tokens: COMET's strength rule and keyed hashing.
//!
//! Tokens are secrets. They are never stored: the store holds
//! HMAC-SHA256(server key, token), and a presented token is hashed the same way and
//! compared in constant time.

use crate::error::ModelError;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::fmt;
use subtle::ConstantTimeEq;

/// Which token a check is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRole {
    /// The read token.
    Read,
    /// The write token.
    Write,
}

impl TokenRole {
    /// "Read" or "Write", as COMET's messages spell it.
    pub fn title(self) -> &'static str {
        match self {
            TokenRole::Read => "Read",
            TokenRole::Write => "Write",
        }
    }
}

/// COMET's strength rule: at least 8 characters, a digit, a lower-case and an
/// upper-case letter, and no white space.
pub fn check_token_strength(role: TokenRole, token: &str) -> Result<(), ModelError> {
    // One pass: every read and write checks its tokens.
    let (mut chars, mut digit, mut lower, mut upper, mut space) = (0, false, false, false, false);
    for c in token.chars() {
        chars += 1;
        digit |= c.is_ascii_digit();
        lower |= c.is_lowercase();
        upper |= c.is_uppercase();
        space |= c.is_whitespace();
    }
    let strong = chars >= 8 && digit && lower && upper && !space;
    if strong {
        Ok(())
    } else {
        Err(ModelError::WeakToken(role))
    }
}

/// The keyed hash of a token, as stored. Comparison is in constant time.
#[derive(Clone, Copy)]
pub struct TokenHash(pub [u8; 32]);

impl TokenHash {
    /// Compares two hashes in constant time.
    pub fn matches(&self, other: &TokenHash) -> bool {
        // The differences of all 32 bytes, folded into one word without a branch,
        // then one constant-time test: `ct_eq` on byte arrays puts every byte
        // through an optimization barrier (0.5 % of a get's CPU).
        let word = |h: &[u8; 32], i: usize| {
            u64::from_ne_bytes(h[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
        };
        let diff = (0..4).fold(0u64, |d, i| d | (word(&self.0, i) ^ word(&other.0, i)));
        diff.ct_eq(&0).into()
    }
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Even a hash says nothing useful in a log line.
        f.write_str("TokenHash(..)")
    }
}

/// Hashes tokens under the server key.
#[derive(Clone)]
pub struct TokenHasher {
    mac: Hmac<Sha256>,
}

impl fmt::Debug for TokenHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenHasher(..)")
    }
}

impl TokenHasher {
    /// A hasher keyed with the server key.
    pub fn new(server_key: &[u8; 32]) -> Self {
        TokenHasher {
            mac: Hmac::<Sha256>::new_from_slice(server_key).expect("HMAC takes keys of any length"),
        }
    }

    /// HMAC-SHA256(server key, token).
    pub fn hash(&self, token: &str) -> TokenHash {
        let mut mac = self.mac.clone();
        mac.update(token.as_bytes());
        TokenHash(mac.finalize().into_bytes().into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strength_rule_matches_comet() {
        for ok in ["Abcdefg1", "secretTOKEN42", "ÀbcdefG1"] {
            assert_eq!(check_token_strength(TokenRole::Read, ok), Ok(()), "{ok}");
        }
        for weak in [
            "Abcdef1",    // seven characters
            "abcdefg1",   // no upper case
            "ABCDEFG1",   // no lower case
            "Abcdefgh",   // no digit
            "Abcd efg1",  // white space
            "Abcdefg1\t", // white space
            "",
        ] {
            assert_eq!(
                check_token_strength(TokenRole::Write, weak),
                Err(ModelError::WeakToken(TokenRole::Write)),
                "{weak:?}"
            );
        }
        assert_eq!(
            ModelError::WeakToken(TokenRole::Read)
                .to_string()
                .split(':')
                .next(),
            Some("Read token not strong enough")
        );
    }

    #[test]
    fn hashes_are_keyed_and_compare() {
        let a = TokenHasher::new(&[1; 32]);
        let b = TokenHasher::new(&[2; 32]);
        assert!(a.hash("Token123").matches(&a.hash("Token123")));
        assert!(!a.hash("Token123").matches(&a.hash("Token124")));
        assert!(!a.hash("Token123").matches(&b.hash("Token123")));
        assert_eq!(format!("{:?}", a.hash("Token123")), "TokenHash(..)");
    }
}
