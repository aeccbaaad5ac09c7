//! Amphora's domain model: names and their limits, the byte encoding of entry keys,
//! token rules and keyed token hashes, and the record stored for every entry.
//!
//! Invariant: this crate does no I/O, spawns nothing and knows neither HTTP nor any
//! storage engine. Everything here is a pure function of its arguments, so it is
//! tested exhaustively with unit tests and property tests.

mod error;
mod key;
mod name;
mod record;
mod token;

pub use error::ModelError;
pub use key::{ENTRY_NAMESPACE, EntryKey, context_prefix, family_prefix};
pub use name::{Limits, NameKind, validate_name};
pub use record::Record;
pub use token::{TokenHash, TokenHasher, TokenRole, check_token_strength};
