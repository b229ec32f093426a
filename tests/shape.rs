//! Issue 8, item 12 (typed records): the store keeps what a state change changed as typed
//! fields and the gateway names them, so sync and WebSocket entries carry the fields and
//! values docs/api.md §5 lists. Shown over HTTP and the WebSocket against a real nats-server
//! and the embedded store.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use meridian_e2e::{Session, TestRegion};
use serde_json::{json, Value};

/// Polls the caller's sync until an entry of `kind` is there; returns it.
async fn entry_of_kind(s: &Session, kind: &str) -> Result<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let entries = s.sync_all(0).await?;
        if let Some(e) = entries.into_iter().find(|e| e["kind"] == kind) {
            return Ok(e);
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "{} has no {kind} entry",
            s.user
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Polls the caller's sync until the message `mid` is applied (a send's 202 means stored in
/// the stream; recall and delete find the message only once it is applied).
async fn wait_message(s: &Session, mid: &str) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let entries = s.sync_all(0).await?;
        if entries.iter().any(|e| e["message_id"] == mid) {
            return Ok(());
        }
        ensure!(tokio::time::Instant::now() < deadline, "{mid} not applied");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Creates a group named `name` owned by `owner` with `members`; returns its id.
async fn group(owner: &Session, name: &str, members: &[&str]) -> Result<String> {
    let body = json!({"kind": "group", "name": name, "members": members});
    let (st, g) = owner.post("/v1/conversations", body).await?;
    ensure!(st == 201, "create group: {st} {g}");
    Ok(g["conversation_id"].as_str().context("id")?.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item12_read_entry_cursor_is_the_read_index_it_set() -> Result<()> {
    let r = TestRegion::start().await?;
    let ann = r.user("ann", "d").await?;
    r.user("bob", "d").await?;
    let cid = ann.direct("bob").await?;
    let first = ann.send(&cid, "m-1", "one").await?;
    ann.send(&cid, "m-2", "two").await?;
    let (st, b) = ann
        .put(
            &format!("/v1/conversations/{cid}/read"),
            json!({"cursor": first["cursor"]}),
        )
        .await?;
    ensure!(st == 200, "read: {st} {b}");

    let read = entry_of_kind(&ann, "read").await?;
    assert_eq!(read["user_id"], "ann", "{read}");
    assert_eq!(
        read["cursor"], first["cursor"],
        "a read entry's cursor is the read index it set: {read}"
    );
    r.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item12_member_role_changed_entry_names_the_role_as_the_api_does() -> Result<()> {
    let r = TestRegion::start().await?;
    let ann = r.user("ann", "d").await?;
    let bob = r.user("bob", "d").await?;
    let cid = group(&ann, "roles", &["bob"]).await?;
    // Bob's socket is live before the change, so the entry also arrives as a live frame.
    bob.wait_entries(1).await?;
    let head = bob.sync_all(0).await?.len();
    let mut ws = bob.ws().await?;
    ws.send(json!({"op": "hello", "after": head})).await?;

    let path = format!("/v1/conversations/{cid}/members/bob");
    let (st, b) = ann.patch(&path, json!({"role": "admin"})).await?;
    ensure!(st == 200, "role change: {st} {b}");
    assert_eq!(b["role"], "admin", "{b}");

    let synced = entry_of_kind(&bob, "member_role_changed").await?;
    assert_eq!(synced["user_id"], "bob", "{synced}");
    assert_eq!(
        synced["role"], "admin",
        "sync names the role as the role call does: {synced}"
    );

    let live = ws.next_op("entry", Duration::from_secs(10)).await?;
    assert_eq!(live["kind"], "member_role_changed", "{live}");
    assert_eq!(live["role"], "admin", "live frame: {live}");
    assert_eq!(live["user_id"], "bob", "{live}");
    r.stop().await
}

/// Every state-change kind of docs/api.md §5 with its fields, as sync serves it: the typed
/// details render with the names the document lists (a guard for the typed records).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item12_state_change_entries_carry_the_fields_the_api_lists() -> Result<()> {
    let r = TestRegion::start().await?;
    let ann = r.user("ann", "d").await?;
    r.user("bob", "d").await?;
    r.user("carol", "d").await?;
    let cid = group(&ann, "fields", &["bob"]).await?;
    let conv = format!("/v1/conversations/{cid}");
    let calls = [
        ann.patch(&conv, json!({"announcement": "hello all"})).await?,
        ann.post(&format!("{conv}/members"), json!({"user_ids": ["carol"]}))
            .await?,
        ann.put(&format!("{conv}/settings"), json!({"muted": true}))
            .await?,
    ];
    for (st, b) in &calls {
        ensure!((200..300).contains(st), "{st} {b}");
    }
    let sent = ann.send(&cid, "m-1", "to be recalled").await?;
    let mid = sent["message_id"].as_str().context("message_id")?;
    wait_message(&ann, mid).await?;
    let (st, b) = ann
        .post(&format!("{conv}/messages/{mid}/recall"), json!({}))
        .await?;
    ensure!(st == 200, "recall: {st} {b}");
    let kept = ann.send(&cid, "m-2", "to be deleted for me").await?;
    let kept_id = kept["message_id"].as_str().context("message_id")?;
    wait_message(&ann, kept_id).await?;
    let (st, b) = ann.delete(&format!("{conv}/messages/{kept_id}")).await?;
    ensure!(st == 204, "delete for me: {st} {b}");
    let (st, b) = ann.delete(&format!("{conv}/members/carol")).await?;
    ensure!(st == 204, "remove carol: {st} {b}");

    let created = entry_of_kind(&ann, "conversation_created").await?;
    assert_eq!(created["name"], "fields", "{created}");
    let mut ids: Vec<&str> = created["user_ids"]
        .as_array()
        .context("user_ids")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    ids.sort();
    assert_eq!(ids, ["ann", "bob"], "{created}");
    let updated = entry_of_kind(&ann, "conversation_updated").await?;
    assert_eq!(updated["announcement"], "hello all", "{updated}");
    assert!(updated.get("name").is_none(), "only what changed: {updated}");
    let added = entry_of_kind(&ann, "member_added").await?;
    assert_eq!(added["user_ids"], json!(["carol"]), "{added}");
    let settings = entry_of_kind(&ann, "settings").await?;
    assert_eq!(settings["muted"], true, "{settings}");
    assert!(settings["pinned"].is_null(), "{settings}");
    let recall = entry_of_kind(&ann, "recall").await?;
    assert_eq!(recall["message_id"], mid, "{recall}");
    let deleted = entry_of_kind(&ann, "message_deleted").await?;
    assert_eq!(deleted["message_id"], kept_id, "{deleted}");
    let removed = entry_of_kind(&ann, "member_removed").await?;
    assert_eq!(removed["user_id"], "carol", "{removed}");
    r.stop().await
}
