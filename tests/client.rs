//! The Rust SDK against a real region: typed calls, idempotent sends, the WebSocket sync loop
//! with its checkpoint, resync on a stale epoch, and reconnect after a region restart.

use std::time::Duration;

use anyhow::{bail, Result};
use meridian_client::{Checkpoint, Client, ClientError, RetryPolicy, SyncEvent, SyncStream};
use meridian_e2e::TestRegion;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(15);

/// The next entry, skipping signals and disconnects.
async fn next_entry(sync: &mut SyncStream) -> Result<meridian_client::Entry> {
    loop {
        match tokio::time::timeout(WAIT, sync.next()).await? {
            Some(Ok(SyncEvent::Entry(e))) => return Ok(e),
            Some(Ok(SyncEvent::Signal(_) | SyncEvent::Disconnected(_))) => continue,
            other => bail!("expected an entry, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_calls_sync_loop_resync_and_reconnect() -> Result<()> {
    let mut r = TestRegion::start().await?;
    let ann_s = r.user("ann", "laptop").await?;
    let bob_s = r.user("bob", "phone").await?;
    let ann = Client::new(&r.base, &ann_s.token);
    let bob = Client::new(&r.base, &bob_s.token);

    let conv = ann.create_direct("bob").await?;
    assert_eq!(conv.kind, "direct");
    assert_eq!(conv.member_count, 2);
    let first = ann
        .send(&conv.conversation_id, "c-1", "text", &json!({"text": "one"}))
        .await?;
    let again = ann
        .send(&conv.conversation_id, "c-1", "text", &json!({"text": "one"}))
        .await?;
    assert_eq!(first, again, "the same client_msg_id is the same message");

    // Typed errors.
    match ann.conversation("g_00000000000000000000000000000000").await {
        Err(ClientError::Api {
            status: 404, code, ..
        }) => assert_eq!(code, "conversation_not_found"),
        other => panic!("expected 404, got {other:?}"),
    }

    // The sync loop hands out every entry once, in seq order, and keeps the checkpoint.
    let mut sync = bob.sync(Checkpoint::default());
    let created = next_entry(&mut sync).await?;
    assert_eq!((created.seq, created.kind.as_str()), (1, "conversation_created"));
    let one = next_entry(&mut sync).await?;
    assert_eq!((one.seq, one.body["text"].as_str()), (2, Some("one")));
    ann.send_text(&conv.conversation_id, "two").await?;
    let two = next_entry(&mut sync).await?;
    assert_eq!((two.seq, two.sender.as_deref()), (3, Some("ann")));
    assert_eq!(sync.checkpoint().seq, 3);
    let epoch = sync.checkpoint().epoch.expect("the loop learned the epoch");

    // A region restart drops the socket; the loop reconnects and carries on from its checkpoint.
    r.restart().await?;
    ann.send_text(&conv.conversation_id, "three").await?;
    let three = next_entry(&mut sync).await?;
    assert_eq!((three.seq, three.body["text"].as_str()), (4, Some("three")));
    drop(sync);

    // A checkpoint from another epoch: resync, then continue from the head.
    let mut stale = bob.sync(Checkpoint {
        epoch: Some("eu.1".into()),
        seq: 2,
    });
    // The loop reads the timelines itself first (issue 10 item 3): this device held nothing
    // of them, so every message comes back once, then the resync is announced.
    let mut recovered = Vec::new();
    loop {
        match tokio::time::timeout(WAIT, stale.next()).await? {
            Some(Ok(SyncEvent::Recovered { message, .. })) => {
                recovered.push(
                    message.body.as_ref().unwrap()["text"]
                        .as_str()
                        .unwrap()
                        .to_string(),
                );
            }
            Some(Ok(SyncEvent::ResyncRequired { epoch: e, head })) => {
                assert_eq!(e, epoch);
                assert_eq!(head, 4);
                break;
            }
            other => bail!("expected resync, got {other:?}"),
        }
    }
    assert_eq!(recovered, ["one", "two", "three"]);
    ann.send_text(&conv.conversation_id, "four").await?;
    let four = next_entry(&mut stale).await?;
    assert_eq!((four.seq, four.body["text"].as_str()), (5, Some("four")));

    // History through the SDK, oldest first.
    let h = bob.history(&conv.conversation_id, Some(""), None, 50).await?;
    let texts: Vec<_> = h
        .items
        .iter()
        .map(|m| m.body.as_ref().unwrap()["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(texts, ["one", "two", "three", "four"]);
    let list = bob.conversations(10, None).await?;
    assert_eq!(list.items[0].unread, 4);
    r.stop().await
}

/// Issue 8 item 4: the gateway closes a socket with 4401 when its token expires; the SDK
/// reconnects at once with a fresh token from its token provider and misses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item4_sdk_reconnects_with_a_fresh_token_after_4401() -> Result<()> {
    let r = TestRegion::start().await?;
    let ann_s = r.user("ann", "laptop").await?;
    r.user("bob", "phone").await?;
    let short = r.session_with_ttl("bob", "phone", 2).await?;
    let (http, base) = (r.http.clone(), r.base.clone());
    let provider: meridian_client::TokenProvider = std::sync::Arc::new(move || {
        let (http, base) = (http.clone(), base.clone());
        Box::pin(async move {
            let v: serde_json::Value = http
                .post(format!("{base}/v1/admin/tokens"))
                .header("X-Admin-Key", meridian_e2e::ADMIN_KEY)
                .json(&json!({"user_id": "bob", "device_id": "phone", "ttl_s": 3600}))
                .send()
                .await
                .map_err(|e| ClientError::Transport(e.to_string()))?
                .json()
                .await
                .map_err(|e| ClientError::Decode(e.to_string()))?;
            Ok(v["token"].as_str().unwrap_or_default().to_string())
        })
    });
    let bob = Client::new(&r.base, &short.token).with_token_provider(provider);
    let ann = Client::new(&r.base, &ann_s.token);
    let conv = ann.create_direct("bob").await?;
    let mut sync = bob.sync(Checkpoint::default());
    assert_eq!(next_entry(&mut sync).await?.kind, "conversation_created");
    // The short token expires within 3 s; the loop reports the disconnect and reconnects.
    loop {
        match tokio::time::timeout(WAIT, sync.next()).await? {
            Some(Ok(SyncEvent::Disconnected(why))) if why.contains("token expired") => break,
            Some(Ok(SyncEvent::Signal(_) | SyncEvent::Disconnected(_))) => continue,
            other => bail!("expected the token-expired disconnect, got {other:?}"),
        }
    }
    ann.send_text(&conv.conversation_id, "after expiry").await?;
    let e = next_entry(&mut sync).await?;
    assert_eq!((e.seq, e.body["text"].as_str()), (2, Some("after expiry")));
    assert_ne!(bob.token(), short.token, "the client holds the fresh token");
    r.stop().await
}

/// Issue 8 item 12: every SDK call, not only sends, waits out a 429 (the `retry_after_ms` its
/// body carries, else its `Retry-After` header) and is made again, a bounded number of times.
/// A gateway refilling one request per second: back-to-back calls are refused until they wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item12_sdk_calls_wait_out_rate_limits() -> Result<()> {
    let r = TestRegion::start_with(|cfg| {
        cfg.gateway.rate_limit_per_s = 1.0;
        cfg.gateway.rate_limit_burst = 1.0;
    })
    .await?;
    let ann_s = r.user("ann", "laptop").await?;
    r.user("bob", "phone").await?;
    let ann = Client::new(&r.base, &ann_s.token);
    // Six calls of different kinds back to back: each after the first is refused once and
    // succeeds after the wait the gateway asked for.
    ann.me().await?;
    let conv = ann.create_direct("bob").await?;
    let cid = conv.conversation_id;
    ann.conversation(&cid).await?;
    ann.send_text(&cid, "after a wait").await?;
    let history = ann.history(&cid, Some(""), None, 10).await?;
    assert_eq!(history.items.len(), 1);
    let page = ann.sync_page(0, None, 10).await?;
    assert!(page.head >= 2, "conversation_created and the message: {page:?}");

    // With the waiting turned off the 429 comes back, with the wait the gateway asked for.
    let impatient = Client::new(&r.base, &ann_s.token).with_retry(RetryPolicy {
        rate_limited_retries: 0,
        ..RetryPolicy::default()
    });
    let mut refused = None;
    for _ in 0..5 {
        if let Err(e) = impatient.me().await {
            refused = Some(e);
            break;
        }
    }
    match refused {
        Some(ClientError::Api {
            status: 429,
            code,
            retry_after: Some(wait),
            ..
        }) => {
            assert_eq!(code, "rate_limited");
            assert!(wait <= Duration::from_secs(1), "one token per second: {wait:?}");
        }
        other => bail!("expected a 429 with retry_after, got {other:?}"),
    }
    r.stop().await
}

/// Issue 11, item 2 (found by the drill workload's reconnects): an app that drops its sync
/// stream and resumes from `checkpoint()` and `timelines()` must get every entry it had not
/// taken yet. The loop runs ahead of the app by what it has buffered; a checkpoint that
/// counted those entries made a resume skip them, lost to the app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item2_a_resumed_stream_hands_out_what_the_dropped_one_had_buffered() -> Result<()> {
    let r = TestRegion::start().await?;
    let ann_s = r.user("ann", "laptop").await?;
    let bob_s = r.user("bob", "phone").await?;
    let ann = Client::new(&r.base, &ann_s.token);
    let bob = Client::new(&r.base, &bob_s.token);
    let cid = ann.create_direct("bob").await?.conversation_id;
    let texts = ["m1", "m2", "m3", "m4", "m5"];
    for t in texts {
        ann.send_text(&cid, t).await?;
    }
    let mut sync = bob.sync(Checkpoint::default());
    // The app takes the conversation's creation and the first message only.
    let created = next_entry(&mut sync).await?;
    assert_eq!(created.kind, "conversation_created");
    let first = next_entry(&mut sync).await?;
    assert_eq!(first.body["text"].as_str(), Some("m1"));
    // Give the loop time to buffer the rest (it reads them in the same catch-up page).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (cp, timelines) = (sync.checkpoint(), sync.timelines());
    drop(sync);
    assert_eq!(
        cp.seq, first.seq,
        "the checkpoint is after the last entry the app took"
    );
    let mut resumed = bob.sync_with_timelines(cp, timelines);
    let mut got = Vec::new();
    for _ in 1..texts.len() {
        let e = next_entry(&mut resumed).await?;
        got.push(e.body["text"].as_str().unwrap_or_default().to_string());
    }
    assert_eq!(got, ["m2", "m3", "m4", "m5"]);
    Ok(())
}

/// Found by the region-loss drill (issue 11): a message a device already had from a resync
/// also reaches the new epoch's inbox; the SDK rightly does not hand it out twice, but it
/// skipped its seq in silence, so the app saw seqs jump (…, 181, 183) and could not tell a
/// deduplicated entry from a lost one. Every seq now reaches the app: the message it already
/// had as `AlreadyHad`, the others as entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item3_a_message_the_device_already_had_keeps_its_seq() -> Result<()> {
    let r = TestRegion::start().await?;
    let ann_s = r.user("ann", "laptop").await?;
    let bob_s = r.user("bob", "phone").await?;
    let ann = Client::new(&r.base, &ann_s.token);
    let bob = Client::new(&r.base, &bob_s.token);
    let conv = ann.create_direct("bob").await?;
    let cid = conv.conversation_id.clone();
    let had = ann.send(&cid, "had-1", "text", &json!({"text": "had"})).await?;
    ann.send(&cid, "new-1", "text", &json!({"text": "new"})).await?;

    // Bob's inbox: 1 conversation_created, 2 "had", 3 "new". The device holds "had" already
    // (as after a resync that read it from the timeline) and resumes after seq 1.
    let mut first = bob.sync(Checkpoint::default());
    let created = next_entry(&mut first).await?;
    assert_eq!(created.seq, 1);
    let cp = first.checkpoint();
    drop(first);
    let mut timelines = meridian_client::Timelines::default();
    timelines.seen.insert(had.message_id.clone());
    let mut sync = bob.sync_with_timelines(cp, timelines);
    let mut seqs = Vec::new();
    let mut texts = Vec::new();
    while seqs.len() < 2 {
        match tokio::time::timeout(WAIT, sync.next()).await? {
            Some(Ok(SyncEvent::Entry(e))) => {
                seqs.push(e.seq);
                texts.push(e.body["text"].as_str().unwrap_or_default().to_string());
            }
            Some(Ok(SyncEvent::AlreadyHad { seq, message_id, .. })) => {
                assert_eq!(message_id, had.message_id);
                seqs.push(seq);
            }
            Some(Ok(SyncEvent::Signal(_) | SyncEvent::Disconnected(_))) => continue,
            other => bail!("expected an entry, got {other:?}"),
        }
    }
    assert_eq!(seqs, [2, 3], "every seq reaches the app, in order");
    assert_eq!(texts, ["new"], "the message it had is not handed out again");
    assert_eq!(sync.checkpoint().seq, 3);
    r.stop().await
}
