//! Identifier newtypes.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// A device id: 1–128 visible ASCII characters, no whitespace, no `/`, no `?`, no `#`, no `%`
/// (it appears in admin paths unescaped).
///
/// Shared, not owned: a request's id is cloned into its admission, its quota hold and the
/// ledger's dirty set, and the verified-token memo hands out a clone on every hit, so a clone
/// is a reference-count increment rather than an allocation. It hashes, compares and
/// serializes as the plain string.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(Arc<str>);

/// Why a string is not a valid [`DeviceId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceIdError {
    #[error("device_id must not be empty")]
    Empty,
    #[error("device_id must be at most 128 characters (got {0})")]
    TooLong(usize),
    #[error("device_id may only contain visible ASCII other than / ? # % and quotes")]
    BadChar,
}

impl DeviceId {
    pub const MAX_LEN: usize = 128;

    pub fn parse(s: &str) -> Result<DeviceId, DeviceIdError> {
        Self::validate(s)?;
        Ok(DeviceId(Arc::from(s)))
    }

    /// Check `s` without allocating (what [`DeviceId::parse`] checks).
    pub fn validate(s: &str) -> Result<(), DeviceIdError> {
        if s.is_empty() {
            return Err(DeviceIdError::Empty);
        }
        if s.len() > Self::MAX_LEN {
            return Err(DeviceIdError::TooLong(s.len()));
        }
        let ok = s.bytes().all(|b| {
            b.is_ascii_graphic() && !matches!(b, b'/' | b'?' | b'#' | b'%' | b'"' | b'\\')
        });
        if !ok {
            return Err(DeviceIdError::BadChar);
        }
        Ok(())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Serialize for DeviceId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for DeviceId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        DeviceId::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_device_ids() {
        assert!(DeviceId::parse("SN-0001_a.b").is_ok());
        assert_eq!(DeviceId::parse(""), Err(DeviceIdError::Empty));
        assert_eq!(DeviceId::parse("a/b"), Err(DeviceIdError::BadChar));
        assert_eq!(DeviceId::parse("a b"), Err(DeviceIdError::BadChar));
        assert_eq!(
            DeviceId::parse(&"x".repeat(129)),
            Err(DeviceIdError::TooLong(129))
        );
    }

    #[test]
    fn serializes_as_the_plain_string_and_checks_on_the_way_in() {
        let id = DeviceId::parse("SN-0001").unwrap();
        assert_eq!(serde_json::to_string(&id).unwrap(), r#""SN-0001""#);
        let back: DeviceId = serde_json::from_str(r#""SN-0001""#).unwrap();
        assert_eq!(back, id);
        assert!(serde_json::from_str::<DeviceId>(r#""a/b""#).is_err());
        // A clone shares the text; equality and order are by the text, not the pointer.
        let other = DeviceId::parse("SN-0001").unwrap();
        assert_eq!(id.clone(), other);
        assert!(DeviceId::parse("a").unwrap() < DeviceId::parse("b").unwrap());
    }
}
