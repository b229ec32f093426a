//! The applier against a real nats-server and the embedded store.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use futures::StreamExt;
use meridian_applier::testing::TestRegion as World;
use meridian_applier::ApplierConfig;
use meridian_model::events::{event_envelope::Body, EventEnvelope};
use meridian_model::{ConversationId, EventId, RegionId, UserId};
use meridian_store::inbox::SyncOutcome;
use meridian_store::records::InboxEntry;
use meridian_store::testing::{eventually, user, EventFactory};
use meridian_store::timeline::HistoryPage;
use prost::Message as _;
use tokio_util::sync::CancellationToken;

const REGION: &str = "eu-west";

fn region() -> RegionId {
    RegionId::parse(REGION).unwrap()
}

/// What these tests read back from the store.
trait Reads {
    async fn messages(&self, cid: &ConversationId, viewer: &str) -> Result<Vec<EventId>>;
    async fn inbox(&self, u: &str) -> Result<Vec<InboxEntry>>;
}

impl Reads for World {
    async fn messages(&self, cid: &ConversationId, viewer: &str) -> Result<Vec<EventId>> {
        let h = self
            .store
            .history(cid, &user(viewer), HistoryPage::After(None), 10_000)
            .await?;
        Ok(h.messages.into_iter().map(|m| m.message_id).collect())
    }

    /// Every entry of `u`'s inbox, checking the seqs run 1, 2, 3... without holes.
    async fn inbox(&self, u: &str) -> Result<Vec<InboxEntry>> {
        let view = self.store.user(&user(u)).await?.context("user not applied")?;
        let page = match self
            .store
            .read_inbox(&user(u), &view.epoch, None, 0, 100_000)
            .await?
        {
            SyncOutcome::Page(p) => p,
            other => bail!("unexpected {other:?}"),
        };
        for (i, e) in page.entries.iter().enumerate() {
            ensure!(
                e.seq == i as u64 + 1,
                "inbox seqs not consecutive at {i}: {}",
                e.seq
            );
        }
        ensure!(
            page.head == page.entries.len() as u64,
            "head {} vs {} entries",
            page.head,
            page.entries.len()
        );
        Ok(page.entries)
    }
}

async fn world() -> Result<World> {
    Ok(World::start(region()).await?)
}

/// Makes events as a gateway of REGION would, with a trace context.
fn events() -> EventFactory {
    let mut ev = EventFactory::new(REGION);
    ev.traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into();
    ev
}

/// Message `n` of `sender`: client message id `m<n>`, text `hello <n>`.
fn message(ev: &EventFactory, sender: &str, cid: &ConversationId, n: usize) -> EventEnvelope {
    ev.message(sender, cid, &format!("m{n}"), &format!("hello {n}"))
}

fn id(env: &EventEnvelope) -> EventId {
    EventId::from_bytes(&env.event_id).unwrap()
}

/// Users ann and bob and their direct conversation.
async fn setup(w: &World, ev: &EventFactory) -> Result<ConversationId> {
    let (cid, created) = ev.direct("ann", "bob");
    w.bus
        .publish_events(&[
            ev.user("ann", REGION),
            ev.user("bob.smith", REGION),
            ev.user("bob", REGION),
        ])
        .await?;
    w.bus.publish_event(&created).await?;
    Ok(cid)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applies_events_and_delivers_inbox_entries_live() -> Result<()> {
    let w = world().await?;
    let ev = events();
    let mut deliveries = w.bus.subscribe(w.bus.delivery_wildcard()).await?;
    w.bus.client().flush().await?;
    let applier = w.start_applier();

    let cid = setup(&w, &ev).await?;
    let sent: Vec<EventEnvelope> = (0..5).map(|n| message(&ev, "ann", &cid, n)).collect();
    w.bus.publish_events(&sent).await?;

    eventually(Duration::from_secs(15), "5 messages in history", || async {
        Ok(w.messages(&cid, "ann").await?.len() == 5)
    })
    .await?;
    let want: Vec<EventId> = sent.iter().map(id).collect();
    assert_eq!(w.messages(&cid, "bob").await?, want);

    // Both inboxes: the conversation's creation, then the five messages.
    for u in ["ann", "bob"] {
        let inbox = w.inbox(u).await?;
        assert_eq!(inbox.len(), 6, "{u}");
        let kinds: Vec<&str> = inbox
            .iter()
            .map(|e| e.entry.as_ref().unwrap().kind.as_str())
            .collect();
        assert_eq!(kinds[1..], ["message"; 5]);
    }

    // Every appended entry went out live, on the recipient's delivery subject.
    let mut got: Vec<(UserId, InboxEntry)> = Vec::new();
    while got.len() < 12 {
        let msg = tokio::time::timeout(Duration::from_secs(10), deliveries.next())
            .await
            .context("deliveries stopped")?
            .context("subscription ended")?;
        let u = w
            .bus
            .delivery_user(&msg.subject)
            .context("not a delivery subject")?;
        let live = meridian_model::events::LiveEntry::decode(msg.payload.as_ref())?;
        got.push((u, InboxEntry::from(live)));
    }
    for u in ["ann", "bob"] {
        let live: Vec<InboxEntry> = got
            .iter()
            .filter(|(g, _)| g.as_str() == u)
            .map(|(_, e)| e.clone())
            .collect();
        assert_eq!(live, w.inbox(u).await?, "{u}");
    }

    let metrics = applier.stop().await?;
    assert_eq!(metrics.applied.get(), 4 + 5);
    assert_eq!(metrics.deliveries.get(), 12);
    assert_eq!(metrics.checkpoint(&w.bus.stream()), Some(9));
    assert_eq!(w.store.checkpoint(&w.bus.stream()).await?, 9);
    assert!(metrics
        .render_prometheus()
        .contains("meridian_applier_applied_total 9"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_9_of_nats_mid_stream_applies_every_event_once() -> Result<()> {
    const N: usize = 300;
    let mut w = world().await?;
    let ev = events();
    let applier = w.start_applier();
    let cid = setup(&w, &ev).await?;
    let sent: Vec<EventEnvelope> = (0..N).map(|n| message(&ev, "ann", &cid, n)).collect();

    let (progress_tx, mut progress_rx) = tokio::sync::mpsc::channel::<usize>(N);
    let publisher = tokio::spawn({
        let bus = w.bus.clone();
        let sent = sent.clone();
        async move {
            for (i, chunk) in sent.chunks(4).enumerate() {
                bus.publish_events(chunk).await?;
                progress_tx.send((i + 1) * 4).await.ok();
            }
            Ok::<_, meridian_bus::BusError>(())
        }
    });
    while let Some(done) = progress_rx.recv().await {
        if done >= N / 3 {
            break;
        }
    }
    let applied_at_kill = w.store.checkpoint(&w.bus.stream()).await?;
    w.server.restart()?;
    tokio::spawn(async move { while progress_rx.recv().await.is_some() {} });
    publisher.await??;
    eprintln!("nats killed with {applied_at_kill} of {} events applied", 4 + N);

    eventually(Duration::from_secs(60), "every message applied", || async {
        Ok(w.messages(&cid, "ann").await?.len() >= N)
    })
    .await?;
    let history = w.messages(&cid, "bob").await?;
    assert_eq!(
        history,
        sent.iter().map(id).collect::<Vec<_>>(),
        "each message once, in order"
    );
    for u in ["ann", "bob"] {
        let inbox = w.inbox(u).await?;
        assert_eq!(inbox.len(), 1 + N, "{u}: creation + every message, once");
        let ids: HashSet<Vec<u8>> = inbox
            .iter()
            .map(|e| e.entry.as_ref().unwrap().event_id.clone())
            .collect();
        assert_eq!(ids.len(), inbox.len(), "{u}: no entry twice");
    }
    let state = w.bus.stream_state(&w.bus.stream()).await?;
    assert_eq!(state.messages, (4 + N) as u64, "the stream holds each event once");
    let metrics = applier.stop().await?;
    assert_eq!(metrics.applied.get(), (4 + N) as u64);
    assert_eq!(metrics.duplicates.get(), 0);
    eprintln!(
        "redeliveries skipped by the checkpoint: {}",
        metrics.below_checkpoint.get()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_applier_restart_resumes_without_duplicate_effects() -> Result<()> {
    const N: usize = 200;
    let w = world().await?;
    let ev = events();
    let first = w.start_applier();
    let cid = setup(&w, &ev).await?;
    let sent: Vec<EventEnvelope> = (0..N).map(|n| message(&ev, "bob", &cid, n)).collect();
    let publisher = tokio::spawn({
        let bus = w.bus.clone();
        let sent = sent.clone();
        async move {
            for chunk in sent.chunks(5) {
                bus.publish_events(chunk).await?;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok::<_, meridian_bus::BusError>(())
        }
    });
    eventually(Duration::from_secs(15), "some messages applied", || async {
        Ok(w.messages(&cid, "ann").await?.len() >= N / 4)
    })
    .await?;
    let m1 = first.stop().await?;
    let at_stop = w.store.checkpoint(&w.bus.stream()).await?;

    let second = w.start_applier();
    publisher.await??;
    eventually(Duration::from_secs(30), "every message applied", || async {
        Ok(w.messages(&cid, "ann").await?.len() >= N)
    })
    .await?;
    assert_eq!(
        w.messages(&cid, "ann").await?,
        sent.iter().map(id).collect::<Vec<_>>()
    );
    for u in ["ann", "bob"] {
        assert_eq!(w.inbox(u).await?.len(), 1 + N, "{u}");
    }
    let m2 = second.stop().await?;
    let applied = m1.applied.get() + m2.applied.get();
    assert_eq!(
        applied,
        (4 + N) as u64,
        "every event applied by exactly one of the two runs"
    );
    assert_eq!(m1.checkpoint(&w.bus.stream()), Some(at_stop));
    Ok(())
}

/// The stream is replaced under a running applier, first by an operator deleting and
/// recreating it, then by nats-server coming back without its storage. Each new instance
/// numbers its events from 1 again, below the store's checkpoint; the applier notices when
/// its subscription breaks and applies the new instance from its start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item1_a_stream_replaced_under_a_running_applier_is_applied_from_its_start() -> Result<()> {
    let mut w = world().await?;
    let ev = events();
    let applier = w.start_applier();
    let cid = setup(&w, &ev).await?;
    let mut sent: Vec<EventEnvelope> = (0..3).map(|n| message(&ev, "ann", &cid, n)).collect();
    w.bus.publish_events(&sent).await?;
    eventually(Duration::from_secs(15), "the first 3 messages", || async {
        Ok(w.messages(&cid, "bob").await?.len() == 3)
    })
    .await?;

    w.bus.jetstream().delete_stream(w.bus.stream()).await?;
    w.bus.ensure_stream().await?;
    let batch: Vec<EventEnvelope> = (3..6).map(|n| message(&ev, "ann", &cid, n)).collect();
    w.bus.publish_events(&batch).await?;
    sent.extend(batch);
    eventually(
        Duration::from_secs(30),
        "3 messages from the recreated stream",
        || async { Ok(w.messages(&cid, "bob").await?.len() == 6) },
    )
    .await?;

    w.server.restart_empty()?;
    // Nobody but the applier recreates the stream: the publish waits for it.
    let batch: Vec<EventEnvelope> = (6..9).map(|n| message(&ev, "ann", &cid, n)).collect();
    w.bus.publish_events(&batch).await?;
    sent.extend(batch);
    eventually(
        Duration::from_secs(30),
        "3 messages after the storage loss",
        || async { Ok(w.messages(&cid, "bob").await?.len() == 9) },
    )
    .await?;

    assert_eq!(
        w.messages(&cid, "ann").await?,
        sent.iter().map(id).collect::<Vec<_>>()
    );
    for u in ["ann", "bob"] {
        assert_eq!(
            w.inbox(u).await?.len(),
            1 + 9,
            "{u}: creation + every message, once"
        );
    }
    let state = w.bus.stream_state(&w.bus.stream()).await?;
    let cp = w.store.stream_checkpoint(&w.bus.stream()).await?;
    assert_eq!(
        (cp.instance, cp.seq),
        (state.instance, 3),
        "checkpointed in the new instance"
    );
    applier.stop().await?;
    Ok(())
}

/// A checkpoint written before instances were recorded (8 bytes, the seq alone) that lies
/// beyond the end of the stream: the stream is not the one it counted in, so it is applied
/// from its start, and the checkpoint then names the instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item1_an_old_checkpoint_beyond_the_stream_end_applies_the_stream_from_its_start() -> Result<()> {
    let w = world().await?;
    let key = w.store.keys().checkpoint(&w.bus.stream());
    let mut txn = w.store.kv().begin().await?;
    txn.put(key, 100u64.to_be_bytes().to_vec()).await?;
    txn.commit().await?;
    let ev = events();
    let cid = setup(&w, &ev).await?;
    let sent: Vec<EventEnvelope> = (0..3).map(|n| message(&ev, "ann", &cid, n)).collect();
    w.bus.publish_events(&sent).await?;

    let applier = w.start_applier();
    eventually(Duration::from_secs(15), "3 messages", || async {
        Ok(w.messages(&cid, "bob").await?.len() == 3)
    })
    .await?;
    let state = w.bus.stream_state(&w.bus.stream()).await?;
    let cp = w.store.stream_checkpoint(&w.bus.stream()).await?;
    assert_eq!((cp.instance, cp.seq), (state.instance, 4 + 3));
    applier.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_messages_move_the_checkpoint_without_wedging() -> Result<()> {
    let w = world().await?;
    let ev = events();
    let applier = w.start_applier();
    let subject = format!("{}sync.{}.events", w.bus.config().prefix, REGION);
    w.bus
        .jetstream()
        .publish(subject, bytes::Bytes::from_static(b"\xff\xfe not an envelope"))
        .await?
        .await?;
    let cid = setup(&w, &ev).await?;
    w.bus.publish_event(&message(&ev, "ann", &cid, 1)).await?;
    eventually(
        Duration::from_secs(15),
        "the message after the bad one",
        || async { Ok(w.messages(&cid, "bob").await?.len() == 1) },
    )
    .await?;
    assert_eq!(w.store.checkpoint(&w.bus.stream()).await?, 6);
    let m = applier.stop().await?;
    assert_eq!(m.undecodable.get(), 1);
    assert_eq!(m.rejected.get(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_mismatch_is_a_config_error() -> Result<()> {
    let w = world().await?;
    let cfg = ApplierConfig::new(RegionId::parse("elsewhere")?);
    let err = meridian_applier::run(cfg, w.bus.clone(), w.store.clone(), CancellationToken::new())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            meridian_applier::ApplierError::Config { field: "region", .. }
        ),
        "{err}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item5_a_batch_past_the_store_bounds_commits_in_parts_each_acked_after_its_commit() -> Result<()> {
    const N: usize = 40;
    let w = world().await?;
    let ev = events();
    let cid = setup(&w, &ev).await?;
    // 40 messages of 20 KB, all in the stream before the applier starts, so it pulls them
    // as one batch; a transaction stops taking events once past 64 KiB: after the fourth.
    let text = "w".repeat(20_000);
    let sent: Vec<EventEnvelope> = (0..N)
        .map(|n| {
            let mut e = message(&ev, "ann", &cid, n);
            if let Some(Body::MessageSent(m)) = e.body.as_mut() {
                m.body_json = serde_json::json!({ "text": text }).to_string();
            }
            e
        })
        .collect();
    w.bus.publish_events(&sent).await?;
    let mut cfg = ApplierConfig::new(region());
    cfg.batch_max_bytes = 64 * 1024;
    let applier = w.start_applier_with(cfg);

    eventually(Duration::from_secs(30), "every message in history", || async {
        Ok(w.messages(&cid, "bob").await?.len() == N)
    })
    .await?;
    let last = (4 + N) as u64;
    eventually(
        Duration::from_secs(10),
        "the checkpoint at the last event",
        || async { Ok(w.store.checkpoint(&w.bus.stream()).await? == last) },
    )
    .await?;
    for u in ["ann", "bob"] {
        let inbox = w.inbox(u).await?;
        assert_eq!(inbox.len(), 1 + N, "{u}");
        assert!(inbox[1..]
            .iter()
            .all(|e| e.entry.as_ref().is_some_and(|t| t.body_json.len() > 20_000)));
    }
    // Everything committed is acked, and the acks reached the last event.
    let stream = w.bus.jetstream().get_stream(w.bus.stream()).await?;
    eventually(Duration::from_secs(10), "acks up to the last event", || {
        let stream = stream.clone();
        async move {
            let info = stream.consumer_info("applier").await?;
            Ok(info.ack_floor.stream_sequence == last)
        }
    })
    .await?;
    let metrics = applier.stop().await?;
    let commits = metrics.batches.get();
    assert!(
        commits >= (N / 4) as u64,
        "{N} messages of 20 KB in {commits} transactions of at most 64 KiB"
    );
    assert_eq!(metrics.deliveries.get(), 2 + 2 * N as u64);
    Ok(())
}
