//! APNs token-based authentication: a JWT with header `{"alg":"ES256","kid":<key id>}` and
//! claims `{"iss":<team id>,"iat":<seconds>}`, signed with the team's P-256 `.p8` key.
//!
//! Apple rejects a token older than an hour (`ExpiredProviderToken`) and throttles
//! providers that mint new ones more often than every 20 minutes
//! (`TooManyProviderTokenUpdates`), so one token is cached and reused for 50 minutes.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use p256::ecdsa::signature::Signer as _;
use p256::ecdsa::{Signature, SigningKey};
use p256::pkcs8::DecodePrivateKey as _;

/// How long one provider token is used: inside Apple's hour, outside its 20 minutes.
pub(crate) const TOKEN_LIFETIME: Duration = Duration::from_secs(50 * 60);

/// Signs provider tokens with one `.p8` key.
pub(crate) struct ApnsSigner {
    key: SigningKey,
}

impl ApnsSigner {
    /// Parses a PKCS#8 PEM P-256 private key (what Apple's `.p8` download holds).
    pub(crate) fn from_pem(pem: &str) -> Result<Self, p256::pkcs8::Error> {
        Ok(Self {
            key: SigningKey::from_pkcs8_pem(pem.trim())?,
        })
    }

    /// A compact JWS (ES256): base64url(header).base64url(claims).base64url(r || s).
    pub(crate) fn sign(&self, team_id: &str, key_id: &str, iat: u64) -> String {
        let header = serde_json::json!({"alg": "ES256", "kid": key_id});
        let claims = serde_json::json!({"iss": team_id, "iat": iat});
        let mut jwt = String::new();
        jwt.push_str(&URL_SAFE_NO_PAD.encode(header.to_string()));
        jwt.push('.');
        jwt.push_str(&URL_SAFE_NO_PAD.encode(claims.to_string()));
        // ES256 signs SHA-256(signing input); p256's Signer hashes for us. The JWS form is
        // the fixed 64-byte r || s, not DER.
        let sig: Signature = self.key.sign(jwt.as_bytes());
        jwt.push('.');
        jwt.push_str(&URL_SAFE_NO_PAD.encode(sig.to_bytes()));
        jwt
    }
}

/// The current provider token, minted on first use and again after [`TOKEN_LIFETIME`] or
/// when Apple reports it expired.
pub(crate) struct TokenCache {
    signer: ApnsSigner,
    team_id: String,
    key_id: String,
    current: Mutex<Option<(String, Instant)>>,
}

impl TokenCache {
    pub(crate) fn new(signer: ApnsSigner, team_id: String, key_id: String) -> Self {
        Self {
            signer,
            team_id,
            key_id,
            current: Mutex::new(None),
        }
    }

    /// The token to send now. Signing takes microseconds, so it happens under the lock:
    /// concurrent senders then share one fresh token instead of each minting their own.
    pub(crate) fn token(&self) -> String {
        let mut current = match self.current.lock() {
            Ok(g) => g,
            // A panic while holding this lock cannot leave a half-written token behind.
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some((token, minted)) = current.as_ref() {
            if minted.elapsed() < TOKEN_LIFETIME {
                return token.clone();
            }
        }
        let iat = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let token = self.signer.sign(&self.team_id, &self.key_id, iat);
        *current = Some((token.clone(), Instant::now()));
        token
    }

    /// Drops `rejected` if it is still the current token (Apple said it expired, e.g. after
    /// a clock jump); a concurrent sender may already have replaced it.
    pub(crate) fn invalidate(&self, rejected: &str) {
        let mut current = match self.current.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        if current.as_ref().is_some_and(|(t, _)| t == rejected) {
            *current = None;
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use p256::ecdsa::signature::Verifier as _;

    /// A throwaway key made for these tests (`openssl genpkey -algorithm EC -pkeyopt
    /// ec_paramgen_curve:P-256`); it signs nothing anywhere else.
    pub(crate) const TEST_KEY_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgGxDvlfM0YTXK63tc
FlxHH+fu+Qxije2CAlEXv4slpIahRANCAAThbLTDWiZMumuj23Vo6FFuf1kcKEZ/
ZWDuS4eaH775Yf9pwxK9wFmcTgK6+EBaNbIxHyjLjuohtsazXdTxrSsu
-----END PRIVATE KEY-----
";

    #[test]
    fn jwt_has_es256_header_claims_and_a_valid_signature() {
        let signer = ApnsSigner::from_pem(TEST_KEY_PEM).unwrap();
        let jwt = signer.sign("TEAM123456", "KEY1234567", 1_700_000_000);
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3);
        let header: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
        assert_eq!(header, serde_json::json!({"alg": "ES256", "kid": "KEY1234567"}));
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(
            claims,
            serde_json::json!({"iss": "TEAM123456", "iat": 1_700_000_000u64})
        );
        let sig_bytes = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
        assert_eq!(sig_bytes.len(), 64, "JWS ES256 signatures are r || s, 64 bytes");
        let sig = Signature::from_slice(&sig_bytes).unwrap();
        let input = format!("{}.{}", parts[0], parts[1]);
        signer.key.verifying_key().verify(input.as_bytes(), &sig).unwrap();
    }

    #[test]
    fn bad_keys_are_refused() {
        assert!(ApnsSigner::from_pem("").is_err());
        assert!(
            ApnsSigner::from_pem("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----").is_err()
        );
    }

    #[test]
    fn the_token_is_cached_until_invalidated() {
        let cache = TokenCache::new(
            ApnsSigner::from_pem(TEST_KEY_PEM).unwrap(),
            "T".into(),
            "K".into(),
        );
        let a = cache.token();
        assert_eq!(cache.token(), a);
        cache.invalidate("some other token");
        assert_eq!(cache.token(), a);
        assert!(cache.current.lock().unwrap().is_some());
        cache.invalidate(&a);
        assert!(cache.current.lock().unwrap().is_none());
        // Minted again (RFC 6979 signatures are deterministic, so within the same second
        // the new token may equal the old one; what matters is that it was re-signed).
        let b = cache.token();
        assert_eq!(b.split('.').count(), 3);
        assert!(cache.current.lock().unwrap().is_some());
    }
}
