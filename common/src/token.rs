//! Bearer token formats: API keys (`poly_…`), runner join tokens (`mjt_…`) and
//! agent tokens (`agt_…`).
//!
//! A token is `<prefix>_<32 base62 random chars><6 base62 chars of CRC-32>`.
//! The checksum lets the server (and secret scanners) reject a mistyped or
//! truncated token without a database look-up. Tokens have ~190 bits of
//! entropy, so a plain SHA-256 is a sufficient at-rest hash: only the hash is
//! ever stored, and the token itself is shown once.

use sha2::{Digest, Sha256};

const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
const RANDOM_LEN: usize = 32;
const CHECKSUM_LEN: usize = 6;

/// What a token grants; its prefix says which.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    ApiKey,
    JoinToken,
    AgentToken,
}

impl TokenKind {
    pub fn prefix(self) -> &'static str {
        match self {
            TokenKind::ApiKey => "poly_",
            TokenKind::JoinToken => "mjt_",
            TokenKind::AgentToken => "agt_",
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("token does not start with '{expected}'")]
    WrongPrefix { expected: &'static str },
    #[error("token has {found} characters after its prefix, expected {expected}")]
    WrongLength { expected: usize, found: usize },
    #[error("token contains a character that is not a letter or digit")]
    BadCharacter,
    #[error("token checksum does not match (mistyped or truncated token)")]
    BadChecksum,
}

/// Creates a new random token of `kind`.
pub fn generate(kind: TokenKind) -> String {
    let mut bytes = [0u8; RANDOM_LEN];
    getrandom::fill(&mut bytes).expect("the operating system's random source is available");
    // 256 is a multiple of 62 plus 8; the bias this leaves (~3% on the first
    // 8 symbols) costs well under one bit of the 190.
    let random: String = bytes
        .iter()
        .map(|b| ALPHABET[(*b as usize) % 62] as char)
        .collect();
    let checksum = checksum(&random);
    format!("{}{random}{checksum}", kind.prefix())
}

/// Checks a token's prefix, length, alphabet and checksum.
pub fn validate(kind: TokenKind, token: &str) -> Result<(), TokenError> {
    let body = token
        .strip_prefix(kind.prefix())
        .ok_or(TokenError::WrongPrefix {
            expected: kind.prefix(),
        })?;
    if !body.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(TokenError::BadCharacter);
    }
    if body.len() != RANDOM_LEN + CHECKSUM_LEN {
        return Err(TokenError::WrongLength {
            expected: RANDOM_LEN + CHECKSUM_LEN,
            found: body.len(),
        });
    }
    let (random, sum) = body.split_at(RANDOM_LEN);
    if checksum(random) != sum {
        return Err(TokenError::BadChecksum);
    }
    Ok(())
}

/// The at-rest form of a token: hex SHA-256.
pub fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A short, non-secret handle shown in listings (`poly_AbC1…`).
pub fn display_prefix(token: &str) -> String {
    let keep = token.find('_').map(|i| i + 5).unwrap_or(4);
    let shown: String = token.chars().take(keep).collect();
    format!("{shown}…")
}

fn checksum(random: &str) -> String {
    let mut value = crc32fast::hash(random.as_bytes()) as u64;
    let mut out = [b'0'; CHECKSUM_LEN];
    for slot in out.iter_mut().rev() {
        *slot = ALPHABET[(value % 62) as usize];
        value /= 62;
    }
    String::from_utf8(out.to_vec()).expect("alphabet is ASCII")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn generated_tokens_validate_and_differ() {
        let a = generate(TokenKind::ApiKey);
        let b = generate(TokenKind::ApiKey);
        assert_ne!(a, b);
        assert!(a.starts_with("poly_"));
        assert_eq!(validate(TokenKind::ApiKey, &a), Ok(()));
        assert_eq!(
            validate(TokenKind::JoinToken, &a),
            Err(TokenError::WrongPrefix { expected: "mjt_" })
        );
    }

    #[test]
    fn a_changed_character_fails_the_checksum() {
        let token = generate(TokenKind::JoinToken);
        let mut bytes = token.into_bytes();
        let i = 4 + 3;
        bytes[i] = if bytes[i] == b'a' { b'b' } else { b'a' };
        let changed = String::from_utf8(bytes).unwrap();
        assert_eq!(
            validate(TokenKind::JoinToken, &changed),
            Err(TokenError::BadChecksum)
        );
    }

    #[test]
    fn hash_is_stable_and_not_the_token() {
        let token = generate(TokenKind::ApiKey);
        assert_eq!(hash(&token), hash(&token));
        assert!(!hash(&token).contains(&token[5..]));
        assert_eq!(display_prefix(&token).chars().count(), 10);
    }

    proptest! {
        #[test]
        fn validate_never_panics(s in ".{0,80}") {
            let _ = validate(TokenKind::ApiKey, &s);
            let _ = display_prefix(&s);
        }
    }
}
