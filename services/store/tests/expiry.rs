//! Inbox TTL: the sweeper deletes expired entries and moves the oldest retained seq; a device
//! whose checkpoint fell behind it must resync.

mod support;

use meridian_store::inbox::SyncOutcome;
use support::*;

#[tokio::test]
async fn expired_entries_are_swept_and_the_oldest_seq_moves() {
    for b in backends().await {
        let store = b.store();
        let us = EventFactory::new("us");
        let (cid, create) = us.direct("ann", "bob");
        let t0 = 1_000_000_000_000u64;
        let old = vec![
            us.user("ann", "us"),
            us.user("bob", "us"),
            create,
            us.message("ann", &cid, "1", "old"),
            us.message("ann", &cid, "2", "old"),
        ];
        store
            .apply_batch_at(&cfg("us"), "S", &sequenced(&old, 1), t0)
            .await
            .unwrap();
        let fresh = vec![
            us.message("ann", &cid, "3", "new"),
            us.message("ann", &cid, "4", "new"),
        ];
        store
            .apply_batch_at(&cfg("us"), "S", &sequenced(&fresh, 6), t0 + 10_000)
            .await
            .unwrap();

        let bob = user("bob");
        assert_eq!(store.inbox_head(&bob).await.unwrap().unwrap().oldest, 1);
        // Expire everything appended before t0 + 5s: seqs 1..=3 (created + two old messages).
        let deleted = store.sweep_expired(t0 + 5_000).await.unwrap();
        assert_eq!(deleted, 6, "{}: three entries in each of two inboxes", b.name);
        let head = store.inbox_head(&bob).await.unwrap().unwrap();
        assert_eq!((head.oldest, head.head), (4, 5), "{}", b.name);
        // Sweeping again finds nothing more.
        assert_eq!(store.sweep_expired(t0 + 5_000).await.unwrap(), 0);

        let epoch = store.user(&bob).await.unwrap().unwrap().epoch;
        assert!(
            matches!(
                store.read_inbox(&bob, &epoch, Some(&epoch), 0, 10).await.unwrap(),
                SyncOutcome::ResyncRequired { .. }
            ),
            "{}",
            b.name
        );
        assert!(matches!(
            store.read_inbox(&bob, &epoch, Some(&epoch), 2, 10).await.unwrap(),
            SyncOutcome::ResyncRequired { .. }
        ));
        let SyncOutcome::Page(p) = store.read_inbox(&bob, &epoch, Some(&epoch), 3, 10).await.unwrap() else {
            panic!()
        };
        assert_eq!(p.entries.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![4, 5]);
        // History (the storage timeline) keeps everything: TTL is for inboxes only.
        let hist = store
            .history(&cid, &bob, meridian_store::timeline::HistoryPage::Latest, 10)
            .await
            .unwrap();
        assert_eq!(hist.messages.len(), 4);
    }
}
