//! Restarting a region on what it left behind: a stream that came back empty (its storage
//! lost), and a wall clock that stepped back. Either way every call answered 200/202 after
//! the restart must take effect, in order after what came before.

use std::time::Duration;

use anyhow::{bail, Result};
use meridian_e2e::{Session, TestRegion};
use serde_json::{json, Value};

/// Polls the history (oldest first) until it holds at least `n` messages.
async fn wait_history(s: &Session, cid: &str, n: usize) -> Result<Vec<Value>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (st, body) = s
            .get(&format!("/v1/conversations/{cid}/messages?limit=200"))
            .await?;
        if st != 200 {
            bail!("history: {st} {body}");
        }
        let messages = body["messages"].as_array().cloned().unwrap_or_default();
        if messages.len() >= n {
            return Ok(messages);
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "history of {cid} has {} messages, expected {n}: {body}",
                messages.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn texts(messages: &[Value]) -> Vec<String> {
    messages
        .iter()
        .map(|m| m["body"]["text"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// The stream comes back with fewer events than the store's checkpoint (nats-server lost its
/// JetStream storage while the region was down). Sends after the restart are answered 202
/// with stream sequences at or below the old checkpoint; every one must still be stored and
/// delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item1_recreated_stream_is_applied_from_its_start() -> Result<()> {
    let mut r = TestRegion::start().await?;
    let ann = r.user("ann", "laptop").await?;
    let bob = r.user("bob", "phone").await?;
    let cid = ann.direct("bob").await?;
    ann.send(&cid, "before-1", "before the loss").await?;
    wait_history(&bob, &cid, 1).await?;
    let inbox_before = bob.wait_entries(2).await?.len();

    r.stop_region().await?;
    r.nats.restart_empty()?;
    r.restart().await?;

    let after = ["after 1", "after 2", "after 3"];
    for (i, text) in after.iter().enumerate() {
        ann.send(&cid, &format!("after-{i}"), text).await?;
    }
    // Stored: the history has all four, in order.
    let history = wait_history(&bob, &cid, 4).await?;
    assert_eq!(
        texts(&history),
        ["before the loss", "after 1", "after 2", "after 3"]
    );
    // Delivered: bob's inbox gained one message entry per send.
    let inbox = bob.wait_entries(inbox_before + after.len()).await?;
    let delivered: Vec<&str> = inbox[inbox_before..]
        .iter()
        .filter(|e| e["kind"] == "message")
        .filter_map(|e| e["body"]["text"].as_str())
        .collect();
    assert_eq!(delivered, after);
    r.stop().await
}

/// The region restarts on a clock one hour behind the one it ran on. A later PATCH and role
/// change must win over the earlier ones (not be dropped by last-writer-wins while answering
/// 200), and a message sent afterwards must sort after the earlier messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item6_writes_after_a_clock_step_back_order_after_earlier_ones() -> Result<()> {
    let mut r = TestRegion::start().await?;
    let ann = r.user("ann", "laptop").await?;
    r.user("bob", "phone").await?;
    let (st, g) = ann
        .post(
            "/v1/conversations",
            json!({"kind": "group", "name": "start", "members": ["bob"]}),
        )
        .await?;
    assert_eq!(st, 201, "{g}");
    let cid = g["conversation_id"].as_str().unwrap_or_default().to_string();
    let conv = format!("/v1/conversations/{cid}");
    let (st, b) = ann.patch(&conv, json!({"name": "A"})).await?;
    assert_eq!(st, 200, "{b}");
    let (st, b) = ann
        .patch(&format!("{conv}/members/bob"), json!({"role": "admin"}))
        .await?;
    assert_eq!(st, 200, "{b}");
    ann.send(&cid, "m-1", "before the step back").await?;
    wait_history(&ann, &cid, 1).await?;

    r.stop_region().await?;
    r.cfg.gateway.clock_offset_ms = -3_600_000;
    r.restart().await?;

    let (st, b) = ann.patch(&conv, json!({"name": "B"})).await?;
    assert_eq!(st, 200, "{b}");
    let (st, b) = ann
        .patch(&format!("{conv}/members/bob"), json!({"role": "member"}))
        .await?;
    assert_eq!(st, 200, "{b}");
    let (st, info) = ann.get(&conv).await?;
    assert_eq!(st, 200, "{info}");
    assert_eq!(info["name"], "B", "{info}");
    let bob_role = info["members"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["user_id"] == "bob"))
        .map(|m| m["role"].clone());
    assert_eq!(bob_role, Some(json!("member")), "{info}");

    ann.send(&cid, "m-2", "after the step back").await?;
    let history = wait_history(&ann, &cid, 2).await?;
    assert_eq!(texts(&history), ["before the step back", "after the step back"]);
    r.stop().await
}
