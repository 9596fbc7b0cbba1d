//! Identity: guest tokens (HS256 JWTs) and the admin token. No HTTP here;
//! `http::auth` turns headers into these calls.

use chrono::{DateTime, TimeZone, Utc};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    exp: i64,
    /// Written on the tokens we issue, but not required: the contract's
    /// tokens are `sub` and `exp`, and another issuer sharing AUTH_SECRET
    /// need not add more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iat: Option<i64>,
}

/// A freshly issued token.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    pub token: String,
    pub user_id: Uuid,
    pub expires_at: DateTime<Utc>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("invalid or expired token")]
    InvalidToken,
    #[error("could not sign token: {0}")]
    Signing(String),
}

/// Issues and checks user tokens. Every replica with the same secret accepts
/// every other replica's tokens.
#[derive(Clone)]
pub struct TokenAuthority {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    ttl_seconds: i64,
}

impl TokenAuthority {
    pub fn new(secret: &[u8], ttl_seconds: u32) -> Self {
        // HS256 only: a token whose header names another algorithm (or
        // "none") is refused before its signature is even looked at.
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        // A token that says it is not valid yet is not valid yet.
        validation.validate_nbf = true;
        validation.leeway = 5;
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            ttl_seconds: ttl_seconds.into(),
        }
    }

    /// A token for a new anonymous user.
    pub fn issue_guest(&self) -> Result<IssuedToken, AuthError> {
        let user_id = Uuid::new_v4();
        let now = Utc::now().timestamp();
        let exp = now + self.ttl_seconds;
        let claims = Claims {
            sub: user_id.to_string(),
            exp,
            iat: Some(now),
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| AuthError::Signing(e.to_string()))?;
        let expires_at = Utc.timestamp_opt(exp, 0).single().unwrap_or_else(Utc::now);
        Ok(IssuedToken {
            token,
            user_id,
            expires_at,
        })
    }

    /// The user a token speaks for, if it is signed by us and not expired.
    pub fn verify(&self, token: &str) -> Result<Uuid, AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|_| AuthError::InvalidToken)?;
        Uuid::parse_str(&data.claims.sub).map_err(|_| AuthError::InvalidToken)
    }
}

/// Compares secrets without leaking, through timing, how much of a guess
/// was right.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejections() {
        let auth = TokenAuthority::new(b"0123456789abcdef0123", 3600);
        let t = auth.issue_guest().unwrap();
        assert_eq!(auth.verify(&t.token).unwrap(), t.user_id);
        let other = TokenAuthority::new(b"another-secret-0123456", 3600);
        assert!(other.verify(&t.token).is_err());
        assert!(auth.verify("not.a.token").is_err());
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
