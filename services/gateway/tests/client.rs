//! Issue 9 item 8: meridian-client follows `421 wrong_region` to the region serving the user,
//! against real gateways (see `common`).

mod common;

use std::time::Duration;

use anyhow::{bail, Result};
use common::Cluster;
use meridian_client::{Checkpoint, Client, SyncEvent};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item8_a_send_to_the_wrong_region_follows_421_and_is_stored_once() -> Result<()> {
    let c = Cluster::start(&["us", "eu"], &[]).await?;
    c.provision("ann", "eu").await?;
    c.provision("bob", "eu").await?;
    let cid = c.session("eu", "ann").await?.direct("bob").await?;
    let token = c.session("us", "ann").await?.token;
    let (us, eu) = (c.region("us").base.clone(), c.region("eu").base.clone());
    let client = Client::new(&us, token);
    let sync = client.clone();
    let accepted = client.send(&cid, "m-1", "text", &json!({"text": "hi"})).await?;
    assert_eq!(client.base_url(), eu);
    assert_eq!(sync.base_url(), eu, "clones follow too");
    // The same client_msg_id again: the same message, stored once.
    let again = client.send(&cid, "m-1", "text", &json!({"text": "hi"})).await?;
    assert_eq!(again.message_id, accepted.message_id);
    // Stored asynchronously after the 202: wait for it, then there is exactly one.
    let history = common::eventually_some(Duration::from_secs(10), "the message stored", || async {
        let page = client.history(&cid, Some(""), None, 50).await?;
        Ok((!page.items.is_empty()).then_some(page))
    })
    .await?;
    assert_eq!(history.items.len(), 1);
    assert_eq!(history.items[0].message_id, accepted.message_id);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item8_the_sync_loop_follows_a_wrong_region_frame_to_the_serving_region() -> Result<()> {
    let c = Cluster::start(&["us", "eu"], &[]).await?;
    // us serves ann until she is re-homed below; eu's directory has her in eu already.
    c.provision_in(&["us"], "ann", "us").await?;
    c.provision_in(&["eu"], "ann", "eu").await?;
    c.provision("bob", "eu").await?;
    let client = Client::new(&c.region("us").base, c.session("us", "ann").await?.token);
    let mut sync = client.sync(Checkpoint::default());
    // Connected to us: the socket is open once the gateway counts ann online there.
    let ann_us = c.session("us", "ann").await?;
    common::eventually(Duration::from_secs(10), "ann's socket open on us", || async {
        let (_, body) = ann_us.get("/v1/presence?user_ids=ann").await?;
        Ok(body["users"][0]["online"] == true)
    })
    .await?;
    c.provision_in(&["us"], "ann", "eu").await?;
    // us fences her socket; the loop says where it goes and reconnects there, where her
    // inbox has another epoch: a resync to eu's epoch is the sign it arrived.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, sync.next()).await {
            Ok(Some(Ok(SyncEvent::ResyncRequired { epoch, .. }))) if epoch.starts_with("eu") => break,
            Ok(Some(other)) => seen.push(format!("{other:?}")),
            Ok(None) => bail!("the sync loop ended; saw {seen:?}"),
            Err(_) => bail!("the loop did not follow ann to eu within 20 s; saw {seen:?}"),
        }
    }
    // bob writes to ann in eu: the loop sees it only if it moved there.
    let bob = c.session("eu", "bob").await?;
    let cid = bob.direct("ann").await?;
    let (st, body) = bob
        .post(
            &format!("/v1/conversations/{cid}/messages"),
            json!({"client_msg_id": "x1", "body": {"text": "over here"}}),
        )
        .await?;
    assert_eq!(st, 202, "{body}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let ev = match tokio::time::timeout(left, sync.next()).await {
            Ok(Some(ev)) => ev,
            Ok(None) => bail!("the sync loop ended; saw {seen:?}"),
            Err(_) => bail!("no message from eu within 20 s; saw {seen:?}"),
        };
        match ev {
            Ok(SyncEvent::Entry(e)) if e.kind == "message" => {
                assert_eq!(e.body, json!({"text": "over here"}));
                break;
            }
            other => seen.push(format!("{other:?}")),
        }
    }
    assert_eq!(client.base_url(), c.region("eu").base);
    assert!(
        seen.iter().any(|e| e.contains("served by region eu")),
        "the loop said why it moved: {seen:?}"
    );
    Ok(())
}
