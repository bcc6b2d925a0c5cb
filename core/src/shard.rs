//! User id → shard. Frozen forever: a change here would send users to cells that do not
//! hold their records. The test vectors below pin it.

use thiserror::Error;

/// Shard count used when a platform is created without one.
pub const DEFAULT_SHARDS: u32 = 100;
/// Upper bound on the shard count (a limit on everything: tables stay small).
pub const MAX_SHARDS: u32 = 10_000;
/// Longest accepted user id, in bytes.
pub const USER_ID_LEN_MAX: usize = 64;

/// A user id that cannot be used.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum UserIdError {
    #[error("user id is empty; pass a user id of 1 to {USER_ID_LEN_MAX} characters")]
    Empty,
    #[error("user id is {0} bytes long; at most {USER_ID_LEN_MAX} are allowed")]
    TooLong(usize),
    #[error("user id {0:?} has a character other than A-Z, a-z, 0-9, '_', '-' or '.'")]
    BadChar(String),
}

/// Checks that `user` is a usable user id: 1 to 64 of `[A-Za-z0-9_.-]`. The restricted
/// alphabet keeps store keys unambiguous and headers plain ASCII.
pub fn validate_user_id(user: &str) -> Result<(), UserIdError> {
    if user.is_empty() {
        return Err(UserIdError::Empty);
    }
    if user.len() > USER_ID_LEN_MAX {
        return Err(UserIdError::TooLong(user.len()));
    }
    if !user
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    {
        return Err(UserIdError::BadChar(user.to_string()));
    }
    Ok(())
}

/// 64-bit FNV-1a: tiny, stable across platforms and releases, good enough spread for
/// sharding and the colour split (neither is adversarial: users do not pick their shard).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The shard of `user` among `shard_count` shards.
///
/// # Panics
/// If `shard_count` is zero (a platform always has at least one shard).
pub fn shard_of(user: &str, shard_count: u32) -> u32 {
    assert!(shard_count > 0, "shard count must be positive");
    (fnv1a64(user.as_bytes()) % u64::from(shard_count)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn frozen_vectors() {
        // If this test fails, the shard function changed: every deployed platform would
        // route users to the wrong owner. Do not update the vectors; revert the change.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(shard_of("alice", 100), (fnv1a64(b"alice") % 100) as u32);
        assert_eq!(shard_of("alice", 100), 83);
        assert_eq!(shard_of("bob", 100), 92);
        assert_eq!(shard_of("user-000001", 100), 46);
    }

    #[test]
    fn user_ids() {
        assert!(validate_user_id("alice_1.b-2").is_ok());
        assert_eq!(validate_user_id(""), Err(UserIdError::Empty));
        assert!(matches!(
            validate_user_id("a/b"),
            Err(UserIdError::BadChar(_))
        ));
        assert!(matches!(
            validate_user_id("é"),
            Err(UserIdError::BadChar(_))
        ));
        assert_eq!(
            validate_user_id(&"x".repeat(65)),
            Err(UserIdError::TooLong(65))
        );
        assert!(validate_user_id(&"x".repeat(64)).is_ok());
    }

    proptest! {
        #[test]
        fn shard_in_range(user in "[a-z0-9]{1,20}", n in 1u32..MAX_SHARDS) {
            prop_assert!(shard_of(&user, n) < n);
        }
    }
}
