//! [`PushConfig`]: which providers are configured, and how hard to try.

use std::fmt;
use std::path::PathBuf;

use meridian_model::RegionId;
use serde::Deserialize;

use crate::apns::ApnsSigner;
use crate::fcm_auth::ServiceAccountKey;
use crate::PushError;

/// The environment variable that overrides [`PushConfig::webhook_url`] (see
/// [`PushConfig::with_env`]).
pub const WEBHOOK_URL_ENV: &str = "MERIDIAN_PUSH_WEBHOOK_URL";

/// Apple's production endpoint. The sandbox is `https://api.sandbox.push.apple.com`.
pub const APNS_DEFAULT_ENDPOINT: &str = "https://api.push.apple.com";
/// Google's FCM HTTP v1 endpoint.
pub const FCM_DEFAULT_ENDPOINT: &str = "https://fcm.googleapis.com";

/// Offline push for one region. A provider that is not configured is not used: devices
/// registered with its platform are counted as `unsupported` and skipped.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushConfig {
    /// The region whose delivery subjects this process watches; must be the bus's region.
    pub region: RegionId,
    /// Where `webhook` devices are notified (an HTTP POST of a JSON payload per device).
    /// `MERIDIAN_PUSH_WEBHOOK_URL` overrides it, applied by [`PushConfig::with_env`].
    #[serde(default)]
    pub webhook_url: Option<String>,
    #[serde(default)]
    pub apns: Option<ApnsConfig>,
    #[serde(default)]
    pub fcm: Option<FcmConfig>,
    /// Attempts per notification, the first included; after the last it is counted failed.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Wait before the first retry; it doubles per retry up to `max_backoff_ms`.
    #[serde(default = "default_first_backoff_ms")]
    pub first_backoff_ms: u64,
    #[serde(default = "default_max_backoff_ms")]
    pub max_backoff_ms: u64,
    /// Entries being handled and provider requests in flight, each at most this many.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// On shutdown, how long notifications already under way may take to finish (retries
    /// included) before they are abandoned.
    #[serde(default = "default_shutdown_grace_ms")]
    pub shutdown_grace_ms: u64,
}

/// APNs with token-based authentication: a provider JWT (ES256) signed with the team's
/// `.p8` key. See [`crate::apns`].
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApnsConfig {
    /// `https://api.push.apple.com` (default) or the sandbox. An `http://` endpoint (tests,
    /// a local relay) is spoken to with prior-knowledge HTTP/2 (h2c), since APNs is
    /// HTTP/2-only; over https HTTP/2 is negotiated by ALPN.
    #[serde(default = "default_apns_endpoint")]
    pub endpoint: String,
    /// The JWT's `iss`.
    pub team_id: String,
    /// The JWT header's `kid`: the id of the signing key in the developer account.
    pub key_id: String,
    /// The `.p8` file's content: a PKCS#8 PEM P-256 private key.
    pub private_key_pem: String,
    /// The app's bundle id (`apns-topic`).
    pub topic: String,
}

/// FCM HTTP v1. Exactly one of `service_account_key_file` (production: tokens are minted
/// and refreshed from it, see [`crate::fcm_auth`]) and `access_token` is set.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FcmConfig {
    #[serde(default = "default_fcm_endpoint")]
    pub endpoint: String,
    pub project_id: String,
    /// The service account's JSON key file as downloaded from the Google Cloud console
    /// (`client_email`, `private_key`, `token_uri`). Access tokens are requested from its
    /// `token_uri` and replaced before their hour is up.
    #[serde(default)]
    pub service_account_key_file: Option<PathBuf>,
    /// A fixed OAuth2 bearer token, for a relay or emulator that accepts one. Google's
    /// tokens expire after an hour, so against FCM itself use `service_account_key_file`.
    #[serde(default)]
    pub access_token: Option<String>,
}

// Secrets stay out of logs: Debug prints everything but the key and the token.
impl fmt::Debug for ApnsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApnsConfig")
            .field("endpoint", &self.endpoint)
            .field("team_id", &self.team_id)
            .field("key_id", &self.key_id)
            .field("private_key_pem", &"<redacted>")
            .field("topic", &self.topic)
            .finish()
    }
}

impl fmt::Debug for FcmConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FcmConfig")
            .field("endpoint", &self.endpoint)
            .field("project_id", &self.project_id)
            .field("service_account_key_file", &self.service_account_key_file)
            .field("access_token", &self.access_token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

fn default_max_attempts() -> u32 {
    5
}
fn default_first_backoff_ms() -> u64 {
    200
}
fn default_max_backoff_ms() -> u64 {
    10_000
}
fn default_concurrency() -> usize {
    64
}
fn default_shutdown_grace_ms() -> u64 {
    5_000
}
fn default_apns_endpoint() -> String {
    APNS_DEFAULT_ENDPOINT.into()
}
fn default_fcm_endpoint() -> String {
    FCM_DEFAULT_ENDPOINT.into()
}

impl ApnsConfig {
    pub fn new(
        team_id: impl Into<String>,
        key_id: impl Into<String>,
        private_key_pem: impl Into<String>,
        topic: impl Into<String>,
    ) -> Self {
        Self {
            endpoint: default_apns_endpoint(),
            team_id: team_id.into(),
            key_id: key_id.into(),
            private_key_pem: private_key_pem.into(),
            topic: topic.into(),
        }
    }
}

impl FcmConfig {
    /// FCM with a fixed access token (a relay or emulator; see [`FcmConfig::access_token`]).
    pub fn new(project_id: impl Into<String>, access_token: impl Into<String>) -> Self {
        Self {
            endpoint: default_fcm_endpoint(),
            project_id: project_id.into(),
            service_account_key_file: None,
            access_token: Some(access_token.into()),
        }
    }

    /// FCM with tokens minted from a service-account key file.
    pub fn with_service_account(project_id: impl Into<String>, key_file: impl Into<PathBuf>) -> Self {
        Self {
            endpoint: default_fcm_endpoint(),
            project_id: project_id.into(),
            service_account_key_file: Some(key_file.into()),
            access_token: None,
        }
    }
}

impl PushConfig {
    /// No provider configured, default retry policy.
    pub fn new(region: RegionId) -> Self {
        Self {
            region,
            webhook_url: None,
            apns: None,
            fcm: None,
            max_attempts: default_max_attempts(),
            first_backoff_ms: default_first_backoff_ms(),
            max_backoff_ms: default_max_backoff_ms(),
            concurrency: default_concurrency(),
            shutdown_grace_ms: default_shutdown_grace_ms(),
        }
    }

    /// Applies `MERIDIAN_PUSH_WEBHOOK_URL` when it is set and not empty.
    pub fn with_env(self) -> Self {
        self.with_webhook_override(std::env::var(WEBHOOK_URL_ENV).ok())
    }

    /// [`PushConfig::with_env`] with the variable's value given (testable without touching
    /// the process environment, which other threads may read concurrently).
    pub fn with_webhook_override(mut self, value: Option<String>) -> Self {
        if let Some(url) = value.map(|v| v.trim().to_string()).filter(|v| !v.is_empty()) {
            self.webhook_url = Some(url);
        }
        self
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), PushError> {
        if let Some(url) = &self.webhook_url {
            check_url("webhook_url", url)?;
        }
        if let Some(a) = &self.apns {
            check_url("apns.endpoint", &a.endpoint)?;
            check_key_id("apns.team_id", &a.team_id)?;
            check_key_id("apns.key_id", &a.key_id)?;
            if a.topic.trim().is_empty() || a.topic.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(PushError::config(
                    "apns.topic",
                    "must be the app's bundle id (no whitespace)",
                ));
            }
            ApnsSigner::from_pem(&a.private_key_pem)
                .map_err(|e| PushError::config("apns.private_key_pem", e.to_string()))?;
        }
        if let Some(f) = &self.fcm {
            check_url("fcm.endpoint", &f.endpoint)?;
            // It goes into the request path unescaped: Firebase project ids are lower-case
            // letters, digits and '-'.
            if f.project_id.is_empty()
                || !f
                    .project_id
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                return Err(PushError::config(
                    "fcm.project_id",
                    "must be 1+ characters of [a-z0-9-]",
                ));
            }
            match (&f.service_account_key_file, &f.access_token) {
                (Some(path), None) => {
                    ServiceAccountKey::from_file(path)
                        .map_err(|e| PushError::config("fcm.service_account_key_file", e))?;
                }
                (None, Some(token)) => {
                    if token.trim().is_empty() || token.chars().any(char::is_control) {
                        return Err(PushError::config(
                            "fcm.access_token",
                            "must be a non-empty OAuth2 token",
                        ));
                    }
                }
                _ => {
                    return Err(PushError::config(
                        "fcm.service_account_key_file",
                        "set exactly one of service_account_key_file and access_token",
                    ))
                }
            }
        }
        if !(1..=100).contains(&self.max_attempts) {
            return Err(PushError::config("max_attempts", "must be 1-100"));
        }
        // Zero would retry in a tight loop against a provider that is already failing.
        if self.first_backoff_ms == 0 {
            return Err(PushError::config("first_backoff_ms", "must be positive"));
        }
        if self.max_backoff_ms < self.first_backoff_ms || self.max_backoff_ms > 600_000 {
            return Err(PushError::config(
                "max_backoff_ms",
                "must be at least first_backoff_ms and at most 600000",
            ));
        }
        if !(1..=10_000).contains(&self.concurrency) {
            return Err(PushError::config("concurrency", "must be 1-10000"));
        }
        if self.shutdown_grace_ms > 600_000 {
            return Err(PushError::config("shutdown_grace_ms", "must be at most 600000"));
        }
        Ok(())
    }
}

fn check_url(field: &'static str, url: &str) -> Result<(), PushError> {
    let parsed = reqwest::Url::parse(url).map_err(|e| PushError::config(field, format!("{url:?}: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err(PushError::config(field, format!("{url:?} is not an http(s) URL")));
    }
    Ok(())
}

/// Apple's team and key ids are 10 upper-case alphanumerics; we only insist on a plain
/// token, so a wrong paste (whitespace, quotes) fails here rather than at Apple.
fn check_key_id(field: &'static str, s: &str) -> Result<(), PushError> {
    if s.is_empty() || s.len() > 64 || !s.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(PushError::config(field, "must be 1-64 characters of [A-Za-z0-9]"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apns::tests::TEST_KEY_PEM;

    fn region() -> RegionId {
        RegionId::parse("eu").unwrap()
    }

    fn field(c: &PushConfig) -> &'static str {
        match c.validate() {
            Err(PushError::Config { field, .. }) => field,
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    fn full() -> PushConfig {
        let mut c = PushConfig::new(region());
        c.webhook_url = Some("http://127.0.0.1:9/hook".into());
        c.apns = Some(ApnsConfig::new(
            "TEAM123456",
            "KEY1234567",
            TEST_KEY_PEM,
            "com.example.app",
        ));
        c.fcm = Some(FcmConfig::new("my-project-1", "ya29.token"));
        c
    }

    #[test]
    fn defaults_parse_and_validate() {
        let c: PushConfig = serde_json::from_str(r#"{"region":"eu"}"#).unwrap();
        c.validate().unwrap();
        assert_eq!(c.max_attempts, 5);
        assert_eq!(c.first_backoff_ms, 200);
        assert_eq!(c.max_backoff_ms, 10_000);
        assert_eq!(c.concurrency, 64);
        assert!(c.webhook_url.is_none() && c.apns.is_none() && c.fcm.is_none());
        full().validate().unwrap();

        let apns: ApnsConfig = serde_json::from_value(serde_json::json!({
            "team_id": "T", "key_id": "K", "private_key_pem": TEST_KEY_PEM, "topic": "a.b"
        }))
        .unwrap();
        assert_eq!(apns.endpoint, APNS_DEFAULT_ENDPOINT);
        let fcm: FcmConfig =
            serde_json::from_value(serde_json::json!({"project_id": "p", "access_token": "t"})).unwrap();
        assert_eq!(fcm.endpoint, FCM_DEFAULT_ENDPOINT);
        let fcm: FcmConfig = serde_json::from_value(
            serde_json::json!({"project_id": "p", "service_account_key_file": "/etc/meridian/fcm.json"}),
        )
        .unwrap();
        assert_eq!(
            fcm.service_account_key_file.as_deref(),
            Some(std::path::Path::new("/etc/meridian/fcm.json"))
        );
    }

    #[test]
    fn unknown_fields_are_refused() {
        let r: Result<PushConfig, _> = serde_json::from_str(r#"{"region":"eu","webhook":"x"}"#);
        assert!(r.is_err());
    }

    #[test]
    fn bad_fields_are_named() {
        let mut c = full();
        c.webhook_url = Some("not a url".into());
        assert_eq!(field(&c), "webhook_url");
        let mut c = full();
        c.webhook_url = Some("ftp://host/x".into());
        assert_eq!(field(&c), "webhook_url");

        let mut c = full();
        c.apns.as_mut().unwrap().endpoint = "api.push.apple.com".into();
        assert_eq!(field(&c), "apns.endpoint");
        let mut c = full();
        c.apns.as_mut().unwrap().team_id = "".into();
        assert_eq!(field(&c), "apns.team_id");
        let mut c = full();
        c.apns.as_mut().unwrap().key_id = "AB CD".into();
        assert_eq!(field(&c), "apns.key_id");
        let mut c = full();
        c.apns.as_mut().unwrap().topic = " ".into();
        assert_eq!(field(&c), "apns.topic");
        let mut c = full();
        c.apns.as_mut().unwrap().private_key_pem =
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----".into();
        assert_eq!(field(&c), "apns.private_key_pem");

        let mut c = full();
        c.fcm.as_mut().unwrap().project_id = "My/Project".into();
        assert_eq!(field(&c), "fcm.project_id");
        let mut c = full();
        c.fcm.as_mut().unwrap().access_token = Some("".into());
        assert_eq!(field(&c), "fcm.access_token");
        let mut c = full();
        c.fcm.as_mut().unwrap().service_account_key_file = Some("/nonexistent/key.json".into());
        assert_eq!(field(&c), "fcm.service_account_key_file", "both set");
        let mut c = full();
        c.fcm.as_mut().unwrap().access_token = None;
        assert_eq!(field(&c), "fcm.service_account_key_file", "missing file");
        let mut c = full();
        c.fcm.as_mut().unwrap().endpoint = "".into();
        assert_eq!(field(&c), "fcm.endpoint");

        let mut c = full();
        c.max_attempts = 0;
        assert_eq!(field(&c), "max_attempts");
        let mut c = full();
        c.first_backoff_ms = 0;
        assert_eq!(field(&c), "first_backoff_ms");
        let mut c = full();
        c.max_backoff_ms = 10;
        assert_eq!(field(&c), "max_backoff_ms");
        let mut c = full();
        c.concurrency = 0;
        assert_eq!(field(&c), "concurrency");
        let mut c = full();
        c.shutdown_grace_ms = 3_600_000;
        assert_eq!(field(&c), "shutdown_grace_ms");
    }

    #[test]
    fn env_override_replaces_the_webhook_url() {
        let c = full().with_webhook_override(Some("https://hooks.example/push".into()));
        assert_eq!(c.webhook_url.as_deref(), Some("https://hooks.example/push"));
        // Empty means "not set": it does not erase a configured URL.
        let c = full().with_webhook_override(Some("  ".into()));
        assert_eq!(c.webhook_url.as_deref(), Some("http://127.0.0.1:9/hook"));
        let c = PushConfig::new(region()).with_webhook_override(None);
        assert!(c.webhook_url.is_none());
    }

    #[test]
    fn debug_hides_secrets() {
        let text = format!("{:?}", full());
        assert!(!text.contains("PRIVATE KEY"), "{text}");
        assert!(!text.contains("ya29.token"), "{text}");
        assert!(text.contains("TEAM123456"));
    }
}
