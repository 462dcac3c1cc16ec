//! Join tokens: compact JWTs (HS256) signed with a cluster key.
//!
//! The token proves who issued it and until when it is valid; remaining uses
//! and revocation live in the replicated state, keyed by `jti`.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::error::PkiError;

const HEADER: &str = r#"{"alg":"HS256","typ":"JWT"}"#;
const TOKEN_TYPE: &str = "cloudless-join";
/// Tolerated clock skew for `iat`, seconds.
const SKEW: i64 = 60;
/// Longest token accepted at all (bounds parsing work on untrusted input).
const MAX_TOKEN_LEN: usize = 8 * 1024;

/// What a join token says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinTokenClaims {
    /// Token id; uses and revocation are recorded against it.
    pub jti: String,
    /// Issued at, Unix seconds.
    pub iat: i64,
    /// Expires at, Unix seconds.
    pub exp: i64,
    /// How many enrollments it allows.
    pub max_uses: u32,
    /// Labels given to nodes enrolled with it.
    pub labels: BTreeMap<String, String>,
    /// Always "cloudless-join".
    pub typ: String,
}

impl JoinTokenClaims {
    /// Claims for a new token.
    pub fn new(
        jti: String,
        now: i64,
        ttl_seconds: u64,
        max_uses: u32,
        labels: BTreeMap<String, String>,
    ) -> Self {
        Self {
            jti,
            iat: now,
            exp: now.saturating_add(i64::try_from(ttl_seconds).unwrap_or(i64::MAX)),
            max_uses,
            labels,
            typ: TOKEN_TYPE.to_owned(),
        }
    }
}

/// Why a token was refused. Messages never include the token itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not three base64url parts of valid JSON, or too long.
    #[error("join token is malformed: {0}")]
    Malformed(String),
    /// Algorithm other than HS256 (including "none").
    #[error("join token uses algorithm {0:?}; only HS256 is accepted")]
    Algorithm(String),
    /// Signature does not verify with this cluster's key.
    #[error("join token signature is invalid (forged, or from another cluster)")]
    BadSignature,
    /// Past its expiry.
    #[error("join token expired at {expired_at} (Unix seconds)")]
    Expired {
        /// When it expired.
        expired_at: i64,
    },
    /// Issued in the future.
    #[error("join token is not valid yet (issued at {issued_at})")]
    NotYetValid {
        /// Claimed issue time.
        issued_at: i64,
    },
    /// Not a join token.
    #[error("token type {0:?} is not a join token")]
    WrongType(String),
}

/// The cluster's token signing key (32 random bytes).
pub struct TokenKey {
    key: Zeroizing<[u8; 32]>,
}

impl fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenKey(<redacted>)")
    }
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
}

impl TokenKey {
    /// A fresh random key.
    pub fn generate() -> Result<Self, PkiError> {
        let mut key = Zeroizing::new([0u8; 32]);
        SystemRandom::new()
            .fill(key.as_mut())
            .map_err(|_| PkiError::Generate("system random source failed".into()))?;
        Ok(Self { key })
    }

    /// From stored bytes (e.g. opened from the replicated state).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, PkiError> {
        let key: [u8; 32] = bytes.try_into().map_err(|_| PkiError::Parse {
            what: "token key",
            detail: format!("{} bytes, expected 32", bytes.len()),
        })?;
        Ok(Self {
            key: Zeroizing::new(key),
        })
    }

    /// The raw key, for sealing into the replicated state.
    pub fn as_bytes(&self) -> &[u8] {
        self.key.as_ref()
    }

    fn hmac_key(&self) -> hmac::Key {
        hmac::Key::new(hmac::HMAC_SHA256, self.key.as_ref())
    }

    /// A key for another purpose, derived from this one (HMAC of `context`),
    /// so tokens of one kind never verify as another.
    pub fn derive(&self, context: &str) -> Self {
        let tag = hmac::sign(&self.hmac_key(), context.as_bytes());
        let mut key = Zeroizing::new([0u8; 32]);
        key.copy_from_slice(&tag.as_ref()[..32]);
        Self { key }
    }

    /// Signs `claims` into a compact JWT.
    pub fn sign(&self, claims: &JoinTokenClaims) -> Result<String, PkiError> {
        self.sign_claims(claims)
    }

    /// Signs any claims into a compact HS256 JWT.
    pub fn sign_claims<C: Serialize>(&self, claims: &C) -> Result<String, PkiError> {
        let payload = serde_json::to_vec(claims).map_err(|e| PkiError::Generate(e.to_string()))?;
        let signing_input = format!("{}.{}", b64().encode(HEADER), b64().encode(payload));
        let tag = hmac::sign(&self.hmac_key(), signing_input.as_bytes());
        Ok(format!("{signing_input}.{}", b64().encode(tag.as_ref())))
    }

    /// Checks a compact JWT's shape, algorithm (HS256 only) and signature
    /// (constant time) and returns its claims as JSON bytes.
    pub fn verify_signature(&self, token: &str) -> Result<Vec<u8>, TokenError> {
        verify_hs256(&self.hmac_key(), token)
    }
}

/// [`TokenKey::verify_signature`] with any HMAC-SHA256 key.
fn verify_hs256(key: &hmac::Key, token: &str) -> Result<Vec<u8>, TokenError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::Malformed(format!(
            "longer than {MAX_TOKEN_LEN} bytes"
        )));
    }
    let mut parts = token.trim().split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed(
            "expected three dot-separated parts".into(),
        ));
    };
    let header: serde_json::Value = b64()
        .decode(h)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| TokenError::Malformed("header is not base64url JSON".into()))?;
    let alg = header
        .get("alg")
        .and_then(|a| a.as_str())
        .unwrap_or_default();
    if alg != "HS256" {
        return Err(TokenError::Algorithm(alg.to_owned()));
    }
    let sig = b64()
        .decode(s)
        .map_err(|_| TokenError::Malformed("signature is not base64url".into()))?;
    let signing_input_len = h.len() + 1 + p.len();
    let signing_input = &token.trim()[..signing_input_len];
    hmac::verify(key, signing_input.as_bytes(), &sig).map_err(|_| TokenError::BadSignature)?;
    b64()
        .decode(p)
        .map_err(|_| TokenError::Malformed("claims are not base64url".into()))
}

impl TokenKey {
    /// Verifies signature (constant time), algorithm, type and validity at `now`.
    pub fn verify(&self, token: &str, now: i64) -> Result<JoinTokenClaims, TokenError> {
        let payload = self.verify_signature(token)?;
        let claims: JoinTokenClaims = serde_json::from_slice(&payload).map_err(|_| {
            TokenError::Malformed("claims are not base64url JSON of a join token".into())
        })?;
        if claims.typ != TOKEN_TYPE {
            return Err(TokenError::WrongType(claims.typ));
        }
        if now >= claims.exp {
            return Err(TokenError::Expired {
                expired_at: claims.exp,
            });
        }
        if claims.iat > now + SKEW {
            return Err(TokenError::NotYetValid {
                issued_at: claims.iat,
            });
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7515, appendix A.1: the HS256 example (its JWK key, its token).
    #[test]
    fn the_rfc_7515_hs256_example_verifies_and_a_changed_byte_does_not() {
        let key = b64()
            .decode("AyM1SysPpbyDfgZld3umj1qzKObwVMkoqQ-EstJQLr_T-1qS0gZH75aKtMN3Yj0iPS4hcgUuTwjAzZr1Z9CAow")
            .expect("key");
        let key = hmac::Key::new(hmac::HMAC_SHA256, &key);
        let token = "eyJ0eXAiOiJKV1QiLA0KICJhbGciOiJIUzI1NiJ9\
            .eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ\
            .dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
        let claims = verify_hs256(&key, token).expect("the RFC's token verifies");
        assert_eq!(
            claims,
            b"{\"iss\":\"joe\",\r\n \"exp\":1300819380,\r\n \"http://example.com/is_root\":true}"
        );
        // The RFC's signature is what our HMAC computes over its input.
        let (input, sig) = token.rsplit_once('.').expect("three parts");
        assert_eq!(
            b64().encode(hmac::sign(&key, input.as_bytes()).as_ref()),
            sig
        );
        let forged = token.replacen("eyJpc3MiOiJqb2", "eyJpc3MiOiJqb3", 1);
        assert!(matches!(
            verify_hs256(&key, &forged),
            Err(TokenError::BadSignature)
        ));
    }

    fn claims(now: i64, ttl: u64) -> JoinTokenClaims {
        JoinTokenClaims::new(
            "tok-1".into(),
            now,
            ttl,
            1,
            BTreeMap::from([("zone".to_owned(), "eu-a".to_owned())]),
        )
    }

    #[test]
    fn valid_token_round_trips() {
        let k = TokenKey::generate().expect("key");
        let t = k.sign(&claims(1_000, 3600)).expect("sign");
        assert_eq!(k.verify(&t, 1_500).expect("valid"), claims(1_000, 3600));
    }

    #[test]
    fn refusals_are_specific() {
        let k = TokenKey::generate().expect("key");
        let t = k.sign(&claims(1_000, 3600)).expect("sign");
        assert_eq!(
            k.verify(&t, 4_600),
            Err(TokenError::Expired { expired_at: 4_600 })
        );
        assert_eq!(
            k.verify(&t, 500),
            Err(TokenError::NotYetValid { issued_at: 1_000 })
        );
        let other = TokenKey::generate().expect("key");
        assert_eq!(other.verify(&t, 1_500), Err(TokenError::BadSignature));
        // Tampered claims: more uses.
        let parts: Vec<&str> = t.split('.').collect();
        let mut c = claims(1_000, 3600);
        c.max_uses = 1000;
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            b64().encode(serde_json::to_vec(&c).expect("json")),
            parts[2]
        );
        assert_eq!(k.verify(&forged, 1_500), Err(TokenError::BadSignature));
        // alg=none
        let none = format!("{}.{}.", b64().encode(r#"{"alg":"none"}"#), parts[1]);
        assert_eq!(
            k.verify(&none, 1_500),
            Err(TokenError::Algorithm("none".into()))
        );
        for junk in ["", "a.b", "a.b.c.d", "!!!.???.***"] {
            assert!(
                matches!(k.verify(junk, 1_500), Err(TokenError::Malformed(_))),
                "{junk:?}"
            );
        }
        assert!(matches!(
            k.verify(&"x".repeat(10_000), 1_500),
            Err(TokenError::Malformed(_))
        ));
    }
}
