//! Identifiers of twins, device types and groups. They are shared, immutable strings
//! (`Arc<str>`): a fleet of a million twins clones them often and stores them in several
//! indexes, so a clone must be a pointer copy.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::borrow::Borrow;
use std::fmt;
use std::sync::Arc;

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{kind} id is empty")]
    Empty { kind: &'static str },
    #[error("{kind} id {id:?} is longer than {max} bytes")]
    TooLong { kind: &'static str, id: String, max: usize },
    #[error("{kind} id {id:?} contains {ch:?}; allowed are letters, digits and . _ : -")]
    BadChar { kind: &'static str, id: String, ch: char },
}

/// The longest identifier accepted, in bytes.
pub const MAX_ID_LEN: usize = 128;

fn validate(kind: &'static str, s: &str) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if s.len() > MAX_ID_LEN {
        return Err(IdError::TooLong { kind, id: s.chars().take(40).collect(), max: MAX_ID_LEN });
    }
    if let Some(ch) = s.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-'))) {
        return Err(IdError::BadChar { kind, id: s.to_string(), ch });
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            /// Checks the identifier rules (non-empty, at most 128 bytes, `[A-Za-z0-9._:-]`).
            pub fn new(s: impl AsRef<str>) -> Result<Self, IdError> {
                let s = s.as_ref();
                validate($kind, s)?;
                Ok(Self(Arc::from(s)))
            }

            /// The shared string, for indexes that key on `Arc<str>`.
            pub fn as_arc(&self) -> &Arc<str> {
                &self.0
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        #[cfg(feature = "openapi")]
        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                utoipa::openapi::ObjectBuilder::new()
                    .schema_type(utoipa::openapi::schema::Type::String)
                    .min_length(Some(1))
                    .max_length(Some(MAX_ID_LEN))
                    .pattern(Some("^[A-Za-z0-9._:-]+$"))
                    .into()
            }
        }

        #[cfg(feature = "openapi")]
        impl utoipa::ToSchema for $name {}

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                Self::new(&*s).map_err(serde::de::Error::custom)
            }
        }
    };
}

id_type!(
    /// The identifier of a DTI: one physical device.
    TwinId,
    "twin"
);
id_type!(
    /// The identifier of a device type, and so of its TDTA.
    DeviceTypeId,
    "device type"
);
id_type!(
    /// The identifier of a group, and so of its DTA.
    DtaId,
    "dta"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_validated() {
        assert!(TwinId::new("dev-0001:a.b_c").is_ok());
        assert_eq!(TwinId::new(""), Err(IdError::Empty { kind: "twin" }));
        assert!(matches!(TwinId::new("a/b"), Err(IdError::BadChar { ch: '/', .. })));
        assert!(matches!(DtaId::new("x".repeat(129)), Err(IdError::TooLong { .. })));
        let bad: Result<TwinId, _> = serde_json::from_str("\"no spaces\"");
        assert!(bad.is_err());
    }
}
