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
    let strong = token.chars().count() >= 8
        && token.chars().any(|c| c.is_ascii_digit())
        && token.chars().any(char::is_lowercase)
        && token.chars().any(char::is_uppercase)
        && !token.chars().any(char::is_whitespace);
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
        self.0.ct_eq(&other.0).into()
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
