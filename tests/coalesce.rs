//! Read diffusion's trailing edge through the public API: a group above the threshold gets
//! one `conversation_advanced` per member per coalescing window, and the end of a burst is
//! announced too (after the window), live and in sync, so a client that pulls history when
//! told sees the burst's last message.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use meridian_e2e::TestRegion;
use meridian_model::{Cursor, OrderKey};
use serde_json::{json, Value};

/// How long the end of a burst may take to be announced before the test fails (the window
/// here is 300 ms).
const WAIT: Duration = Duration::from_secs(15);

fn order_key(v: &Value) -> Result<OrderKey> {
    Ok(Cursor::parse(v["cursor"].as_str().context("cursor")?)?)
}

/// A `conversation_advanced` entry of `cid` at or after `last`.
fn announces(e: &Value, cid: &str, last: &OrderKey) -> bool {
    e["kind"] == "conversation_advanced"
        && e["conversation_id"] == cid
        && order_key(e).is_ok_and(|k| k.to_bytes() >= last.to_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_end_of_a_burst_to_a_read_diffusion_group_is_announced() -> Result<()> {
    let r = TestRegion::start_with(|c| {
        c.applier.read_diffusion_threshold = 3;
        c.applier.coalesce_window_ms = 300;
    })
    .await?;
    let ann = r.user("ann", "d").await?;
    let bob = r.user("bob", "d").await?;
    for u in ["carol", "dave", "erin"] {
        r.user(u, "d").await?;
    }
    let (st, g) = ann
        .post(
            "/v1/conversations",
            json!({"kind": "group", "name": "big", "members": ["bob", "carol", "dave", "erin"]}),
        )
        .await?;
    assert_eq!(st, 201, "{g}");
    let cid = g["conversation_id"]
        .as_str()
        .context("conversation_id")?
        .to_string();
    let head = bob.wait_entries(1).await?.len() as u64;
    let mut ws = bob.ws().await?;
    ws.send(json!({"op": "hello", "after": head})).await?;

    // A burst well inside one window: only its first message can be announced at once.
    let mut last = None;
    for i in 0..8 {
        last = Some(
            ann.send(&cid, &format!("burst-{i}"), &format!("hello {i}"))
                .await?,
        );
    }
    let last = order_key(&last.context("sent")?)?;

    // Live: the flusher publishes what it appends.
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() || seen.len() > 100 {
            bail!("no live conversation_advanced at or after the burst's last message; got {seen:?}");
        }
        let Ok(f) = ws.next_op("entry", left).await else {
            bail!("no live conversation_advanced at or after the burst's last message; got {seen:?}");
        };
        if announces(&f, &cid, &last) {
            break;
        }
        seen.push(f);
    }

    // Sync: the same entry is stored, in a gap-free inbox.
    let all = bob.sync_all(0).await?;
    let seqs: Vec<u64> = all.iter().filter_map(|e| e["seq"].as_u64()).collect();
    assert_eq!(seqs, (1..=all.len() as u64).collect::<Vec<_>>(), "gap-free seqs");
    assert!(
        all.iter().any(|e| announces(e, &cid, &last)),
        "bob's inbox has no conversation_advanced at or after the last message: {all:?}"
    );
    // History pulled when told ends with the burst's last message.
    let (st, page) = bob
        .get(&format!("/v1/conversations/{cid}/messages?after=&limit=100"))
        .await?;
    assert_eq!(st, 200, "{page}");
    let newest = page["messages"]
        .as_array()
        .and_then(|m| m.last())
        .context("history")?;
    assert_eq!(order_key(newest)?.to_bytes(), last.to_bytes(), "{page}");
    r.stop().await
}
