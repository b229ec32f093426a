//! Test fixtures for the store and every crate whose tests apply events to it (feature
//! `testing`): an event factory that makes envelopes as a region's gateway would, a store in a
//! temporary directory under a unique namespace, a bounded polling loop, and the bytes a data
//! directory holds on disk. Real store, real engine: nothing here stands in for either.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use meridian_model::events::{self, event_envelope::Body, EventEnvelope};
use meridian_model::{ConversationId, EventId, HybridClock, RegionId, UserId};

use crate::kv::embedded::{EmbeddedStore, EngineKind};
use crate::{ApplyConfig, SequencedEvent, Store};

/// A user id from a literal; panics on an invalid one (a test's typo).
pub fn user(s: &str) -> UserId {
    UserId::parse(s).unwrap()
}

/// A region id from a literal; panics on an invalid one.
pub fn region(s: &str) -> RegionId {
    RegionId::parse(s).unwrap()
}

/// The apply configuration of `region`'s processes.
pub fn apply_config(region: &str) -> ApplyConfig {
    ApplyConfig::new(self::region(region))
}

/// Makes events as a region's gateway would: its region as origin, HLCs from one clock.
pub struct EventFactory {
    pub region: RegionId,
    /// The `traceparent` every envelope carries (empty: none).
    pub traceparent: String,
    clock: HybridClock,
}

impl EventFactory {
    pub fn new(region: &str) -> Self {
        Self {
            region: self::region(region),
            traceparent: String::new(),
            clock: HybridClock::new(),
        }
    }

    /// The clock the factory stamps HLCs from.
    pub fn clock(&self) -> &HybridClock {
        &self.clock
    }

    pub fn envelope(&self, actor: &str, body: Body) -> EventEnvelope {
        self.envelope_with_id(actor, EventId::new_v7(), body)
    }

    pub fn envelope_with_id(&self, actor: &str, id: EventId, body: Body) -> EventEnvelope {
        EventEnvelope {
            event_id: id.as_bytes().to_vec(),
            origin_region: self.region.to_string(),
            hlc: self.clock.now().0,
            actor: actor.into(),
            actor_device: "d1".into(),
            traceparent: self.traceparent.clone(),
            tracestate: String::new(),
            body: Some(body),
        }
    }

    /// `id` homed in `home`, display name its upper case.
    pub fn user(&self, id: &str, home: &str) -> EventEnvelope {
        self.envelope(
            "admin",
            Body::UserUpserted(events::UserUpserted {
                user_id: id.into(),
                home_region: home.into(),
                display_name: id.to_uppercase(),
            }),
        )
    }

    /// A group named "team" created by `owner` with `members` as plain members.
    pub fn group(&self, owner: &str, cid: &ConversationId, members: &[&str]) -> EventEnvelope {
        let mut grants = vec![grant(owner, events::MemberRole::Owner)];
        grants.extend(members.iter().map(|m| grant(m, events::MemberRole::Member)));
        self.envelope(
            owner,
            Body::ConversationCreated(events::ConversationCreated {
                conversation_id: cid.to_string(),
                kind: events::ConversationKind::Group as i32,
                name: "team".into(),
                members: grants,
            }),
        )
    }

    /// The direct conversation of `a` and `b`, created by `a`.
    pub fn direct(&self, a: &str, b: &str) -> (ConversationId, EventEnvelope) {
        let cid = ConversationId::direct(&user(a), &user(b));
        let ev = self.envelope(
            a,
            Body::ConversationCreated(events::ConversationCreated {
                conversation_id: cid.to_string(),
                kind: events::ConversationKind::Direct as i32,
                name: String::new(),
                members: vec![
                    grant(a, events::MemberRole::Member),
                    grant(b, events::MemberRole::Member),
                ],
            }),
        );
        (cid, ev)
    }

    /// A text message `{"text": text}`, its event id derived as the gateway derives it.
    pub fn message(
        &self,
        sender: &str,
        cid: &ConversationId,
        client_msg_id: &str,
        text: &str,
    ) -> EventEnvelope {
        self.message_json(
            sender,
            cid,
            client_msg_id,
            serde_json::json!({ "text": text }).to_string(),
        )
    }

    /// A text message with the body JSON given as is.
    pub fn message_json(
        &self,
        sender: &str,
        cid: &ConversationId,
        client_msg_id: &str,
        body_json: String,
    ) -> EventEnvelope {
        let id = EventId::for_message(&user(sender), cid, client_msg_id);
        self.envelope_with_id(
            sender,
            id,
            Body::MessageSent(events::MessageSent {
                conversation_id: cid.to_string(),
                client_msg_id: client_msg_id.into(),
                msg_type: "text".into(),
                body_json,
            }),
        )
    }
}

fn grant(user_id: &str, role: events::MemberRole) -> events::MemberGrant {
    events::MemberGrant {
        user_id: user_id.into(),
        role: role as i32,
    }
}

/// Numbers events as one stream would, from `first_seq`.
pub fn sequenced(events: &[EventEnvelope], first_seq: u64) -> Vec<SequencedEvent> {
    events
        .iter()
        .enumerate()
        .map(|(i, e)| SequencedEvent {
            stream_seq: first_seq + i as u64,
            envelope: e.clone(),
        })
        .collect()
}

/// A key namespace no other test (in this or any other process, on a shared TiKV) uses: a
/// fresh v7 event id, unique by construction.
pub fn unique_namespace() -> String {
    format!("t{}/", EventId::new_v7())
}

/// An embedded store in a temporary directory, under a unique namespace. Dropping it removes
/// the directory.
pub struct TempStore {
    pub store: Store,
    pub dir: tempfile::TempDir,
}

impl TempStore {
    /// A fjall store.
    pub fn open() -> crate::Result<TempStore> {
        Self::open_with(EngineKind::Fjall)
    }

    pub fn open_with(kind: EngineKind) -> crate::Result<TempStore> {
        let dir = tempfile::Builder::new()
            .prefix("meridian-store-")
            .tempdir()
            .map_err(|e| crate::StoreError::Backend(format!("temporary directory: {e}")))?;
        let kv = EmbeddedStore::open(dir.path(), kind)?;
        let store = Store::new(Arc::new(kv), unique_namespace().as_bytes());
        Ok(TempStore { store, dir })
    }
}

/// Polls `check` every 10 ms until it returns true or its error, or fails once `within` has
/// passed: the bounded way to wait for something asynchronous, instead of a sleep.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await? {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Bytes in the files below `dir` (0 for a directory that cannot be read): what a data
/// directory holds on disk.
pub fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}
