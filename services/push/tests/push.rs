//! Offline push against a real nats-server, an embedded store and local HTTP servers that
//! stand in for the webhook receiver, APNs (h2c) and FCM, recording every request.
//!
//! Deliveries are made the way the applier makes them: events are applied to the store and
//! the `report.deliveries` it returns are published as `LiveEntry` bytes on the users'
//! delivery subjects.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use axum::extract::{Request, State};
use axum::http::{StatusCode, Version};
use axum::response::IntoResponse;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use meridian_applier::testing::{RunningApplier, TestRegion};
use meridian_model::events::{self, event_envelope::Body, EventEnvelope};
use meridian_model::{ConversationId, RegionId, UserId};
use meridian_push::{ApnsConfig, FcmConfig, PushConfig, PushMetrics};
use meridian_store::testing::{eventually, user as uid, EventFactory};
use meridian_store::{ApplyConfig, Delivery, SequencedEvent};
use p256::ecdsa::signature::Verifier as _;
use p256::ecdsa::{Signature, SigningKey};
use p256::pkcs8::DecodePrivateKey as _;
use prost::Message as _;
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const REGION: &str = "eu";
/// A throwaway P-256 key made for these tests; it signs nothing anywhere else.
const TEST_KEY_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgGxDvlfM0YTXK63tc
FlxHH+fu+Qxije2CAlEXv4slpIahRANCAAThbLTDWiZMumuj23Vo6FFuf1kcKEZ/
ZWDuS4eaH775Yf9pwxK9wFmcTgK6+EBaNbIxHyjLjuohtsazXdTxrSsu
-----END PRIVATE KEY-----
";
const WAIT: Duration = Duration::from_secs(15);
/// After the expected outcome, how long we keep watching for requests that should not come.
const SETTLE: Duration = Duration::from_millis(300);

// ---------------------------------------------------------------------------------------
// A recording HTTP server.

#[derive(Clone, Debug)]
struct Recorded {
    path: String,
    version: Version,
    headers: axum::http::HeaderMap,
    body: Value,
}

#[derive(Default)]
struct ServerState {
    requests: Mutex<Vec<Recorded>>,
    /// Statuses (and bodies, when given) to answer, in order; once used up,
    /// `default_status`.
    script: Mutex<VecDeque<(u16, Option<Value>)>>,
    default_status: Mutex<u16>,
    delay: Mutex<Duration>,
}

struct Recorder {
    url: String,
    state: Arc<ServerState>,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Recorder {
    /// Answers `script` in order, then `then` for every later request. Speaks HTTP/1.1 and
    /// prior-knowledge HTTP/2 (h2c) on the same port, like axum's server does.
    async fn start(script: &[u16], then: u16) -> Result<Recorder> {
        let replies: Vec<(u16, Option<Value>)> = script.iter().map(|s| (*s, None)).collect();
        Self::start_replies(replies, then).await
    }

    /// Like [`Recorder::start`], with the body of each scripted answer given.
    async fn start_replies(script: Vec<(u16, Option<Value>)>, then: u16) -> Result<Recorder> {
        let state = Arc::new(ServerState::default());
        *state.script.lock().unwrap() = script.into_iter().collect();
        *state.default_status.lock().unwrap() = then;
        let app = axum::Router::new().fallback(record).with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stopped.cancelled().await })
                .await;
        });
        Ok(Recorder {
            url,
            state,
            stop,
            task: Some(task),
        })
    }

    fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().unwrap().clone()
    }

    fn set_delay(&self, d: Duration) {
        *self.state.delay.lock().unwrap() = d;
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

async fn record(State(state): State<Arc<ServerState>>, req: Request) -> impl IntoResponse {
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, 1 << 20).await.unwrap_or_default();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    state.requests.lock().unwrap().push(Recorded {
        path: parts.uri.path().to_string(),
        version: parts.version,
        headers: parts.headers,
        body,
    });
    let delay = *state.delay.lock().unwrap();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let (status, body) = state
        .script
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or((*state.default_status.lock().unwrap(), None));
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let reply = body.unwrap_or_else(|| {
        if status.is_success() {
            json!({"name": "projects/p/messages/1"})
        } else {
            json!({"reason": "Scripted"})
        }
    });
    (status, axum::Json(reply))
}

// ---------------------------------------------------------------------------------------
// The region: NATS, store, and an event factory that numbers events like a stream.

struct Region {
    world: TestRegion,
    events: EventFactory,
    next_seq: u64,
}

impl Region {
    async fn start() -> Result<Region> {
        Ok(Region {
            world: TestRegion::start(RegionId::parse(REGION)?).await?,
            events: EventFactory::new(REGION),
            next_seq: 1,
        })
    }

    async fn apply(&mut self, envs: Vec<EventEnvelope>) -> Result<Vec<Delivery>> {
        let events: Vec<SequencedEvent> = envs
            .into_iter()
            .map(|envelope| {
                let e = SequencedEvent {
                    stream_seq: self.next_seq,
                    envelope,
                };
                self.next_seq += 1;
                e
            })
            .collect();
        let report = self
            .world
            .store
            .apply_batch(&ApplyConfig::new(RegionId::parse(REGION)?), "TEST", &events)
            .await?;
        Ok(report.deliveries)
    }

    /// ann and bob, homed here, with a direct conversation; `devices` are (user, device,
    /// platform, token).
    async fn setup(&mut self, devices: &[(&str, &str, &str, &str)]) -> Result<ConversationId> {
        let (cid, created) = self.events.direct("ann", "bob");
        let mut envs = vec![
            self.events.user("ann", REGION),
            self.events.user("bob", REGION),
            created,
        ];
        for (user, device, platform, token) in devices {
            envs.push(self.events.envelope(
                user,
                Body::DeviceRegistered(events::DeviceRegistered {
                    user_id: (*user).into(),
                    device_id: (*device).into(),
                    platform: (*platform).into(),
                    token: (*token).into(),
                }),
            ));
        }
        // Setup entries are not published: each test publishes exactly what it is about.
        self.apply(envs).await?;
        Ok(cid)
    }

    async fn mute(&mut self, user: &str, cid: &ConversationId) -> Result<()> {
        let env = self.events.envelope(
            user,
            Body::UserSettingsChanged(events::UserSettingsChanged {
                user_id: user.into(),
                conversation_id: cid.to_string(),
                muted: Some(true),
                pinned: None,
            }),
        );
        self.apply(vec![env]).await?;
        Ok(())
    }

    /// `sender` sends a message; returns the deliveries (one per member), unpublished.
    async fn message(
        &mut self,
        sender: &str,
        cid: &ConversationId,
        client_msg_id: &str,
    ) -> Result<Vec<Delivery>> {
        let env = self.events.message(sender, cid, client_msg_id, "secret text");
        let deliveries = self.apply(vec![env]).await?;
        if deliveries.len() != 2 {
            bail!("expected a delivery per member, got {deliveries:?}");
        }
        Ok(deliveries)
    }

    /// The real applier on the region's stream, for the events push publishes. It stops
    /// with the test's runtime.
    fn start_applier(&self) -> RunningApplier {
        self.world.start_applier()
    }

    /// Polls until `user` has no active device registration.
    async fn wait_no_devices(&self, user: &str) -> Result<()> {
        eventually(WAIT, &format!("{user}'s registration to be removed"), || async {
            Ok(self.world.store.devices(&uid(user)).await?.is_empty())
        })
        .await
    }

    /// What the applier does after a commit.
    async fn publish(&self, deliveries: &[Delivery]) -> Result<()> {
        for d in deliveries {
            self.world
                .bus
                .publish_delivery(&d.user, Bytes::from(d.live_entry().encode_to_vec()))
                .await?;
        }
        self.world.bus.client().flush().await?;
        Ok(())
    }
}

fn for_user<'a>(deliveries: &'a [Delivery], user: &str) -> &'a Delivery {
    deliveries
        .iter()
        .find(|d| d.user.as_str() == user)
        .expect("a delivery for the user")
}

// ---------------------------------------------------------------------------------------
// Running push.

struct Running {
    metrics: Arc<PushMetrics>,
    stop: CancellationToken,
    task: JoinHandle<Result<(), meridian_push::PushError>>,
}

fn config() -> PushConfig {
    let mut cfg = PushConfig::new(RegionId::parse(REGION).unwrap());
    cfg.first_backoff_ms = 10;
    cfg.max_backoff_ms = 50;
    cfg.max_attempts = 5;
    cfg.shutdown_grace_ms = 5_000;
    cfg
}

async fn start_push(region: &Region, cfg: PushConfig, online: &'static [&'static str]) -> Result<Running> {
    let metrics = Arc::new(PushMetrics::default());
    let stop = CancellationToken::new();
    let presence = Arc::new(move |u: &UserId| online.contains(&u.as_str()));
    let task = tokio::spawn(meridian_push::run(
        cfg,
        region.world.bus.clone(),
        region.world.store.clone(),
        presence,
        metrics.clone(),
        stop.clone(),
    ));
    // Core NATS only delivers to subscriptions that exist: probe until push sees one.
    // The probe is not an inbox entry, so it only counts as undecodable.
    let probe_user = uid("probe");
    let deadline = tokio::time::Instant::now() + WAIT;
    while metrics.undecodable.get() == 0 {
        if task.is_finished() {
            bail!("push exited early: {:?}", task.await);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("push never subscribed");
        }
        region
            .world
            .bus
            .publish_delivery(&probe_user, Bytes::from_static(&[0x0a, 0xff]))
            .await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Later probes may still be in flight; let them land before tests read counters.
    tokio::time::sleep(Duration::from_millis(100)).await;
    Ok(Running { metrics, stop, task })
}

impl Running {
    fn get(&self, f: impl Fn(&PushMetrics) -> &prometheus_client::metrics::counter::Counter) -> u64 {
        f(&self.metrics).get()
    }

    /// Waits until `cond` holds on the metrics, then a little longer so anything that
    /// should not happen has had the chance to.
    async fn wait_for(&self, what: &str, cond: impl Fn(&PushMetrics) -> bool) -> Result<()> {
        eventually(WAIT, what, || async { Ok(cond(&self.metrics)) })
            .await
            .with_context(|| self.metrics.render_prometheus())?;
        tokio::time::sleep(SETTLE).await;
        Ok(())
    }

    async fn stop(self) -> Result<Arc<PushMetrics>> {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .context("push did not stop")???;
        Ok(self.metrics)
    }
}

fn done(m: &PushMetrics) -> u64 {
    m.notifications_sent.get() + m.failed.get()
}

// ---------------------------------------------------------------------------------------
// Tests.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_user_gets_exactly_one_webhook_post_with_seq_and_token() -> Result<()> {
    let hook = Recorder::start(&[], 200).await?;
    let mut region = Region::start().await?;
    let cid = region.setup(&[("bob", "phone", "webhook", "tok-bob")]).await?;
    let mut cfg = config();
    cfg.webhook_url = Some(format!("{}/hook", hook.url));
    let push = start_push(&region, cfg, &[]).await?;

    let deliveries = region.message("ann", &cid, "m1").await?;
    region.publish(&deliveries).await?;
    push.wait_for("one notification", |m| done(m) >= 1).await?;

    let reqs = hook.requests();
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    let bob = for_user(&deliveries, "bob");
    let entry = &bob.entry;
    assert_eq!(reqs[0].path, "/hook");
    assert_eq!(
        reqs[0].body,
        json!({
            "user_id": "bob",
            "device_id": "phone",
            "token": "tok-bob",
            "platform": "webhook",
            "seq": bob.seq,
            "conversation_id": cid.to_string(),
            "kind": "message",
            "sender": "ann",
            "sent_at": entry.at_ms,
        })
    );
    assert!(!reqs[0].body.to_string().contains("secret text"));
    // ann's own copy of the message was skipped as hers.
    assert_eq!(push.get(|m| &m.skipped_own), 1);
    assert_eq!(push.get(|m| &m.notifications_sent), 1);
    assert_eq!(push.get(|m| &m.webhook.sent), 1);
    let text = push.metrics.render_prometheus();
    assert!(
        text.contains("meridian_push_notifications_sent_total 1"),
        "{text}"
    );
    assert!(
        text.contains("meridian_push_provider_sent_total{provider=\"webhook\"} 1"),
        "{text}"
    );
    push.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_user_gets_no_push() -> Result<()> {
    let hook = Recorder::start(&[], 200).await?;
    let mut region = Region::start().await?;
    let cid = region.setup(&[("bob", "phone", "webhook", "tok-bob")]).await?;
    let mut cfg = config();
    cfg.webhook_url = Some(hook.url.clone());
    let push = start_push(&region, cfg, &["bob"]).await?;

    let deliveries = region.message("ann", &cid, "m1").await?;
    region.publish(&deliveries).await?;
    push.wait_for("the online skip", |m| m.skipped_online.get() >= 1)
        .await?;
    assert!(hook.requests().is_empty());
    assert_eq!(push.get(|m| &m.skipped_online), 1);
    assert_eq!(push.get(|m| &m.notifications_sent), 0);
    push.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn muted_conversation_gets_no_push() -> Result<()> {
    let hook = Recorder::start(&[], 200).await?;
    let mut region = Region::start().await?;
    let cid = region.setup(&[("bob", "phone", "webhook", "tok-bob")]).await?;
    region.mute("bob", &cid).await?;
    let mut cfg = config();
    cfg.webhook_url = Some(hook.url.clone());
    let push = start_push(&region, cfg, &[]).await?;

    let deliveries = region.message("ann", &cid, "m1").await?;
    region.publish(&deliveries).await?;
    push.wait_for("the muted skip", |m| m.skipped_muted.get() >= 1)
        .await?;
    assert!(hook.requests().is_empty());
    assert_eq!(push.get(|m| &m.skipped_muted), 1);
    push.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sender_gets_no_push_for_their_own_message() -> Result<()> {
    let hook = Recorder::start(&[], 200).await?;
    let mut region = Region::start().await?;
    let cid = region
        .setup(&[
            ("ann", "laptop", "webhook", "tok-ann"),
            ("bob", "phone", "webhook", "tok-bob"),
        ])
        .await?;
    let mut cfg = config();
    cfg.webhook_url = Some(hook.url.clone());
    let push = start_push(&region, cfg, &[]).await?;

    // ann writes: only bob hears about it. Then bob answers: only ann does.
    let d1 = region.message("ann", &cid, "m1").await?;
    region.publish(&d1).await?;
    push.wait_for("bob's notification", |m| done(m) >= 1).await?;
    let d2 = region.message("bob", &cid, "m2").await?;
    region.publish(&d2).await?;
    push.wait_for("ann's notification", |m| done(m) >= 2).await?;

    let reqs = hook.requests();
    let users: Vec<&str> = reqs.iter().map(|r| r.body["user_id"].as_str().unwrap()).collect();
    assert_eq!(users, ["bob", "ann"], "{reqs:?}");
    assert_eq!(reqs[0].body["sender"], "ann");
    assert_eq!(reqs[1].body["sender"], "bob");
    assert_eq!(push.get(|m| &m.skipped_own), 2);
    push.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_500s_then_200_is_three_attempts_and_one_success() -> Result<()> {
    let hook = Recorder::start(&[500, 500], 200).await?;
    let mut region = Region::start().await?;
    let cid = region.setup(&[("bob", "phone", "webhook", "tok-bob")]).await?;
    let mut cfg = config();
    cfg.webhook_url = Some(hook.url.clone());
    let push = start_push(&region, cfg, &[]).await?;

    let deliveries = region.message("ann", &cid, "m1").await?;
    region.publish(&deliveries).await?;
    push.wait_for("the success", |m| done(m) >= 1).await?;

    assert_eq!(hook.requests().len(), 3);
    assert_eq!(push.get(|m| &m.notifications_sent), 1);
    assert_eq!(push.get(|m| &m.failed), 0);
    assert_eq!(push.get(|m| &m.retries), 2);
    assert_eq!(push.get(|m| &m.webhook.attempts), 3);
    // Every attempt is the same notification.
    let reqs = hook.requests();
    assert!(reqs.iter().all(|r| r.body == reqs[0].body));
    push.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_400_is_not_retried_and_counts_failed() -> Result<()> {
    let hook = Recorder::start(&[400], 200).await?;
    let mut region = Region::start().await?;
    let cid = region.setup(&[("bob", "phone", "webhook", "tok-bob")]).await?;
    let mut cfg = config();
    cfg.webhook_url = Some(hook.url.clone());
    let push = start_push(&region, cfg, &[]).await?;

    let deliveries = region.message("ann", &cid, "m1").await?;
    region.publish(&deliveries).await?;
    push.wait_for("the failure", |m| done(m) >= 1).await?;

    assert_eq!(hook.requests().len(), 1);
    assert_eq!(push.get(|m| &m.failed), 1);
    assert_eq!(push.get(|m| &m.webhook.failed), 1);
    assert_eq!(push.get(|m| &m.retries), 0);
    assert_eq!(push.get(|m| &m.notifications_sent), 0);
    push.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_always_failing_is_given_up_after_max_attempts() -> Result<()> {
    let hook = Recorder::start(&[], 503).await?;
    let mut region = Region::start().await?;
    let cid = region.setup(&[("bob", "phone", "webhook", "tok-bob")]).await?;
    let mut cfg = config();
    cfg.webhook_url = Some(hook.url.clone());
    cfg.max_attempts = 4;
    let push = start_push(&region, cfg, &[]).await?;

    let deliveries = region.message("ann", &cid, "m1").await?;
    region.publish(&deliveries).await?;
    push.wait_for("giving up", |m| done(m) >= 1).await?;

    assert_eq!(hook.requests().len(), 4);
    assert_eq!(push.get(|m| &m.failed), 1);
    assert_eq!(push.get(|m| &m.retries), 3);
    assert_eq!(push.get(|m| &m.notifications_sent), 0);
    let text = push.metrics.render_prometheus();
    assert!(
        text.contains("meridian_push_notifications_failed_total 1"),
        "{text}"
    );
    push.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_entry_published_twice_notifies_once() -> Result<()> {
    let hook = Recorder::start(&[], 200).await?;
    let mut region = Region::start().await?;
    let cid = region.setup(&[("bob", "phone", "webhook", "tok-bob")]).await?;
    let mut cfg = config();
    cfg.webhook_url = Some(hook.url.clone());
    let push = start_push(&region, cfg, &[]).await?;

    let deliveries = region.message("ann", &cid, "m1").await?;
    let bob = for_user(&deliveries, "bob").clone();
    // Back to back (the second arrives while the first may still be in flight), then once
    // more after it is done.
    region.publish(&[bob.clone(), bob.clone()]).await?;
    push.wait_for("the notification", |m| done(m) >= 1).await?;
    region.publish(std::slice::from_ref(&bob)).await?;
    push.wait_for("both duplicates", |m| m.duplicates.get() >= 2)
        .await?;

    assert_eq!(hook.requests().len(), 1);
    assert_eq!(push.get(|m| &m.notifications_sent), 1);
    assert_eq!(push.get(|m| &m.duplicates), 2);

    // The next entry (seq + 1) is a new notification.
    let next = region.message("ann", &cid, "m2").await?;
    region.publish(&[for_user(&next, "bob").clone()]).await?;
    push.wait_for("the second notification", |m| done(m) >= 2).await?;
    let seqs: Vec<u64> = hook
        .requests()
        .iter()
        .map(|r| r.body["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [bob.seq, bob.seq + 1]);
    push.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apns_request_is_http2_with_token_auth_and_the_right_shape() -> Result<()> {
    let apns = Recorder::start(&[], 200).await?;
    let mut region = Region::start().await?;
    let token = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";
    let cid = region.setup(&[("bob", "iphone", "apns", token)]).await?;
    let mut cfg = config();
    let mut a = ApnsConfig::new("TEAM123456", "KEY1234567", TEST_KEY_PEM, "com.example.meridian");
    a.endpoint = apns.url.clone();
    cfg.apns = Some(a);
    let push = start_push(&region, cfg, &[]).await?;

    let deliveries = region.message("ann", &cid, "m1").await?;
    region.publish(&deliveries).await?;
    push.wait_for("the notification", |m| done(m) >= 1).await?;

    let reqs = apns.requests();
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    let r = &reqs[0];
    assert_eq!(r.version, Version::HTTP_2, "APNs is HTTP/2 only");
    assert_eq!(r.path, format!("/3/device/{token}"));
    let h = |name: &str| r.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("");
    assert_eq!(h("apns-topic"), "com.example.meridian");
    assert_eq!(h("apns-push-type"), "alert");
    assert_eq!(h("apns-priority"), "10");
    let jwt = h("authorization")
        .strip_prefix("bearer ")
        .context("authorization is `bearer <jwt>`")?;
    let parts: Vec<&str> = jwt.split('.').collect();
    assert_eq!(parts.len(), 3);
    let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0])?)?;
    assert_eq!(header["alg"], "ES256");
    assert_eq!(header["kid"], "KEY1234567");
    let claims: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1])?)?;
    assert_eq!(claims["iss"], "TEAM123456");
    let iat = claims["iat"].as_u64().context("iat")?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    assert!(iat <= now && now - iat < 120, "iat {iat} vs now {now}");
    // The signature verifies with the key's public half.
    let key = SigningKey::from_pkcs8_pem(TEST_KEY_PEM)?;
    let sig = Signature::from_slice(&URL_SAFE_NO_PAD.decode(parts[2])?)?;
    key.verifying_key()
        .verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &sig)?;

    let bob = for_user(&deliveries, "bob");
    assert_eq!(
        r.body["aps"]["alert"]["title"], "ANN",
        "the sender's display name"
    );
    assert_eq!(r.body["aps"]["alert"]["body"], "New message");
    assert_eq!(r.body["aps"]["mutable-content"], 1);
    assert_eq!(r.body["seq"], bob.seq);
    assert_eq!(r.body["conversation_id"], cid.to_string());
    assert!(!r.body.to_string().contains("secret text"));
    assert_eq!(push.get(|m| &m.apns.sent), 1);
    push.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fcm_request_has_the_v1_path_bearer_and_body() -> Result<()> {
    let fcm = Recorder::start(&[], 200).await?;
    let mut region = Region::start().await?;
    let cid = region.setup(&[("bob", "pixel", "fcm", "fcm-token-1")]).await?;
    let mut cfg = config();
    let mut f = FcmConfig::new("meridian-test", "test-access-token");
    f.endpoint = fcm.url.clone();
    cfg.fcm = Some(f);
    let push = start_push(&region, cfg, &[]).await?;

    let deliveries = region.message("ann", &cid, "m1").await?;
    region.publish(&deliveries).await?;
    push.wait_for("the notification", |m| done(m) >= 1).await?;

    let reqs = fcm.requests();
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    let r = &reqs[0];
    assert_eq!(r.path, "/v1/projects/meridian-test/messages:send");
    assert_eq!(
        r.headers.get("authorization").and_then(|v| v.to_str().ok()),
        Some("Bearer test-access-token")
    );
    let bob = for_user(&deliveries, "bob");
    let m = &r.body["message"];
    assert_eq!(m["token"], "fcm-token-1");
    assert_eq!(
        m["data"],
        json!({"seq": bob.seq.to_string(), "conversation_id": cid.to_string(), "kind": "message"})
    );
    assert_eq!(m["notification"], json!({"title": "ANN", "body": "New message"}));
    assert!(!r.body.to_string().contains("secret text"));
    assert_eq!(push.get(|m| &m.fcm.sent), 1);
    push.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_of_every_platform_are_notified_and_unconfigured_ones_skipped() -> Result<()> {
    let hook = Recorder::start(&[], 200).await?;
    let fcm = Recorder::start(&[], 200).await?;
    let mut region = Region::start().await?;
    let cid = region
        .setup(&[
            ("bob", "phone", "webhook", "tok-bob"),
            ("bob", "pixel", "fcm", "fcm-token-1"),
            ("bob", "iphone", "apns", "abcdef"),
        ])
        .await?;
    let mut cfg = config();
    cfg.webhook_url = Some(hook.url.clone());
    let mut f = FcmConfig::new("meridian-test", "t");
    f.endpoint = fcm.url.clone();
    cfg.fcm = Some(f);
    // No APNs configured: the iphone is skipped, not failed.
    let push = start_push(&region, cfg, &[]).await?;

    let deliveries = region.message("ann", &cid, "m1").await?;
    region.publish(&deliveries).await?;
    push.wait_for("two notifications", |m| done(m) >= 2).await?;
    assert_eq!(hook.requests().len(), 1);
    assert_eq!(fcm.requests().len(), 1);
    assert_eq!(push.get(|m| &m.skipped_unsupported), 1);
    assert_eq!(push.get(|m| &m.failed), 0);
    push.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_without_devices_is_counted_and_skipped() -> Result<()> {
    let hook = Recorder::start(&[], 200).await?;
    let mut region = Region::start().await?;
    let cid = region.setup(&[]).await?;
    let mut cfg = config();
    cfg.webhook_url = Some(hook.url.clone());
    let push = start_push(&region, cfg, &[]).await?;

    let deliveries = region.message("ann", &cid, "m1").await?;
    region.publish(&deliveries).await?;
    push.wait_for("the skip", |m| m.skipped_no_device.get() >= 1)
        .await?;
    assert!(hook.requests().is_empty());
    push.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_a_notification_in_flight_finish() -> Result<()> {
    let hook = Recorder::start(&[], 200).await?;
    hook.set_delay(Duration::from_millis(500));
    let mut region = Region::start().await?;
    let cid = region.setup(&[("bob", "phone", "webhook", "tok-bob")]).await?;
    let mut cfg = config();
    cfg.webhook_url = Some(hook.url.clone());
    let push = start_push(&region, cfg, &[]).await?;

    let deliveries = region.message("ann", &cid, "m1").await?;
    region.publish(&deliveries).await?;
    eventually(WAIT, "the request", || async { Ok(!hook.requests().is_empty()) }).await?;
    // The provider is still answering: shutting down now must wait for it.
    let metrics = push.stop().await?;
    assert_eq!(metrics.notifications_sent.get(), 1);
    assert_eq!(metrics.in_flight.get(), 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_for_another_region_is_refused() -> Result<()> {
    let region = Region::start().await?;
    let cfg = PushConfig::new(RegionId::parse("us")?);
    let r = meridian_push::run(
        cfg,
        region.world.bus.clone(),
        region.world.store.clone(),
        Arc::new(meridian_push::NobodyOnline),
        Arc::new(PushMetrics::default()),
        CancellationToken::new(),
    )
    .await;
    match r {
        Err(meridian_push::PushError::Config { field, .. }) => assert_eq!(field, "region"),
        other => bail!("expected a region config error, got {other:?}"),
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Item 13: dead device tokens are unregistered; FCM access tokens come from a service
// account and are refreshed.

const APNS_TOKEN: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";

fn apns_config(endpoint: &str) -> ApnsConfig {
    let mut a = ApnsConfig::new("TEAM123456", "KEY1234567", TEST_KEY_PEM, "com.example.meridian");
    a.endpoint = endpoint.to_string();
    a
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item13_apns_410_unregistered_removes_the_device_registration() -> Result<()> {
    // What APNs answers for a token whose app was uninstalled.
    let apns = Recorder::start_replies(
        vec![(
            410,
            Some(json!({"reason": "Unregistered", "timestamp": 1_700_000_000_000u64})),
        )],
        200,
    )
    .await?;
    let mut region = Region::start().await?;
    let cid = region.setup(&[("bob", "iphone", "apns", APNS_TOKEN)]).await?;
    let applier = region.start_applier();
    let mut cfg = config();
    cfg.apns = Some(apns_config(&apns.url));
    let push = start_push(&region, cfg, &[]).await?;

    let deliveries = region.message("ann", &cid, "m1").await?;
    region.publish(&deliveries).await?;
    push.wait_for("the refused notification", |m| done(m) >= 1)
        .await?;
    region.wait_no_devices("bob").await?;
    assert_eq!(apns.requests().len(), 1, "a dead token is not retried");
    assert_eq!(push.get(|m| &m.retries), 0);
    assert_eq!(push.get(|m| &m.failed), 1);

    // The next message finds no device to notify.
    let next = region.message("ann", &cid, "m2").await?;
    region.publish(&next).await?;
    push.wait_for("the no-device skip", |m| m.skipped_no_device.get() >= 1)
        .await?;
    assert_eq!(apns.requests().len(), 1);
    push.stop().await?;
    applier.stop().await?;
    Ok(())
}

/// FCM's answer for a registration token that is no longer valid.
fn fcm_unregistered_body() -> Value {
    json!({"error": {
        "code": 404,
        "message": "Requested entity was not found.",
        "status": "NOT_FOUND",
        "details": [{
            "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
            "errorCode": "UNREGISTERED"
        }]
    }})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item13_fcm_404_unregistered_removes_the_device_registration() -> Result<()> {
    let fcm = Recorder::start_replies(vec![(404, Some(fcm_unregistered_body()))], 200).await?;
    let mut region = Region::start().await?;
    let cid = region
        .setup(&[
            ("bob", "pixel", "fcm", "fcm-token-dead"),
            ("bob", "phone", "webhook", "tok-bob"),
        ])
        .await?;
    let hook = Recorder::start(&[], 200).await?;
    let applier = region.start_applier();
    let mut cfg = config();
    let mut f = FcmConfig::new("meridian-test", "test-access-token");
    f.endpoint = fcm.url.clone();
    cfg.fcm = Some(f);
    cfg.webhook_url = Some(hook.url.clone());
    let push = start_push(&region, cfg, &[]).await?;

    let deliveries = region.message("ann", &cid, "m1").await?;
    region.publish(&deliveries).await?;
    push.wait_for("both devices' outcomes", |m| done(m) >= 2).await?;
    // Only the dead registration goes; the webhook device stays.
    eventually(WAIT, "the dead FCM registration to be removed", || async {
        let devices = region.world.store.devices(&uid("bob")).await?;
        Ok(devices.iter().map(|d| d.device_id.as_str()).eq(["phone"]))
    })
    .await?;
    assert_eq!(fcm.requests().len(), 1, "a dead token is not retried");
    assert_eq!(push.get(|m| &m.fcm.failed), 1);
    assert_eq!(push.get(|m| &m.webhook.sent), 1);
    push.stop().await?;
    applier.stop().await?;
    Ok(())
}

// A stand-in for Google: the OAuth2 token endpoint (JWT bearer grant) and FCM HTTP v1,
// which accepts only tokens that endpoint issued and that have not expired or been revoked.

const TEST_RSA_PEM: &str = include_str!("data/test-service-account.pem");
const SA_EMAIL: &str = "push@meridian-test.iam.gserviceaccount.com";
const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

#[derive(Default)]
struct GoogleState {
    url: String,
    /// `expires_in` of the tokens issued, in order; 3600 once used up.
    lifetimes: Mutex<VecDeque<u64>>,
    /// Issued tokens and when they expire.
    issued: Mutex<Vec<(String, tokio::time::Instant)>>,
    revoked: Mutex<Vec<String>>,
    /// Every FCM send: the Authorization header and the status answered.
    sends: Mutex<Vec<(String, u16)>>,
    /// Why a token request was refused, if one was.
    refusals: Mutex<Vec<String>>,
}

struct Google {
    url: String,
    state: Arc<GoogleState>,
    _stop: CancellationToken,
}

impl Google {
    async fn start(lifetimes: &[u64]) -> Result<Google> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let state = Arc::new(GoogleState {
            url: url.clone(),
            lifetimes: Mutex::new(lifetimes.iter().copied().collect()),
            ..Default::default()
        });
        let app = axum::Router::new()
            .route("/token", axum::routing::post(google_token))
            .fallback(google_fcm)
            .with_state(state.clone());
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stopped.cancelled().await })
                .await;
        });
        Ok(Google {
            url,
            state,
            _stop: stop,
        })
    }

    /// A service-account key file whose `token_uri` is this stand-in.
    fn key_file(&self, dir: &std::path::Path) -> Result<std::path::PathBuf> {
        let path = dir.join("service-account.json");
        let key = json!({
            "type": "service_account",
            "project_id": "meridian-test",
            "private_key_id": "kid-1",
            "private_key": TEST_RSA_PEM,
            "client_email": SA_EMAIL,
            "client_id": "100000000000000000001",
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": format!("{}/token", self.url),
        });
        std::fs::write(&path, key.to_string())?;
        Ok(path)
    }

    fn sends(&self) -> Vec<(String, u16)> {
        self.state.sends.lock().unwrap().clone()
    }

    fn tokens_issued(&self) -> usize {
        self.state.issued.lock().unwrap().len()
    }

    fn expired(&self, token: &str) -> bool {
        let now = tokio::time::Instant::now();
        self.state
            .issued
            .lock()
            .unwrap()
            .iter()
            .any(|(t, until)| t == token && *until <= now)
    }

    fn revoke(&self, token: &str) {
        self.state.revoked.lock().unwrap().push(token.to_string());
    }
}

/// Checks the assertion the way Google does (grant type, RS256 signature by the key,
/// issuer, audience, scope, lifetime) and issues `tok-<n>`.
async fn google_token(State(state): State<Arc<GoogleState>>, body: Bytes) -> axum::response::Response {
    let form: Vec<(String, String)> = match serde_urlencoded::from_bytes(&body) {
        Ok(f) => f,
        Err(e) => return refuse(&state, format!("form: {e}")),
    };
    let field = |name: &str| {
        form.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    if field("grant_type") != JWT_BEARER {
        return refuse(&state, format!("grant_type {:?}", field("grant_type")));
    }
    if let Err(e) = check_assertion(&field("assertion"), &format!("{}/token", state.url)) {
        return refuse(&state, e);
    }
    let lifetime = state.lifetimes.lock().unwrap().pop_front().unwrap_or(3600);
    let mut issued = state.issued.lock().unwrap();
    let token = format!("tok-{}", issued.len() + 1);
    issued.push((
        token.clone(),
        tokio::time::Instant::now() + Duration::from_secs(lifetime),
    ));
    axum::Json(json!({"access_token": token, "expires_in": lifetime, "token_type": "Bearer"})).into_response()
}

fn refuse(state: &GoogleState, why: String) -> axum::response::Response {
    state.refusals.lock().unwrap().push(why.clone());
    (
        StatusCode::BAD_REQUEST,
        axum::Json(json!({"error": "invalid_grant", "error_description": why})),
    )
        .into_response()
}

fn check_assertion(jwt: &str, audience: &str) -> std::result::Result<(), String> {
    let parts: Vec<&str> = jwt.split('.').collect();
    let [header, claims, sig] = parts[..] else {
        return Err("not a JWS".into());
    };
    let decode = |s: &str| URL_SAFE_NO_PAD.decode(s).map_err(|e| e.to_string());
    let header: Value = serde_json::from_slice(&decode(header)?).map_err(|e| e.to_string())?;
    if header["alg"] != "RS256" {
        return Err(format!("alg {}", header["alg"]));
    }
    let (_, der) =
        p256::pkcs8::der::pem::decode_vec(TEST_RSA_PEM.trim().as_bytes()).map_err(|e| e.to_string())?;
    let key = ring::signature::RsaKeyPair::from_pkcs8(&der).map_err(|e| e.to_string())?;
    ring::signature::UnparsedPublicKey::new(
        &ring::signature::RSA_PKCS1_2048_8192_SHA256,
        key.public().as_ref(),
    )
    .verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &decode(sig)?)
    .map_err(|_| "bad signature".to_string())?;
    let claims: Value = serde_json::from_slice(&decode(claims)?).map_err(|e| e.to_string())?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_secs();
    let (iat, exp) = (
        claims["iat"].as_u64().unwrap_or(0),
        claims["exp"].as_u64().unwrap_or(0),
    );
    if claims["iss"] != SA_EMAIL
        || claims["aud"] != audience
        || claims["scope"] != "https://www.googleapis.com/auth/firebase.messaging"
        || iat > now + 60
        || exp <= now
        || exp - iat > 3600
    {
        return Err(format!("claims {claims}"));
    }
    Ok(())
}

async fn google_fcm(State(state): State<Arc<GoogleState>>, req: Request) -> axum::response::Response {
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let token = auth.strip_prefix("Bearer ").unwrap_or("");
    let now = tokio::time::Instant::now();
    let valid = !state.revoked.lock().unwrap().iter().any(|t| t == token)
        && state
            .issued
            .lock()
            .unwrap()
            .iter()
            .any(|(t, until)| t == token && now < *until);
    let status = if valid { 200 } else { 401 };
    state.sends.lock().unwrap().push((auth, status));
    if valid {
        axum::Json(json!({"name": "projects/meridian-test/messages/1"})).into_response()
    } else {
        (
            StatusCode::UNAUTHORIZED,
            axum::Json(json!({"error": {
                "code": 401,
                "message": "Request had invalid authentication credentials.",
                "status": "UNAUTHENTICATED"
            }})),
        )
            .into_response()
    }
}

/// bob's FCM device, push configured with a service-account key whose `token_uri` is the
/// stand-in Google.
struct FcmWorld {
    google: Google,
    region: Region,
    cid: ConversationId,
    push: Running,
    sent: u64,
    _dir: tempfile::TempDir,
}

impl FcmWorld {
    async fn start(token_lifetimes: &[u64]) -> Result<FcmWorld> {
        let google = Google::start(token_lifetimes).await?;
        let dir = tempfile::tempdir()?;
        let mut region = Region::start().await?;
        let cid = region.setup(&[("bob", "pixel", "fcm", "fcm-token-1")]).await?;
        let mut cfg = config();
        let mut fcm = FcmConfig::with_service_account("meridian-test", google.key_file(dir.path())?);
        fcm.endpoint = google.url.clone();
        cfg.fcm = Some(fcm);
        let push = start_push(&region, cfg, &[]).await?;
        Ok(FcmWorld {
            google,
            region,
            cid,
            push,
            sent: 0,
            _dir: dir,
        })
    }

    /// ann sends one more message; waits until bob's notification is done.
    async fn notify_bob(&mut self) -> Result<()> {
        self.sent += 1;
        let n = self.sent;
        let deliveries = self.region.message("ann", &self.cid, &format!("m{n}")).await?;
        self.region.publish(&deliveries).await?;
        self.push
            .wait_for(&format!("notification {n}"), |m| done(m) >= n)
            .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item13_fcm_token_is_minted_from_the_service_account_and_refreshed_after_expiry() -> Result<()> {
    // The first token lives one second, the next an hour.
    let mut w = FcmWorld::start(&[1]).await?;
    w.notify_bob().await?;
    assert_eq!(w.google.sends(), [("Bearer tok-1".to_string(), 200)]);

    // The hour passes (here, the second): FCM would now refuse tok-1.
    eventually(WAIT, "tok-1 to expire", || async {
        Ok(w.google.expired("tok-1"))
    })
    .await?;
    w.notify_bob().await?;
    // And a fresh token is cached: the third send asks for none.
    w.notify_bob().await?;

    assert_eq!(
        w.google.sends(),
        [
            ("Bearer tok-1".to_string(), 200),
            ("Bearer tok-2".to_string(), 200),
            ("Bearer tok-2".to_string(), 200),
        ]
    );
    assert_eq!(w.google.tokens_issued(), 2);
    assert!(w.google.state.refusals.lock().unwrap().is_empty());
    assert_eq!(w.push.get(|m| &m.fcm.sent), 3);
    assert_eq!(w.push.get(|m| &m.failed), 0);
    assert_eq!(w.push.get(|m| &m.retries), 0);
    w.push.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item13_fcm_401_drops_the_token_and_retries_with_a_fresh_one() -> Result<()> {
    let mut w = FcmWorld::start(&[]).await?;
    w.notify_bob().await?;
    // Revoked before its hour is up (a rotated key, say): FCM answers 401.
    w.google.revoke("tok-1");
    w.notify_bob().await?;

    assert_eq!(
        w.google.sends(),
        [
            ("Bearer tok-1".to_string(), 200),
            ("Bearer tok-1".to_string(), 401),
            ("Bearer tok-2".to_string(), 200),
        ]
    );
    assert_eq!(w.push.get(|m| &m.fcm.sent), 2);
    assert_eq!(w.push.get(|m| &m.retries), 1);
    assert_eq!(w.push.get(|m| &m.failed), 0);
    w.push.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item13_a_registration_renewed_with_a_new_token_survives_the_dead_tokens_removal() -> Result<()> {
    let mut region = Region::start().await?;
    region.setup(&[("bob", "iphone", "apns", "aaaa")]).await?;
    // The app was reinstalled: a new token for the same device id, then push's removal
    // of the old token (reported dead) arrives.
    let unregister = |region: &Region, token: &str| {
        region.events.envelope(
            "push",
            Body::DeviceUnregistered(events::DeviceUnregistered {
                user_id: "bob".into(),
                device_id: "iphone".into(),
                token: token.into(),
            }),
        )
    };
    let renew = region.events.envelope(
        "bob",
        Body::DeviceRegistered(events::DeviceRegistered {
            user_id: "bob".into(),
            device_id: "iphone".into(),
            platform: "apns".into(),
            token: "bbbb".into(),
        }),
    );
    let stale = unregister(&region, "aaaa");
    region.apply(vec![renew, stale]).await?;
    let devices = region.world.store.devices(&uid("bob")).await?;
    assert_eq!(devices.len(), 1, "{devices:?}");
    assert_eq!(devices[0].token, "bbbb");

    // The new token's own removal does remove it.
    let current = unregister(&region, "bbbb");
    region.apply(vec![current]).await?;
    assert!(region.world.store.devices(&uid("bob")).await?.is_empty());
    Ok(())
}
