//! A strict-but-lenient query string parser.
//!
//! Lenient where old clients need it: parameters may come in any order, values are
//! taken byte for byte (a Java client that formats queries without URL-encoding
//! still works as long as its values carry no `&`, `=`, `%` or `+`). Strict where
//! ambiguity would be dangerous: a broken percent-escape or bytes that are not UTF-8
//! are refused with a clear error, and a parameter given twice is refused rather than
//! guessing which one the client meant.

use crate::error::ApiError;

/// A parsed query string, in order of appearance.
#[derive(Debug, Default)]
pub struct Query(Vec<(String, String)>);

impl Query {
    /// Parses a raw query string (without the `?`).
    pub fn parse(raw: Option<&str>) -> Result<Self, ApiError> {
        let mut out: Vec<(String, String)> = Vec::new();
        for pair in raw.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let name = decode(name)?;
            let value = decode(value)?;
            if out.iter().any(|(n, _)| *n == name) {
                return Err(ApiError::DuplicateParameter(name));
            }
            out.push((name, value));
        }
        Ok(Query(out))
    }

    /// The value of `name`, if present.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The value of `name`; missing or empty is an error naming the parameter.
    pub fn require(&self, name: &'static str) -> Result<&str, ApiError> {
        match self.get(name) {
            Some(v) if !v.is_empty() => Ok(v),
            _ => Err(ApiError::MissingParameter(name)),
        }
    }

    /// The name of the first parameter.
    pub fn first_name(&self) -> Option<&str> {
        self.0.first().map(|(n, _)| n.as_str())
    }

    /// True when any of `names` is present.
    pub fn has_any(&self, names: &[&str]) -> bool {
        self.0
            .iter()
            .any(|(n, _)| names.iter().any(|m| n.eq_ignore_ascii_case(m)))
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn decode(s: &str) -> Result<String, ApiError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let byte = bytes
                    .get(i + 1)
                    .and_then(|h| hex(*h))
                    .zip(bytes.get(i + 2).and_then(|l| hex(*l)))
                    .map(|(h, l)| h << 4 | l)
                    .ok_or_else(|| {
                        ApiError::InvalidQuery(format!(
                            "invalid percent-encoding at byte {i}: '%' must be followed by two hex digits"
                        ))
                    })?;
                out.push(byte);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out)
        .map_err(|_| ApiError::InvalidQuery("percent-decoded value is not UTF-8".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_like_python_requests_encodes() {
        let q = Query::parse(Some(
            "contextID=ctx%201&family=hosts+all&Key=n%2F1&empty=&flag",
        ))
        .unwrap();
        assert_eq!(q.get("contextID"), Some("ctx 1"));
        assert_eq!(q.get("family"), Some("hosts all"));
        assert_eq!(q.get("Key"), Some("n/1"));
        assert_eq!(q.get("empty"), Some(""));
        assert_eq!(q.get("flag"), Some(""));
        assert!(matches!(
            q.require("empty"),
            Err(ApiError::MissingParameter("empty"))
        ));
        assert!(matches!(
            q.require("nope"),
            Err(ApiError::MissingParameter("nope"))
        ));
        assert_eq!(q.get("key"), None, "names are case-sensitive");
    }

    #[test]
    fn takes_unencoded_values_byte_for_byte() {
        let q = Query::parse(Some("readToken=Abc:def/Ghi1@x.y&Key=a.b-c_d~e")).unwrap();
        assert_eq!(q.get("readToken"), Some("Abc:def/Ghi1@x.y"));
        assert_eq!(q.get("Key"), Some("a.b-c_d~e"));
    }

    #[test]
    fn refuses_bad_escapes_duplicates_and_non_utf8() {
        for bad in ["a=%", "a=%4", "a=%zz", "a=%ff", "%g1=x"] {
            assert!(
                matches!(Query::parse(Some(bad)), Err(ApiError::InvalidQuery(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            Query::parse(Some("a=1&a=2")),
            Err(ApiError::DuplicateParameter(n)) if n == "a"
        ));
    }
}
