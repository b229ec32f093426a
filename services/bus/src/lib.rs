//! Meridian's bus: the region's JetStream stream of events, and the core NATS subjects live
//! delivery and ephemeral signals (typing, presence) travel on.
//!
//! # Layout
//! - [`config`]: [`BusConfig`] (with the login and TLS a process connects with),
//!   [`Durability`], and [`nats_server_config`] / [`nats_hub_config`], the nats-server config
//!   texts (a region's server, the hub linking the regions) the launcher and the test
//!   harness write.
//! - [`auth`]: the NATS user of each role and its subject permissions, and the server's
//!   `authorization` and `tls` blocks.
//! - this file: [`Bus`], a cheap-to-clone handle: connect with retry, stream provisioning,
//!   publishing events with JetStream dedup and W3C trace headers (retrying through NATS
//!   restarts with the same message id), delivery subjects, ephemeral publish/subscribe.
//! - `mirror`: the region's mirrors of the other regions' streams ([`Bus::ensure_mirrors`],
//!   [`Bus::applied_streams`], [`Bus::mirror_health`] and [`MirrorHealth`]).
//! - [`consumer`]: [`EventConsumer`], a durable pull consumer that hands out events in
//!   stream order without holes, realigning itself with the server after restarts.
//! - `error`: [`BusError`].
//! - [`testing`] (feature `testing`): a real nats-server process per test, and
//!   `NatsCluster`: linked regions (a hub and a server per region).

pub mod auth;
pub mod config;
pub mod consumer;
mod durable;
mod error;
mod mirror;
mod read;
#[cfg(feature = "testing")]
pub mod testing;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishErrorKind, message::PublishMessage};
use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use futures::FutureExt as _;
use meridian_model::events::EventEnvelope;
use meridian_model::{EventId, RegionId, UserId};
use prost::Message as _;
use tokio::time::Instant;

pub use auth::{
    nats_server_auth_config, BusRole, NatsLogin, NatsUser, Permissions, RoleCredentials, ServerTls,
};
pub use config::{
    nats_hub_config, nats_server_config, BusConfig, Durability, HubSpec, LeafRemote, NatsServerSpec,
};
pub use consumer::{EventConsumer, ReceivedEvent};
pub use durable::MAX_ATOMIC_BATCH;
pub use error::BusError;
pub use mirror::MirrorHealth;

/// W3C trace context header names (lower case, as the spec writes them).
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";
/// JetStream's dedup header.
pub const MSG_ID: &str = "Nats-Msg-Id";

/// How long one publish attempt waits for its PubAck before it is sent again. Short enough
/// that a publish caught by a NATS restart is retried soon after the server is back.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// JetStream API requests (stream and consumer management).
const API_TIMEOUT: Duration = Duration::from_secs(5);
/// Pipelined publishes in flight at once; below async-nats' ack-permit limit (5000), which
/// would otherwise stall sends waiting for acks nobody is reading yet.
const PIPELINE_WINDOW: usize = 1024;
/// A live delivery is best effort: a slow or absent connection must not hold up the applier.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(1);

/// What JetStream answered for one published event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublishAck {
    pub stream: String,
    pub stream_seq: u64,
    /// The server had already stored this event id within the duplicate window; `stream_seq`
    /// is then the sequence of the original. It can also be set when an earlier attempt of
    /// the same call was stored but its ack was lost to a reconnect: either way the event is
    /// in the stream once.
    pub duplicate: bool,
}

/// A stream's extent, for tests, lag and readiness.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamState {
    /// Which instance of the stream this is: its creation time, ns since the Unix epoch. A
    /// stream deleted and recreated, or lost with its server's storage, is a new instance
    /// that numbers its events from 1 again (see [`EventConsumer`]).
    pub instance: u64,
    pub messages: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub consumer_count: usize,
}

/// The region's bus. Cheap to clone: clones share one NATS connection.
#[derive(Clone)]
pub struct Bus {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: BusConfig,
    client: async_nats::Client,
    js: jetstream::Context,
    stream: String,
    events_subject: Subject,
    /// Counts reconnects (see `connect`).
    reconnects: tokio::sync::watch::Receiver<u64>,
    /// Counts the moments a subscriber of this connection may have missed core-NATS
    /// messages: a slow subscription's buffer overflowed, or the connection was re-made.
    losses: tokio::sync::watch::Receiver<u64>,
}

impl Bus {
    /// Connects, retrying the initial connect for up to `publish_timeout_s` (the server may
    /// be starting alongside us). Afterwards the client reconnects forever on its own.
    pub async fn connect(cfg: BusConfig) -> Result<Bus, BusError> {
        Self::connect_with(cfg, None).await
    }

    /// A second connection with the same configuration whose subscriptions each buffer at
    /// most `capacity` messages (async-nats keeps 65,536 by default). For subscribers that
    /// can afford to lose messages and recover them elsewhere: the gateway's WebSockets,
    /// which fill a delivery gap from the store. A subscription that falls behind drops
    /// messages instead of queueing them in memory.
    pub async fn connect_bounded(&self, capacity: usize) -> Result<Bus, BusError> {
        Self::connect_with(self.inner.cfg.clone(), Some(capacity.max(1))).await
    }

    async fn connect_with(cfg: BusConfig, subscription_capacity: Option<usize>) -> Result<Bus, BusError> {
        cfg.validate()?;
        let login = cfg.login()?;
        let deadline = Instant::now() + Duration::from_secs(cfg.publish_timeout_s);
        let mut backoff = Backoff::new();
        let (reconnects_tx, reconnects) = tokio::sync::watch::channel(0u64);
        let reconnects_tx = Arc::new(reconnects_tx);
        let (losses_tx, losses) = tokio::sync::watch::channel(0u64);
        let losses_tx = Arc::new(losses_tx);
        let disconnected = Arc::new(AtomicBool::new(false));
        let client = loop {
            let reconnects_tx = reconnects_tx.clone();
            let losses_tx = losses_tx.clone();
            let disconnected = disconnected.clone();
            let opts = credentials(async_nats::ConnectOptions::new(), &cfg, &login)
                .name(format!("meridian-{}", cfg.region))
                .max_reconnects(None)
                .connection_timeout(Duration::from_secs(2))
                // The default backs off to 4 s; capping at 1 s gets publishers going again
                // soon after a NATS restart, which is the outage we expect most.
                .reconnect_delay_callback(|attempts| {
                    Duration::from_millis(2u64.saturating_pow(attempts.min(10) as u32))
                        .min(Duration::from_secs(1))
                })
                .event_callback(move |event| {
                    let reconnects_tx = reconnects_tx.clone();
                    let losses_tx = losses_tx.clone();
                    let disconnected = disconnected.clone();
                    async move {
                        match event {
                            async_nats::Event::Connected => {
                                tracing::info!("NATS connected");
                                // Only a reconnect counts: publishes waiting for acks from
                                // the lost connection are then resent at once.
                                if disconnected.swap(false, Ordering::SeqCst) {
                                    reconnects_tx.send_modify(|n| *n += 1);
                                    losses_tx.send_modify(|n| *n += 1);
                                }
                            }
                            async_nats::Event::Disconnected => {
                                disconnected.store(true, Ordering::SeqCst);
                                tracing::warn!("NATS disconnected; reconnecting");
                            }
                            // Expected on bounded connections: subscribers watching
                            // `delivery_losses` recover what was dropped from elsewhere.
                            async_nats::Event::SlowConsumer(sid) => {
                                tracing::debug!(sid, "slow subscriber; messages dropped");
                                losses_tx.send_modify(|n| *n += 1);
                            }
                            other => tracing::warn!(event = %other, "NATS event"),
                        }
                    }
                });
            let opts = match subscription_capacity {
                Some(n) => opts.subscription_capacity(n),
                None => opts,
            };
            match opts.connect(login.servers.clone()).await {
                Ok(c) => break c,
                // Retrying will not change the server's mind about these credentials.
                Err(e) if is_auth_error(&e) => {
                    return Err(BusError::Unauthorized(format!(
                        "connect to {} as role {}: {e}",
                        cfg.redacted_url(),
                        cfg.role().as_str()
                    )));
                }
                Err(e) if Instant::now() + backoff.peek() < deadline => {
                    tracing::warn!(url = %cfg.redacted_url(), error = %e, "NATS connect failed; retrying");
                    backoff.sleep().await;
                }
                Err(e) => {
                    return Err(BusError::Unavailable(format!(
                        "connect to {}: {e}",
                        cfg.redacted_url()
                    )));
                }
            }
        };
        let js = jetstream::ContextBuilder::new()
            .timeout(API_TIMEOUT)
            .build(client.clone());
        let stream = cfg.stream_name(&cfg.region);
        let events_subject = Subject::from(cfg.events_subject(&cfg.region));
        Ok(Bus {
            inner: Arc::new(Inner {
                cfg,
                client,
                js,
                stream,
                events_subject,
                reconnects,
                losses,
            }),
        })
    }

    /// Changes whenever a subscription of this connection may have lost core-NATS messages
    /// (a full subscription buffer dropped some, or the connection was re-made). A
    /// subscriber that can recover, like a WebSocket that refills from the store, watches
    /// it: a dropped message at the tail of a burst leaves no later one to reveal the gap.
    pub fn delivery_losses(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.losses.clone()
    }

    pub fn config(&self) -> &BusConfig {
        &self.inner.cfg
    }

    pub fn region(&self) -> &RegionId {
        &self.inner.cfg.region
    }

    /// The name of this region's own stream.
    pub fn stream(&self) -> String {
        self.inner.stream.clone()
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.inner.client
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.inner.js
    }

    /// Creates the region's stream, or updates it to the configured limits. File storage:
    /// the stream is the durable record of every acknowledged event.
    pub async fn ensure_stream(&self) -> Result<(), BusError> {
        let cfg = &self.inner.cfg;
        let config = jetstream::stream::Config {
            description: Some(format!("Meridian events stamped in region {}", cfg.region)),
            subjects: vec![cfg.stream_subjects(&cfg.region)],
            duplicate_window: Duration::from_secs(cfg.duplicate_window_s),
            // Group commit (`Bus::publish_batch`): one fsync per batch under `disk`.
            allow_atomic_publish: true,
            ..self.stored_stream_config(self.inner.stream.clone())
        };
        self.with_api_retry("create or update stream", || {
            let config = config.clone();
            async move { self.inner.js.create_or_update_stream(config).await }
        })
        .await?;
        Ok(())
    }

    /// What every stream this region stores shares, its own and its mirrors: file storage
    /// (the durable record of every acknowledged event) and the configured limits.
    pub(crate) fn stored_stream_config(&self, name: String) -> jetstream::stream::Config {
        let cfg = &self.inner.cfg;
        jetstream::stream::Config {
            name,
            storage: jetstream::stream::StorageType::File,
            retention: jetstream::stream::RetentionPolicy::Limits,
            max_age: Duration::from_secs(cfg.max_age_s),
            max_bytes: cfg.max_bytes,
            // Discard old: a full stream must keep taking new events; the applier and the
            // mirrors are expected to keep up with far more than `max_bytes` of lead.
            discard: jetstream::stream::DiscardPolicy::Old,
            // Deleting single events would punch holes that consumers take for lost events.
            deny_delete: true,
            allow_direct: true,
            // S2 per message block: events repeat ids and field names, and a stream's bytes
            // on disk count against every message until retention trims it.
            compression: Some(jetstream::stream::Compression::S2),
            ..Default::default()
        }
    }

    /// The extent of `stream`.
    pub async fn stream_state(&self, stream: &str) -> Result<StreamState, BusError> {
        let s = self
            .with_api_retry("get stream", || self.inner.js.get_stream_no_info(stream))
            .await?;
        let info = self.with_api_retry("stream info", || s.get_info()).await?;
        Ok(StreamState {
            instance: stream_instance(&info),
            messages: info.state.messages,
            first_seq: info.state.first_sequence,
            last_seq: info.state.last_sequence,
            consumer_count: info.state.consumer_count,
        })
    }

    /// Removes `stream`'s events up to and including `through_seq` (JetStream's purge "up
    /// to but not including" `through_seq + 1`); answers how many went. Only the applier's
    /// retention calls it, with a sequence every reader of the stream is known to be past
    /// (meridian-applier's `retention`).
    pub async fn trim_stream(&self, stream: &str, through_seq: u64) -> Result<u64, BusError> {
        let s = self
            .with_api_retry("get stream", || self.inner.js.get_stream_no_info(stream))
            .await?;
        let resp = s
            .purge()
            .sequence(through_seq.saturating_add(1))
            .await
            .map_err(|e| BusError::nats("purge stream", e))?;
        Ok(resp.purged)
    }

    /// Publishes one event to the region's stream and returns once JetStream has acked it.
    /// Through connection loss, timeouts and "no responders" (a restarting server) it
    /// resends with the same `Nats-Msg-Id` until `publish_timeout_s`, so the stream ends up
    /// holding the event exactly once.
    pub async fn publish_event(&self, env: &EventEnvelope) -> Result<PublishAck, BusError> {
        let mut acks = self.publish_events(std::slice::from_ref(env)).await?;
        Ok(acks.remove(0))
    }

    /// Publishes many events pipelined: all are sent before their acks are awaited, so one
    /// fsync (under `Durability::Disk`) covers many. Same retry semantics as
    /// [`Bus::publish_event`]. Events that need a retry are resent after the ones that went
    /// through, so if a server loses an unacked event mid-batch, the stream order can differ
    /// from the slice order; order keys, not stream order, order the timelines.
    pub async fn publish_events(&self, envs: &[EventEnvelope]) -> Result<Vec<PublishAck>, BusError> {
        let prepared = envs.iter().map(prepare).collect::<Result<Vec<_>, _>>()?;
        let deadline = Instant::now() + Duration::from_secs(self.inner.cfg.publish_timeout_s);
        let mut acks: Vec<Option<PublishAck>> = vec![None; envs.len()];
        let mut backoff = Backoff::new();
        loop {
            let todo: Vec<usize> = (0..acks.len()).filter(|&i| acks[i].is_none()).collect();
            if todo.is_empty() {
                return Ok(acks.into_iter().map(|a| a.expect("every slot acked")).collect());
            }
            let mut last_error = String::new();
            for window in todo.chunks(PIPELINE_WINDOW) {
                let results = self.publish_window(&prepared, window, deadline).await;
                for (&i, result) in window.iter().zip(results) {
                    match result {
                        Ok(ack) => acks[i] = Some(ack),
                        Err(Attempt::Retry(e)) => last_error = e,
                        Err(Attempt::Fatal(e)) => return Err(e),
                    }
                }
            }
            if acks.iter().all(Option::is_some) {
                continue;
            }
            if Instant::now() + backoff.peek() >= deadline {
                return Err(BusError::Unavailable(format!(
                    "publish to {} not acked within {} s: {last_error}",
                    self.inner.stream, self.inner.cfg.publish_timeout_s
                )));
            }
            tracing::warn!(stream = %self.inner.stream, error = %last_error, "publish not acked; retrying with the same ids");
            backoff.sleep().await;
        }
    }

    /// Sends the events at `window` without waiting, then collects their acks.
    async fn publish_window(
        &self,
        prepared: &[Prepared],
        window: &[usize],
        deadline: Instant,
    ) -> Vec<Result<PublishAck, Attempt>> {
        let generation = *self.inner.reconnects.borrow();
        let mut pending = Vec::with_capacity(window.len());
        for &i in window {
            let p = &prepared[i];
            let msg = PublishMessage::build()
                .payload(p.payload.clone())
                .headers(p.headers.clone());
            let sent = tokio::time::timeout(
                ATTEMPT_TIMEOUT,
                self.inner.js.send_publish(self.inner.events_subject.clone(), msg),
            )
            .await;
            pending.push(match sent {
                Ok(Ok(fut)) => Ok(fut),
                Ok(Err(e)) => Err(classify(e)),
                Err(_) => Err(Attempt::Retry("send timed out".into())),
            });
        }
        let acks = pending.into_iter().map(|p| async move {
            let fut = p?;
            let left = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(100));
            // An ack owed by a connection that has since been replaced never comes: resend
            // as soon as the client is back rather than sitting out the attempt timeout.
            let mut reconnects = self.inner.reconnects.clone();
            let reconnected = async move {
                if reconnects.wait_for(|n| *n > generation).await.is_err() {
                    futures::future::pending::<()>().await;
                }
            };
            tokio::select! {
                acked = tokio::time::timeout(left.min(ATTEMPT_TIMEOUT), fut) => match acked {
                    Ok(Ok(ack)) => Ok(PublishAck {
                        stream: ack.stream,
                        stream_seq: ack.sequence,
                        duplicate: ack.duplicate,
                    }),
                    Ok(Err(e)) => Err(classify(e)),
                    Err(_) => Err(Attempt::Retry("ack timed out".into())),
                },
                _ = reconnected => Err(Attempt::Retry("reconnected before the ack arrived".into())),
            }
        });
        futures::future::join_all(acks).await
    }

    /// A durable pull consumer on `stream` (own or mirror) resuming where its acks left off.
    /// See [`EventConsumer`] for how it stays gap-free.
    pub async fn event_consumer(&self, stream: &str, durable: &str) -> Result<EventConsumer, BusError> {
        EventConsumer::open(self.clone(), stream, durable, None).await
    }

    /// A durable pull consumer on `stream` positioned right after `after_seq`: the applier
    /// passes its store checkpoint, which (not the consumer's acks, docs/design.md §4)
    /// decides what is new.
    pub async fn event_consumer_after(
        &self,
        stream: &str,
        durable: &str,
        after_seq: u64,
    ) -> Result<EventConsumer, BusError> {
        EventConsumer::open(self.clone(), stream, durable, Some(after_seq)).await
    }

    /// Publishes a live delivery for `user` on core NATS (no JetStream: a missed delivery is
    /// gap-filled from the store by the device). Gives up after a second.
    pub async fn publish_delivery(&self, user: &UserId, payload: Bytes) -> Result<(), BusError> {
        self.publish_delivery_traced(user, payload, None).await
    }

    /// [`Bus::publish_delivery`] with the trace context of the span that produced it in a
    /// `traceparent` header, so whoever delivers it (a WebSocket, push) continues the trace.
    pub async fn publish_delivery_traced(
        &self,
        user: &UserId,
        payload: Bytes,
        traceparent: Option<&str>,
    ) -> Result<(), BusError> {
        let subject = self.delivery_subject(user);
        let publish = match traceparent.filter(|t| !t.is_empty()) {
            Some(tp) => {
                let mut headers = HeaderMap::new();
                headers.insert(TRACEPARENT, tp);
                self.inner
                    .client
                    .publish_with_headers(subject, headers, payload)
                    .left_future()
            }
            None => self.inner.client.publish(subject, payload).right_future(),
        };
        match tokio::time::timeout(DELIVERY_TIMEOUT, publish).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(BusError::Unavailable(format!("publish delivery: {e}"))),
            Err(_) => Err(BusError::Unavailable("publish delivery timed out".into())),
        }
    }

    /// `{prefix}deliver.{region}.{user}.e` with the user id encoded as one subject token:
    /// user ids may contain '.', which would split the token, so '.' is written as '~'
    /// (not in the user id alphabet `[A-Za-z0-9_.-]`, so the encoding is reversible, and
    /// legal in NATS subjects). See [`Bus::delivery_user`] for the reverse.
    pub fn delivery_subject(&self, user: &UserId) -> String {
        format!("{}{}.e", self.delivery_base(), encode_user_token(user))
    }

    /// `{prefix}deliver.{region}.{user}.t`: ephemeral frames for a user's sockets (typing),
    /// never stored, never pushed.
    pub fn ephemeral_subject(&self, user: &UserId) -> String {
        self.ephemeral_subject_in(&self.inner.cfg.region, user)
    }

    /// [`Bus::ephemeral_subject`] of a user served by `region` (typing reaches members
    /// served by other regions over the leafnode links): `{prefix}deliver.{region}.{user}.t`.
    pub fn ephemeral_subject_in(&self, region: &RegionId, user: &UserId) -> String {
        format!(
            "{}deliver.{region}.{}.t",
            self.inner.cfg.prefix,
            encode_user_token(user)
        )
    }

    /// Where presence requests for users served by `region` go (request/reply; the
    /// region's gateways answer): `{prefix}presence.{region}`.
    pub fn presence_subject(&self, region: &RegionId) -> String {
        format!("{}presence.{region}", self.inner.cfg.prefix)
    }

    /// Both of a user's subjects, for one subscription per WebSocket: each subscription
    /// costs the gateway a channel (~6 KiB) and the server an interest entry, per socket.
    pub fn user_subjects(&self, user: &UserId) -> String {
        format!("{}{}.*", self.delivery_base(), encode_user_token(user))
    }

    /// Whether a message from [`Bus::user_subjects`] is an ephemeral frame.
    pub fn is_ephemeral_subject(subject: &str) -> bool {
        subject.ends_with(".t")
    }

    /// Matches every delivery subject of this region (not the ephemeral ones).
    pub fn delivery_wildcard(&self) -> String {
        format!("{}*.e", self.delivery_base())
    }

    /// The user a delivery subject (from [`Bus::delivery_wildcard`]) is for.
    pub fn delivery_user(&self, subject: &str) -> Option<UserId> {
        let token = subject.strip_prefix(&self.delivery_base())?.strip_suffix(".e")?;
        decode_user_token(token)
    }

    fn delivery_base(&self) -> String {
        format!("{}deliver.{}.", self.inner.cfg.prefix, self.inner.cfg.region)
    }

    /// `suffix` under this bus's prefix: for subjects other roles define (typing, presence),
    /// so tests sharing a server stay apart.
    pub fn subject(&self, suffix: &str) -> String {
        format!("{}{}", self.inner.cfg.prefix, suffix)
    }

    pub async fn subscribe(&self, subject: String) -> Result<async_nats::Subscriber, BusError> {
        self.inner
            .client
            .subscribe(subject)
            .await
            .map_err(|e| BusError::Unavailable(format!("subscribe: {e}")))
    }

    /// Core NATS publish for signals nobody needs to keep (typing, presence).
    pub async fn publish_ephemeral(&self, subject: String, payload: Bytes) -> Result<(), BusError> {
        match tokio::time::timeout(DELIVERY_TIMEOUT, self.inner.client.publish(subject, payload)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(BusError::Unavailable(format!("publish: {e}"))),
            Err(_) => Err(BusError::Unavailable("publish timed out".into())),
        }
    }

    /// A round trip to the server, for readiness checks.
    pub async fn ping(&self) -> Result<(), BusError> {
        if self.inner.client.connection_state() != async_nats::connection::State::Connected {
            return Err(BusError::Unavailable("not connected".into()));
        }
        match tokio::time::timeout(Duration::from_secs(2), self.inner.client.flush()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(BusError::Unavailable(format!("flush: {e}"))),
            Err(_) => Err(BusError::Unavailable("flush timed out".into())),
        }
    }

    /// Runs a JetStream API call, retrying transient failures (a server that is restarting
    /// answers "no responders" or not at all) until `publish_timeout_s`.
    pub(crate) async fn with_api_retry<T, E, F, Fut>(&self, what: &str, mut call: F) -> Result<T, BusError>
    where
        E: std::fmt::Display,
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        let deadline = Instant::now() + Duration::from_secs(self.inner.cfg.publish_timeout_s);
        let mut backoff = Backoff::new();
        loop {
            match call().await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    let text = e.to_string();
                    if !is_transient_api_error(&text) {
                        return Err(BusError::nats(what, text));
                    }
                    if Instant::now() + backoff.peek() >= deadline {
                        return Err(BusError::Unavailable(format!("{what}: {text}")));
                    }
                    tracing::debug!(what, error = %text, "JetStream API call failed; retrying");
                    backoff.sleep().await;
                }
            }
        }
    }
}

/// The login and TLS of `cfg` on `opts`, and the inbox prefix the role's permissions allow.
fn credentials(
    mut opts: async_nats::ConnectOptions,
    cfg: &BusConfig,
    login: &config::Login,
) -> async_nats::ConnectOptions {
    if let Some((user, password)) = &login.user_password {
        opts = opts.user_and_password(user.clone(), password.clone());
    }
    if let Some(seed) = &login.nkey_seed {
        opts = opts.nkey(seed.clone());
    }
    if let Some(ca) = &cfg.tls_ca_file {
        opts = opts.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let (Some(cert), Some(key)) = (&cfg.tls_cert_file, &cfg.tls_key_file) {
        opts = opts
            .add_client_certificate(cert.clone(), key.clone())
            .require_tls(true);
    }
    opts.custom_inbox_prefix(cfg.inbox_prefix())
}

fn is_auth_error(e: &async_nats::ConnectError) -> bool {
    matches!(
        e.kind(),
        async_nats::ConnectErrorKind::AuthorizationViolation | async_nats::ConnectErrorKind::Authentication
    )
}

/// async-nats reports API failures as errors whose kinds differ per call; their text is
/// the one thing they share. Timeouts, missing responders and 503s (JetStream not ready
/// yet after a restart) are worth retrying; a 4xx answer (bad config, not found) is not.
fn is_transient_api_error(text: &str) -> bool {
    let t = text.to_ascii_lowercase();
    t.contains("timed out")
        || t.contains("timeout")
        || t.contains("no responders")
        || t.contains("code 503")
        || t.contains("temporarily unavailable")
        || t.contains("broken pipe")
        || t.contains("disconnected")
        || t.contains("connection")
}

/// One event ready to send: its bytes and headers are built once and reused by every retry,
/// so a retry is byte-for-byte the same publish.
struct Prepared {
    payload: Bytes,
    headers: HeaderMap,
}

fn prepare(env: &EventEnvelope) -> Result<Prepared, BusError> {
    let id = EventId::from_bytes(&env.event_id).map_err(|e| BusError::InvalidEvent(e.to_string()))?;
    let mut headers = HeaderMap::new();
    headers.insert(MSG_ID, id.to_string().as_str());
    if !env.traceparent.is_empty() {
        headers.insert(TRACEPARENT, env.traceparent.as_str());
    }
    if !env.tracestate.is_empty() {
        headers.insert(TRACESTATE, env.tracestate.as_str());
    }
    Ok(Prepared {
        payload: Bytes::from(env.encode_to_vec()),
        headers,
    })
}

enum Attempt {
    Retry(String),
    Fatal(BusError),
}

fn classify(e: jetstream::context::PublishError) -> Attempt {
    match e.kind() {
        PublishErrorKind::TimedOut
        | PublishErrorKind::BrokenPipe
        | PublishErrorKind::StreamNotFound
        | PublishErrorKind::MaxAckPending => Attempt::Retry(e.to_string()),
        PublishErrorKind::MaxPayloadExceeded
        | PublishErrorKind::WrongLastMessageId
        | PublishErrorKind::WrongLastSequence => Attempt::Fatal(BusError::nats("publish", e)),
        PublishErrorKind::Other => {
            // An API error in the ack: 503 means JetStream is not ready (yet); anything else
            // is the server refusing this message, which a resend will not change.
            let api = std::error::Error::source(&e).and_then(|s| s.downcast_ref::<jetstream::Error>());
            match api {
                Some(api) if api.code() != 503 => Attempt::Fatal(BusError::nats("publish", &e)),
                _ => Attempt::Retry(e.to_string()),
            }
        }
        #[allow(unreachable_patterns)]
        _ => Attempt::Retry(e.to_string()),
    }
}

/// A stream's instance (see [`StreamState::instance`]): its creation time in ns since the
/// epoch, as nats-server records it with the stream and keeps across restarts.
pub(crate) fn stream_instance(info: &jetstream::stream::Info) -> u64 {
    u64::try_from(info.created.unix_timestamp_nanos()).unwrap_or(0)
}

fn encode_user_token(user: &UserId) -> String {
    user.as_str().replace('.', "~")
}

fn decode_user_token(token: &str) -> Option<UserId> {
    if token.contains('.') {
        return None;
    }
    UserId::parse(token.replace('~', ".")).ok()
}

/// Exponential backoff from 50 ms to 1 s: quick enough to catch a restarted server within
/// a second or so, slow enough not to spin.
pub(crate) struct Backoff {
    next: Duration,
}

impl Backoff {
    pub(crate) fn new() -> Self {
        Self {
            next: Duration::from_millis(50),
        }
    }

    pub(crate) fn peek(&self) -> Duration {
        self.next
    }

    pub(crate) async fn sleep(&mut self) {
        tokio::time::sleep(self.next).await;
        self.next = (self.next * 2).min(Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_tokens_round_trip() {
        for u in ["ann", "ann.b", "a.b.c", "x-y_z", ".lead", "trail."] {
            let user = UserId::parse(u).unwrap();
            let token = encode_user_token(&user);
            assert!(!token.contains('.'), "{token}");
            assert_eq!(decode_user_token(&token), Some(user));
        }
    }

    #[test]
    fn envelopes_without_a_valid_id_are_refused() {
        let env = EventEnvelope::default();
        assert!(matches!(prepare(&env), Err(BusError::InvalidEvent(_))));
    }
}
