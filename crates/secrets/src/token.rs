//! Access tokens: compact HS256 JWTs for one secret, one audience and one
//! holder, signed with a key derived from the cluster's token key (so they
//! can never pass as join tokens, nor join tokens as them). Expiry is in
//! the token; uses and revocation are counted in Raft by `jti`.

use cloudless_pki::TokenKey;
use serde::{Deserialize, Serialize};

use crate::SecretsError;

const TOKEN_TYPE: &str = "cloudless-secret-access";
const KEY_CONTEXT: &str = "cloudless secret access tokens v1";
/// Tolerated clock skew for `iat`, ms.
const SKEW_MS: i64 = 60_000;

/// What an access token says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessClaims {
    /// Token id (uses and revocation are recorded against it).
    pub jti: String,
    /// The secret's namespace.
    pub ns: String,
    /// The secret's name.
    pub secret: String,
    /// The audience (a workload name in the secret's namespace).
    pub aud: String,
    /// The holder (`admin`, `node:<id>`).
    pub sub: String,
    /// Issued at, ms since the epoch.
    pub iat: i64,
    /// Expires at, ms since the epoch.
    pub exp: i64,
    /// Always "cloudless-secret-access".
    pub typ: String,
}

/// Signs and verifies access tokens.
#[derive(Debug)]
pub struct AccessTokenKey(TokenKey);

impl AccessTokenKey {
    /// The access-token key of a cluster with token key `cluster`.
    pub fn from_cluster_key(cluster: &TokenKey) -> Self {
        Self(cluster.derive(KEY_CONTEXT))
    }

    /// Signs `claims` (its `typ` is set).
    pub fn sign(&self, mut claims: AccessClaims) -> Result<String, SecretsError> {
        claims.typ = TOKEN_TYPE.to_owned();
        self.0
            .sign_claims(&claims)
            .map_err(|e| SecretsError::Crypto(e.to_string()))
    }

    /// The claims of a token without checking anything (for the audit
    /// record of a refused token; never for a decision).
    pub fn peek(token: &str) -> Option<AccessClaims> {
        use base64::Engine as _;
        if token.len() > 8 * 1024 {
            return None;
        }
        let payload = token.split('.').nth(1)?;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Checks signature, type and time; the caller checks the rest against
    /// the replicated record.
    pub fn verify(&self, token: &str, now_ms: i64) -> Result<AccessClaims, SecretsError> {
        let payload = self
            .0
            .verify_signature(token)
            .map_err(|e| SecretsError::Token(e.to_string().replace("join token", "token")))?;
        let claims: AccessClaims = serde_json::from_slice(&payload)
            .map_err(|_| SecretsError::Token("claims are not an access token's".into()))?;
        if claims.typ != TOKEN_TYPE {
            return Err(SecretsError::Token(format!(
                "type {:?} is not an access token",
                claims.typ
            )));
        }
        if now_ms >= claims.exp {
            return Err(SecretsError::Token(format!(
                "expired at {} (ms since the epoch)",
                claims.exp
            )));
        }
        if claims.iat > now_ms + SKEW_MS {
            return Err(SecretsError::Token("issued in the future".into()));
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(now: i64) -> AccessClaims {
        AccessClaims {
            jti: "t1".into(),
            ns: "prod".into(),
            secret: "db".into(),
            aud: "api".into(),
            sub: "node:n1".into(),
            iat: now,
            exp: now + 1000,
            typ: String::new(),
        }
    }

    #[test]
    fn verifies_its_own_and_refuses_forged_expired_and_join_tokens() {
        let cluster = TokenKey::generate().expect("key");
        let key = AccessTokenKey::from_cluster_key(&cluster);
        let t = key.sign(claims(10_000)).expect("sign");
        assert_eq!(key.verify(&t, 10_500).expect("valid").aud, "api");
        assert!(key
            .verify(&t, 11_000)
            .expect_err("expired")
            .to_string()
            .contains("expired"));
        // Another cluster's key: forged.
        let other = AccessTokenKey::from_cluster_key(&TokenKey::generate().expect("key"));
        assert!(other.verify(&t, 10_500).is_err());
        // A tampered payload fails the signature.
        let mut parts: Vec<&str> = t.split('.').collect();
        let forged_claims = {
            use base64::Engine as _;
            let mut c = claims(10_000);
            c.aud = "admin-tool".into();
            c.typ = TOKEN_TYPE.into();
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(serde_json::to_vec(&c).expect("json"))
        };
        parts[1] = &forged_claims;
        let forged = parts.join(".");
        // Refused, but its (unverified) claims can still be audited.
        assert_eq!(
            AccessTokenKey::peek(&forged).map(|c| c.aud),
            Some("admin-tool".to_owned())
        );
        assert!(key
            .verify(&forged, 10_500)
            .expect_err("forged")
            .to_string()
            .contains("signature"));
        // A token signed with the cluster key itself (as join tokens are)
        // does not pass: the access key is derived.
        let direct = cluster.sign_claims(&claims(10_000)).expect("sign");
        assert!(key.verify(&direct, 10_500).is_err());
        assert!(key.verify("junk", 10_500).is_err());
    }
}
