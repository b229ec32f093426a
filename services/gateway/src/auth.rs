//! Client tokens (JWT, HS256) and the admin key.
//!
//! HS256 is small enough to verify by hand (HMAC-SHA256 over `header.payload`), which keeps
//! a JOSE crate and its key-type zoo out of the build. Only `alg: HS256` is accepted, so a
//! token claiming `none` or an asymmetric algorithm is rejected before any key is used.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The claims Meridian reads: user, device, expiry and (optional) issue time, in seconds
/// since the epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub dev: String,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is malformed")]
    Malformed,
    #[error("token algorithm must be HS256")]
    Algorithm,
    #[error("token signature is invalid")]
    Signature,
    #[error("token has expired")]
    Expired,
    /// `exp - iat` (or `exp - now` without `iat`) is longer than the gateway accepts: a
    /// leaked long-lived token would otherwise stay valid for as long as its minter chose.
    #[error("token lifetime exceeds the maximum of {max_s} s (gateway.max_token_ttl_s)")]
    LifetimeTooLong { max_s: u64 },
}

pub fn sign(secret: &[u8], claims: &Claims) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap_or_default());
    let signing_input = format!("{header}.{payload}");
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(signing_input.as_bytes());
    let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{signing_input}.{sig}")
}

/// Verifies signature, expiry at `now_s`, and that the token's lifetime is at most
/// `max_lifetime_s` (counted from `iat` when the token has one, else from now).
pub fn verify(secret: &[u8], token: &str, now_s: u64, max_lifetime_s: u64) -> Result<Claims, TokenError> {
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(TokenError::Malformed);
    };
    #[derive(Deserialize)]
    struct Header {
        alg: String,
    }
    let header: Header = URL_SAFE_NO_PAD
        .decode(h)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or(TokenError::Malformed)?;
    if header.alg != "HS256" {
        return Err(TokenError::Algorithm);
    }
    let sig = URL_SAFE_NO_PAD.decode(s).map_err(|_| TokenError::Malformed)?;
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(h.as_bytes());
    mac.update(b".");
    mac.update(p.as_bytes());
    // Constant-time comparison.
    mac.verify_slice(&sig).map_err(|_| TokenError::Signature)?;
    let claims: Claims = URL_SAFE_NO_PAD
        .decode(p)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or(TokenError::Malformed)?;
    if claims.exp <= now_s {
        return Err(TokenError::Expired);
    }
    // An `iat` in the future would let a token claim a short life while living long: the
    // lifetime counts from whichever is earlier, its `iat` or now.
    let issued = claims.iat.map_or(now_s, |i| i.min(now_s));
    if claims.exp.saturating_sub(issued) > max_lifetime_s {
        return Err(TokenError::LifetimeTooLong {
            max_s: max_lifetime_s,
        });
    }
    Ok(claims)
}

/// Compares the admin key without leaking its length or prefix through timing.
pub fn admin_key_matches(expected: &str, given: &str) -> bool {
    let mut a = HmacSha256::new_from_slice(b"meridian-admin-key").expect("any key length");
    a.update(expected.as_bytes());
    let mut b = HmacSha256::new_from_slice(b"meridian-admin-key").expect("any key length");
    b.update(given.as_bytes());
    b.verify(&a.finalize().into_bytes()).is_ok()
}

pub fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";
    const DAY: u64 = 24 * 3600;

    fn claims(exp: u64) -> Claims {
        Claims {
            sub: "ann".into(),
            dev: "phone".into(),
            exp,
            iat: None,
        }
    }

    #[test]
    fn round_trip() {
        let t = sign(KEY, &claims(1_000));
        assert_eq!(verify(KEY, &t, 999, DAY).unwrap(), claims(1_000));
    }

    #[test]
    fn expired_forged_and_malformed_are_rejected() {
        let t = sign(KEY, &claims(1_000));
        assert_eq!(verify(KEY, &t, 1_000, DAY), Err(TokenError::Expired));
        assert_eq!(
            verify(b"another key of thirty-two bytes!", &t, 0, DAY),
            Err(TokenError::Signature)
        );
        // Changing the payload (a different sub) breaks the signature.
        let mut parts: Vec<&str> = t.split('.').collect();
        let forged = URL_SAFE_NO_PAD.encode(br#"{"sub":"root","dev":"x","exp":99999}"#);
        parts[1] = &forged;
        assert_eq!(verify(KEY, &parts.join("."), 0, DAY), Err(TokenError::Signature));
        assert_eq!(verify(KEY, "not-a-token", 0, DAY), Err(TokenError::Malformed));
        assert_eq!(verify(KEY, "a.b.c.d", 0, DAY), Err(TokenError::Malformed));
        // alg=none is refused before the signature is even looked at.
        let none = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#),
            URL_SAFE_NO_PAD.encode(br#"{"sub":"ann","dev":"x","exp":99999}"#)
        );
        assert_eq!(verify(KEY, &none, 0, DAY), Err(TokenError::Algorithm));
    }

    #[test]
    fn lifetime_counts_from_iat_or_from_now() {
        let now = 100 * DAY;
        let long = sign(KEY, &claims(now + 2 * DAY));
        assert_eq!(
            verify(KEY, &long, now, DAY),
            Err(TokenError::LifetimeTooLong { max_s: DAY })
        );
        assert!(
            verify(KEY, &long, now + DAY + 1, DAY).is_ok(),
            "counted from now without iat"
        );
        let old = Claims {
            iat: Some(now - 2 * DAY),
            ..claims(now + 60)
        };
        assert_eq!(
            verify(KEY, &sign(KEY, &old), now, DAY),
            Err(TokenError::LifetimeTooLong { max_s: DAY })
        );
        let fine = Claims {
            iat: Some(now),
            ..claims(now + DAY)
        };
        assert_eq!(verify(KEY, &sign(KEY, &fine), now, DAY), Ok(fine));
    }

    #[test]
    fn admin_key_comparison() {
        assert!(admin_key_matches("secret-admin-key", "secret-admin-key"));
        assert!(!admin_key_matches("secret-admin-key", "secret-admin-kez"));
        assert!(!admin_key_matches("secret-admin-key", ""));
    }
}
