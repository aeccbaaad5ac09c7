//! The model's error type: every way a name, token or stored record can be refused.

use crate::name::NameKind;
use crate::token::TokenRole;

/// Why the model refused a name, a value, a token or a stored record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// A name was empty.
    #[error("{0} must not be empty")]
    EmptyName(NameKind),
    /// A name was longer than the configured limit.
    #[error("{kind} is {len} bytes long; the limit is {max} bytes")]
    NameTooLong {
        /// Which name.
        kind: NameKind,
        /// Its length in bytes.
        len: usize,
        /// The configured limit.
        max: usize,
    },
    /// A name contained a control character (U+0000 to U+001F, U+007F to U+009F).
    #[error("{0} must not contain control characters")]
    ControlCharacter(NameKind),
    /// A value was larger than the configured limit.
    #[error("value is {len} bytes long; the limit is {max} bytes")]
    ValueTooLarge {
        /// Its length in bytes.
        len: usize,
        /// The configured limit.
        max: usize,
    },
    /// A token failed the strength rule.
    #[error(
        "{} token not strong enough: it needs at least 8 characters, a digit, a lower-case and an upper-case letter, and no white space",
        .0.title()
    )]
    WeakToken(TokenRole),
    /// The read and the write token were the same.
    #[error("Invalid tokens: read and write token cannot be the same")]
    EqualTokens,
    /// Bytes read from the store could not be decoded.
    #[error("stored data could not be decoded: {0}")]
    Corrupted(&'static str),
}
