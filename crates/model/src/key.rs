//! The byte encoding of entry keys in the store.
//!
//! An entry `(context, family, key)` is stored under
//! `ENTRY_NAMESPACE ++ context ++ 0x00 ++ family ++ 0x00 ++ key`. Names never contain
//! U+0000 (control characters are refused), and 0x00 sorts before every other byte,
//! so the byte order of encoded keys is the order of `(context, family, key)` tuples
//! and a context or a family is one contiguous prefix: listing is a prefix scan.

use crate::error::ModelError;

/// The prefix of every metadata entry in the store; other namespaces (file metadata,
/// leases of the agent, ...) get prefixes of their own.
pub const ENTRY_NAMESPACE: &[u8] = b"kv\0";

const SEP: u8 = 0;

/// The three names that identify an entry.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EntryKey {
    /// The context (COMET `contextID`).
    pub context: String,
    /// The family inside the context.
    pub family: String,
    /// The key inside the family.
    pub key: String,
}

impl EntryKey {
    /// Builds a key from its three names. Validation is the caller's business
    /// ([`crate::validate_name`]); encoding a name with U+0000 would break decoding.
    pub fn new(
        context: impl Into<String>,
        family: impl Into<String>,
        key: impl Into<String>,
    ) -> Self {
        EntryKey {
            context: context.into(),
            family: family.into(),
            key: key.into(),
        }
    }

    /// The store key of this entry.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            ENTRY_NAMESPACE.len() + self.context.len() + self.family.len() + self.key.len() + 2,
        );
        out.extend_from_slice(ENTRY_NAMESPACE);
        out.extend_from_slice(self.context.as_bytes());
        out.push(SEP);
        out.extend_from_slice(self.family.as_bytes());
        out.push(SEP);
        out.extend_from_slice(self.key.as_bytes());
        out
    }

    /// Decodes a store key written by [`EntryKey::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Self, ModelError> {
        let rest = bytes
            .strip_prefix(ENTRY_NAMESPACE)
            .ok_or(ModelError::Corrupted(
                "entry key outside the entry namespace",
            ))?;
        let mut parts = rest.splitn(3, |b| *b == SEP);
        let mut next = || -> Result<String, ModelError> {
            let part = parts.next().ok_or(ModelError::Corrupted(
                "entry key with fewer than three names",
            ))?;
            String::from_utf8(part.to_vec())
                .map_err(|_| ModelError::Corrupted("entry key is not UTF-8"))
        };
        let (context, family, key) = (next()?, next()?, next()?);
        if key.as_bytes().contains(&SEP) {
            return Err(ModelError::Corrupted(
                "entry key with more than three names",
            ));
        }
        Ok(EntryKey {
            context,
            family,
            key,
        })
    }
}

/// The store prefix of every entry of a context.
pub fn context_prefix(context: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(ENTRY_NAMESPACE.len() + context.len() + 1);
    out.extend_from_slice(ENTRY_NAMESPACE);
    out.extend_from_slice(context.as_bytes());
    out.push(SEP);
    out
}

/// The store prefix of every entry of a family.
pub fn family_prefix(context: &str, family: &str) -> Vec<u8> {
    let mut out = context_prefix(context);
    out.extend_from_slice(family.as_bytes());
    out.push(SEP);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn name() -> impl Strategy<Value = String> {
        // Any string without control characters, including multi-byte UTF-8.
        "[^\\p{Cc}]{1,12}"
    }

    proptest! {
        #[test]
        fn round_trips(c in name(), f in name(), k in name()) {
            let key = EntryKey::new(c, f, k);
            prop_assert_eq!(EntryKey::decode(&key.encode()).unwrap(), key);
        }

        #[test]
        fn byte_order_is_tuple_order(a in (name(), name(), name()), b in (name(), name(), name())) {
            let ka = EntryKey::new(a.0, a.1, a.2);
            let kb = EntryKey::new(b.0, b.1, b.2);
            prop_assert_eq!(ka.encode().cmp(&kb.encode()), ka.cmp(&kb));
        }

        #[test]
        fn prefixes_select_exactly_their_entries(a in (name(), name(), name()), c in name(), f in name()) {
            let key = EntryKey::new(a.0, a.1, a.2);
            let enc = key.encode();
            prop_assert_eq!(enc.starts_with(&context_prefix(&c)), key.context == c);
            prop_assert_eq!(
                enc.starts_with(&family_prefix(&c, &f)),
                key.context == c && key.family == f
            );
        }
    }

    #[test]
    fn refuses_foreign_bytes() {
        assert!(EntryKey::decode(b"xx\0a\0b\0c").is_err());
        assert!(EntryKey::decode(b"kv\0a\0b").is_err());
        assert!(EntryKey::decode(b"kv\0a\0b\0c\0d").is_err());
        assert!(EntryKey::decode(b"kv\0a\0b\0\xff").is_err());
    }
}
