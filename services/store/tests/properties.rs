//! Property tests of the merge rules and of inbox seqs.

mod support;

use std::sync::Arc;

use meridian_model::events::{self, event_envelope::Body, EventEnvelope, MemberRole};
use meridian_model::{ConversationId, EventId};
use meridian_store::inbox::SyncOutcome;
use meridian_store::kv::embedded::EngineKind;
use meridian_store::SequencedEvent;
use proptest::prelude::*;
use support::*;

/// A history from two regions touching every replicated record family.
fn scenario() -> (Vec<EventEnvelope>, ConversationId) {
    let us = EventFactory::new("us");
    let eu = EventFactory::new("eu");
    let g = ConversationId::new_group();
    let (d, create_d_us) = us.direct("ann", "eve");
    let (_, create_d_eu) = eu.direct("eve", "ann");
    let m1 = us.message("ann", &d, "1", "one");
    let m1_id = EventId::from_bytes(&m1.event_id).unwrap();
    let m2 = eu.message("eve", &d, "2", "two");
    let m2_key = {
        let id = EventId::from_bytes(&m2.event_id).unwrap();
        meridian_model::OrderKey::new(meridian_model::Hlc(m2.hlc), region("eu"), id).to_bytes()
    };
    let evs = vec![
        us.user("ann", "us"),
        us.user("bob", "us"),
        eu.user("eve", "eu"),
        create_d_us,
        create_d_eu,
        us.group("ann", &g, &["bob"]),
        eu.envelope(
            "eve",
            Body::MembersAdded(events::MembersAdded {
                conversation_id: g.to_string(),
                user_ids: vec!["eve".into()],
            }),
        ),
        us.envelope(
            "ann",
            Body::MemberRoleChanged(events::MemberRoleChanged {
                conversation_id: g.to_string(),
                user_id: "bob".into(),
                role: events::MemberRole::Admin as i32,
            }),
        ),
        eu.envelope(
            "eve",
            Body::MemberRoleChanged(events::MemberRoleChanged {
                conversation_id: g.to_string(),
                user_id: "bob".into(),
                role: events::MemberRole::Member as i32,
            }),
        ),
        us.envelope(
            "ann",
            Body::ConversationUpdated(events::ConversationUpdated {
                conversation_id: g.to_string(),
                name: Some("us name".into()),
                announcement: None,
                members_can_add: Some(true),
            }),
        ),
        eu.envelope(
            "eve",
            Body::ConversationUpdated(events::ConversationUpdated {
                conversation_id: g.to_string(),
                name: Some("eu name".into()),
                announcement: Some("hi".into()),
                members_can_add: None,
            }),
        ),
        m1,
        m2,
        us.message("bob", &g, "g1", "group one"),
        eu.message("eve", &g, "g2", "group two"),
        us.envelope(
            "ann",
            Body::MessageRecalled(events::MessageRecalled {
                conversation_id: d.to_string(),
                message_id: m1_id.as_bytes().to_vec(),
            }),
        ),
        eu.envelope(
            "eve",
            Body::MessageRecalled(events::MessageRecalled {
                conversation_id: d.to_string(),
                message_id: m1_id.as_bytes().to_vec(),
            }),
        ),
        us.envelope(
            "ann",
            Body::ReadIndexSet(events::ReadIndexSet {
                conversation_id: d.to_string(),
                user_id: "ann".into(),
                order_key: m2_key,
            }),
        ),
        eu.envelope(
            "eve",
            Body::MessageDeletedForMe(events::MessageDeletedForMe {
                conversation_id: d.to_string(),
                message_id: m1_id.as_bytes().to_vec(),
                user_id: "eve".into(),
            }),
        ),
        us.envelope(
            "ann",
            Body::UserSettingsChanged(events::UserSettingsChanged {
                user_id: "ann".into(),
                conversation_id: g.to_string(),
                muted: Some(true),
                pinned: None,
            }),
        ),
        us.envelope(
            "ann",
            Body::UserSettingsChanged(events::UserSettingsChanged {
                user_id: "ann".into(),
                conversation_id: g.to_string(),
                muted: Some(false),
                pinned: Some(true),
            }),
        ),
        eu.envelope(
            "eve",
            Body::ConversationHidden(events::ConversationHidden {
                conversation_id: d.to_string(),
                user_id: "eve".into(),
            }),
        ),
        // Adds of people who are members already, after their roles were given: they must
        // change no role, whatever order they are applied in.
        eu.envelope(
            "eve",
            Body::MembersAdded(events::MembersAdded {
                conversation_id: g.to_string(),
                user_ids: vec!["ann".into(), "bob".into()],
            }),
        ),
        // Leave, then be added back: the role given before the leave does not come back.
        us.user("cat", "us"),
        us.envelope(
            "ann",
            Body::MembersAdded(events::MembersAdded {
                conversation_id: g.to_string(),
                user_ids: vec!["cat".into()],
            }),
        ),
        us.envelope(
            "ann",
            Body::MemberRoleChanged(events::MemberRoleChanged {
                conversation_id: g.to_string(),
                user_id: "cat".into(),
                role: events::MemberRole::Admin as i32,
            }),
        ),
        us.envelope(
            "cat",
            Body::MemberRemoved(events::MemberRemoved {
                conversation_id: g.to_string(),
                user_id: "cat".into(),
            }),
        ),
        // From the same region, so it sorts after the leave (the two regions' clocks only
        // order events a millisecond or more apart).
        us.envelope(
            "bob",
            Body::MembersAdded(events::MembersAdded {
                conversation_id: g.to_string(),
                user_ids: vec!["cat".into()],
            }),
        ),
        us.envelope(
            "bob",
            Body::MemberRemoved(events::MemberRemoved {
                conversation_id: g.to_string(),
                user_id: "bob".into(),
            }),
        ),
        eu.envelope(
            "eve",
            Body::DeviceRegistered(events::DeviceRegistered {
                user_id: "eve".into(),
                device_id: "p1".into(),
                platform: "fcm".into(),
                token: "t".into(),
            }),
        ),
        eu.envelope(
            "eve",
            Body::DeviceUnregistered(events::DeviceUnregistered {
                user_id: "eve".into(),
                device_id: "p1".into(),
                token: String::new(),
            }),
        ),
        us.envelope(
            "admin",
            Body::RegionFailover(events::RegionFailover {
                region: "eu".into(),
                to: "us".into(),
                applied: vec![],
            }),
        ),
        us.envelope(
            "admin",
            Body::RegionFailback(events::RegionFailback { region: "eu".into() }),
        ),
        eu.user("eve", "eu"),
    ];
    (evs, g)
}

fn order_with_duplicates(n: usize) -> impl Strategy<Value = Vec<usize>> {
    (
        Just((0..n).collect::<Vec<_>>()).prop_shuffle(),
        prop::collection::vec(0..n, 0..n),
    )
        .prop_flat_map(|(perm, dups)| {
            let mut all = perm;
            all.extend(dups);
            Just(all).prop_shuffle()
        })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Applying the same events in any order, with any duplicates, yields the same digest.
    #[test]
    fn any_order_any_duplicates_same_digest(order in order_with_duplicates(34)) {
        let (events, g) = scenario();
        prop_assert_eq!(events.len(), 34);
        let rt = runtime();
        let backend = embedded(EngineKind::Fjall);
        rt.block_on(async {
            let reference = backend.store();
            reference.apply_batch(&cfg("us"), "S", &sequenced(&events, 1)).await.unwrap();
            let shuffled = backend.store();
            // One event per batch, each with its own stream seq, so only the merge rules
            // and the applied-event record stand between duplicates and double effects.
            for (i, &ix) in order.iter().enumerate() {
                let ev = SequencedEvent { stream_seq: i as u64 + 1, envelope: events[ix].clone() };
                shuffled.apply_batch(&cfg("eu"), "S", &[ev]).await.unwrap();
            }
            assert_eq!(reference.digest().await.unwrap(), shuffled.digest().await.unwrap());
            assert_eq!(reference.conversation_digest(&g).await.unwrap(), shuffled.conversation_digest(&g).await.unwrap());
            // The derived member list that fan-out reads agrees with the member records.
            for store in [&reference, &shuffled] {
                let mut from_records: Vec<String> = store.conversation(&g).await.unwrap().unwrap()
                    .members.iter().map(|m| m.user_id.to_string()).collect();
                from_records.sort();
                let derived: Vec<String> = store.fan_out_members(&g).await.unwrap().unwrap()
                    .iter().map(|u| u.to_string()).collect();
                assert_eq!(derived, from_records);
                // Adds never change roles: ann stays owner; cat, an admin who left and was
                // added back, is a plain member.
                assert_eq!(store.member_role(&g, &user("ann")).await.unwrap(), Some(MemberRole::Owner));
                assert_eq!(store.member_role(&g, &user("cat")).await.unwrap(), Some(MemberRole::Member));
            }
        });
    }

    /// Concurrent appliers appending to the same inboxes: seqs stay consecutive from 1 and
    /// every message lands exactly once.
    #[test]
    fn inbox_seqs_stay_consecutive_under_concurrent_appends(writers in 2usize..5, per_writer in 1usize..12) {
        let rt = runtime();
        let backend = embedded(EngineKind::Fjall);
        rt.block_on(async {
            let store = backend.store();
            let us = EventFactory::new("us");
            let (cid, create) = us.direct("ann", "bob");
            store.apply_batch(&cfg("us"), "SETUP", &sequenced(&[us.user("ann", "us"), us.user("bob", "us"), create], 1)).await.unwrap();
            let us = Arc::new(us);
            let mut tasks = Vec::new();
            for w in 0..writers {
                let (store, us, cid) = (store.clone(), us.clone(), cid.clone());
                tasks.push(tokio::spawn(async move {
                    for i in 0..per_writer {
                        let ev = us.message("ann", &cid, &format!("w{w}-{i}"), "x");
                        store.apply_batch(&cfg("us"), &format!("STREAM{w}"), &sequenced(&[ev], i as u64 + 1)).await.unwrap();
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            let bob = store.user(&user("bob")).await.unwrap().unwrap();
            let SyncOutcome::Page(page) = store.read_inbox(&user("bob"), &bob.epoch, None, 0, 10_000).await.unwrap() else { panic!() };
            let seqs: Vec<u64> = page.entries.iter().map(|e| e.seq).collect();
            let total = writers * per_writer + 1; // + conversation_created
            assert_eq!(seqs, (1..=total as u64).collect::<Vec<_>>());
            let mut ids: Vec<_> = page.entries.iter().map(|e| e.entry.as_ref().unwrap().event_id.clone()).collect();
            ids.sort();
            ids.dedup();
            assert_eq!(ids.len(), total);
        });
    }
}
