//! Collection-name validation: a name becomes a file name, so only
//! `[A-Za-z0-9_-]{1,64}` is accepted and nothing can leave the data directory.

use crate::error::{Error, Result};

/// The longest collection name.
pub const MAX_COLLECTION_NAME_LEN: usize = 64;

/// Checks that `name` is a valid collection name: 1 to 64 characters from
/// `A-Z a-z 0-9 _ -`. Names starting with `_` are reserved for the system but
/// are valid here; refusing them to users is the caller's business.
pub fn validate_collection_name(name: &str) -> Result<()> {
    let refuse = |reason| {
        Err(Error::InvalidCollection {
            name: name.chars().take(80).collect(),
            reason,
        })
    };
    if name.is_empty() {
        return refuse("empty");
    }
    if name.len() > MAX_COLLECTION_NAME_LEN {
        return refuse("longer than 64 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return refuse("only A-Z, a-z, 0-9, '_' and '-' are allowed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_names() {
        for ok in [
            "default",
            "a",
            "users_2024",
            "x-y",
            "_system",
            &"a".repeat(64),
        ] {
            validate_collection_name(ok).unwrap();
        }
    }

    #[test]
    fn refuses_everything_else() {
        for bad in [
            "",
            "..",
            ".",
            "a/b",
            "../etc",
            "a\0b",
            "é",
            "a b",
            "a.dhrt",
            "%2e%2e",
            &"a".repeat(65),
        ] {
            assert!(validate_collection_name(bad).is_err(), "{bad:?} accepted");
        }
    }
}
