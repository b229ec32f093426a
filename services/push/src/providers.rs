//! The providers' HTTP clients, and one attempt at one notification, classified so the
//! caller knows whether to retry.
//!
//! Retry rules (the same for every provider): 2xx is sent; 429 and 5xx are retried, after
//! the provider's `Retry-After` if it gave one; any other 4xx is permanent (a bad or
//! unregistered token, a wrong topic: resending cannot fix it); transport errors (connect,
//! reset, timeout) are retried. APNs' `403 ExpiredProviderToken` and FCM's 401 (with a
//! minted access token) are the 4xx retried: the cached token is dropped and the retry
//! carries a fresh one. APNs 410 and FCM 404 `UNREGISTERED` say the device token is dead:
//! [`Attempt::Unregistered`], and the dispatcher has the registration removed.

use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use reqwest::{Client, Response, StatusCode};

use crate::apns::{ApnsSigner, TokenCache};
use crate::config::PushConfig;
use crate::fcm_auth::{ServiceAccountKey, ServiceAccountTokens, TokenError};
use crate::payload::{apns_body, apns_kind_headers, fcm_body, webhook_body, Notification};
use crate::PushError;

/// One provider request may take this long, connect included; a hung provider must not
/// pin a send slot.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How much of an error response is kept for the log.
const ERROR_BODY_LIMIT: usize = 512;

/// A device platform, as registered with `PUT /v1/devices/{device_id}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Provider {
    Webhook,
    Apns,
    Fcm,
}

impl Provider {
    pub const ALL: [Provider; 3] = [Provider::Webhook, Provider::Apns, Provider::Fcm];

    pub fn from_platform(platform: &str) -> Option<Provider> {
        match platform {
            "webhook" => Some(Provider::Webhook),
            "apns" => Some(Provider::Apns),
            "fcm" => Some(Provider::Fcm),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Webhook => "webhook",
            Provider::Apns => "apns",
            Provider::Fcm => "fcm",
        }
    }
}

/// What one attempt came to.
#[derive(Debug)]
pub(crate) enum Attempt {
    Sent,
    /// Worth another try; `after` is the provider's `Retry-After`, when it sent one.
    Retry {
        reason: String,
        after: Option<Duration>,
    },
    /// Resending will not help.
    Permanent {
        reason: String,
    },
    /// The provider says the device token is dead (the app was uninstalled, the token
    /// rotated): resending will not help, and the registration should go.
    Unregistered {
        reason: String,
    },
}

pub(crate) struct Providers {
    webhook: Option<Webhook>,
    apns: Option<Apns>,
    fcm: Option<Fcm>,
}

struct Webhook {
    client: Client,
    url: String,
}

struct Apns {
    client: Client,
    endpoint: String,
    topic: String,
    tokens: TokenCache,
}

struct Fcm {
    client: Client,
    url: String,
    auth: FcmAuth,
}

enum FcmAuth {
    Fixed(HeaderValue),
    // Boxed: one per process, and the key pair makes it ten times the fixed variant.
    ServiceAccount(Box<ServiceAccountTokens>),
}

impl Providers {
    /// Builds a client per configured provider. Expects a validated config.
    pub(crate) fn new(cfg: &PushConfig) -> Result<Self, PushError> {
        let http = || {
            Client::builder()
                .timeout(REQUEST_TIMEOUT)
                .connect_timeout(CONNECT_TIMEOUT)
                .user_agent(concat!("meridian-push/", env!("CARGO_PKG_VERSION")))
        };
        let build = |b: reqwest::ClientBuilder| b.build().map_err(|e| PushError::Client(e.to_string()));

        let webhook = match &cfg.webhook_url {
            Some(url) => Some(Webhook {
                client: build(http())?,
                url: url.clone(),
            }),
            None => None,
        };
        let apns = match &cfg.apns {
            Some(a) => {
                let signer = ApnsSigner::from_pem(&a.private_key_pem)
                    .map_err(|e| PushError::config("apns.private_key_pem", e.to_string()))?;
                // APNs speaks only HTTP/2. Prior knowledge makes that explicit: over https
                // it offers only "h2" in ALPN, and over http:// (tests, a local relay) it
                // speaks h2c from the first byte instead of HTTP/1.1 plus an upgrade.
                let client = build(http().http2_prior_knowledge())?;
                Some(Apns {
                    client,
                    endpoint: a.endpoint.trim_end_matches('/').to_string(),
                    topic: a.topic.clone(),
                    tokens: TokenCache::new(signer, a.team_id.clone(), a.key_id.clone()),
                })
            }
            None => None,
        };
        let fcm = match &cfg.fcm {
            Some(f) => {
                let client = build(http())?;
                let auth = match (&f.service_account_key_file, &f.access_token) {
                    (Some(path), _) => {
                        let field = "fcm.service_account_key_file";
                        let key =
                            ServiceAccountKey::from_file(path).map_err(|e| PushError::config(field, e))?;
                        FcmAuth::ServiceAccount(Box::new(
                            ServiceAccountTokens::new(&key, client.clone())
                                .map_err(|e| PushError::config(field, e))?,
                        ))
                    }
                    (None, Some(token)) => {
                        let mut bearer = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
                            PushError::config("fcm.access_token", "is not a valid header value")
                        })?;
                        bearer.set_sensitive(true);
                        FcmAuth::Fixed(bearer)
                    }
                    (None, None) => {
                        return Err(PushError::config(
                            "fcm.service_account_key_file",
                            "set exactly one of service_account_key_file and access_token",
                        ))
                    }
                };
                Some(Fcm {
                    client,
                    url: format!(
                        "{}/v1/projects/{}/messages:send",
                        f.endpoint.trim_end_matches('/'),
                        f.project_id
                    ),
                    auth,
                })
            }
            None => None,
        };
        Ok(Self { webhook, apns, fcm })
    }

    pub(crate) fn configured(&self, p: Provider) -> bool {
        match p {
            Provider::Webhook => self.webhook.is_some(),
            Provider::Apns => self.apns.is_some(),
            Provider::Fcm => self.fcm.is_some(),
        }
    }

    /// One attempt. An unconfigured provider is permanent (callers check `configured`).
    pub(crate) async fn send(&self, p: Provider, n: &Notification) -> Attempt {
        match p {
            Provider::Webhook => match &self.webhook {
                Some(w) => w.send(n).await,
                None => not_configured(p),
            },
            Provider::Apns => match &self.apns {
                Some(a) => a.send(n).await,
                None => not_configured(p),
            },
            Provider::Fcm => match &self.fcm {
                Some(f) => f.send(n).await,
                None => not_configured(p),
            },
        }
    }
}

fn not_configured(p: Provider) -> Attempt {
    Attempt::Permanent {
        reason: format!("provider {} is not configured", p.as_str()),
    }
}

impl Webhook {
    async fn send(&self, n: &Notification) -> Attempt {
        let req = self.client.post(&self.url).json(&webhook_body(n));
        match req.send().await {
            Ok(resp) => classify(resp).await,
            Err(e) => transport(e),
        }
    }
}

impl Apns {
    async fn send(&self, n: &Notification) -> Attempt {
        // The token goes into the path: APNs tokens are hex, and anything else must not be
        // able to reshape the request.
        if n.token.is_empty() || !n.token.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Attempt::Permanent {
                reason: "device token is not an APNs token (expected hex digits)".into(),
            };
        }
        let jwt = self.tokens.token();
        let (push_type, priority) = apns_kind_headers(n);
        let mut headers = HeaderMap::new();
        match HeaderValue::from_str(&format!("bearer {jwt}")) {
            Ok(mut v) => {
                v.set_sensitive(true);
                headers.insert(AUTHORIZATION, v);
            }
            Err(_) => {
                return Attempt::Permanent {
                    reason: "provider token is not a header value".into(),
                }
            }
        }
        match HeaderValue::from_str(&self.topic) {
            Ok(v) => headers.insert("apns-topic", v),
            Err(_) => {
                return Attempt::Permanent {
                    reason: "apns topic is not a header value".into(),
                }
            }
        };
        headers.insert("apns-push-type", HeaderValue::from_static(push_type));
        headers.insert("apns-priority", HeaderValue::from_static(priority));
        let url = format!("{}/3/device/{}", self.endpoint, n.token);
        let req = self.client.post(url).headers(headers).json(&apns_body(n));
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => return transport(e),
        };
        // 410: the token is no longer active for the topic (`Unregistered`, `ExpiredToken`).
        if resp.status() == StatusCode::GONE {
            return Attempt::Unregistered {
                reason: format!("410 {}", error_body(resp).await),
            };
        }
        if resp.status() == StatusCode::FORBIDDEN {
            let body = error_body(resp).await;
            if body.contains("ExpiredProviderToken") {
                self.tokens.invalidate(&jwt);
                return Attempt::Retry {
                    reason: format!("403 {body}"),
                    after: None,
                };
            }
            return Attempt::Permanent {
                reason: format!("403 {body}"),
            };
        }
        classify(resp).await
    }
}

impl Fcm {
    async fn send(&self, n: &Notification) -> Attempt {
        let bearer = match &self.auth {
            FcmAuth::Fixed(b) => b.clone(),
            FcmAuth::ServiceAccount(tokens) => match tokens.bearer().await {
                Ok(b) => b,
                Err(TokenError::Retry(reason)) => {
                    return Attempt::Retry {
                        reason: format!("no access token: {reason}"),
                        after: None,
                    }
                }
                Err(TokenError::Permanent(reason)) => {
                    return Attempt::Permanent {
                        reason: format!("no access token: {reason}"),
                    }
                }
            },
        };
        let req = self
            .client
            .post(&self.url)
            .header(AUTHORIZATION, bearer.clone())
            .json(&fcm_body(n));
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => return transport(e),
        };
        match resp.status() {
            // The token expired early or was revoked: a minted one is dropped and the retry
            // carries a fresh one. A fixed token cannot be refreshed.
            StatusCode::UNAUTHORIZED => {
                let reason = format!("401 {}", error_body(resp).await);
                match &self.auth {
                    FcmAuth::ServiceAccount(tokens) => {
                        tokens.invalidate(&bearer).await;
                        Attempt::Retry { reason, after: None }
                    }
                    FcmAuth::Fixed(_) => Attempt::Permanent { reason },
                }
            }
            StatusCode::NOT_FOUND => {
                let body = error_body(resp).await;
                let reason = format!("404 {body}");
                if fcm_says_unregistered(&body) {
                    Attempt::Unregistered { reason }
                } else {
                    Attempt::Permanent { reason }
                }
            }
            _ => classify(resp).await,
        }
    }
}

/// FCM answers a dead registration token with 404 and error code `UNREGISTERED`. A 404
/// without it (a wrong project id, say) says nothing about the device and must not remove
/// it.
fn fcm_says_unregistered(body: &str) -> bool {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(body) else {
        return false;
    };
    v["error"]["details"]
        .as_array()
        .is_some_and(|details| details.iter().any(|d| d["errorCode"] == "UNREGISTERED"))
}

/// The shared status rules (module doc).
async fn classify(resp: Response) -> Attempt {
    let status = resp.status();
    if status.is_success() {
        return Attempt::Sent;
    }
    let after = retry_after(resp.headers());
    let reason = format!("{} {}", status.as_u16(), error_body(resp).await);
    if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
        Attempt::Retry { reason, after }
    } else {
        Attempt::Permanent { reason }
    }
}

fn transport(e: reqwest::Error) -> Attempt {
    // A request we could not even build (bad URL, body) will fail the same way again.
    if e.is_builder() {
        Attempt::Permanent {
            reason: e.to_string(),
        }
    } else {
        Attempt::Retry {
            reason: e.to_string(),
            after: None,
        }
    }
}

/// `Retry-After` in seconds (the HTTP-date form is rare from these providers and ignored).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let secs: u64 = headers.get(RETRY_AFTER)?.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(secs))
}

/// The start of an error response, for the log: APNs and FCM explain themselves in JSON
/// (`{"reason":"BadDeviceToken"}`, `{"error":{"status":"UNREGISTERED",..}}`).
async fn error_body(mut resp: Response) -> String {
    let is_text = resp
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|ct| ct.contains("json") || ct.starts_with("text/"));
    let mut buf = Vec::new();
    while buf.len() < ERROR_BODY_LIMIT {
        match resp.chunk().await {
            Ok(Some(chunk)) => buf.extend_from_slice(&chunk),
            _ => break,
        }
    }
    if !is_text {
        return format!("({} bytes)", buf.len());
    }
    buf.truncate(ERROR_BODY_LIMIT);
    String::from_utf8_lossy(&buf).trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platforms_round_trip() {
        for p in Provider::ALL {
            assert_eq!(Provider::from_platform(p.as_str()), Some(p));
        }
        assert_eq!(Provider::from_platform("sms"), None);
    }

    #[test]
    fn only_fcm_unregistered_errors_name_a_dead_token() {
        let unregistered = r#"{"error":{"code":404,"message":"Requested entity was not found.","status":"NOT_FOUND","details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"UNREGISTERED"}]}}"#;
        assert!(fcm_says_unregistered(unregistered));
        // A wrong project id is a 404 too, without the error code: the device stays.
        let wrong_project =
            r#"{"error":{"code":404,"message":"Requested entity was not found.","status":"NOT_FOUND"}}"#;
        assert!(!fcm_says_unregistered(wrong_project));
        assert!(!fcm_says_unregistered("UNREGISTERED"));
        assert!(!fcm_says_unregistered(""));
    }

    #[test]
    fn retry_after_is_read_in_seconds() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(RETRY_AFTER, HeaderValue::from_static("3"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        h.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&h), None);
    }
}
