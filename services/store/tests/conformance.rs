//! One conformance suite, run against every backend: both embedded engines always, TiKV
//! when `MERIDIAN_TIKV_PD` is set. First the KV contract the layers above rely on, then the
//! timeline model on top of it.

mod support;

use meridian_model::events::{self, event_envelope::Body};
use meridian_model::{ConversationId, Cursor, EventId};
use meridian_store::inbox::SyncOutcome;
use meridian_store::kv::prefix_end;
use meridian_store::timeline::HistoryPage;
use meridian_store::{Checkpoint, ScanOrder, StoreError, StreamRef};
use support::*;

fn k(ns: &[u8], s: &str) -> Vec<u8> {
    [ns, s.as_bytes()].concat()
}

#[tokio::test]
async fn kv_reads_see_own_writes_and_scans_merge_them() {
    for b in backends().await {
        let store = b.store();
        let ns = store.keys().namespace().to_vec();
        let mut t = b.kv.begin().await.unwrap();
        for i in 0..10 {
            t.put(k(&ns, &format!("k{i}")), vec![i]).await.unwrap();
        }
        t.commit().await.unwrap();

        let mut t = b.kv.begin().await.unwrap();
        t.delete(k(&ns, "k3")).await.unwrap();
        t.put(k(&ns, "k35"), vec![35]).await.unwrap();
        assert_eq!(t.get(&k(&ns, "k3")).await.unwrap(), None, "{}", b.name);
        assert_eq!(t.get(&k(&ns, "k35")).await.unwrap(), Some(vec![35]), "{}", b.name);
        let (lo, hi) = (k(&ns, "k"), prefix_end(&k(&ns, "k")));
        let fwd = t.scan(&lo, &hi, 4, ScanOrder::Forward).await.unwrap();
        let names: Vec<_> = fwd
            .iter()
            .map(|(k, _)| String::from_utf8_lossy(&k[ns.len()..]).into_owned())
            .collect();
        assert_eq!(names, ["k0", "k1", "k2", "k35"], "{}", b.name);
        let rev = t.scan(&lo, &hi, 3, ScanOrder::Reverse).await.unwrap();
        let names: Vec<_> = rev
            .iter()
            .map(|(k, _)| String::from_utf8_lossy(&k[ns.len()..]).into_owned())
            .collect();
        assert_eq!(names, ["k9", "k8", "k7"], "{}", b.name);
        let got = t
            .batch_get(&[k(&ns, "k1"), k(&ns, "k3"), k(&ns, "nope")])
            .await
            .unwrap();
        assert_eq!(got, vec![Some(vec![1]), None, None], "{}", b.name);
        t.rollback().await.unwrap();

        // Rolled back: nothing changed.
        let mut r = b.kv.begin_read().await.unwrap();
        assert_eq!(r.get(&k(&ns, "k3")).await.unwrap(), Some(vec![3]), "{}", b.name);
        assert_eq!(r.get(&k(&ns, "k35")).await.unwrap(), None, "{}", b.name);
        // Ranges are half-open.
        let all = r
            .scan(&k(&ns, "k2"), &k(&ns, "k5"), 100, ScanOrder::Forward)
            .await
            .unwrap();
        assert_eq!(all.len(), 3, "{}", b.name);
        assert!(r
            .scan(&k(&ns, "k5"), &k(&ns, "k5"), 10, ScanOrder::Forward)
            .await
            .unwrap()
            .is_empty());
        r.rollback().await.unwrap();
    }
}

/// `get_latest`: each key's latest committed value, whatever the backend caches, and
/// never a value older than one a transaction that began earlier read.
#[tokio::test]
async fn kv_get_latest_sees_every_commit() {
    for b in backends().await {
        let ns = b.store().keys().namespace().to_vec();
        let (a, missing) = (k(&ns, "latest-a"), k(&ns, "latest-missing"));
        assert_eq!(
            b.kv.get_latest(std::slice::from_ref(&a)).await.unwrap(),
            vec![None],
            "{}",
            b.name
        );
        for round in 0..3u8 {
            // A read-write transaction reads the key (a backend may cache it), then a commit
            // overwrites it.
            let mut t = b.kv.begin().await.unwrap();
            t.get(&a).await.unwrap();
            t.rollback().await.unwrap();
            let mut t = b.kv.begin().await.unwrap();
            t.put(a.clone(), vec![round]).await.unwrap();
            t.commit().await.unwrap();
            assert_eq!(
                b.kv.get_latest(&[a.clone(), missing.clone()]).await.unwrap(),
                vec![Some(vec![round]), None],
                "{} round {round}",
                b.name
            );
        }
        let mut t = b.kv.begin().await.unwrap();
        t.delete(a.clone()).await.unwrap();
        t.commit().await.unwrap();
        assert_eq!(b.kv.get_latest(&[a]).await.unwrap(), vec![None], "{}", b.name);
    }
}

#[tokio::test]
async fn kv_commit_fails_when_a_read_key_was_written_concurrently() {
    for b in backends().await {
        let ns = b.store().keys().namespace().to_vec();
        let mut seed = b.kv.begin().await.unwrap();
        seed.put(k(&ns, "counter"), vec![0]).await.unwrap();
        seed.commit().await.unwrap();

        let mut t1 = b.kv.begin().await.unwrap();
        let mut t2 = b.kv.begin().await.unwrap();
        let v1 = t1.get(&k(&ns, "counter")).await.unwrap().unwrap();
        let v2 = t2.get(&k(&ns, "counter")).await.unwrap().unwrap();
        t1.put(k(&ns, "counter"), vec![v1[0] + 1]).await.unwrap();
        t2.put(k(&ns, "counter"), vec![v2[0] + 1]).await.unwrap();
        t1.commit().await.unwrap();
        let err = t2.commit().await.unwrap_err();
        assert!(matches!(err, StoreError::Conflict(_)), "{}: {err}", b.name);

        // A scanned range conflicts too.
        let mut t3 = b.kv.begin().await.unwrap();
        let _ = t3
            .scan(&k(&ns, "r/"), &prefix_end(&k(&ns, "r/")), 10, ScanOrder::Forward)
            .await
            .unwrap();
        t3.put(k(&ns, "summary"), vec![1]).await.unwrap();
        let mut t4 = b.kv.begin().await.unwrap();
        t4.put(k(&ns, "r/new"), vec![1]).await.unwrap();
        t4.commit().await.unwrap();
        assert!(t3.commit().await.unwrap_err().is_conflict(), "{}", b.name);

        // Disjoint transactions both commit.
        let mut t5 = b.kv.begin().await.unwrap();
        let mut t6 = b.kv.begin().await.unwrap();
        t5.get(&k(&ns, "a")).await.unwrap();
        t6.get(&k(&ns, "b")).await.unwrap();
        t5.put(k(&ns, "a"), vec![1]).await.unwrap();
        t6.put(k(&ns, "b"), vec![1]).await.unwrap();
        t5.commit().await.unwrap();
        t6.commit().await.unwrap();
    }
}

#[tokio::test]
async fn embedded_commits_survive_reopen() {
    use meridian_store::kv::embedded::{EmbeddedStore, EngineKind};
    use meridian_store::KvStore;
    for kind in [EngineKind::Fjall, EngineKind::Redb] {
        let dir = tempfile::tempdir().unwrap();
        {
            let kv = EmbeddedStore::open(dir.path(), kind).unwrap();
            let mut t = kv.begin().await.unwrap();
            t.put(b"durable".to_vec(), b"yes".to_vec()).await.unwrap();
            t.commit().await.unwrap();
        }
        let kv = EmbeddedStore::open(dir.path(), kind).unwrap();
        let mut r = kv.begin_read().await.unwrap();
        assert_eq!(
            r.get(b"durable").await.unwrap(),
            Some(b"yes".to_vec()),
            "{kind:?}"
        );
    }
}

#[tokio::test]
async fn messages_land_in_history_and_every_members_inbox_once() {
    for b in backends().await {
        let store = b.store();
        let us = EventFactory::new("us");
        let (cid, create) = us.direct("ann", "bob");
        let mut evs = vec![us.user("ann", "us"), us.user("bob", "us"), create];
        for i in 0..5 {
            evs.push(us.message("ann", &cid, &format!("m{i}"), &format!("hello {i}")));
        }
        // A retried send: same client_msg_id, so the same event id, under a later seq.
        evs.push(us.message("ann", &cid, "m2", "hello 2"));
        let report = store
            .apply_batch(&cfg("us"), "SYNC_US", &sequenced(&evs, 1))
            .await
            .unwrap();
        assert_eq!(report.applied, 8, "{}", b.name);
        assert_eq!(report.duplicates, 1, "{}", b.name);
        assert_eq!(report.checkpoint, 9);
        assert_eq!(store.checkpoint("SYNC_US").await.unwrap(), 9);

        // Redelivered by the stream: below the checkpoint, skipped.
        let again = store
            .apply_batch(&cfg("us"), "SYNC_US", &sequenced(&evs, 1))
            .await
            .unwrap();
        assert_eq!((again.applied, again.below_checkpoint), (0, 9), "{}", b.name);

        let hist = store
            .history(&cid, &user("bob"), HistoryPage::After(None), 50)
            .await
            .unwrap();
        let texts: Vec<_> = hist
            .messages
            .iter()
            .map(|m| m.body_json.clone().unwrap())
            .collect();
        assert_eq!(texts.len(), 5, "{}", b.name);
        assert!(texts[0].contains("hello 0") && texts[4].contains("hello 4"));
        for who in ["ann", "bob"] {
            let view = store.user(&user(who)).await.unwrap().unwrap();
            let SyncOutcome::Page(page) = store
                .read_inbox(&user(who), &view.epoch, None, 0, 100)
                .await
                .unwrap()
            else {
                panic!("resync")
            };
            let seqs: Vec<u64> = page.entries.iter().map(|e| e.seq).collect();
            assert_eq!(seqs, (1..=6).collect::<Vec<_>>(), "{} {who}", b.name);
            let msgs = page
                .entries
                .iter()
                .filter(|e| e.entry.as_ref().unwrap().kind == "message")
                .count();
            assert_eq!(msgs, 5, "{} {who}", b.name);
        }

        // Pages: latest two, then the two before them.
        let latest = store
            .history(&cid, &user("ann"), HistoryPage::Latest, 2)
            .await
            .unwrap();
        assert!(latest.more);
        assert!(latest.messages[1].body_json.as_ref().unwrap().contains("hello 4"));
        let before = store
            .history(
                &cid,
                &user("ann"),
                HistoryPage::Before(latest.messages[0].order_key.clone()),
                2,
            )
            .await
            .unwrap();
        assert!(before.messages[0].body_json.as_ref().unwrap().contains("hello 1"));
        let cursor = before.messages[0].order_key.cursor();
        assert_eq!(
            Cursor::parse(cursor.as_str()).unwrap(),
            before.messages[0].order_key
        );
    }
}

/// A checkpoint is (stream instance, seq): a batch from another instance of the stream
/// (recreated, or lost with its server's storage, so numbering from 1 again) is applied
/// from its start instead of being skipped up to the old seq, and redeliveries within an
/// instance are still skipped. An 8-byte checkpoint from before instances were recorded
/// reads as instance 0 and is adopted by the next batch. The checkpoint carries the highest
/// HLC applied, which survives instance changes.
#[tokio::test]
async fn checkpoints_name_the_stream_instance_and_old_values_stay_readable() {
    for b in backends().await {
        let store = b.store();
        let us = EventFactory::new("us");
        let (cid, create) = us.direct("ann", "bob");
        let setup = [us.user("ann", "us"), us.user("bob", "us"), create];
        store
            .apply_batch(&cfg("us"), "S", &sequenced(&setup, 1))
            .await
            .unwrap();
        // As written before instances were recorded: 8 bytes, the seq alone.
        let key = store.keys().checkpoint("S");
        let mut txn = store.kv().begin().await.unwrap();
        txn.put(key, 3u64.to_be_bytes().to_vec()).await.unwrap();
        txn.commit().await.unwrap();
        assert_eq!(
            store.stream_checkpoint("S").await.unwrap(),
            Checkpoint {
                instance: 0,
                seq: 3,
                max_hlc: 0
            },
            "{}",
            b.name
        );

        let m1 = us.message("ann", &cid, "m1", "one");
        let r = store
            .apply_batch(
                &cfg("us"),
                StreamRef::new("S", 111),
                &sequenced(std::slice::from_ref(&m1), 4),
            )
            .await
            .unwrap();
        assert_eq!((r.applied, r.checkpoint), (1, 4), "{}", b.name);
        let cp = store.stream_checkpoint("S").await.unwrap();
        assert_eq!((cp.instance, cp.seq, cp.max_hlc), (111, 4, m1.hlc), "{}", b.name);

        // The stream comes back as a new instance: seqs 1 and 2 are new events.
        let m2 = us.message("ann", &cid, "m2", "two");
        let m3 = us.message("bob", &cid, "m3", "three");
        let fresh = sequenced(&[m2, m3.clone()], 1);
        let r = store
            .apply_batch(&cfg("us"), StreamRef::new("S", 222), &fresh)
            .await
            .unwrap();
        assert_eq!(
            (r.applied, r.below_checkpoint, r.checkpoint),
            (2, 0, 2),
            "{}",
            b.name
        );
        let cp = store.stream_checkpoint("S").await.unwrap();
        assert_eq!((cp.instance, cp.seq, cp.max_hlc), (222, 2, m3.hlc), "{}", b.name);
        assert_eq!(store.checkpoint("S").await.unwrap(), 2);
        // Redelivered within the instance: skipped.
        let r = store
            .apply_batch(&cfg("us"), StreamRef::new("S", 222), &fresh)
            .await
            .unwrap();
        assert_eq!((r.applied, r.below_checkpoint), (0, 2), "{}", b.name);
        // The whole of an older instance again: below nothing, every event already applied.
        let all = [setup.to_vec(), vec![m1]].concat();
        let r = store
            .apply_batch(&cfg("us"), StreamRef::new("S", 111), &sequenced(&all, 1))
            .await
            .unwrap();
        assert_eq!((r.applied, r.duplicates), (0, 4), "{}", b.name);
        let hist = store
            .history(&cid, &user("bob"), HistoryPage::After(None), 50)
            .await
            .unwrap();
        assert_eq!(hist.messages.len(), 3, "{}", b.name);

        // The applier resets the checkpoint when it finds a new instance; the max HLC stays.
        let cp = store.reset_checkpoint("S", 333).await.unwrap();
        assert_eq!((cp.instance, cp.seq, cp.max_hlc), (333, 0, m3.hlc), "{}", b.name);
        assert_eq!(store.max_applied_hlc().await.unwrap().0, m3.hlc, "{}", b.name);
    }
}

/// What the gateway's clock observes before stamping: the newest version the event would
/// overwrite or must sort after, here one stamped far ahead of this process's clock (as a
/// region with a faster clock would).
#[tokio::test]
async fn overwritten_version_is_the_newest_version_an_event_replaces() {
    for b in backends().await {
        let store = b.store();
        let us = EventFactory::new("us");
        let eu = EventFactory::new("eu");
        let g = ConversationId::new_group();
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let ahead = meridian_model::Hlc::new(now_ms + 3_600_000, 0).0;
        let update = events::ConversationUpdated {
            conversation_id: g.to_string(),
            name: Some("from the future".into()),
            announcement: None,
            members_can_add: None,
        };
        let settings = events::UserSettingsChanged {
            user_id: "ann".into(),
            conversation_id: g.to_string(),
            muted: Some(true),
            pinned: None,
        };
        let mut from_eu = eu.envelope("ann", Body::ConversationUpdated(update.clone()));
        from_eu.hlc = ahead;
        let mut settings_eu = eu.envelope("ann", Body::UserSettingsChanged(settings.clone()));
        settings_eu.hlc = ahead + 5;
        let evs = [us.user("ann", "us"), us.group("ann", &g, &[]), from_eu];
        store
            .apply_batch(&cfg("us"), "S", &sequenced(&evs, 1))
            .await
            .unwrap();
        let seen = |body| {
            let store = store.clone();
            async move { store.overwritten_version(&body).await.unwrap().map(|h| h.0) }
        };
        assert_eq!(
            seen(Body::ConversationUpdated(update.clone())).await,
            Some(ahead),
            "{}",
            b.name
        );
        let role = events::MemberRoleChanged {
            conversation_id: g.to_string(),
            user_id: "ann".into(),
            role: events::MemberRole::Admin as i32,
        };
        assert_eq!(
            seen(Body::MemberRoleChanged(role)).await,
            Some(ahead),
            "{}",
            b.name
        );
        assert_eq!(
            seen(Body::UserSettingsChanged(settings.clone())).await,
            Some(ahead),
            "{}",
            b.name
        );
        store
            .apply_batch(&cfg("us"), "S", &sequenced(&[settings_eu], 4))
            .await
            .unwrap();
        assert_eq!(
            seen(Body::UserSettingsChanged(settings)).await,
            Some(ahead + 5),
            "{}",
            b.name
        );
        let other = events::ConversationUpdated {
            conversation_id: ConversationId::new_group().to_string(),
            ..update
        };
        assert_eq!(seen(Body::ConversationUpdated(other)).await, None, "{}", b.name);
        let upsert = us.user("ann", "us").body.unwrap();
        assert!(seen(upsert).await.is_some(), "{}", b.name);
    }
}

#[tokio::test]
async fn recall_read_index_and_delete_for_me() {
    for b in backends().await {
        let store = b.store();
        let us = EventFactory::new("us");
        let (cid, create) = us.direct("ann", "bob");
        let m1 = us.message("ann", &cid, "c1", "one");
        let m2 = us.message("ann", &cid, "c2", "two");
        let id1 = EventId::from_bytes(&m1.event_id).unwrap();
        let id2 = EventId::from_bytes(&m2.event_id).unwrap();
        let evs = vec![us.user("ann", "us"), us.user("bob", "us"), create, m1, m2];
        store
            .apply_batch(&cfg("us"), "S", &sequenced(&evs, 1))
            .await
            .unwrap();
        let hist = store
            .history(&cid, &user("bob"), HistoryPage::Latest, 10)
            .await
            .unwrap();
        let (k1, k2) = (
            hist.messages[0].order_key.clone(),
            hist.messages[1].order_key.clone(),
        );

        let later = vec![
            us.envelope(
                "ann",
                Body::MessageRecalled(events::MessageRecalled {
                    conversation_id: cid.to_string(),
                    message_id: id1.as_bytes().to_vec(),
                }),
            ),
            us.envelope(
                "bob",
                Body::ReadIndexSet(events::ReadIndexSet {
                    conversation_id: cid.to_string(),
                    user_id: "bob".into(),
                    order_key: k2.to_bytes(),
                }),
            ),
            // An older read index arrives late: the max register ignores it.
            us.envelope(
                "bob",
                Body::ReadIndexSet(events::ReadIndexSet {
                    conversation_id: cid.to_string(),
                    user_id: "bob".into(),
                    order_key: k1.to_bytes(),
                }),
            ),
            us.envelope(
                "bob",
                Body::MessageDeletedForMe(events::MessageDeletedForMe {
                    conversation_id: cid.to_string(),
                    message_id: id2.as_bytes().to_vec(),
                    user_id: "bob".into(),
                }),
            ),
        ];
        store
            .apply_batch(&cfg("us"), "S", &sequenced(&later, 6))
            .await
            .unwrap();

        let bob = store
            .history(&cid, &user("bob"), HistoryPage::Latest, 10)
            .await
            .unwrap();
        assert_eq!(bob.messages.len(), 1, "{}: bob deleted m2 for himself", b.name);
        assert!(bob.messages[0].recalled && bob.messages[0].body_json.is_none());
        let ann = store
            .history(&cid, &user("ann"), HistoryPage::Latest, 10)
            .await
            .unwrap();
        assert_eq!(ann.messages.len(), 2, "{}", b.name);
        assert_eq!(store.read_index(&cid, &user("bob")).await.unwrap(), Some(k2));
        assert_eq!(store.unread(&cid, &user("bob")).await.unwrap(), 0);
        assert_eq!(
            store.unread(&cid, &user("ann")).await.unwrap(),
            0,
            "own messages are never unread"
        );
        let (list, _) = store.conversations_for(&user("bob"), 10, None).await.unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].conversation_id, cid);
        assert_eq!(list[0].member_count, 2);
    }
}

#[tokio::test]
async fn membership_roles_and_conversation_list_order() {
    for b in backends().await {
        let store = b.store();
        let us = EventFactory::new("us");
        let g1 = ConversationId::new_group();
        let g2 = ConversationId::new_group();
        let evs = vec![
            us.user("ann", "us"),
            us.user("bob", "us"),
            us.user("cat", "us"),
            us.group("ann", &g1, &["bob"]),
            us.group("ann", &g2, &["bob"]),
            us.envelope(
                "ann",
                Body::MembersAdded(events::MembersAdded {
                    conversation_id: g1.to_string(),
                    user_ids: vec!["cat".into()],
                }),
            ),
            us.envelope(
                "ann",
                Body::MemberRoleChanged(events::MemberRoleChanged {
                    conversation_id: g1.to_string(),
                    user_id: "bob".into(),
                    role: events::MemberRole::Admin as i32,
                }),
            ),
            us.envelope(
                "bob",
                Body::MemberRemoved(events::MemberRemoved {
                    conversation_id: g2.to_string(),
                    user_id: "bob".into(),
                }),
            ),
            us.message("bob", &g1, "x", "in g1"),
        ];
        store
            .apply_batch(&cfg("us"), "S", &sequenced(&evs, 1))
            .await
            .unwrap();
        let info = store.conversation(&g1).await.unwrap().unwrap();
        let roles: Vec<_> = info
            .members
            .iter()
            .map(|m| (m.user_id.to_string(), m.role))
            .collect();
        assert_eq!(
            roles,
            [
                ("ann".into(), "owner"),
                ("bob".into(), "admin"),
                ("cat".into(), "member")
            ],
            "{}",
            b.name
        );
        assert_eq!(
            store.member_role(&g2, &user("bob")).await.unwrap(),
            None,
            "{}",
            b.name
        );
        let (ann_list, more) = store.conversations_for(&user("ann"), 10, None).await.unwrap();
        assert!(!more);
        // g1 had the latest activity (a message after g2's last change, bob leaving).
        let ids: Vec<_> = ann_list.iter().map(|c| c.conversation_id.clone()).collect();
        assert_eq!(ids, vec![g1.clone(), g2.clone()], "{}", b.name);
        let (bob_list, _) = store.conversations_for(&user("bob"), 10, None).await.unwrap();
        assert_eq!(bob_list.len(), 1, "{}: bob left g2", b.name);
        assert_eq!(bob_list[0].unread, 0);
        let (cat_list, _) = store.conversations_for(&user("cat"), 10, None).await.unwrap();
        assert_eq!(cat_list[0].unread, 1, "{}", b.name);
        // Pagination: one per page, no overlap.
        let (p1, more) = store.conversations_for(&user("ann"), 1, None).await.unwrap();
        assert!(more);
        let (p2, more) = store
            .conversations_for(&user("ann"), 1, Some((&p1[0].activity, &p1[0].conversation_id)))
            .await
            .unwrap();
        assert!(!more);
        assert_ne!(p1[0].conversation_id, p2[0].conversation_id, "{}", b.name);
    }
}

#[tokio::test]
async fn inbox_fan_out_only_for_users_this_region_serves_and_epoch_changes_on_failover() {
    for b in backends().await {
        let us_store = b.store();
        let us = EventFactory::new("us");
        let (cid, create) = us.direct("ann", "eve");
        let evs = vec![
            us.user("ann", "us"),
            us.user("eve", "eu"),
            create,
            us.message("ann", &cid, "1", "hi"),
        ];
        us_store
            .apply_batch(&cfg("us"), "SYNC_US", &sequenced(&evs, 1))
            .await
            .unwrap();
        assert!(us_store.inbox_head(&user("ann")).await.unwrap().is_some());
        assert!(
            us_store.inbox_head(&user("eve")).await.unwrap().is_none(),
            "{}: eve is served by eu",
            b.name
        );

        let eve = us_store.user(&user("eve")).await.unwrap().unwrap();
        assert_eq!(eve.serving_region.as_str(), "eu");
        // eu fails over to us: us now serves eve, under a new epoch.
        let fo = vec![
            us.envelope(
                "admin",
                Body::RegionFailover(events::RegionFailover {
                    region: "eu".into(),
                    to: "us".into(),
                    applied: vec![],
                }),
            ),
            us.message("ann", &cid, "2", "again"),
        ];
        us_store
            .apply_batch(&cfg("us"), "SYNC_US", &sequenced(&fo, 5))
            .await
            .unwrap();
        let eve2 = us_store.user(&user("eve")).await.unwrap().unwrap();
        assert_eq!(eve2.serving_region.as_str(), "us");
        assert_ne!(eve.epoch, eve2.epoch);
        match us_store
            .read_inbox(&user("eve"), &eve2.epoch, Some(&eve.epoch), 3, 10)
            .await
            .unwrap()
        {
            SyncOutcome::ResyncRequired { epoch } => assert_eq!(epoch, eve2.epoch),
            other => panic!("{}: expected resync, got {other:?}", b.name),
        }
        let SyncOutcome::Page(p) = us_store
            .read_inbox(&user("eve"), &eve2.epoch, Some(&eve2.epoch), 0, 10)
            .await
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(p.entries.len(), 1);
        assert_eq!(p.entries[0].seq, 1);
    }
}

#[tokio::test]
async fn digests_match_whatever_order_two_regions_apply_in() {
    for b in backends().await {
        let (r1, r2) = (b.store(), b.store());
        let us = EventFactory::new("us");
        let eu = EventFactory::new("eu");
        let (cid, create_us) = us.direct("ann", "eve");
        let (_, create_eu) = eu.direct("eve", "ann");
        let us_events = vec![
            us.user("ann", "us"),
            create_us,
            us.message("ann", &cid, "a", "from us"),
        ];
        let eu_events = vec![
            eu.user("eve", "eu"),
            create_eu,
            eu.message("eve", &cid, "b", "from eu"),
        ];
        // Region us applies its own stream first, eu the other way round.
        r1.apply_batch(&cfg("us"), "SYNC_US", &sequenced(&us_events, 1))
            .await
            .unwrap();
        r1.apply_batch(&cfg("us"), "SYNC_EU", &sequenced(&eu_events, 1))
            .await
            .unwrap();
        r2.apply_batch(&cfg("eu"), "SYNC_EU", &sequenced(&eu_events, 1))
            .await
            .unwrap();
        r2.apply_batch(&cfg("eu"), "SYNC_US", &sequenced(&us_events, 1))
            .await
            .unwrap();
        assert_eq!(
            r1.digest().await.unwrap(),
            r2.digest().await.unwrap(),
            "{}",
            b.name
        );
        assert_eq!(
            r1.conversation_digest(&cid).await.unwrap(),
            r2.conversation_digest(&cid).await.unwrap()
        );
        // And a difference shows.
        r2.apply_batch(
            &cfg("eu"),
            "SYNC_EU",
            &sequenced(&[eu.message("eve", &cid, "c", "only eu")], 4),
        )
        .await
        .unwrap();
        assert_ne!(
            r1.digest().await.unwrap(),
            r2.digest().await.unwrap(),
            "{}",
            b.name
        );
        assert_ne!(
            r1.conversation_digest(&cid).await.unwrap(),
            r2.conversation_digest(&cid).await.unwrap()
        );
    }
}

#[tokio::test]
async fn malformed_events_are_recorded_not_fatal() {
    for b in backends().await {
        let store = b.store();
        let us = EventFactory::new("us");
        let bad = us.envelope(
            "ann",
            Body::MembersAdded(events::MembersAdded {
                conversation_id: "not-an-id".into(),
                user_ids: vec![],
            }),
        );
        let mut no_id = us.user("ann", "us");
        no_id.event_id = vec![1, 2, 3];
        let good = us.user("bob", "us");
        let r = store
            .apply_batch(&cfg("us"), "S", &sequenced(&[bad, no_id, good], 1))
            .await
            .unwrap();
        assert_eq!((r.rejected, r.applied, r.checkpoint), (2, 1, 3), "{}", b.name);
        assert!(store.user(&user("bob")).await.unwrap().is_some());
    }
}

#[tokio::test]
async fn send_check_answers_membership_dissolution_and_earlier_sends() {
    for b in backends().await {
        let store = b.store();
        let us = EventFactory::new("us");
        let (direct, create) = us.direct("ann", "bob");
        let group = ConversationId::new_group();
        let sent = us.message("ann", &direct, "c1", "hi");
        let sent_id = EventId::from_bytes(&sent.event_id).unwrap();
        let evs = vec![
            us.user("ann", "us"),
            us.user("bob", "us"),
            us.user("cat", "us"),
            create,
            us.group("ann", &group, &["bob"]),
            sent,
        ];
        store
            .apply_batch(&cfg("us"), "S", &sequenced(&evs, 1))
            .await
            .unwrap();
        let fresh = EventId::for_message(&user("ann"), &direct, "c2");
        // Twice: the second answer for a direct member comes from the member cache.
        for _ in 0..2 {
            let c = store.send_check(&direct, &user("ann"), &fresh).await.unwrap();
            assert_eq!(c.role, Some(events::MemberRole::Member), "{}", b.name);
            assert!(!c.dissolved && c.applied.is_none(), "{}", b.name);
            let c = store.send_check(&direct, &user("cat"), &fresh).await.unwrap();
            assert_eq!(
                c.role, None,
                "{}: cat is not in ann and bob's conversation",
                b.name
            );
        }
        let again = store.send_check(&direct, &user("ann"), &sent_id).await.unwrap();
        let loc = again.applied.expect("the applied send is found");
        assert_eq!(loc.conversation_id, direct.as_str(), "{}", b.name);
        let unknown = ConversationId::new_group();
        let c = store.send_check(&unknown, &user("ann"), &fresh).await.unwrap();
        assert_eq!((c.role, c.dissolved), (None, false), "{}", b.name);

        let c = store.send_check(&group, &user("bob"), &fresh).await.unwrap();
        assert_eq!((c.role, c.dissolved), (Some(events::MemberRole::Member), false));
        let dissolve = us.envelope(
            "ann",
            Body::ConversationDissolved(events::ConversationDissolved {
                conversation_id: group.to_string(),
            }),
        );
        store
            .apply_batch(&cfg("us"), "S", &sequenced(&[dissolve], 7))
            .await
            .unwrap();
        let c = store.send_check(&group, &user("bob"), &fresh).await.unwrap();
        assert!(c.dissolved, "{}: the group was dissolved", b.name);
    }
}
