//! Issue 8, item 5: what one apply transaction may hold. Inbox entries reference the storage
//! timeline instead of copying each message once per member; a batch is committed in
//! transactions bounded by bytes and by inbox appends; an epoch change leaves the old
//! inbox to be deleted in chunks. Each transaction is measured on a real backend through
//! [`TalliedKv`], which counts what every commit wrote.

mod support;

use std::sync::Arc;

use meridian_model::events::{self, event_envelope::Body, EventEnvelope};
use meridian_model::ConversationId;
use meridian_store::inbox::{InboxPage, SyncOutcome};
use meridian_store::kv::embedded::EngineKind;
use meridian_store::kv::prefix_end;
use meridian_store::records::{decode, InboxEntry, InboxHead, TimelineEntry};
use meridian_store::testing::dir_bytes;
use meridian_store::{ApplyConfig, ScanOrder, SequencedEvent, Store};
use support::*;

/// The applier's defaults (`ApplierConfig`): a transaction stops planning once it holds
/// this many bytes of writes or this many inbox appends.
const BATCH_MAX_BYTES: usize = 8 * 1024 * 1024;
const BATCH_MAX_INBOX_APPENDS: usize = 20_000;

fn tallied_store() -> (Store, Arc<TalliedKv>, Backend) {
    let backend = embedded(EngineKind::Fjall);
    let kv = Arc::new(TalliedKv::new(backend.kv.clone()));
    (Store::new(kv.clone(), b"bounded/"), kv, backend)
}

/// Applies `events` as the applier does: again and again from the first event the store
/// has not committed yet, until all are. Returns how many transactions that took.
async fn apply_all(store: &Store, cfg: &ApplyConfig, events: &[SequencedEvent]) -> usize {
    let mut rest = events;
    let mut rounds = 0;
    while !rest.is_empty() {
        assert!(rounds < 10_000, "apply_batch makes no progress");
        rounds += 1;
        let report = store.apply_batch(cfg, "SYNC_US", rest).await.unwrap();
        let done = rest
            .iter()
            .take_while(|e| e.stream_seq <= report.checkpoint)
            .count();
        assert!(done > 0, "a batch committed nothing");
        rest = &rest[done..];
    }
    rounds
}

/// Every stored (key, value) of one user's inbox entries, read straight from the backend.
async fn raw_inbox(store: &Store, who: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
    let prefix = store.keys().prefix(b'Y', &[who.as_bytes()]);
    let mut txn = store.kv().begin_read().await.unwrap();
    txn.scan(&prefix, &prefix_end(&prefix), usize::MAX, ScanOrder::Forward)
        .await
        .unwrap()
}

/// The page of `who`'s inbox after `after`, in the user's current epoch.
async fn inbox_page(store: &Store, who: &str, after: u64) -> InboxPage {
    let view = store.user(&user(who)).await.unwrap().unwrap();
    match store
        .read_inbox(&user(who), &view.epoch, Some(&view.epoch), after, 1_000)
        .await
        .unwrap()
    {
        SyncOutcome::Page(page) => page,
        other => panic!("{who}: no page after {after}: {other:?}"),
    }
}

fn group_setup(f: &EventFactory, cid: &ConversationId, members: &[String]) -> Vec<EventEnvelope> {
    let mut evs: Vec<EventEnvelope> = members.iter().map(|m| f.user(m, "us")).collect();
    let others: Vec<&str> = members[1..].iter().map(String::as_str).collect();
    evs.push(f.group(&members[0], cid, &others));
    evs
}

#[tokio::test]
async fn item5_inbox_entries_reference_the_timeline_instead_of_copying_it() {
    for b in backends().await {
        let store = b.store();
        let f = EventFactory::new("us");
        let cid = ConversationId::new_group();
        let members: Vec<String> = (0..50).map(|i| format!("m{i:02}")).collect();
        let text = "y".repeat(60_000);
        let mut evs = group_setup(&f, &cid, &members);
        for n in 0..10 {
            evs.push(f.message("m00", &cid, &format!("c{n}"), &text));
        }
        store
            .apply_batch(&cfg("us"), "SYNC_US", &sequenced(&evs, 1))
            .await
            .unwrap();

        // 10 messages of 60 KB to 50 members: copies would be 30 MB of inbox entries.
        let stored: usize = raw_inbox(&store, "m17").await.iter().map(|(_, v)| v.len()).sum();
        assert!(
            stored < 11 * 1024,
            "{}: m17's 11 inbox entries take {stored} bytes",
            b.name
        );

        // Readers still get the whole entry.
        let page = inbox_page(&store, "m17", 0).await;
        let kinds: Vec<&str> = page
            .entries
            .iter()
            .map(|e| e.entry.as_ref().map_or("none", |t| t.kind.as_str()))
            .collect();
        assert_eq!(kinds.len(), 11, "{}: {kinds:?}", b.name);
        assert_eq!(kinds[0], "conversation_created", "{}", b.name);
        for e in &page.entries[1..] {
            let t = e.entry.as_ref().unwrap();
            assert_eq!(t.kind, "message", "{}", b.name);
            assert_eq!(t.body_json, serde_json::json!({ "text": text }).to_string());
            assert_eq!(t.actor, "m00");
        }

        // An entry written before references existed (the whole entry inline) still reads.
        let old = InboxEntry {
            seq: 12,
            conversation_id: cid.to_string(),
            order_key: page.entries[1].order_key.clone(),
            appended_at_ms: 1,
            entry: Some(TimelineEntry {
                kind: "message".into(),
                body_json: r#"{"text":"inline"}"#.into(),
                actor: "m00".into(),
                ..Default::default()
            }),
        };
        let hkey = store.keys().inbox_head(&user("m17"));
        let mut txn = store.kv().begin().await.unwrap();
        let mut head: InboxHead = decode(&hkey, &txn.get(&hkey).await.unwrap().unwrap()).unwrap();
        assert_eq!(head.head, 11);
        head.head = 12;
        txn.put(hkey, prost::Message::encode_to_vec(&head)).await.unwrap();
        txn.put(
            store.keys().inbox_entry(&user("m17"), 12),
            prost::Message::encode_to_vec(&old),
        )
        .await
        .unwrap();
        txn.commit().await.unwrap();
        let page = inbox_page(&store, "m17", 11).await;
        assert_eq!(page.entries, vec![old], "{}", b.name);
    }
}

#[tokio::test]
async fn item5_apply_batch_commits_in_transactions_bounded_by_inbox_appends() {
    let (store, kv, _backend) = tallied_store();
    let f = EventFactory::new("us");
    let cid = ConversationId::new_group();
    let members: Vec<String> = (0..300).map(|i| format!("g{i:03}")).collect();
    let setup = group_setup(&f, &cid, &members);
    apply_all(&store, &cfg("us"), &sequenced(&setup, 1)).await;
    kv.take();
    // 100 messages to 300 members: 30,000 inbox appends.
    let messages: Vec<EventEnvelope> = (0..100)
        .map(|n| f.message(&members[n % 7], &cid, &format!("s{n}"), "short"))
        .collect();
    apply_all(&store, &cfg("us"), &sequenced(&messages, setup.len() as u64 + 1)).await;
    let commits = kv.take();
    let most = commits.iter().map(|c| c.puts).max().unwrap();
    // Each append puts an entry and its inbox head; the last event planned may pass the
    // bound by its fan-out. Unbounded, the batch was one transaction of 60,301 puts.
    assert!(
        most <= 2 * (BATCH_MAX_INBOX_APPENDS + members.len()) + 64,
        "a transaction wrote {most} keys ({} transactions)",
        commits.len()
    );
    assert_eq!(
        store.checkpoint("SYNC_US").await.unwrap(),
        (setup.len() + 100) as u64
    );
    for who in ["g000", "g150", "g299"] {
        let page = inbox_page(&store, who, 0).await;
        let n = page
            .entries
            .iter()
            .filter(|e| e.entry.as_ref().is_some_and(|t| t.kind == "message"))
            .count();
        assert_eq!(n, 100, "{who}'s inbox");
    }
}

#[tokio::test]
async fn item5_apply_batch_commits_in_transactions_bounded_by_bytes() {
    let (store, kv, _backend) = tallied_store();
    let f = EventFactory::new("us");
    let (cid, create) = f.direct("ann", "bob");
    let setup = vec![f.user("ann", "us"), f.user("bob", "us"), create];
    apply_all(&store, &cfg("us"), &sequenced(&setup, 1)).await;
    kv.take();
    // 300 messages of 60 KB: 18 MB of text.
    let text = "z".repeat(60_000);
    let messages: Vec<EventEnvelope> = (0..300)
        .map(|n| f.message("ann", &cid, &format!("l{n}"), &text))
        .collect();
    let rounds = apply_all(&store, &cfg("us"), &sequenced(&messages, 4)).await;
    let commits = kv.take();
    let most = commits.iter().map(|c| c.bytes).max().unwrap();
    assert!(
        most <= BATCH_MAX_BYTES + 256 * 1024,
        "a transaction wrote {most} bytes ({rounds} transactions)"
    );
    let history = store
        .history(
            &cid,
            &user("bob"),
            meridian_store::timeline::HistoryPage::Latest,
            1_000,
        )
        .await
        .unwrap();
    assert_eq!(history.messages.len(), 300);
}

#[tokio::test]
async fn item5_epoch_change_drops_the_old_inbox_in_bounded_chunks() {
    let (store, kv, _backend) = tallied_store();
    let f = EventFactory::new("us");
    let (cid, create) = f.direct("ann", "bob");
    let setup = vec![f.user("ann", "us"), f.user("bob", "us"), create];
    let mut evs = setup.clone();
    for n in 0..3_000 {
        evs.push(f.message("bob", &cid, &format!("e{n}"), "hello"));
    }
    apply_all(&store, &cfg("us"), &sequenced(&evs, 1)).await;
    let before = store.user(&user("ann")).await.unwrap().unwrap();
    assert_eq!(raw_inbox(&store, "ann").await.len(), 3_001);

    // us fails over to eu and back: us serves ann again, under a new epoch.
    let away = vec![
        f.envelope(
            "admin",
            Body::RegionFailover(events::RegionFailover {
                region: "us".into(),
                to: "eu".into(),
                applied: vec![],
            }),
        ),
        f.envelope(
            "admin",
            Body::RegionFailback(events::RegionFailback { region: "us".into() }),
        ),
    ];
    let next = evs.len() as u64 + 1;
    apply_all(&store, &cfg("us"), &sequenced(&away, next)).await;
    let after = store.user(&user("ann")).await.unwrap().unwrap();
    assert_ne!(before.epoch, after.epoch, "failback starts a new epoch");
    kv.take();
    let first = vec![f.message("bob", &cid, "new-1", "first of the epoch")];
    apply_all(&store, &cfg("us"), &sequenced(&first, next + 2)).await;
    let commits = kv.take();
    let most = commits.iter().map(|c| c.deletes).max().unwrap_or(0);
    assert!(
        most <= 1_024,
        "the first append of the new epoch deleted {most} keys in one transaction"
    );
    let page = inbox_page(&store, "ann", 0).await;
    assert_eq!(page.head, 1);
    assert_eq!(page.entries.len(), 1);
    assert_eq!(
        page.entries[0].entry.as_ref().unwrap().body_json,
        r#"{"text":"first of the epoch"}"#
    );

    // The sweeper removes what the old epoch left, a bounded chunk per transaction.
    store.sweep_expired(0).await.unwrap();
    let commits = kv.take();
    assert!(
        commits.iter().all(|c| c.deletes <= 1_024),
        "sweep transactions: {commits:?}"
    );
    for who in ["ann", "bob"] {
        let left = raw_inbox(&store, who).await;
        assert_eq!(left.len(), 1, "{who} keeps only the new epoch's entry");
    }
    let page = inbox_page(&store, "ann", 0).await;
    assert_eq!(page.entries.len(), 1);
}

/// A measurement, not a check: what a one-to-one message with a 100-byte body costs the
/// store, written (key and value bytes of every commit) and on disk (the fjall directory).
/// `cargo test -p meridian-store --test bounded -- --ignored --nocapture item5_measure`
#[tokio::test]
#[ignore = "a measurement: prints bytes per message"]
async fn item5_measure_bytes_per_one_to_one_message() {
    const MESSAGES: usize = 200_000;
    let dir = tempfile::tempdir().unwrap();
    let kv = Arc::new(TalliedKv::new(Arc::new(
        meridian_store::kv::embedded::EmbeddedStore::open(dir.path(), EngineKind::Fjall).unwrap(),
    )));
    let store = Store::new(kv.clone(), b"");
    let f = EventFactory::new("us");
    let (cid, create) = f.direct("ann", "bob");
    let setup = vec![f.user("ann", "us"), f.user("bob", "us"), create];
    apply_all(&store, &cfg("us"), &sequenced(&setup, 1)).await;
    kv.take();
    let before = dir_bytes(dir.path());
    // `{"text":"..."}` of 100 bytes.
    let text = "m".repeat(100 - r#"{"text":""}"#.len());
    let mut seq = setup.len() as u64 + 1;
    for chunk in 0..MESSAGES / 500 {
        let evs: Vec<EventEnvelope> = (0..500)
            .map(|n| f.message("ann", &cid, &format!("p{chunk}-{n}"), &text))
            .collect();
        apply_all(&store, &cfg("us"), &sequenced(&evs, seq)).await;
        seq += 500;
    }
    let written: usize = kv.take().iter().map(|c| c.bytes).sum();
    drop(store);
    drop(kv);
    let on_disk = dir_bytes(dir.path()).saturating_sub(before);
    eprintln!(
        "item5: {MESSAGES} one-to-one messages of 100 bytes: {} bytes written per message, \
         {} bytes on disk per message",
        written / MESSAGES,
        on_disk as usize / MESSAGES
    );
}
