//! Read diffusion's trailing edge: a burst of messages to a group above the threshold ends
//! with one `conversation_advanced` entry per served member at or after its last message,
//! appended by `Store::flush_coalesced` once the coalescing window has passed.

mod support;

use meridian_model::{ConversationId, EventId, Hlc, OrderKey};
use meridian_store::inbox::{InboxPage, SyncOutcome};
use meridian_store::kv::embedded::EngineKind;
use meridian_store::{ApplyConfig, Store};
use support::*;

const WINDOW_MS: u64 = 1_000;

fn small_group_cfg() -> ApplyConfig {
    let mut c = cfg("us");
    c.read_diffusion_threshold = 3;
    c.coalesce_window_ms = WINDOW_MS;
    c
}

async fn page(store: &Store, who: &str) -> InboxPage {
    let view = store.user(&user(who)).await.unwrap().unwrap();
    match store
        .read_inbox(&user(who), &view.epoch, Some(&view.epoch), 0, 1_000)
        .await
        .unwrap()
    {
        SyncOutcome::Page(page) => page,
        other => panic!("{who}: no page: {other:?}"),
    }
}

/// The order key of the newest `conversation_advanced` entry in `who`'s inbox, if any.
async fn last_advanced(store: &Store, who: &str) -> Option<Vec<u8>> {
    page(store, who)
        .await
        .entries
        .into_iter()
        .filter(|e| {
            e.entry
                .as_ref()
                .is_some_and(|t| t.kind == "conversation_advanced")
        })
        .map(|e| e.order_key)
        .max()
}

#[tokio::test]
async fn coalesced_burst_ends_with_conversation_advanced_for_every_served_member() {
    let backend = embedded(EngineKind::Fjall);
    let store = backend.store();
    let cfg = small_group_cfg();
    let f = EventFactory::new("us");
    let cid = ConversationId::new_group();
    let members = ["m1", "m2", "m3", "m4", "m5"];
    let mut setup: Vec<_> = ["ana", "m1", "m2", "m3", "m4", "m5"]
        .iter()
        .map(|u| f.user(u, "us"))
        .collect();
    // Homed elsewhere: this region never appends to its inbox.
    setup.push(f.user("zed", "eu"));
    let mut invited: Vec<&str> = members.to_vec();
    invited.push("zed");
    setup.push(f.group("ana", &cid, &invited));
    let t0 = 1_900_000_000_000;
    store
        .apply_batch_at(&cfg, "SYNC_US", &sequenced(&setup, 1), t0)
        .await
        .unwrap();

    // A burst inside one window, one batch per message as a busy applier would see it.
    let burst: Vec<_> = (0..5)
        .map(|i| f.message("ana", &cid, &format!("c{i}"), &format!("hello {i}")))
        .collect();
    let mut seq = setup.len() as u64;
    for (i, ev) in burst.iter().enumerate() {
        seq += 1;
        store
            .apply_batch_at(
                &cfg,
                "SYNC_US",
                &sequenced(std::slice::from_ref(ev), seq),
                t0 + 100 + 100 * i as u64,
            )
            .await
            .unwrap();
    }
    let last = burst.last().unwrap();
    let last_key = OrderKey::new(
        Hlc(last.hlc),
        region("us"),
        EventId::from_bytes(&last.event_id).unwrap(),
    )
    .to_bytes();
    let burst_end = t0 + 500;

    // Inside the window after the last message nothing is due yet.
    let early = store
        .flush_coalesced(&cfg, burst_end + WINDOW_MS / 2, None, 64)
        .await
        .unwrap();
    assert!(
        early.deliveries.is_empty(),
        "flushed before the window passed: {early:?}"
    );

    let flush = store
        .flush_coalesced(&cfg, burst_end + 2 * WINDOW_MS, None, 64)
        .await
        .unwrap();
    for m in members {
        let advanced = last_advanced(&store, m).await;
        assert!(
            advanced.as_ref().is_some_and(|k| *k >= last_key),
            "{m} has no conversation_advanced at or after the last message of the burst \
             (newest: {advanced:?}, last message: {last_key:?})"
        );
    }
    assert_eq!(
        flush.deliveries.len(),
        members.len(),
        "one live delivery per served member: {flush:?}"
    );
    assert!(flush.deliveries.iter().all(|d| d.order_key == last_key));
    assert!(
        page(&store, "zed").await.entries.is_empty(),
        "a user served elsewhere got entries"
    );
    assert_eq!(
        last_advanced(&store, "ana").await,
        None,
        "the sender has the messages themselves"
    );

    // Once flushed, nothing is pending: the next flush appends nothing.
    let again = store
        .flush_coalesced(&cfg, burst_end + 10 * WINDOW_MS, None, 64)
        .await
        .unwrap();
    assert!(again.deliveries.is_empty(), "flushed twice: {again:?}");
    assert_eq!(again.flushed, 0);
}

/// A sender is left out of the flush only when every message coalesced away was their own:
/// one who sent the newest message but missed someone else's earlier is told too.
#[tokio::test]
async fn a_sender_who_missed_another_senders_message_is_told_too() {
    let backend = embedded(EngineKind::Fjall);
    let store = backend.store();
    let cfg = small_group_cfg();
    let f = EventFactory::new("us");
    let cid = ConversationId::new_group();
    let mut setup: Vec<_> = ["ana", "m1", "m2", "m3", "m4"]
        .iter()
        .map(|u| f.user(u, "us"))
        .collect();
    setup.push(f.group("ana", &cid, &["m1", "m2", "m3", "m4"]));
    let t0 = 1_900_000_000_000;
    store
        .apply_batch_at(&cfg, "SYNC_US", &sequenced(&setup, 1), t0)
        .await
        .unwrap();
    // ana's message opens everyone else's window; m1's first opens ana's; m1's second is
    // coalesced away for ana; ana's last is the newest.
    let burst = [
        f.message("ana", &cid, "a1", "one"),
        f.message("m1", &cid, "b1", "two"),
        f.message("m1", &cid, "b2", "three"),
        f.message("ana", &cid, "a2", "four"),
    ];
    let mut seq = setup.len() as u64;
    for (i, ev) in burst.iter().enumerate() {
        seq += 1;
        store
            .apply_batch_at(
                &cfg,
                "SYNC_US",
                &sequenced(std::slice::from_ref(ev), seq),
                t0 + 100 * (i as u64 + 1),
            )
            .await
            .unwrap();
    }
    let missed = &burst[2];
    let missed_key = OrderKey::new(
        Hlc(missed.hlc),
        region("us"),
        EventId::from_bytes(&missed.event_id).unwrap(),
    )
    .to_bytes();
    store
        .flush_coalesced(&cfg, t0 + 400 + 2 * WINDOW_MS, None, 64)
        .await
        .unwrap();
    for who in ["ana", "m1", "m2", "m3", "m4"] {
        let advanced = last_advanced(&store, who).await;
        assert!(
            advanced.as_ref().is_some_and(|k| *k >= missed_key),
            "{who} was not told of m1's coalesced message (newest conversation_advanced: {advanced:?})"
        );
    }
}
