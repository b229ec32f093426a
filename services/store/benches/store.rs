//! Store benchmarks on Meridian's access pattern, for both embedded engine candidates:
//! - `append/<engine>/<n>`: one `apply_batch` of n messages (timeline append + 2 inbox
//!   appends each, one durable commit per batch);
//! - `reverse_read/<engine>`: the latest 50 messages of a random timeline among 10,000;
//! - `fan_out_500/<engine>`: one group message written to 500 inboxes.
//!
//! Run: `cargo bench -p meridian-store` (figures in the crate README).

use std::sync::atomic::{AtomicU64, Ordering};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use meridian_model::events::{self, event_envelope::Body, EventEnvelope};
use meridian_model::{ConversationId, EventId, OrderKey, RegionId, UserId};
use meridian_store::kv::embedded::EngineKind;
use meridian_store::records::TimelineEntry;
use meridian_store::testing::{apply_config, EventFactory, TempStore};
use meridian_store::timeline::HistoryPage;
use meridian_store::{SequencedEvent, Store};
use prost::Message;
use rand::Rng;

struct Env {
    rt: tokio::runtime::Runtime,
    store: Store,
    events: EventFactory,
    seq: AtomicU64,
    _dir: tempfile::TempDir,
}

fn env(kind: EngineKind) -> Env {
    let TempStore { store, dir } = TempStore::open_with(kind).unwrap();
    Env {
        rt: tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap(),
        store,
        events: EventFactory::new("us"),
        seq: AtomicU64::new(0),
        _dir: dir,
    }
}

impl Env {
    /// Numbers `envelope` as the next event of the stream.
    fn sequence(&self, envelope: EventEnvelope) -> SequencedEvent {
        SequencedEvent {
            stream_seq: self.seq.fetch_add(1, Ordering::Relaxed) + 1,
            envelope,
        }
    }
    fn user(&self, u: &str) -> SequencedEvent {
        self.sequence(self.events.user(u, "us"))
    }
    fn message(&self, sender: &str, cid: &ConversationId) -> SequencedEvent {
        let body = format!("{{\"text\":\"{}\"}}", "x".repeat(80));
        self.sequence(self.events.envelope(
            sender,
            Body::MessageSent(events::MessageSent {
                conversation_id: cid.to_string(),
                client_msg_id: String::new(),
                msg_type: "text".into(),
                body_json: body,
            }),
        ))
    }
    fn apply(&self, evs: &[SequencedEvent]) {
        let cfg = apply_config("us");
        self.rt
            .block_on(self.store.apply_batch(&cfg, "SYNC_US", evs))
            .unwrap();
    }
}

const ENGINES: [(EngineKind, &str); 2] = [(EngineKind::Fjall, "fjall"), (EngineKind::Redb, "redb")];

fn append(c: &mut Criterion) {
    for (kind, name) in ENGINES {
        let e = env(kind);
        let (cid, create) = e.events.direct("ann", "bob");
        let create = e.sequence(create);
        e.apply(&[e.user("ann"), e.user("bob"), create]);
        let mut g = c.benchmark_group(format!("append/{name}"));
        g.sample_size(20);
        for n in [1usize, 16, 256] {
            g.throughput(Throughput::Elements(n as u64));
            g.bench_function(n.to_string(), |bench| {
                bench.iter_batched(
                    || (0..n).map(|_| e.message("ann", &cid)).collect::<Vec<_>>(),
                    |evs| e.apply(&evs),
                    BatchSize::SmallInput,
                )
            });
        }
        g.finish();
    }
}

fn reverse_read(c: &mut Criterion) {
    const TIMELINES: usize = 10_000;
    const PER_TIMELINE: usize = 60;
    for (kind, name) in ENGINES {
        let e = env(kind);
        let cids: Vec<ConversationId> = (0..TIMELINES).map(|_| ConversationId::new_group()).collect();
        let region = RegionId::parse("us").unwrap();
        // Bulk-load timelines straight through the KV layer: 600k entries.
        e.rt.block_on(async {
            for chunk in cids.chunks(200) {
                let mut t = e.store.kv().begin().await.unwrap();
                for cid in chunk {
                    for _ in 0..PER_TIMELINE {
                        let key = OrderKey::new(e.events.clock().now(), region.clone(), EventId::new_v7());
                        let entry = TimelineEntry {
                            kind: "message".into(),
                            event_id: key.event_id.as_bytes().to_vec(),
                            actor: "ann".into(),
                            at_ms: key.hlc.physical_ms(),
                            msg_type: "text".into(),
                            body_json: "x".repeat(100),
                            ..Default::default()
                        };
                        t.put(e.store.keys().timeline(cid, &key), entry.encode_to_vec())
                            .await
                            .unwrap();
                    }
                }
                t.commit().await.unwrap();
            }
        });
        let viewer = UserId::parse("ann").unwrap();
        let mut rng = rand::thread_rng();
        c.bench_function(&format!("reverse_read/{name}"), |bench| {
            bench.iter(|| {
                let cid = &cids[rng.gen_range(0..TIMELINES)];
                let h =
                    e.rt.block_on(e.store.history(cid, &viewer, HistoryPage::Latest, 50))
                        .unwrap();
                assert_eq!(h.messages.len(), 50);
            })
        });
    }
}

fn fan_out(c: &mut Criterion) {
    for (kind, name) in ENGINES {
        let e = env(kind);
        let cid = ConversationId::new_group();
        let mut setup: Vec<SequencedEvent> = (0..500).map(|i| e.user(&format!("u{i}"))).collect();
        let members: Vec<String> = (1..500).map(|i| format!("u{i}")).collect();
        let members: Vec<&str> = members.iter().map(String::as_str).collect();
        setup.push(e.sequence(e.events.group("u0", &cid, &members)));
        e.apply(&setup);
        let mut g = c.benchmark_group("fan_out_500");
        g.sample_size(20);
        g.throughput(Throughput::Elements(500));
        g.bench_function(name, |bench| {
            bench.iter_batched(
                || vec![e.message("u1", &cid)],
                |evs| e.apply(&evs),
                BatchSize::SmallInput,
            )
        });
        g.finish();
    }
}

criterion_group!(benches, append, reverse_read, fan_out);
criterion_main!(benches);
