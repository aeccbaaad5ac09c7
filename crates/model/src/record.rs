//! The record stored as the value of every entry: times, token hashes and the value.
//!
//! Layout (all integers big-endian): one format byte (1), created_at and updated_at in
//! milliseconds since the Unix epoch (8 bytes each), the read and the write token
//! hashes (32 bytes each), then the value as JSON text to the end. A fixed header
//! keeps decoding trivial and lets a reader check a token without touching the value.

use crate::error::ModelError;
use crate::token::TokenHash;

const FORMAT: u8 = 1;
const HEADER: usize = 1 + 8 + 8 + 32 + 32;

/// One entry as stored.
#[derive(Debug, Clone)]
pub struct Record {
    /// When the entry was created, in ms since the Unix epoch.
    pub created_at_ms: u64,
    /// When the entry was last written, in ms since the Unix epoch.
    pub updated_at_ms: u64,
    /// The keyed hash of the read token.
    pub read_hash: TokenHash,
    /// The keyed hash of the write token.
    pub write_hash: TokenHash,
    /// The value as JSON text (a COMET value is a JSON string).
    pub value: String,
}

impl Record {
    /// Where the creation time lies in an encoded record.
    pub const CREATED_AT: std::ops::Range<usize> = 1..9;
    /// Where the read and the write token hashes lie in an encoded record, in that
    /// order.
    pub const TOKEN_HASHES: std::ops::Range<usize> = 17..81;

    /// The bytes written to the store.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + self.value.len());
        out.push(FORMAT);
        out.extend_from_slice(&self.created_at_ms.to_be_bytes());
        out.extend_from_slice(&self.updated_at_ms.to_be_bytes());
        out.extend_from_slice(&self.read_hash.0);
        out.extend_from_slice(&self.write_hash.0);
        out.extend_from_slice(self.value.as_bytes());
        out
    }

    /// Decodes bytes written by [`Record::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Self, ModelError> {
        if bytes.len() < HEADER {
            return Err(ModelError::Corrupted("record shorter than its header"));
        }
        if bytes[0] != FORMAT {
            return Err(ModelError::Corrupted("record of an unknown format"));
        }
        let u64_at = |i: usize| u64::from_be_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
        let hash_at = |i: usize| TokenHash(bytes[i..i + 32].try_into().expect("32 bytes"));
        let value = std::str::from_utf8(&bytes[HEADER..])
            .map_err(|_| ModelError::Corrupted("record value is not UTF-8"))?
            .to_owned();
        Ok(Record {
            created_at_ms: u64_at(1),
            updated_at_ms: u64_at(9),
            read_hash: hash_at(17),
            write_hash: hash_at(49),
            value,
        })
    }

    /// [`Record::decode`], reusing `bytes` for the value instead of copying it.
    pub fn decode_owned(mut bytes: Vec<u8>) -> Result<Self, ModelError> {
        let mut record = Record::decode(bytes.get(..HEADER).unwrap_or(&bytes))?;
        bytes.drain(..HEADER);
        record.value = String::from_utf8(bytes)
            .map_err(|_| ModelError::Corrupted("record value is not UTF-8"))?;
        Ok(record)
    }

    /// True when `read` is this entry's read token hash.
    pub fn readable_with(&self, read: &TokenHash) -> bool {
        self.read_hash.matches(read)
    }

    /// True when both hashes are this entry's.
    pub fn writable_with(&self, read: &TokenHash, write: &TokenHash) -> bool {
        // Evaluate both comparisons: no early exit that tells which one failed.
        let r = self.read_hash.matches(read);
        let w = self.write_hash.matches(write);
        r & w
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_ranges_match_the_encoding() {
        let r = Record {
            created_at_ms: 0x0102_0304_0506_0708,
            updated_at_ms: 9,
            read_hash: TokenHash([0xaa; 32]),
            write_hash: TokenHash([0xbb; 32]),
            value: "1".into(),
        };
        let bytes = r.encode();
        assert_eq!(
            &bytes[Record::CREATED_AT],
            &0x0102_0304_0506_0708u64.to_be_bytes()
        );
        assert_eq!(
            &bytes[Record::TOKEN_HASHES],
            [[0xaa; 32], [0xbb; 32]].concat().as_slice()
        );
    }
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trips(c: u64, u: u64, r: [u8; 32], w: [u8; 32], v in ".*") {
            let rec = Record { created_at_ms: c, updated_at_ms: u, read_hash: TokenHash(r), write_hash: TokenHash(w), value: v };
            let back = Record::decode(&rec.encode()).unwrap();
            prop_assert_eq!(back.created_at_ms, c);
            prop_assert_eq!(back.updated_at_ms, u);
            prop_assert_eq!(back.read_hash.0, r);
            prop_assert_eq!(back.write_hash.0, w);
            let owned = Record::decode_owned(rec.encode()).unwrap();
            prop_assert_eq!(&back.value, &rec.value);
            prop_assert_eq!(owned.value, rec.value);
            prop_assert_eq!(owned.created_at_ms, c);
            prop_assert_eq!(owned.read_hash.0, r);
        }

        #[test]
        fn never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let borrowed = Record::decode(&bytes).map(|r| r.value);
            let owned = Record::decode_owned(bytes).map(|r| r.value);
            prop_assert_eq!(borrowed, owned);
        }
    }

    #[test]
    fn token_checks() {
        let rec = Record {
            created_at_ms: 1,
            updated_at_ms: 2,
            read_hash: TokenHash([1; 32]),
            write_hash: TokenHash([2; 32]),
            value: "\"x\"".into(),
        };
        assert!(rec.readable_with(&TokenHash([1; 32])));
        assert!(!rec.readable_with(&TokenHash([2; 32])));
        assert!(rec.writable_with(&TokenHash([1; 32]), &TokenHash([2; 32])));
        assert!(!rec.writable_with(&TokenHash([1; 32]), &TokenHash([1; 32])));
        assert!(!rec.writable_with(&TokenHash([2; 32]), &TokenHash([2; 32])));
    }
}
