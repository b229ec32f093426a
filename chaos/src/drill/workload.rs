//! The drill's workload: simulated users in every region, each with one device running the
//! SDK's WebSocket sync loop, sending one-to-one and group messages at a set total rate
//! (open loop: a send that cannot start because too many are in flight is shed and
//! counted, not queued), and mixing in history reads, read indexes (read back and compared
//! with what the user saw before), recalls of their own messages and reconnects (the sync
//! stream dropped and resumed from its checkpoint every 10-20 s, see [`WorkloadTuning`]).
//!
//! It records every acknowledged send and every received message ([`WorkloadRecord`]); the
//! checker ([`super::check`]) judges the record. Clients follow `421 wrong_region` and
//! reconnect by themselves (the SDK does). Every failed attempt (connection refused, 5xx,
//! a 421 not followed) and every dropped socket counts as an error; a send is retried with
//! its `client_msg_id` as the SDK would, and one that finally fails is expected nowhere.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meridian_client::{Checkpoint, Client, ClientError, RetryPolicy, SyncEvent, SyncStream, TokenProvider};
use meridian_model::{Cursor, OrderKey};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::record::{
    admin_call, now_ms, AckedSend, DrillError, InboxSpan, Receipt, RegionTarget, Sample, Via, WorkloadRecord,
};

/// What to run.
#[derive(Clone, Debug)]
pub struct WorkloadConfig {
    pub regions: Vec<RegionTarget>,
    pub admin_key: String,
    pub users_per_region: usize,
    /// Sends per second, all users together.
    pub rate_per_s: f64,
    pub seed: u64,
    /// Prefix of every user id, so reruns against the same deployment never collide.
    pub run_id: String,
}

/// Knobs a drill keeps at their defaults and a short test turns.
#[derive(Clone, Copy, Debug)]
pub struct WorkloadTuning {
    /// Each device drops its sync stream and resumes from its checkpoint after a time drawn
    /// uniformly from this range (default 10-20 s).
    pub reconnect_every: (Duration, Duration),
}

impl Default for WorkloadTuning {
    fn default() -> Self {
        Self {
            reconnect_every: (Duration::from_secs(10), Duration::from_secs(20)),
        }
    }
}

/// The progress line's figures (cumulative, except the last second's p99).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Progress {
    pub acked: u64,
    pub errors: u64,
    pub delivered: u64,
    pub last_p99_ms: Option<f64>,
}

/// The device id every simulated user's one device has.
const DEVICE: &str = "d1";
/// Attempts of one send, and the backoff between them (the SDK's defaults).
const SEND_ATTEMPTS: u32 = 20;
const SEND_FIRST_BACKOFF: Duration = Duration::from_millis(100);
const SEND_MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Sends in flight at most (each may retry for a while during a fault).
const MAX_IN_FLIGHT_SENDS: usize = 64;
/// Other operations (history, read index, recall) per send.
const OPS_PER_SEND: f64 = 0.25;
/// How long setup waits for users and conversations to reach every region.
const SETUP_WAIT: Duration = Duration::from_secs(60);
/// How long `stop` waits for sends in flight, and then for receipts.
const DRAIN_WAIT: Duration = Duration::from_secs(30);
/// The recall window the gateway applies by default is far longer; recall only fresh ones.
const RECALL_MAX_AGE_MS: u64 = 60_000;
/// Recalls at most this many messages per user.
const MAX_RECALLS_PER_USER: usize = 3;

/// A running workload.
pub struct Workload {
    shared: Arc<Shared>,
    /// Stops the send and operation schedulers.
    stop_sending: CancellationToken,
    /// Stops everything (the sync loops last).
    stop_all: CancellationToken,
    schedulers: Vec<JoinHandle<()>>,
    loops: Vec<JoinHandle<()>>,
    sends: Arc<Semaphore>,
}

struct User {
    id: String,
    home: String,
    client: Client,
    /// The same client (clones share the endpoint and token) making one attempt per send:
    /// the workload retries itself, so every failed attempt is counted.
    sender: Client,
    /// The user's conversations: id and the other members.
    conversations: Vec<(String, Vec<String>)>,
}

/// Per (user, conversation): the newest cursor the user received, and the highest read
/// index they have seen.
#[derive(Default)]
struct ReadState {
    newest: Option<(OrderKey, String)>,
    read: Option<(OrderKey, String)>,
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    acked: AtomicU64,
    delivered: AtomicU64,
    errors: AtomicU64,
    /// f64 bits of the last second's p99; `u64::MAX`: none.
    last_p99_bits: AtomicU64,
}

#[derive(Default)]
struct Book {
    acked: Vec<AckedSend>,
    receipts: Vec<Receipt>,
    samples: Vec<Sample>,
    recalled: Vec<String>,
    read_regressions: Vec<String>,
    counts: BTreeMap<String, u64>,
    inbox: Vec<InboxSpan>,
    /// Acked send time by message id (latency: send → first receipt by a recipient).
    sent_at: HashMap<String, u64>,
    /// First receipt by a recipient of messages not acked yet (live can beat the 202).
    first_receipt: HashMap<String, u64>,
    /// Messages some recipient received already.
    reached: HashSet<String>,
    /// (user, message id) received.
    received: HashSet<(String, String)>,
    /// Latencies of this second.
    latencies: Vec<f64>,
    read: HashMap<(String, String), ReadState>,
    /// Per user: own acked messages (conversation, message id, acked at).
    own: HashMap<String, Vec<(String, String, u64)>>,
    recalls_by_user: HashMap<String, usize>,
}

impl Book {
    fn count(&mut self, kind: &str) {
        *self.counts.entry(kind.to_string()).or_insert(0) += 1;
    }
}

struct Shared {
    cfg: WorkloadConfig,
    started: Instant,
    started_at_ms: u64,
    counters: Counters,
    book: Mutex<Book>,
    users: Vec<User>,
    /// Endpoint → region name, to name the region that answered.
    regions_by_endpoint: HashMap<String, String>,
}

impl Shared {
    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn error(&self, kind: &str) {
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        self.book().count(kind);
    }

    fn region_of(&self, client: &Client, fallback: &str) -> String {
        self.regions_by_endpoint
            .get(client.base_url().trim_end_matches('/'))
            .cloned()
            .unwrap_or_else(|| fallback.to_string())
    }
}

impl Workload {
    /// Provisions the users (`<run_id>-<region>-u<i>`, homed in every region), their
    /// conversations (a direct one from each user to the same-numbered user of the next
    /// region, and one group of everyone), starts every device's sync loop, then the senders.
    pub async fn start(cfg: WorkloadConfig, shutdown: CancellationToken) -> Result<Workload, DrillError> {
        Self::start_tuned(cfg, WorkloadTuning::default(), shutdown).await
    }

    /// [`Workload::start`] with other [`WorkloadTuning`].
    pub async fn start_tuned(
        cfg: WorkloadConfig,
        tuning: WorkloadTuning,
        shutdown: CancellationToken,
    ) -> Result<Workload, DrillError> {
        if cfg.regions.is_empty() || cfg.users_per_region == 0 {
            return Err(DrillError::Setup("no regions or no users".into()));
        }
        if !(cfg.rate_per_s > 0.0 && cfg.rate_per_s.is_finite()) {
            return Err(DrillError::Setup(format!(
                "rate_per_s {} is not positive",
                cfg.rate_per_s
            )));
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| DrillError::Setup(e.to_string()))?;
        let mut ids: Vec<(String, String)> = Vec::new();
        for r in &cfg.regions {
            for i in 0..cfg.users_per_region {
                ids.push((format!("{}-{}-u{i}", cfg.run_id, r.region), r.region.clone()));
            }
        }
        let endpoint_of = |region: &str| -> String {
            cfg.regions
                .iter()
                .find(|r| r.region == region)
                .map(|r| r.endpoint.trim_end_matches('/').to_string())
                .unwrap_or_default()
        };
        for (id, home) in &ids {
            let body = json!({"home_region": home});
            let path = format!("/v1/admin/users/{id}");
            let (st, b) = admin_retry(
                &http,
                &endpoint_of(home),
                &cfg.admin_key,
                reqwest::Method::PUT,
                &path,
                Some(&body),
            )
            .await?;
            if st != 200 {
                return Err(DrillError::Setup(format!("provisioning {id}: {st} {b}")));
            }
        }
        // Every region knows every user before anyone opens a conversation with them.
        let mut tokens = HashMap::new();
        for r in &cfg.regions {
            for (id, _) in &ids {
                let token = mint_token(&http, &r.endpoint, &cfg.admin_key, id).await?;
                tokens.insert((r.region.clone(), id.clone()), token);
            }
        }
        let mut users: Vec<User> = ids
            .iter()
            .map(|(id, home)| {
                let provider = token_provider(
                    http.clone(),
                    cfg.regions.clone(),
                    cfg.admin_key.clone(),
                    id.clone(),
                );
                let client = Client::with_http(
                    endpoint_of(home),
                    tokens[&(home.clone(), id.clone())].clone(),
                    http.clone(),
                )
                .with_token_provider(provider)
                // As a real app knows every region's endpoint: when its home region is lost,
                // the SDK finds the region that took its users over.
                .with_region_endpoints(cfg.regions.iter().map(|r| r.endpoint.clone()));
                let sender = client.clone().with_retry(RetryPolicy {
                    attempts: 1,
                    ..RetryPolicy::default()
                });
                User {
                    id: id.clone(),
                    home: home.clone(),
                    client,
                    sender,
                    conversations: Vec::new(),
                }
            })
            .collect();
        let n_regions = cfg.regions.len();
        let per = cfg.users_per_region;
        if n_regions > 1 {
            for ri in 0..n_regions {
                for i in 0..per {
                    let a = ri * per + i;
                    let b = ((ri + 1) % n_regions) * per + i;
                    if n_regions == 2 && ri == 1 {
                        break; // with two regions the pair from the second is the same pair
                    }
                    let other = users[b].id.clone();
                    let conv = retry_setup(|| users[a].client.create_direct(&other)).await?;
                    let cid = conv.conversation_id;
                    let (ua, ub) = (users[a].id.clone(), users[b].id.clone());
                    users[a].conversations.push((cid.clone(), vec![ub]));
                    users[b].conversations.push((cid, vec![ua]));
                }
            }
        }
        if users.len() > 1 {
            let others: Vec<String> = users[1..].iter().map(|u| u.id.clone()).collect();
            let refs: Vec<&str> = others.iter().map(String::as_str).collect();
            let name = format!("{} drill group", cfg.run_id);
            let conv = retry_setup(|| users[0].client.create_group(&name, &refs)).await?;
            let all: Vec<String> = users.iter().map(|u| u.id.clone()).collect();
            for u in &mut users {
                let rest = all.iter().filter(|x| **x != u.id).cloned().collect();
                u.conversations.push((conv.conversation_id.clone(), rest));
            }
        }
        // Every member's region holds every conversation before anyone sends to it.
        for u in &users {
            for (cid, _) in &u.conversations {
                retry_setup(|| u.client.conversation(cid)).await?;
            }
        }
        let regions_by_endpoint = cfg
            .regions
            .iter()
            .map(|r| (r.endpoint.trim_end_matches('/').to_string(), r.region.clone()))
            .collect();
        let shared = Arc::new(Shared {
            cfg: cfg.clone(),
            started: Instant::now(),
            started_at_ms: now_ms(),
            counters: Counters {
                last_p99_bits: AtomicU64::new(u64::MAX),
                ..Default::default()
            },
            book: Mutex::new(Book::default()),
            users,
            regions_by_endpoint,
        });
        let stop_all = shutdown.child_token();
        let stop_sending = stop_all.child_token();
        let mut loops = Vec::new();
        for (i, u) in shared.users.iter().enumerate() {
            // Learn the inbox epoch first, so every entry is recorded with its epoch.
            let epoch = retry_setup(|| u.client.sync_page(0, None, 1)).await?.epoch;
            let cp = Checkpoint {
                epoch: Some(epoch),
                seq: 0,
            };
            let rng = StdRng::seed_from_u64(cfg.seed ^ (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            loops.push(tokio::spawn(device_loop(
                shared.clone(),
                i,
                cp,
                rng,
                tuning.reconnect_every,
                stop_all.clone(),
            )));
        }
        let sends = Arc::new(Semaphore::new(MAX_IN_FLIGHT_SENDS));
        let schedulers = vec![
            tokio::spawn(send_scheduler(
                shared.clone(),
                sends.clone(),
                StdRng::seed_from_u64(cfg.seed),
                stop_sending.clone(),
                stop_all.clone(),
            )),
            tokio::spawn(ops_scheduler(
                shared.clone(),
                StdRng::seed_from_u64(cfg.seed.rotate_left(17) ^ 0x0b5),
                stop_sending.clone(),
            )),
            tokio::spawn(sampler(shared.clone(), stop_all.clone())),
        ];
        Ok(Workload {
            shared,
            stop_sending,
            stop_all,
            schedulers,
            loops,
            sends,
        })
    }

    /// Cumulative counts and the last second's p99 (a few atomic loads).
    pub fn progress(&self) -> Progress {
        let c = &self.shared.counters;
        let bits = c.last_p99_bits.load(Ordering::Relaxed);
        Progress {
            acked: c.acked.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            delivered: c.delivered.load(Ordering::Relaxed),
            last_p99_ms: (bits != u64::MAX).then(|| f64::from_bits(bits)),
        }
    }

    /// Stops sending, waits (bounded) for the sends in flight, then for every acked message
    /// to reach every recipient (bounded), stops the devices and returns the record.
    pub async fn stop(mut self) -> WorkloadRecord {
        self.stop_sending.cancel();
        let deadline = tokio::time::Instant::now() + DRAIN_WAIT;
        // Every permit back: no send in flight (or the bound passed).
        let _all =
            tokio::time::timeout_at(deadline, self.sends.acquire_many(MAX_IN_FLIGHT_SENDS as u32)).await;
        let deadline = tokio::time::Instant::now() + DRAIN_WAIT;
        while !self.stop_all.is_cancelled() && tokio::time::Instant::now() < deadline {
            if self.undelivered() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.stop_all.cancel();
        let tasks = std::mem::take(&mut self.schedulers)
            .into_iter()
            .chain(std::mem::take(&mut self.loops));
        for t in tasks {
            // Each task ends at the token; the bound guards against one stuck in a call.
            let abort = t.abort_handle();
            if tokio::time::timeout(Duration::from_secs(15), t).await.is_err() {
                abort.abort();
            }
        }
        let mut b = self.shared.book();
        WorkloadRecord {
            started_at_ms: self.shared.started_at_ms,
            acked: std::mem::take(&mut b.acked),
            receipts: std::mem::take(&mut b.receipts),
            samples: std::mem::take(&mut b.samples),
            recalled: std::mem::take(&mut b.recalled),
            read_regressions: std::mem::take(&mut b.read_regressions),
            counts: std::mem::take(&mut b.counts),
            devices: self
                .shared
                .users
                .iter()
                .map(|u| (u.id.clone(), vec![DEVICE.to_string()]))
                .collect(),
            inbox: std::mem::take(&mut b.inbox),
        }
    }

    /// (acked message, recipient) pairs not received yet.
    fn undelivered(&self) -> usize {
        let b = self.shared.book();
        b.acked
            .iter()
            .map(|a| {
                a.recipients
                    .iter()
                    .filter(|r| !b.received.contains(&((*r).clone(), a.message_id.clone())))
                    .count()
            })
            .sum()
    }
}

/// A workload dropped without `stop` ends its tasks (and records nothing).
impl Drop for Workload {
    fn drop(&mut self) {
        self.stop_all.cancel();
    }
}

/// An admin call retried on transport errors and 5xx (bounded by [`SETUP_WAIT`]).
async fn admin_retry(
    http: &reqwest::Client,
    endpoint: &str,
    key: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<&Value>,
) -> Result<(u16, Value), DrillError> {
    let deadline = Instant::now() + SETUP_WAIT;
    loop {
        let answer = admin_call(http, endpoint, key, method.clone(), path, body).await;
        let retry = match &answer {
            Ok((st, _)) => *st >= 500,
            Err(_) => true,
        };
        if !retry || Instant::now() > deadline {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A token for `user` from `endpoint`, waiting (bounded) until that region knows the user.
async fn mint_token(
    http: &reqwest::Client,
    endpoint: &str,
    key: &str,
    user: &str,
) -> Result<String, DrillError> {
    let deadline = Instant::now() + SETUP_WAIT;
    let body = json!({"user_id": user, "device_id": DEVICE});
    loop {
        let (st, b) = admin_retry(
            http,
            endpoint,
            key,
            reqwest::Method::POST,
            "/v1/admin/tokens",
            Some(&body),
        )
        .await?;
        if st == 200 {
            return b["token"]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| DrillError::Setup(format!("token answer without a token: {b}")));
        }
        if st != 404 || Instant::now() > deadline {
            return Err(DrillError::Setup(format!(
                "token for {user} at {endpoint}: {st} {b}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Fresh tokens from whichever region answers (during a fault the home may be down).
fn token_provider(
    http: reqwest::Client,
    regions: Vec<RegionTarget>,
    key: String,
    user: String,
) -> TokenProvider {
    Arc::new(move || {
        let (http, regions, key, user) = (http.clone(), regions.clone(), key.clone(), user.clone());
        Box::pin(async move {
            let body = json!({"user_id": user, "device_id": DEVICE});
            let mut last = String::new();
            for r in &regions {
                match admin_call(
                    &http,
                    &r.endpoint,
                    &key,
                    reqwest::Method::POST,
                    "/v1/admin/tokens",
                    Some(&body),
                )
                .await
                {
                    Ok((200, b)) => {
                        if let Some(t) = b["token"].as_str() {
                            return Ok(t.to_string());
                        }
                    }
                    Ok((st, b)) => last = format!("{st} {b}"),
                    Err(e) => last = e.to_string(),
                }
            }
            Err(ClientError::Transport(format!(
                "no region minted a token for {user}: {last}"
            )))
        })
    })
}

/// A setup call retried while the deployment catches up (404 and 400 until replication
/// brings the user or conversation; 5xx and transport errors), bounded by [`SETUP_WAIT`].
async fn retry_setup<T, F, Fut>(mut call: F) -> Result<T, DrillError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    let deadline = Instant::now() + SETUP_WAIT;
    loop {
        match call().await {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() > deadline => return Err(DrillError::Client(e)),
            Err(ClientError::Api { status, .. })
                if status == 404 || status == 400 || status >= 500 || status == 429 => {}
            Err(ClientError::Transport(_)) | Err(ClientError::WrongRegion { .. }) => {}
            Err(e) => return Err(DrillError::Client(e)),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends at the configured total rate until told to stop.
async fn send_scheduler(
    shared: Arc<Shared>,
    sends: Arc<Semaphore>,
    mut rng: StdRng,
    stop: CancellationToken,
    abandon: CancellationToken,
) {
    let period = Duration::from_secs_f64(1.0 / shared.cfg.rate_per_s);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Ok(permit) = sends.clone().try_acquire_owned() else {
            shared.error("send_shed");
            continue;
        };
        let ui = rng.gen_range(0..shared.users.len());
        let u = &shared.users[ui];
        if u.conversations.is_empty() {
            continue;
        }
        let ci = rng.gen_range(0..u.conversations.len());
        n += 1;
        let client_msg_id = format!("{}-{ui}-{n}", shared.cfg.run_id);
        let shared = shared.clone();
        let abandon = abandon.clone();
        tokio::spawn(async move {
            let _permit = permit;
            // Abandoned only when the whole workload is (then the record is not judged).
            tokio::select! {
                _ = abandon.cancelled() => {}
                _ = send_one(&shared, ui, ci, client_msg_id) => {}
            }
        });
    }
}

async fn send_one(shared: &Shared, ui: usize, ci: usize, client_msg_id: String) {
    let u = &shared.users[ui];
    let (cid, recipients) = &u.conversations[ci];
    shared.counters.sent.fetch_add(1, Ordering::Relaxed);
    shared.book().count("send");
    let sent_at_ms = now_ms();
    let body = json!({"text": format!("drill {client_msg_id}")});
    // As the SDK retries a send (same client_msg_id, backoff), but counting each failure;
    // a 421 that could not be followed (the regions disagree for a moment during a
    // failover) is retried too.
    let mut backoff = SEND_FIRST_BACKOFF;
    let mut attempt = 1;
    let answer = loop {
        match u.sender.send(cid, &client_msg_id, "text", &body).await {
            Err(e)
                if attempt < SEND_ATTEMPTS
                    && ((e.is_retryable() && !e.is_rate_limited())
                        || matches!(e, ClientError::WrongRegion { .. })) =>
            {
                shared.error(&format!("send_error_{}", error_kind(&e)));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(SEND_MAX_BACKOFF);
                attempt += 1;
            }
            other => break other,
        }
    };
    match answer {
        Ok(acc) => {
            let acked_at_ms = now_ms();
            let region = shared.region_of(&u.client, &u.home);
            shared.counters.acked.fetch_add(1, Ordering::Relaxed);
            let mut b = shared.book();
            if let Some(first) = b.first_receipt.remove(&acc.message_id) {
                b.latencies.push(first.saturating_sub(sent_at_ms) as f64);
            }
            b.sent_at.insert(acc.message_id.clone(), sent_at_ms);
            b.own
                .entry(u.id.clone())
                .or_default()
                .push((cid.clone(), acc.message_id.clone(), acked_at_ms));
            b.acked.push(AckedSend {
                message_id: acc.message_id,
                conversation_id: cid.clone(),
                sender: u.id.clone(),
                client_msg_id,
                region,
                sent_at_ms,
                acked_at_ms,
                recipients: recipients.clone(),
            });
        }
        Err(e) => {
            tracing::debug!(user = %u.id, error = %e, "send failed for good");
            shared.error(&format!("send_failed_{}", error_kind(&e)));
        }
    }
}

/// A short name of an error for the counts.
fn error_kind(e: &ClientError) -> String {
    match e {
        ClientError::Api { status, .. } => status.to_string(),
        ClientError::ResyncRequired { .. } => "resync".into(),
        ClientError::TokenExpired => "token".into(),
        ClientError::WrongRegion { .. } => "421".into(),
        ClientError::Transport(_) => "transport".into(),
        ClientError::Decode(_) => "decode".into(),
    }
}

/// History reads, read indexes and recalls, mixed in at a fraction of the send rate.
async fn ops_scheduler(shared: Arc<Shared>, mut rng: StdRng, stop: CancellationToken) {
    let rate = (shared.cfg.rate_per_s * OPS_PER_SEND).max(0.5);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let busy = Arc::new(Semaphore::new(16));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Ok(permit) = busy.clone().try_acquire_owned() else {
            continue;
        };
        let ui = rng.gen_range(0..shared.users.len());
        if shared.users[ui].conversations.is_empty() {
            continue;
        }
        let ci = rng.gen_range(0..shared.users[ui].conversations.len());
        let op = rng.gen_range(0..10u32);
        let shared = shared.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let _permit = permit;
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = async {
                    match op {
                        0..=3 => history(&shared, ui, ci).await,
                        4..=8 => mark_read(&shared, ui, ci).await,
                        _ => recall(&shared, ui).await,
                    }
                } => {}
            }
        });
    }
}

async fn history(shared: &Shared, ui: usize, ci: usize) {
    let u = &shared.users[ui];
    let cid = &u.conversations[ci].0;
    shared.book().count("history");
    if let Err(e) = u.client.history(cid, None, None, 20).await {
        shared.error(&format!("history_failed_{}", error_kind(&e)));
    }
}

/// Marks the newest message the user received in the conversation as read, reads the
/// read index back and compares it with the highest the user saw before.
async fn mark_read(shared: &Shared, ui: usize, ci: usize) {
    let u = &shared.users[ui];
    let cid = &u.conversations[ci].0;
    let key = (u.id.clone(), cid.clone());
    // What the user saw before this operation began (a concurrent one may read back an
    // index set after this one's read: that one is not "before").
    let (newest, before) = {
        let b = shared.book();
        let state = b.read.get(&key);
        (
            state.and_then(|r| r.newest.clone()),
            state.and_then(|r| r.read.clone()),
        )
    };
    let Some((_, newest)) = newest else {
        return;
    };
    shared.book().count("mark_read");
    // The answer names the read index as the server holds it after the PUT. That, not the
    // cursor asked for, is what a later read must not fall below: the PUT waits for the
    // applier only up to a bound (read-your-writes), so while the applier is held up (a
    // crash, a restarting nats-server) the answer and a read right after may still show the
    // older index, which is late, not moved back.
    let answered = match u
        .client
        .call(
            reqwest::Method::PUT,
            &format!("/v1/conversations/{cid}/read"),
            Some(&serde_json::json!({"cursor": newest})),
        )
        .await
    {
        Ok(v) => v["cursor"]
            .as_str()
            .and_then(|c| Cursor::parse(c).ok().map(|k| (k, c.to_string()))),
        Err(e) => {
            shared.error(&format!("mark_read_failed_{}", error_kind(&e)));
            return;
        }
    };
    let back = match u
        .client
        .call(
            reqwest::Method::GET,
            &format!("/v1/conversations/{cid}/read"),
            None,
        )
        .await
    {
        Ok(v) => v,
        Err(e) => {
            shared.error(&format!("read_back_failed_{}", error_kind(&e)));
            return;
        }
    };
    let mine = back["members"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["user_id"] == u.id.as_str())
        .and_then(|m| m["cursor"].as_str())
        .map(str::to_string);
    let region = shared.region_of(&u.client, &u.home);
    let mut b = shared.book();
    let state = b.read.entry(key).or_default();
    // The floor: the highest index seen before (read back) or answered by the PUT.
    let floor = match (before, answered) {
        (Some((k, c)), Some((a, _))) if k > a => Some((k, c, "read back before")),
        (_, Some((a, c))) => Some((a, c, "answered by the PUT")),
        (Some((k, c)), None) => Some((k, c, "read back before")),
        (None, None) => None,
    };
    let Some(floor) = floor else {
        return;
    };
    let read_back = mine
        .as_deref()
        .and_then(|c| Cursor::parse(c).ok().map(|k| (k, c.to_string())));
    match read_back {
        Some((k, c)) if k >= floor.0 => {
            if state.read.as_ref().is_none_or(|(r, _)| k > *r) {
                state.read = Some((k, c));
            }
        }
        other => {
            let found = other.map_or_else(|| "no read index".to_string(), |(_, c)| format!("cursor {c}"));
            let line = format!(
                "user {} conversation {cid} at region {region}: read index {found}, below {} ({})",
                u.id, floor.1, floor.2
            );
            b.read_regressions.push(line);
            b.count("read_regression");
        }
    }
}

/// Recalls one of the user's own fresh acked messages (a few per user).
async fn recall(shared: &Shared, ui: usize) {
    let u = &shared.users[ui];
    let target = {
        let b = shared.book();
        let done = b.recalls_by_user.get(&u.id).copied().unwrap_or(0);
        if done >= MAX_RECALLS_PER_USER {
            return;
        }
        let now = now_ms();
        b.own.get(&u.id).and_then(|own| {
            own.iter()
                .rev()
                .find(|(_, _, at)| now.saturating_sub(*at) < RECALL_MAX_AGE_MS)
                .cloned()
        })
    };
    let Some((cid, mid, _)) = target else { return };
    {
        let mut b = shared.book();
        b.count("recall");
        *b.recalls_by_user.entry(u.id.clone()).or_insert(0) += 1;
        b.own
            .entry(u.id.clone())
            .or_default()
            .retain(|(_, m, _)| *m != mid);
    }
    match u.client.recall(&cid, &mid).await {
        Ok(()) => shared.book().recalled.push(mid),
        Err(e) => shared.error(&format!("recall_failed_{}", error_kind(&e))),
    }
}

/// One second's sample, every second.
async fn sampler(shared: Arc<Shared>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let c = &shared.counters;
    let mut last = [0u64; 4];
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = [
            c.sent.load(Ordering::Relaxed),
            c.acked.load(Ordering::Relaxed),
            c.delivered.load(Ordering::Relaxed),
            c.errors.load(Ordering::Relaxed),
        ];
        let mut b = shared.book();
        let mut lat = std::mem::take(&mut b.latencies);
        lat.sort_by(f64::total_cmp);
        let pct = |p: f64| -> Option<f64> {
            (!lat.is_empty()).then(|| lat[((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1])
        };
        let (p50, p99) = (pct(0.50), pct(0.99));
        c.last_p99_bits
            .store(p99.map_or(u64::MAX, f64::to_bits), Ordering::Relaxed);
        b.samples.push(Sample {
            t_s: shared.started.elapsed().as_secs_f64(),
            sent: now[0] - last[0],
            acked: now[1] - last[1],
            delivered: now[2] - last[2],
            errors: now[3] - last[3],
            p50_ms: p50,
            p99_ms: p99,
        });
        last = now;
    }
}

/// Tracks the inbox seqs one device is handed.
struct Spans {
    user: String,
    current: Option<InboxSpan>,
}

impl Spans {
    /// A fresh start at `after` of `epoch` (a new stream, or a resync).
    fn start(&mut self, book: &mut Book, epoch: &str, after: u64) {
        self.close(book);
        self.current = Some(InboxSpan {
            user: self.user.clone(),
            device: DEVICE.to_string(),
            epoch: epoch.to_string(),
            after,
            last: after,
        });
    }

    fn entry(&mut self, book: &mut Book, seq: u64) {
        match &mut self.current {
            Some(s) if seq == s.last + 1 => s.last = seq,
            Some(s) => {
                // Not the next seq: record it as its own span, the checker judges.
                let epoch = s.epoch.clone();
                self.start(book, &epoch, seq.saturating_sub(1));
                if let Some(s) = &mut self.current {
                    s.last = seq;
                }
            }
            None => {}
        }
    }

    fn close(&mut self, book: &mut Book) {
        if let Some(s) = self.current.take() {
            book.inbox.push(s);
        }
    }
}

/// One user's device: the SDK's sync loop, recording every message it hands out, dropped
/// and resumed from its checkpoint every 10-20 s.
async fn device_loop(
    shared: Arc<Shared>,
    ui: usize,
    mut cp: Checkpoint,
    mut rng: StdRng,
    reconnect_every: (Duration, Duration),
    stop: CancellationToken,
) {
    let u = &shared.users[ui];
    let mut timelines = meridian_client::Timelines::default();
    let mut spans = Spans {
        user: u.id.clone(),
        current: None,
    };
    let mut epoch = cp.epoch.clone().unwrap_or_default();
    loop {
        spans.start(&mut shared.book(), &epoch, cp.seq);
        let mut stream: SyncStream = u.client.sync_with_timelines(cp.clone(), timelines.clone());
        let (lo, hi) = (
            reconnect_every.0.as_millis() as u64,
            reconnect_every.1.as_millis() as u64,
        );
        let reconnect_in = Duration::from_millis(rng.gen_range(lo..=hi.max(lo)));
        let reconnect = tokio::time::sleep(reconnect_in);
        tokio::pin!(reconnect);
        let stopped = loop {
            tokio::select! {
                _ = stop.cancelled() => break true,
                _ = &mut reconnect => break false,
                ev = stream.next() => match ev {
                    None => break false,
                    Some(Ok(ev)) => on_event(&shared, u, &mut spans, &mut epoch, ev),
                    Some(Err(e)) => shared.error(&format!("sync_{}", error_kind(&e))),
                },
            }
        };
        cp = stream.checkpoint();
        timelines = stream.timelines();
        drop(stream);
        if cp.epoch.as_deref().is_some_and(|e| e != epoch) {
            // The loop moved to another epoch that no event told of yet.
            epoch = cp.epoch.clone().unwrap_or_default();
        }
        if stopped {
            spans.close(&mut shared.book());
            return;
        }
        shared.book().count("reconnect");
    }
}

fn on_event(shared: &Shared, u: &User, spans: &mut Spans, epoch: &mut String, ev: SyncEvent) {
    let at_ms = now_ms();
    let (via, seq, cid, mid, sender, cursor) = match ev {
        SyncEvent::Entry(e) => {
            spans.entry(&mut shared.book(), e.seq);
            if e.kind != "message" {
                return;
            }
            let Some(mid) = e.message_id else { return };
            // A WebSocket frame keeps its `op`; an inbox page read over HTTP has none.
            let via = if e.raw["op"] == "entry" {
                Via::Live
            } else {
                Via::Sync
            };
            (
                via,
                Some(e.seq),
                e.conversation_id,
                mid,
                e.sender.unwrap_or_default(),
                e.cursor,
            )
        }
        SyncEvent::Recovered {
            conversation_id,
            message,
        } => (
            Via::Resync,
            None,
            conversation_id,
            message.message_id,
            message.sender,
            Some(message.cursor),
        ),
        SyncEvent::ResyncRequired { epoch: new, head } => {
            let mut b = shared.book();
            b.count("resync");
            spans.start(&mut b, &new, head);
            *epoch = new;
            return;
        }
        SyncEvent::Disconnected(_) => {
            // The socket dropped (a fault, or a 421 moving the user): the SDK reconnects.
            shared.error("sync_disconnected");
            return;
        }
        // A message this device already had from a resync: its seq counts, no receipt.
        SyncEvent::AlreadyHad { seq, .. } => {
            spans.entry(&mut shared.book(), seq);
            return;
        }
        SyncEvent::Signal(_) => return,
    };
    let mut b = shared.book();
    if let Some(c) = cursor {
        if let Ok(k) = Cursor::parse(&c) {
            let state = b.read.entry((u.id.clone(), cid.clone())).or_default();
            if state.newest.as_ref().is_none_or(|(n, _)| k > *n) {
                state.newest = Some((k, c));
            }
        }
    }
    if sender != u.id {
        shared.counters.delivered.fetch_add(1, Ordering::Relaxed);
        b.received.insert((u.id.clone(), mid.clone()));
        if b.reached.insert(mid.clone()) {
            match b.sent_at.get(&mid).copied() {
                Some(sent) => b.latencies.push(at_ms.saturating_sub(sent) as f64),
                None => {
                    b.first_receipt.insert(mid.clone(), at_ms);
                }
            }
        }
    }
    b.receipts.push(Receipt {
        user: u.id.clone(),
        device: DEVICE.to_string(),
        message_id: mid,
        conversation_id: cid,
        via,
        epoch: (via != Via::Resync).then(|| epoch.clone()),
        seq,
        at_ms,
    });
}
