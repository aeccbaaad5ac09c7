//! Names (context, family, key) and the limits every name and value obeys.

use crate::error::ModelError;
use std::fmt;

/// Which of the three names of an entry a check is about; used in error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameKind {
    /// The context (COMET `contextID`).
    Context,
    /// The family inside a context.
    Family,
    /// The key inside a family.
    Key,
}

impl fmt::Display for NameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NameKind::Context => "context",
            NameKind::Family => "family",
            NameKind::Key => "key",
        })
    }
}

/// Size limits on names and values. Both are configurable; these are the defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The longest name (context, family or key), in bytes of UTF-8.
    pub max_name_bytes: usize,
    /// The largest value, in bytes.
    pub max_value_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_name_bytes: 256,
            max_value_bytes: 1024 * 1024,
        }
    }
}

impl Limits {
    /// Refuses a value longer than the limit: never truncated, always a clear error.
    pub fn check_value_len(&self, len: usize) -> Result<(), ModelError> {
        if len > self.max_value_bytes {
            return Err(ModelError::ValueTooLarge {
                len,
                max: self.max_value_bytes,
            });
        }
        Ok(())
    }
}

/// Checks one name: not empty, at most `limits.max_name_bytes` bytes, no control
/// characters. Control characters are refused because names appear in logs, in
/// `/etc/hosts` lines written by the agent and in DNS answers; U+0000 in particular
/// is the separator of the key encoding.
pub fn validate_name(kind: NameKind, name: &str, limits: &Limits) -> Result<(), ModelError> {
    if name.is_empty() {
        return Err(ModelError::EmptyName(kind));
    }
    if name.len() > limits.max_name_bytes {
        return Err(ModelError::NameTooLong {
            kind,
            len: name.len(),
            max: limits.max_name_bytes,
        });
    }
    if name.chars().any(char::is_control) {
        return Err(ModelError::ControlCharacter(kind));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        let l = Limits::default();
        for n in ["hostsall", "n1.example.org", "ключ", "a b", "x/y", "🙂"] {
            assert_eq!(validate_name(NameKind::Key, n, &l), Ok(()), "{n}");
        }
    }

    #[test]
    fn refuses_empty_long_and_control() {
        let l = Limits {
            max_name_bytes: 4,
            max_value_bytes: 10,
        };
        assert_eq!(
            validate_name(NameKind::Family, "", &l),
            Err(ModelError::EmptyName(NameKind::Family))
        );
        assert_eq!(
            validate_name(NameKind::Key, "abcde", &l),
            Err(ModelError::NameTooLong {
                kind: NameKind::Key,
                len: 5,
                max: 4
            })
        );
        // Four bytes of UTF-8 in one character fits; five bytes does not.
        assert_eq!(validate_name(NameKind::Key, "🙂", &l), Ok(()));
        assert!(validate_name(NameKind::Key, "é🙂", &l).is_err());
        for bad in ["a\0", "a\nb", "\t", "x\u{7f}", "y\u{85}"] {
            assert_eq!(
                validate_name(NameKind::Context, bad, &l),
                Err(ModelError::ControlCharacter(NameKind::Context)),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn value_limit_is_inclusive() {
        let l = Limits {
            max_name_bytes: 4,
            max_value_bytes: 10,
        };
        assert_eq!(l.check_value_len(10), Ok(()));
        assert_eq!(
            l.check_value_len(11),
            Err(ModelError::ValueTooLarge { len: 11, max: 10 })
        );
    }
}
