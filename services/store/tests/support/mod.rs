//! Shared by the store's integration tests: opening each backend under a unique namespace,
//! and building events.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use meridian_model::events::{self, event_envelope::Body, EventEnvelope};
use meridian_model::{ConversationId, EventId, HybridClock, RegionId, UserId};
use meridian_store::kv::embedded::{EmbeddedStore, EngineKind};
use meridian_store::{ApplyConfig, KvStore, SequencedEvent, Store};

/// A backend under test, with what it needs kept alive.
pub struct Backend {
    pub name: &'static str,
    pub kv: Arc<dyn KvStore>,
    _dir: Option<tempfile::TempDir>,
}

impl Backend {
    /// A store under a namespace no other test uses.
    pub fn store(&self) -> Store {
        static N: AtomicU64 = AtomicU64::new(0);
        let ns = format!(
            "t{}-{}-{}/",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            now_nanos()
        );
        Store::new(self.kv.clone(), ns.as_bytes())
    }
}

fn now_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

pub fn embedded(kind: EngineKind) -> Backend {
    let dir = tempfile::tempdir().unwrap();
    let kv = Arc::new(EmbeddedStore::open(dir.path(), kind).unwrap());
    Backend {
        name: kv.backend(),
        kv,
        _dir: Some(dir),
    }
}

/// Every backend this machine can run: both embedded engines always, TiKV when
/// `MERIDIAN_TIKV_PD` names its PD endpoints.
pub async fn backends() -> Vec<Backend> {
    let mut out = vec![embedded(EngineKind::Fjall), embedded(EngineKind::Redb)];
    match std::env::var("MERIDIAN_TIKV_PD") {
        Ok(pd) if !pd.is_empty() => {
            let kv = meridian_store::kv::open(&format!("tikv://{pd}"))
                .await
                .expect("connect to TiKV");
            out.push(Backend {
                name: "tikv",
                kv,
                _dir: None,
            });
        }
        _ => eprintln!("conformance: TiKV skipped (set MERIDIAN_TIKV_PD=host:port[,host:port] to run it)"),
    }
    out
}

pub fn user(s: &str) -> UserId {
    UserId::parse(s).unwrap()
}
pub fn region(s: &str) -> RegionId {
    RegionId::parse(s).unwrap()
}

/// Makes events as a region's gateway would.
pub struct EventFactory {
    pub region: RegionId,
    clock: HybridClock,
}

impl EventFactory {
    pub fn new(region: &str) -> Self {
        Self {
            region: region.parse_region(),
            clock: HybridClock::new(),
        }
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
            traceparent: String::new(),
            tracestate: String::new(),
            body: Some(body),
        }
    }

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

    pub fn group(&self, owner: &str, cid: &ConversationId, members: &[&str]) -> EventEnvelope {
        let mut grants = vec![events::MemberGrant {
            user_id: owner.into(),
            role: events::MemberRole::Owner as i32,
        }];
        grants.extend(members.iter().map(|m| events::MemberGrant {
            user_id: (*m).into(),
            role: events::MemberRole::Member as i32,
        }));
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

    pub fn direct(&self, a: &str, b: &str) -> (ConversationId, EventEnvelope) {
        let cid = ConversationId::direct(&user(a), &user(b));
        let ev = self.envelope(
            a,
            Body::ConversationCreated(events::ConversationCreated {
                conversation_id: cid.to_string(),
                kind: events::ConversationKind::Direct as i32,
                name: String::new(),
                members: vec![
                    events::MemberGrant {
                        user_id: a.into(),
                        role: events::MemberRole::Member as i32,
                    },
                    events::MemberGrant {
                        user_id: b.into(),
                        role: events::MemberRole::Member as i32,
                    },
                ],
            }),
        );
        (cid, ev)
    }

    pub fn message(
        &self,
        sender: &str,
        cid: &ConversationId,
        client_msg_id: &str,
        text: &str,
    ) -> EventEnvelope {
        let id = EventId::for_message(&user(sender), cid, client_msg_id);
        self.envelope_with_id(
            sender,
            id,
            Body::MessageSent(events::MessageSent {
                conversation_id: cid.to_string(),
                client_msg_id: client_msg_id.into(),
                msg_type: "text".into(),
                body_json: serde_json::json!({ "text": text }).to_string(),
            }),
        )
    }

    pub fn body(&self, actor: &str, body: Body) -> EventEnvelope {
        self.envelope(actor, body)
    }
}

trait ParseRegion {
    fn parse_region(&self) -> RegionId;
}
impl ParseRegion for str {
    fn parse_region(&self) -> RegionId {
        RegionId::parse(self).unwrap()
    }
}

/// Numbers events as one stream would.
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

pub fn cfg(region: &str) -> ApplyConfig {
    ApplyConfig::new(RegionId::parse(region).unwrap())
}

/// What one committed transaction wrote.
#[derive(Debug, Clone, Copy, Default)]
pub struct CommitTally {
    pub puts: usize,
    pub deletes: usize,
    /// Key and value bytes of the puts, key bytes of the deletes.
    pub bytes: usize,
}

/// A real backend with every commit tallied: how big the transactions the store makes are.
pub struct TalliedKv {
    inner: Arc<dyn KvStore>,
    pub commits: Arc<std::sync::Mutex<Vec<CommitTally>>>,
}

impl TalliedKv {
    pub fn new(inner: Arc<dyn KvStore>) -> Self {
        Self {
            inner,
            commits: Default::default(),
        }
    }

    /// Forgets the commits tallied so far.
    pub fn take(&self) -> Vec<CommitTally> {
        std::mem::take(&mut *self.commits.lock().unwrap())
    }
}

struct TalliedTxn {
    inner: Box<dyn meridian_store::KvTxn>,
    tally: CommitTally,
    commits: Arc<std::sync::Mutex<Vec<CommitTally>>>,
}

#[async_trait::async_trait]
impl KvStore for TalliedKv {
    async fn begin(&self) -> meridian_store::Result<Box<dyn meridian_store::KvTxn>> {
        Ok(Box::new(TalliedTxn {
            inner: self.inner.begin().await?,
            tally: CommitTally::default(),
            commits: self.commits.clone(),
        }))
    }
    async fn begin_read(&self) -> meridian_store::Result<Box<dyn meridian_store::KvTxn>> {
        self.inner.begin_read().await
    }
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
}

#[async_trait::async_trait]
impl meridian_store::KvTxn for TalliedTxn {
    async fn get(&mut self, key: &[u8]) -> meridian_store::Result<Option<Vec<u8>>> {
        self.inner.get(key).await
    }
    async fn batch_get(&mut self, keys: &[Vec<u8>]) -> meridian_store::Result<Vec<Option<Vec<u8>>>> {
        self.inner.batch_get(keys).await
    }
    async fn scan(
        &mut self,
        start: &[u8],
        end: &[u8],
        limit: usize,
        order: meridian_store::ScanOrder,
    ) -> meridian_store::Result<Vec<meridian_store::kv::KvPair>> {
        self.inner.scan(start, end, limit, order).await
    }
    async fn put(&mut self, key: Vec<u8>, value: Vec<u8>) -> meridian_store::Result<()> {
        self.tally.puts += 1;
        self.tally.bytes += key.len() + value.len();
        self.inner.put(key, value).await
    }
    async fn delete(&mut self, key: Vec<u8>) -> meridian_store::Result<()> {
        self.tally.deletes += 1;
        self.tally.bytes += key.len();
        self.inner.delete(key).await
    }
    async fn commit(self: Box<Self>) -> meridian_store::Result<()> {
        let me = *self;
        me.inner.commit().await?;
        me.commits.lock().unwrap().push(me.tally);
        Ok(())
    }
    async fn rollback(self: Box<Self>) -> meridian_store::Result<()> {
        self.inner.rollback().await
    }
}
