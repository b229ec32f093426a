//! Meridian's Rust client SDK: typed calls over the HTTP API that wait out rate limits (a 429's
//! `retry_after_ms`, see [`RetryPolicy`]), sends that retry with the same `client_msg_id`
//! until they are acknowledged, and a WebSocket sync loop that keeps the device checkpoint,
//! detects gaps, reconnects with backoff and reports when a resync is due.
//!
//! Users are pinned to a region: a gateway that does not serve the user answers
//! `421 wrong_region` with the serving region's endpoint (a WebSocket gets a `wrong_region`
//! frame and close code 4421). The client then switches its base URL to that endpoint (every
//! clone of it, the sync loop included) and makes the call once more there; a send keeps its
//! `client_msg_id`, so it is stored once wherever it lands.
//!
//! A ten-line chat program:
//!
//! ```no_run
//! # async fn chat() -> Result<(), meridian_client::ClientError> {
//! use meridian_client::{Client, Checkpoint, SyncEvent};
//! let ann = Client::new("http://127.0.0.1:7001", "<ann's token>");
//! let cid = ann.create_direct("bob").await?.conversation_id;
//! ann.send_text(&cid, "hello bob").await?;
//! let mut sync = ann.sync(Checkpoint::default());
//! while let Some(event) = sync.next().await {
//!     if let SyncEvent::Entry(e) = event? { println!("{}: {}", e.sender.unwrap_or_default(), e.body); }
//! }
//! # Ok(()) }
//! ```
//!
//! # Layout
//! - this file: [`Client`] (typed calls), [`ClientError`], the response types.
//! - [`sync`]: [`SyncStream`], the WebSocket sync loop, and [`Checkpoint`].

pub mod sync;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

pub use sync::{Checkpoint, SyncEvent, SyncStream};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error body.
    #[error("{status} {code}: {message}")]
    Api {
        status: u16,
        code: String,
        message: String,
        body: Value,
        /// How long the server asked the caller to wait (a 429's or 503's `retry_after_ms`
        /// body field, else its `Retry-After` header in seconds).
        retry_after: Option<Duration>,
    },
    /// The device's checkpoint cannot be continued: resync from the storage timelines.
    #[error("resync required (epoch {epoch}, head {head})")]
    ResyncRequired { epoch: String, head: u64 },
    /// The token expired (a 401, or the WebSocket's close code 4401) and no
    /// [`TokenProvider`] is set to fetch a fresh one.
    #[error("the token expired and the client has no token provider")]
    TokenExpired,
    /// The user is served by another region, and the client could not follow the answer
    /// (it named no endpoint, or the endpoint answered `wrong_region` too).
    #[error("the user is served by region {region} ({endpoint})")]
    WrongRegion { region: String, endpoint: String },
    #[error("transport: {0}")]
    Transport(String),
    #[error("unexpected response: {0}")]
    Decode(String),
}

impl ClientError {
    /// Whether the same call may succeed later (transport failures, 5xx, 429).
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Transport(_) => true,
            ClientError::Api { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        }
    }

    /// A 429: the caller's rate limit is spent.
    pub fn is_rate_limited(&self) -> bool {
        matches!(self, ClientError::Api { status: 429, .. })
    }
}

/// The 202 answer to a send.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct Accepted {
    pub message_id: String,
    pub cursor: String,
    pub accepted_at: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Conversation {
    pub conversation_id: String,
    pub kind: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub member_count: usize,
    #[serde(default)]
    pub members: Vec<Member>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Member {
    pub user_id: String,
    pub role: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ConversationSummary {
    pub conversation_id: String,
    pub kind: String,
    #[serde(default)]
    pub name: String,
    pub last_message: Option<Message>,
    pub unread: u32,
    pub muted: bool,
    pub pinned: bool,
    pub member_count: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct Message {
    pub message_id: String,
    pub cursor: String,
    pub sender: String,
    #[serde(rename = "type")]
    pub msg_type: String,
    pub body: Option<Value>,
    pub sent_at: u64,
    pub recalled: bool,
}

/// What to search for (`GET /v1/search`): `SearchRequest::new("words")`, then the filters.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SearchRequest {
    pub q: String,
    pub conversation_id: Option<String>,
    pub sender: Option<String>,
    /// Sent before / after this time (ms since the epoch, exclusive).
    pub before_ms: Option<u64>,
    pub after_ms: Option<u64>,
    /// 1–100; the server's default (20) when `None`.
    pub limit: Option<usize>,
    /// The `next_cursor` of the previous page of the same query.
    pub cursor: Option<String>,
}

impl SearchRequest {
    pub fn new(q: impl Into<String>) -> Self {
        Self {
            q: q.into(),
            ..Default::default()
        }
    }

    fn path(&self) -> String {
        let mut url = reqwest::Url::parse("http://search.invalid/v1/search").expect("a fixed valid URL");
        {
            let mut pairs = url.query_pairs_mut();
            pairs.append_pair("q", &self.q);
            let mut opt = |k: &str, v: Option<String>| {
                if let Some(v) = v {
                    pairs.append_pair(k, &v);
                }
            };
            opt("conversation_id", self.conversation_id.clone());
            opt("sender", self.sender.clone());
            opt("before", self.before_ms.map(|v| v.to_string()));
            opt("after", self.after_ms.map(|v| v.to_string()));
            opt("limit", self.limit.map(|v| v.to_string()));
            opt("cursor", self.cursor.clone());
        }
        format!("/v1/search?{}", url.query().unwrap_or_default())
    }
}

/// One search result: the message as history shows it, its conversation, and where the
/// query matched.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct SearchHit {
    #[serde(flatten)]
    pub message: Message,
    pub conversation_id: String,
    pub highlights: Vec<Highlight>,
}

/// A fragment of a message's text and the matched ranges in it (`[start, end)`, in
/// characters from the fragment's start).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct Highlight {
    pub fragment: String,
    pub ranges: Vec<[usize; 2]>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

/// One inbox entry. `kind` names the event; a message carries its fields.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct Entry {
    pub seq: u64,
    pub conversation_id: String,
    pub kind: String,
    pub cursor: Option<String>,
    pub message_id: Option<String>,
    pub sender: Option<String>,
    #[serde(default)]
    pub body: Value,
    pub sent_at: Option<u64>,
    /// Every field as sent (state-change details included).
    #[serde(skip)]
    pub raw: Value,
}

impl Entry {
    pub(crate) fn from_value(v: Value) -> Result<Entry, ClientError> {
        let mut e: Entry =
            serde_json::from_value(v.clone()).map_err(|e| ClientError::Decode(e.to_string()))?;
        e.raw = v;
        Ok(e)
    }
}

/// A page of the inbox.
#[derive(Debug, Clone)]
pub struct SyncPage {
    pub epoch: String,
    pub entries: Vec<Entry>,
    pub head: u64,
    pub has_more: bool,
}

/// How calls retry.
///
/// Every call waits out a 429 and is made again, up to `rate_limited_retries` times: the
/// gateway refuses a rate-limited request before doing anything, so repeating it is safe
/// even for calls that are not idempotent (creating a group), and it says how long to wait.
/// This is on by default because a 429 is the server asking for exactly that; a caller that
/// would rather see the 429 (to shed load itself) sets `rate_limited_retries` to 0.
///
/// Sends also retry transport failures and 5xx, `attempts` times with backoff, with the
/// same `client_msg_id`.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts of a send (transport failures, 5xx); 1 means no retry.
    pub attempts: u32,
    pub first_backoff: Duration,
    pub max_backoff: Duration,
    /// How many 429s one call waits out before returning the 429.
    pub rate_limited_retries: u32,
    /// The longest wait one 429 may ask for; a longer one is returned as the error at once
    /// instead of blocking the caller (a 429 without a hint waits the send backoff).
    pub max_rate_limited_wait: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 20,
            first_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            rate_limited_retries: 10,
            max_rate_limited_wait: Duration::from_secs(30),
        }
    }
}

/// Fetches a fresh token (from the app's backend, which mints them) when the current one
/// expires: the gateway answers 401, and closes WebSockets with 4401 at the token's `exp`.
pub type TokenProvider =
    Arc<dyn Fn() -> futures::future::BoxFuture<'static, Result<String, ClientError>> + Send + Sync>;

/// A user's connection to their region's gateway. Cheap to clone; clones share the token.
#[derive(Clone)]
pub struct Client {
    /// Shared by clones: following a `421 wrong_region` moves all of them.
    base: Arc<RwLock<String>>,
    token: Arc<RwLock<String>>,
    token_provider: Option<TokenProvider>,
    http: reqwest::Client,
    retry: RetryPolicy,
    /// Every region's gateway, asked who serves the user when the current one cannot be
    /// reached at all (see [`Client::with_region_endpoints`]).
    regions: Arc<Vec<String>>,
}

/// How long each region may take to say whether it serves the user, while the current
/// gateway is unreachable.
const ASK_REGION_TIMEOUT: Duration = Duration::from_secs(3);

impl Client {
    pub fn new(base_url: impl Into<String>, token: impl Into<String>) -> Client {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap_or_default();
        Client::with_http(base_url, token, http)
    }

    /// A client over `http`, whose connection pool (and settings) many clients may share:
    /// a process acting for many users needs one pool, not one per user.
    pub fn with_http(base_url: impl Into<String>, token: impl Into<String>, http: reqwest::Client) -> Client {
        Client {
            base: Arc::new(RwLock::new(base_url.into().trim_end_matches('/').to_string())),
            token: Arc::new(RwLock::new(token.into())),
            token_provider: None,
            http,
            retry: RetryPolicy::default(),
            regions: Arc::new(Vec::new()),
        }
    }

    /// The gateways of every region. A lost region cannot answer `421` to point its users at
    /// the region that took them over: with these, a call whose gateway cannot be reached at
    /// all asks each other region `GET /v1/me`, follows the one that serves the user (200,
    /// or a 421 naming another reachable region) and is made once more there. While no
    /// failover has happened the others answer 421 naming the unreachable home, and the
    /// call fails as before: a user is never served by a region that does not own them.
    pub fn with_region_endpoints<I, S>(mut self, endpoints: I) -> Client
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.regions = Arc::new(
            endpoints
                .into_iter()
                .map(|e| e.into().trim_end_matches('/').to_string())
                .collect(),
        );
        self
    }

    /// Asks the other regions which one serves the user now and follows it; whether it did.
    async fn find_serving_region(&self) -> bool {
        let current = self.base_url();
        for endpoint in self.regions.iter().filter(|e| **e != current) {
            let answer = self
                .http
                .get(format!("{endpoint}/v1/me"))
                .bearer_auth(self.token())
                .timeout(ASK_REGION_TIMEOUT)
                .send()
                .await;
            let Ok(resp) = answer else { continue };
            let status = resp.status().as_u16();
            let body: Value = resp.json().await.unwrap_or_default();
            let serving = match status {
                200 => endpoint.clone(),
                421 => body["endpoint"]
                    .as_str()
                    .unwrap_or_default()
                    .trim_end_matches('/')
                    .to_string(),
                _ => continue,
            };
            if serving != current && self.follow(&serving) {
                return true;
            }
        }
        false
    }

    pub fn with_retry(mut self, retry: RetryPolicy) -> Client {
        self.retry = retry;
        self
    }

    /// Fetch fresh tokens from `provider` when the current one expires: a call answered 401
    /// is made once more with a fresh token, and the sync loop reconnects with one.
    pub fn with_token_provider(mut self, provider: TokenProvider) -> Client {
        self.token_provider = Some(provider);
        self
    }

    /// The gateway this client talks to now (it changes when a `421 wrong_region` is
    /// followed).
    pub fn base_url(&self) -> String {
        self.base.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Talks to `endpoint` from now on (every clone of this client). Returns false, and
    /// changes nothing, for an empty endpoint or the current one: following those would
    /// only ask the same gateway again.
    pub(crate) fn follow(&self, endpoint: &str) -> bool {
        let endpoint = endpoint.trim_end_matches('/');
        let mut base = self.base.write().unwrap_or_else(|p| p.into_inner());
        if endpoint.is_empty() || *base == endpoint {
            return false;
        }
        tracing::info!(from = %*base, to = endpoint, "the user is served by another region; following");
        *base = endpoint.to_string();
        true
    }

    /// The current token.
    pub fn token(&self) -> String {
        self.token.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the token with a fresh one from the [`TokenProvider`].
    pub async fn refresh_token(&self) -> Result<(), ClientError> {
        let provider = self.token_provider.as_ref().ok_or(ClientError::TokenExpired)?;
        let fresh = provider().await?;
        *self.token.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(())
    }

    /// One call; error bodies become [`ClientError::Api`]. A 429 is waited out and the call
    /// made again (see [`RetryPolicy`]); a 401 is retried once with a fresh token when a
    /// [`TokenProvider`] is set; a `421 wrong_region` switches the client to the serving
    /// region's endpoint and is made once more there ([`ClientError::WrongRegion`] if that
    /// cannot be done); a gateway that cannot be reached at all makes the client ask the
    /// other regions who serves the user, when it knows them ([`Client::with_region_endpoints`]).
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        let mut refreshed = false;
        let mut followed = false;
        let mut asked_regions = false;
        let mut rate_limited = 0;
        let mut backoff = self.retry.first_backoff;
        loop {
            match self.call_once(method.clone(), path, body).await {
                Err(ClientError::WrongRegion { region, endpoint }) => {
                    if followed || !self.follow(&endpoint) {
                        return Err(ClientError::WrongRegion { region, endpoint });
                    }
                    followed = true;
                }
                Err(ClientError::Transport(e)) if !asked_regions && !self.regions.is_empty() => {
                    asked_regions = true;
                    if !self.find_serving_region().await {
                        return Err(ClientError::Transport(e));
                    }
                }
                Err(ClientError::Api { status: 401, .. }) if !refreshed && self.token_provider.is_some() => {
                    self.refresh_token().await?;
                    refreshed = true;
                }
                Err(ClientError::Api {
                    status: 429,
                    retry_after,
                    ..
                }) if rate_limited < self.retry.rate_limited_retries
                    && retry_after.unwrap_or(backoff) <= self.retry.max_rate_limited_wait =>
                {
                    let wait = retry_after.unwrap_or(backoff);
                    tracing::debug!(path, ?wait, "rate limited; waiting as asked");
                    tokio::time::sleep(wait).await;
                    backoff = (backoff * 2).min(self.retry.max_backoff);
                    rate_limited += 1;
                }
                other => return other,
            }
        }
    }

    async fn call_once(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base_url()))
            .bearer_auth(self.token());
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        let status = resp.status().as_u16();
        // Delta-seconds only: the gateway never sends the HTTP-date form.
        let retry_after_header = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        let value: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(format!("{status}: {e}")))?
        };
        if status < 400 {
            return Ok(value);
        }
        let code = value["error"].as_str().unwrap_or_default().to_string();
        if status == 421 && code == "wrong_region" {
            return Err(ClientError::WrongRegion {
                region: value["region"].as_str().unwrap_or_default().to_string(),
                endpoint: value["endpoint"].as_str().unwrap_or_default().to_string(),
            });
        }
        if code == "resync_required" {
            return Err(ClientError::ResyncRequired {
                epoch: value["epoch"].as_str().unwrap_or_default().to_string(),
                head: value["head"].as_u64().unwrap_or(0),
            });
        }
        // The body's milliseconds are exact; the header rounds up to whole seconds.
        let retry_after = value["retry_after_ms"]
            .as_u64()
            .map(Duration::from_millis)
            .or(retry_after_header);
        Err(ClientError::Api {
            status,
            message: value["message"].as_str().unwrap_or_default().to_string(),
            code,
            body: value,
            retry_after,
        })
    }

    async fn typed<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<T, ClientError> {
        let v = self.call(method, path, body).await?;
        serde_json::from_value(v).map_err(|e| ClientError::Decode(e.to_string()))
    }

    pub async fn me(&self) -> Result<Value, ClientError> {
        self.call(reqwest::Method::GET, "/v1/me", None).await
    }

    pub async fn create_direct(&self, other: &str) -> Result<Conversation, ClientError> {
        let body = json!({"kind": "direct", "members": [other]});
        self.typed(reqwest::Method::POST, "/v1/conversations", Some(&body))
            .await
    }

    pub async fn create_group(&self, name: &str, members: &[&str]) -> Result<Conversation, ClientError> {
        let body = json!({"kind": "group", "name": name, "members": members});
        self.typed(reqwest::Method::POST, "/v1/conversations", Some(&body))
            .await
    }

    pub async fn conversation(&self, cid: &str) -> Result<Conversation, ClientError> {
        self.typed(reqwest::Method::GET, &format!("/v1/conversations/{cid}"), None)
            .await
    }

    pub async fn conversations(
        &self,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<Page<ConversationSummary>, ClientError> {
        let path = format!(
            "/v1/conversations?limit={limit}&cursor={}",
            cursor.unwrap_or_default()
        );
        let v = self.call(reqwest::Method::GET, &path, None).await?;
        page(v, "conversations")
    }

    /// Sends with a fresh client_msg_id, retrying it until acknowledged.
    pub async fn send_text(&self, cid: &str, text: &str) -> Result<Accepted, ClientError> {
        let id = uuid::Uuid::now_v7().to_string();
        self.send(cid, &id, "text", &json!({"text": text})).await
    }

    /// Sends, retrying transport failures and 5xx with the same `client_msg_id`: the server
    /// stores the message once however many attempts reach it (also when a `421
    /// wrong_region` moves the send to the user's serving region). (429s are waited out by every
    /// call; one that still comes back has spent the [`RetryPolicy`]'s rate-limit budget.)
    pub async fn send(
        &self,
        cid: &str,
        client_msg_id: &str,
        msg_type: &str,
        body: &Value,
    ) -> Result<Accepted, ClientError> {
        let req = json!({"client_msg_id": client_msg_id, "type": msg_type, "body": body});
        let path = format!("/v1/conversations/{cid}/messages");
        let mut backoff = self.retry.first_backoff;
        let mut attempt = 1;
        loop {
            match self.typed(reqwest::Method::POST, &path, Some(&req)).await {
                Err(e) if e.is_retryable() && !e.is_rate_limited() && attempt < self.retry.attempts => {
                    tracing::debug!(error = %e, attempt, "send failed; retrying with the same client_msg_id");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.retry.max_backoff);
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// History after a cursor (`Some("")`: from the beginning), before one, or the latest.
    pub async fn history(
        &self,
        cid: &str,
        after: Option<&str>,
        before: Option<&str>,
        limit: usize,
    ) -> Result<Page<Message>, ClientError> {
        let mut path = format!("/v1/conversations/{cid}/messages?limit={limit}");
        if let Some(a) = after {
            path.push_str(&format!("&after={a}"));
        }
        if let Some(b) = before {
            path.push_str(&format!("&before={b}"));
        }
        let v = self.call(reqwest::Method::GET, &path, None).await?;
        page(v, "messages")
    }

    /// Full-text search over the caller's conversations, newest first (`GET /v1/search`).
    /// Continue with `SearchRequest { cursor: page.next_cursor, ..req }` until it is `None`.
    pub async fn search(&self, req: &SearchRequest) -> Result<Page<SearchHit>, ClientError> {
        let v = self.call(reqwest::Method::GET, &req.path(), None).await?;
        page(v, "messages")
    }

    pub async fn mark_read(&self, cid: &str, cursor: &str) -> Result<(), ClientError> {
        let body = json!({"cursor": cursor});
        self.call(
            reqwest::Method::PUT,
            &format!("/v1/conversations/{cid}/read"),
            Some(&body),
        )
        .await
        .map(|_| ())
    }

    pub async fn recall(&self, cid: &str, message_id: &str) -> Result<(), ClientError> {
        let path = format!("/v1/conversations/{cid}/messages/{message_id}/recall");
        self.call(reqwest::Method::POST, &path, Some(&json!({})))
            .await
            .map(|_| ())
    }

    /// One inbox page after `after`; [`ClientError::ResyncRequired`] when the epoch moved on
    /// or `after` fell out of the inbox TTL.
    pub async fn sync_page(
        &self,
        after: u64,
        epoch: Option<&str>,
        limit: usize,
    ) -> Result<SyncPage, ClientError> {
        let path = format!(
            "/v1/sync?after={after}&limit={limit}&epoch={}",
            epoch.unwrap_or_default()
        );
        let v = self.call(reqwest::Method::GET, &path, None).await?;
        let entries = v["entries"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(Entry::from_value)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(SyncPage {
            epoch: v["epoch"].as_str().unwrap_or_default().to_string(),
            entries,
            head: v["head"].as_u64().unwrap_or(0),
            has_more: v["has_more"].as_bool().unwrap_or(false),
        })
    }

    /// The WebSocket sync loop from `checkpoint` (see [`SyncStream`]).
    pub fn sync(&self, checkpoint: Checkpoint) -> SyncStream {
        SyncStream::new(self.clone(), checkpoint, Timelines::default())
    }

    /// The sync loop from `checkpoint`, with what the device already holds of the storage
    /// timelines (`timelines`, persisted by the app), so a resync hands out exactly what is
    /// missing.
    pub fn sync_with_timelines(&self, checkpoint: Checkpoint, timelines: Timelines) -> SyncStream {
        SyncStream::new(self.clone(), checkpoint, timelines)
    }

    /// Resync from the storage timelines (docs/design.md §5): lists the caller's
    /// conversations, reads each timeline after the last cursor `timelines` holds for it
    /// (from its start when none), and returns every message whose id `timelines` has not
    /// seen, oldest first per conversation, recording them. Storage timelines are the same
    /// in every region, so after a failover this is exact: nothing lost, nothing doubled.
    pub async fn resync_timelines(
        &self,
        timelines: &mut Timelines,
    ) -> Result<Vec<(String, Message)>, ClientError> {
        const PAGE: usize = 100;
        const MAX_PAGES: usize = 10_000;
        let mut cids = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let page = self.conversations(PAGE, cursor.as_deref()).await?;
            cids.extend(page.items.into_iter().map(|c| c.conversation_id));
            match page.next_cursor {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        let mut found = Vec::new();
        for cid in cids {
            let mut after = timelines.cursors.get(&cid).cloned().unwrap_or_default();
            for _ in 0..MAX_PAGES {
                let page = self.history(&cid, Some(&after), None, PAGE).await?;
                for m in page.items {
                    after = m.cursor.clone();
                    timelines.cursors.insert(cid.clone(), m.cursor.clone());
                    if timelines.seen.insert(m.message_id.clone()) {
                        found.push((cid.clone(), m));
                    }
                }
                match page.next_cursor {
                    Some(next) => after = next,
                    None => break,
                }
            }
        }
        Ok(found)
    }
}

/// What a device holds of the storage timelines: per conversation the cursor of the last
/// message it read from the timeline, and the ids of every message it has (read from a
/// timeline or received in its inbox). Persist it with the [`Checkpoint`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timelines {
    pub cursors: std::collections::BTreeMap<String, String>,
    pub seen: std::collections::BTreeSet<String>,
}

fn page<T: DeserializeOwned>(mut v: Value, field: &str) -> Result<Page<T>, ClientError> {
    let items = serde_json::from_value(v[field].take()).map_err(|e| ClientError::Decode(e.to_string()))?;
    Ok(Page {
        items,
        next_cursor: v["next_cursor"].as_str().map(str::to_string),
    })
}
