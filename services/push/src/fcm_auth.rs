//! FCM HTTP v1 access tokens minted from a service-account key, the OAuth2 JWT bearer grant
//! (RFC 7523) Google uses for server-to-server calls: an RS256-signed assertion
//! `{iss: client_email, scope: firebase.messaging, aud: token_uri, iat, exp}` is POSTed to the
//! key's `token_uri` as `grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer&assertion=..`,
//! and the answer `{access_token, expires_in}` is cached until shortly before it expires
//! (Google's live an hour), or dropped at once when FCM answers 401.
//!
//! Written here rather than taken from gcp_auth or yup-oauth2: both bring a second HTTP
//! stack (their own hyper + rustls connector) beside the reqwest client push already has,
//! and neither lets the 401-then-refresh and the retry classification share this crate's
//! rules. The flow is one signed JWT and one form POST; the signature itself is `ring`'s
//! (already in the build through async-nats and rustls), so no cryptography is hand-made.

use std::fmt;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use reqwest::header::HeaderValue;
use reqwest::{Client, StatusCode};
use ring::rand::SystemRandom;
use ring::signature::{RsaKeyPair, RSA_PKCS1_SHA256};
use serde::Deserialize;
use tokio::sync::Mutex;

/// The one scope FCM HTTP v1 needs.
pub(crate) const FCM_SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// The assertion's own lifetime; Google accepts at most an hour.
const ASSERTION_LIFETIME_S: u64 = 3600;
/// A token is replaced this long before it expires (capped at half its lifetime), so a
/// request never leaves with a token that dies on the way.
const REFRESH_MARGIN: Duration = Duration::from_secs(60);
/// The longest a token is believed to live, whatever the endpoint says.
const MAX_TOKEN_LIFETIME_S: u64 = 24 * 3600;
/// After a failed token request, callers fail fast for this long instead of each waiting
/// out its own request to an endpoint that is down.
const FAILURE_HOLD: Duration = Duration::from_secs(1);

/// The fields of a Google service-account key file (the JSON downloaded from IAM) that
/// the grant uses; the others are ignored.
#[derive(Clone, Deserialize)]
pub struct ServiceAccountKey {
    #[serde(rename = "type", default)]
    pub key_type: Option<String>,
    pub client_email: String,
    /// PKCS#8 PEM RSA private key.
    pub private_key: String,
    #[serde(default)]
    pub private_key_id: Option<String>,
    /// Where tokens are requested (`https://oauth2.googleapis.com/token`).
    pub token_uri: String,
}

impl fmt::Debug for ServiceAccountKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceAccountKey")
            .field("client_email", &self.client_email)
            .field("private_key_id", &self.private_key_id)
            .field("private_key", &"<redacted>")
            .field("token_uri", &self.token_uri)
            .finish()
    }
}

impl ServiceAccountKey {
    /// Reads and checks a key file; the error says what is wrong without quoting the key.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        Self::parse(&text)
    }

    pub fn parse(json: &str) -> Result<Self, String> {
        let key: ServiceAccountKey =
            serde_json::from_str(json).map_err(|e| format!("not a service-account key file: {e}"))?;
        if key.key_type.as_deref().is_some_and(|t| t != "service_account") {
            return Err(format!(
                "key type is {:?}, expected \"service_account\"",
                key.key_type.as_deref().unwrap_or_default()
            ));
        }
        if key.client_email.trim().is_empty() || key.client_email.chars().any(char::is_whitespace) {
            return Err("client_email must be the service account's address".into());
        }
        let uri = reqwest::Url::parse(&key.token_uri).map_err(|e| format!("token_uri: {e}"))?;
        if !matches!(uri.scheme(), "http" | "https") || uri.host_str().is_none() {
            return Err("token_uri is not an http(s) URL".into());
        }
        RsaSigner::from_pem(&key.private_key)?;
        Ok(key)
    }
}

/// RS256 (RSASSA-PKCS1-v1_5 with SHA-256) over one RSA key.
struct RsaSigner {
    key: RsaKeyPair,
    rng: SystemRandom,
}

impl RsaSigner {
    fn from_pem(pem: &str) -> Result<Self, String> {
        let (label, der) = p256::pkcs8::der::pem::decode_vec(pem.trim().as_bytes())
            .map_err(|e| format!("private_key is not PEM: {e}"))?;
        if label != "PRIVATE KEY" {
            return Err(format!(
                "private_key is a {label:?}, expected a PKCS#8 \"PRIVATE KEY\""
            ));
        }
        let key = RsaKeyPair::from_pkcs8(&der).map_err(|e| format!("private_key is not an RSA key: {e}"))?;
        Ok(Self {
            key,
            rng: SystemRandom::new(),
        })
    }

    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, String> {
        let mut sig = vec![0u8; self.key.public().modulus_len()];
        self.key
            .sign(&RSA_PKCS1_SHA256, &self.rng, msg, &mut sig)
            .map_err(|_| "RSA signing failed".to_string())?;
        Ok(sig)
    }
}

/// Why no token could be had.
#[derive(Debug)]
pub(crate) enum TokenError {
    /// The endpoint was unreachable, throttled or failing: a later try may work.
    Retry(String),
    /// The endpoint refused the assertion (a deleted or disabled key): trying again with
    /// the same key will not help.
    Permanent(String),
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenError::Retry(r) | TokenError::Permanent(r) => f.write_str(r),
        }
    }
}

struct Cached {
    bearer: HeaderValue,
    refresh_at: Instant,
}

#[derive(Default)]
struct TokenState {
    current: Option<Cached>,
    failed: Option<(Instant, String)>,
}

/// The current FCM access token for one service account.
pub(crate) struct ServiceAccountTokens {
    client: Client,
    client_email: String,
    key_id: Option<String>,
    token_uri: String,
    signer: RsaSigner,
    /// Held across a refresh: concurrent senders wait for the one token request instead
    /// of each making their own.
    state: Mutex<TokenState>,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    expires_in: u64,
}

impl ServiceAccountTokens {
    pub(crate) fn new(key: &ServiceAccountKey, client: Client) -> Result<Self, String> {
        Ok(Self {
            client,
            client_email: key.client_email.clone(),
            key_id: key.private_key_id.clone(),
            token_uri: key.token_uri.clone(),
            signer: RsaSigner::from_pem(&key.private_key)?,
            state: Mutex::new(TokenState::default()),
        })
    }

    /// `Bearer <access token>` to send now: the cached one, or a fresh one.
    pub(crate) async fn bearer(&self) -> Result<HeaderValue, TokenError> {
        let mut state = self.state.lock().await;
        if let Some(c) = &state.current {
            if Instant::now() < c.refresh_at {
                return Ok(c.bearer.clone());
            }
        }
        if let Some((at, reason)) = &state.failed {
            if at.elapsed() < FAILURE_HOLD {
                return Err(TokenError::Retry(reason.clone()));
            }
        }
        match self.fetch().await {
            Ok(fresh) => {
                let bearer = fresh.bearer.clone();
                state.current = Some(fresh);
                state.failed = None;
                Ok(bearer)
            }
            Err(e) => {
                state.current = None;
                state.failed = Some((Instant::now(), e.to_string()));
                Err(e)
            }
        }
    }

    /// FCM refused `used` (401): forget it, unless a newer token already replaced it.
    pub(crate) async fn invalidate(&self, used: &HeaderValue) {
        let mut state = self.state.lock().await;
        if state.current.as_ref().is_some_and(|c| c.bearer == used) {
            state.current = None;
        }
    }

    /// The signed assertion for a token request made at `now_s` (Unix seconds).
    fn assertion(&self, now_s: u64) -> Result<String, String> {
        let mut header = serde_json::json!({"alg": "RS256", "typ": "JWT"});
        if let Some(kid) = &self.key_id {
            header["kid"] = kid.as_str().into();
        }
        let claims = serde_json::json!({
            "iss": self.client_email,
            "scope": FCM_SCOPE,
            "aud": self.token_uri,
            "iat": now_s,
            "exp": now_s + ASSERTION_LIFETIME_S,
        });
        let mut jwt = URL_SAFE_NO_PAD.encode(header.to_string());
        jwt.push('.');
        jwt.push_str(&URL_SAFE_NO_PAD.encode(claims.to_string()));
        let sig = self.signer.sign(jwt.as_bytes())?;
        jwt.push('.');
        jwt.push_str(&URL_SAFE_NO_PAD.encode(sig));
        Ok(jwt)
    }

    async fn fetch(&self) -> Result<Cached, TokenError> {
        // The token's lifetime counts from before the request: never past its real expiry.
        let requested = Instant::now();
        let now_s = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let assertion = self.assertion(now_s).map_err(TokenError::Permanent)?;
        let resp = self
            .client
            .post(&self.token_uri)
            .form(&[("grant_type", GRANT_TYPE), ("assertion", assertion.as_str())])
            .send()
            .await
            .map_err(|e| TokenError::Retry(format!("token request to {}: {e}", self.token_uri)))?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            let body: String = body.chars().take(300).collect();
            let reason = format!("token endpoint answered {}: {}", status.as_u16(), body.trim());
            return Err(
                if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
                    TokenError::Retry(reason)
                } else {
                    TokenError::Permanent(reason)
                },
            );
        }
        let token: TokenResponse = resp
            .json()
            .await
            .map_err(|e| TokenError::Retry(format!("token endpoint answer unreadable: {e}")))?;
        let mut bearer = HeaderValue::from_str(&format!("Bearer {}", token.access_token))
            .map_err(|_| TokenError::Permanent("the access token is not a header value".into()))?;
        bearer.set_sensitive(true);
        // Capped: Google's live an hour, and an absurd answer must not overflow the clock.
        let lifetime = Duration::from_secs(token.expires_in.min(MAX_TOKEN_LIFETIME_S));
        let margin = REFRESH_MARGIN.min(lifetime / 2);
        tracing::debug!(expires_in = token.expires_in, "push: new FCM access token");
        Ok(Cached {
            bearer,
            refresh_at: requested + lifetime - margin,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A throwaway RSA key made for these tests; it signs nothing anywhere else.
    pub(crate) const TEST_RSA_PEM: &str = include_str!("../tests/data/test-service-account.pem");

    fn key_json(token_uri: &str) -> String {
        serde_json::json!({
            "type": "service_account",
            "project_id": "meridian-test",
            "private_key_id": "kid-1",
            "private_key": TEST_RSA_PEM,
            "client_email": "push@meridian-test.iam.gserviceaccount.com",
            "client_id": "1",
            "token_uri": token_uri,
        })
        .to_string()
    }

    #[test]
    fn a_google_key_file_parses_and_bad_ones_are_named() {
        let k = ServiceAccountKey::parse(&key_json("https://oauth2.googleapis.com/token")).unwrap();
        assert_eq!(k.client_email, "push@meridian-test.iam.gserviceaccount.com");
        assert!(!format!("{k:?}").contains("PRIVATE KEY"));

        let err = ServiceAccountKey::parse(&key_json("not a url")).unwrap_err();
        assert!(err.contains("token_uri"), "{err}");
        let mut v: serde_json::Value = serde_json::from_str(&key_json("https://h/t")).unwrap();
        v["type"] = "authorized_user".into();
        assert!(ServiceAccountKey::parse(&v.to_string())
            .unwrap_err()
            .contains("service_account"));
        v["type"] = "service_account".into();
        v["private_key"] = crate::apns::tests::TEST_KEY_PEM.into();
        let err = ServiceAccountKey::parse(&v.to_string()).unwrap_err();
        assert!(err.contains("not an RSA key"), "{err}");
        assert!(!err.contains("BEGIN"), "the key is never quoted: {err}");
    }

    #[test]
    fn the_assertion_is_an_rs256_jwt_that_verifies() {
        let k = ServiceAccountKey::parse(&key_json("https://oauth2.googleapis.com/token")).unwrap();
        let t = ServiceAccountTokens::new(&k, Client::new()).unwrap();
        let jwt = t.assertion(1_700_000_000).unwrap();
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3);
        let header: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
        assert_eq!(
            header,
            serde_json::json!({"alg": "RS256", "typ": "JWT", "kid": "kid-1"})
        );
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(claims["iss"], "push@meridian-test.iam.gserviceaccount.com");
        assert_eq!(claims["scope"], FCM_SCOPE);
        assert_eq!(claims["aud"], "https://oauth2.googleapis.com/token");
        assert_eq!(
            claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
            3600
        );
        let public = t.signer.key.public().as_ref().to_vec();
        ring::signature::UnparsedPublicKey::new(&ring::signature::RSA_PKCS1_2048_8192_SHA256, public)
            .verify(
                format!("{}.{}", parts[0], parts[1]).as_bytes(),
                &URL_SAFE_NO_PAD.decode(parts[2]).unwrap(),
            )
            .expect("the signature verifies with the key's public half");
    }
}
