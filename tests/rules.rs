//! Issue 8, item 8 (the gateway's parts): rules the API states and the gateway must hold,
//! each shown over HTTP (and the WebSocket where it matters) against a real nats-server and
//! the embedded store.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use meridian_e2e::{answer, Session, TestRegion, JWT_SECRET};
use meridian_gateway::auth::{self, Claims};
use meridian_model::{EventId, Hlc, OrderKey, RegionId};
use reqwest::Method;
use serde_json::{json, Value};

/// A user call with an `Idempotency-Key`.
async fn post_with_key(s: &Session, path: &str, key: &str, body: &Value) -> Result<(u16, Value)> {
    let resp = s
        .http
        .post(format!("{}{path}", s.base))
        .bearer_auth(&s.token)
        .header("Idempotency-Key", key)
        .json(body)
        .send()
        .await?;
    answer(resp).await
}

/// The caller's groups (ids), from the conversation list.
async fn group_ids(s: &Session) -> Result<BTreeSet<String>> {
    let (st, list) = s.get("/v1/conversations?limit=200").await?;
    ensure!(st == 200, "list: {st} {list}");
    Ok(list["conversations"]
        .as_array()
        .context("conversations")?
        .iter()
        .filter(|c| c["kind"] == "group")
        .filter_map(|c| c["conversation_id"].as_str().map(str::to_string))
        .collect())
}

/// Polls `GET path` until `done` holds for its body (the applier runs asynchronously).
async fn poll(s: &Session, path: &str, what: &str, done: impl Fn(&Value) -> bool) -> Result<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (st, body) = s.get(path).await?;
        ensure!(st == 200, "{path}: {st} {body}");
        if done(&body) {
            return Ok(body);
        }
        ensure!(tokio::time::Instant::now() < deadline, "{what}: {body}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item8_idempotency_key_answers_a_retry_with_the_first_answer() -> Result<()> {
    let mut r = TestRegion::start().await?;
    let ann = r.user("ann", "d").await?;
    r.user("bob", "d").await?;
    r.user("carol", "d").await?;
    r.user("dave", "d").await?;

    // A create retried after a timeout: one group, and the retry gets the first answer.
    let create = json!({"kind": "group", "name": "team", "members": ["bob"]});
    let (st, first) = post_with_key(&ann, "/v1/conversations", "create-1", &create).await?;
    assert_eq!(st, 201, "{first}");
    let (st, again) = post_with_key(&ann, "/v1/conversations", "create-1", &create).await?;
    assert_eq!((st, &again), (201, &first), "the retry gets the first answer");
    let groups = group_ids(&ann).await?;
    assert_eq!(groups.len(), 1, "a retry creates no second group: {groups:?}");

    // The same key with another request is a conflict, and changes nothing.
    let other = json!({"kind": "group", "name": "another", "members": ["bob"]});
    let (st, b) = post_with_key(&ann, "/v1/conversations", "create-1", &other).await?;
    assert_eq!(st, 409, "{b}");
    assert_eq!(b["error"], "idempotency_conflict", "{b}");
    assert!(b["message"].is_string());
    assert_eq!(group_ids(&ann).await?.len(), 1);

    // Keys belong to their caller: bob's "create-1" is his own.
    let bob = r.session("bob", "d").await?;
    let (st, bobs) = post_with_key(&bob, "/v1/conversations", "create-1", &create_with(&["carol"])).await?;
    assert_eq!(st, 201, "{bobs}");
    assert_ne!(bobs["conversation_id"], first["conversation_id"]);

    // Concurrent retries with one key: one group, every answer the first or "in progress".
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let ann = ann.clone();
        tasks.push(tokio::spawn(async move {
            let body = json!({"kind": "group", "name": "burst", "members": ["carol"]});
            post_with_key(&ann, "/v1/conversations", "create-2", &body).await
        }));
    }
    let mut created = BTreeSet::new();
    for t in tasks {
        let (st, b) = t.await??;
        match st {
            201 => {
                created.insert(b["conversation_id"].as_str().context("id")?.to_string());
            }
            409 => assert_eq!(b["error"], "idempotency_in_progress", "{b}"),
            _ => panic!("concurrent retry: {st} {b}"),
        }
    }
    assert_eq!(created.len(), 1, "{created:?}");
    assert_eq!(group_ids(&ann).await?.len(), 2);

    // Adding members: the retry of an add that has since been undone changes nothing.
    let cid = first["conversation_id"].as_str().context("id")?.to_string();
    let members = format!("/v1/conversations/{cid}/members");
    let add = json!({"user_ids": ["dave"]});
    let (st, added) = post_with_key(&ann, &members, "add-1", &add).await?;
    assert_eq!(st, 200, "{added}");
    assert_eq!(added["member_count"], 3);
    let (st, b) = ann.delete(&format!("{members}/dave")).await?;
    assert_eq!(st, 204, "{b}");
    let (st, again) = post_with_key(&ann, &members, "add-1", &add).await?;
    assert_eq!((st, &again), (200, &added), "the retry gets the first answer");
    let (_, info) = ann.get(&format!("/v1/conversations/{cid}")).await?;
    assert_eq!(
        info["member_count"], 2,
        "the retry did not add dave again: {info}"
    );

    // The record outlives the gateway: a retry after a restart still gets the first answer.
    r.restart().await?;
    let ann = r.session("ann", "d").await?;
    let (st, after_restart) = post_with_key(&ann, "/v1/conversations", "create-1", &create).await?;
    assert_eq!((st, &after_restart), (201, &first));
    assert_eq!(group_ids(&ann).await?.len(), 2);

    // A bad key is a 400, not silently ignored.
    let (st, b) = post_with_key(&ann, "/v1/conversations", &"k".repeat(300), &create).await?;
    assert_eq!(st, 400, "{b}");
    r.stop().await
}

fn create_with(members: &[&str]) -> Value {
    json!({"kind": "group", "name": "bob's", "members": members})
}

/// Creates a group owned by `owner`; returns its id.
async fn group(owner: &Session, members: &[&str]) -> Result<String> {
    let (st, g) = owner.post("/v1/conversations", create_with(members)).await?;
    ensure!(st == 201, "create group: {st} {g}");
    Ok(g["conversation_id"].as_str().context("id")?.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item8_read_cursor_past_the_newest_message_is_refused() -> Result<()> {
    let r = TestRegion::start().await?;
    let ann = r.user("ann", "d").await?;
    r.user("bob", "d").await?;
    r.user("carol", "d").await?;
    let with_bob = ann.direct("bob").await?;
    let with_carol = ann.direct("carol").await?;
    let m1 = ann.send(&with_bob, "b-1", "hi bob").await?;
    // Sent after everything in the conversation with bob: past its newest message.
    let later = ann.send(&with_carol, "c-1", "hi carol").await?;
    let read = format!("/v1/conversations/{with_bob}/read");

    // Its own message's cursor is fine (even right after the send's 202).
    let (st, b) = ann.put(&read, json!({"cursor": m1["cursor"]})).await?;
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["cursor"], m1["cursor"]);

    // Another conversation's cursor.
    let (st, b) = ann.put(&read, json!({"cursor": later["cursor"]})).await?;
    assert_eq!(st, 400, "another conversation's cursor: {b}");
    assert_eq!(b["field"], "cursor", "{b}");

    // A well-formed cursor far past the newest message.
    let future = OrderKey::new(
        Hlc::new(auth::now_s() * 1000 + 3_600_000, 0),
        RegionId::parse("us")?,
        EventId::new_v7(),
    );
    let (st, b) = ann
        .put(&read, json!({"cursor": future.cursor().as_str()}))
        .await?;
    assert_eq!(st, 400, "a cursor past the newest message: {b}");
    assert_eq!(b["field"], "cursor", "{b}");

    // Nothing moved.
    let (_, seen) = ann.get(&read).await?;
    assert_eq!(
        seen["members"],
        json!([{"user_id": "ann", "cursor": m1["cursor"]}])
    );
    r.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item8_recalled_message_body_is_not_served_by_sync_or_replay() -> Result<()> {
    let r = TestRegion::start().await?;
    let ann = r.user("ann", "d").await?;
    let bob = r.user("bob", "d").await?;
    let cid = ann.direct("bob").await?;
    let sent = ann.send(&cid, "m-1", "oops, wrong chat").await?;
    ann.send(&cid, "m-2", "still here").await?;
    let mid = sent["message_id"].as_str().context("message_id")?;
    let (st, b) = ann
        .post(
            &format!("/v1/conversations/{cid}/messages/{mid}/recall"),
            json!({}),
        )
        .await?;
    assert_eq!(st, 200, "{b}");

    // Sync: the entry stays (seqs are gap-free) as a tombstone.
    let entries = bob.wait_entries(3).await?;
    let msgs: Vec<&Value> = entries.iter().filter(|e| e["kind"] == "message").collect();
    assert_eq!(msgs.len(), 2, "{entries:?}");
    assert_eq!(msgs[0]["message_id"], mid);
    assert_eq!(msgs[0]["recalled"], true, "{}", msgs[0]);
    assert!(
        msgs[0]["body"].is_null(),
        "sync serves a recalled body: {}",
        msgs[0]
    );
    assert_eq!(msgs[1]["recalled"], false, "{}", msgs[1]);
    assert_eq!(msgs[1]["body"]["text"], "still here");

    // WebSocket replay after hello: the same.
    let mut ws = bob.ws().await?;
    ws.send(json!({"op": "hello", "after": 0})).await?;
    let mut replayed = Vec::new();
    while replayed.len() < 2 {
        let f = ws.next_op("entry", Duration::from_secs(10)).await?;
        if f["kind"] == "message" {
            replayed.push(f);
        }
    }
    assert_eq!(replayed[0]["message_id"], mid);
    assert_eq!(replayed[0]["recalled"], true, "{}", replayed[0]);
    assert!(
        replayed[0]["body"].is_null(),
        "replay serves a recalled body: {}",
        replayed[0]
    );
    assert!(!replayed[0].to_string().contains("wrong chat"));
    assert_eq!(replayed[1]["body"]["text"], "still here");
    r.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item8_presence_is_visible_only_to_users_sharing_a_conversation() -> Result<()> {
    let r = TestRegion::start().await?;
    let ann = r.user("ann", "d").await?;
    let bob = r.user("bob", "d").await?;
    let carol = r.user("carol", "d").await?;
    let dave = r.user("dave", "d").await?;
    ann.direct("bob").await?;
    let gid = group(&ann, &["dave"]).await?;

    let mut sockets = Vec::new();
    for s in [&bob, &carol, &dave] {
        let mut ws = s.ws().await?;
        ws.send(json!({"op": "ping"})).await?;
        ws.next_op("pong", Duration::from_secs(5)).await?;
        sockets.push(ws);
    }
    let (st, p) = ann.get("/v1/presence?user_ids=bob,carol,dave").await?;
    assert_eq!(st, 200, "{p}");
    let users = p["users"].as_array().context("users")?;
    assert_eq!(users.len(), 3, "{p}");
    assert_eq!(users[0]["user_id"], "bob");
    assert_eq!(users[0]["online"], true, "shares a direct conversation: {p}");
    assert_eq!(users[2]["user_id"], "dave");
    assert_eq!(users[2]["online"], true, "shares a group: {p}");
    assert_eq!(
        users[1],
        json!({"user_id": "carol", "online": false, "last_seen": null}),
        "carol shares nothing with ann: reported as never seen"
    );
    // And the other way round: carol learns nothing about ann's contacts.
    let (_, p) = carol.get("/v1/presence?user_ids=bob").await?;
    assert_eq!(
        p["users"][0],
        json!({"user_id": "bob", "online": false, "last_seen": null})
    );
    // Leaving the group ends it.
    let (st, _) = dave
        .delete(&format!("/v1/conversations/{gid}/members/dave"))
        .await?;
    assert_eq!(st, 204);
    let (_, p) = ann.get("/v1/presence?user_ids=dave").await?;
    assert_eq!(p["users"][0]["online"], false, "{p}");
    r.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item8_seen_by_lists_current_members_only() -> Result<()> {
    let r = TestRegion::start().await?;
    let ann = r.user("ann", "d").await?;
    let bob = r.user("bob", "d").await?;
    let carol = r.user("carol", "d").await?;
    let cid = group(&ann, &["bob", "carol"]).await?;
    let sent = ann.send(&cid, "m-1", "hello").await?;
    let read = format!("/v1/conversations/{cid}/read");
    poll(
        &ann,
        &format!("/v1/conversations/{cid}/messages"),
        "message applied",
        |b| b["messages"].as_array().is_some_and(|m| !m.is_empty()),
    )
    .await?;
    for s in [&bob, &carol] {
        let (st, b) = s.put(&read, json!({"cursor": sent["cursor"]})).await?;
        assert_eq!(st, 200, "{b}");
    }
    let (st, _) = ann
        .delete(&format!("/v1/conversations/{cid}/members/carol"))
        .await?;
    assert_eq!(st, 204);
    let (st, seen) = ann.get(&read).await?;
    assert_eq!(st, 200, "{seen}");
    let users: Vec<&str> = seen["members"]
        .as_array()
        .context("members")?
        .iter()
        .filter_map(|m| m["user_id"].as_str())
        .collect();
    assert_eq!(users, ["bob"], "carol left: {seen}");
    r.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item8_app_minted_tokens_have_a_maximum_lifetime() -> Result<()> {
    let r = TestRegion::start_with(|c| c.gateway.max_token_ttl_s = 3600).await?;
    r.user("ann", "d").await?;
    let me = format!("{}/v1/me", r.base);
    let mint = |exp: u64| {
        auth::sign(
            JWT_SECRET.as_bytes(),
            &Claims {
                sub: "ann".into(),
                dev: "watch".into(),
                exp,
                iat: None,
            },
        )
    };
    let (st, b) = answer(
        r.http
            .get(&me)
            .bearer_auth(mint(auth::now_s() + 1800))
            .send()
            .await?,
    )
    .await?;
    assert_eq!(st, 200, "within the maximum: {b}");
    let (st, b) = answer(
        r.http
            .get(&me)
            .bearer_auth(mint(auth::now_s() + 10 * 365 * 24 * 3600))
            .send()
            .await?,
    )
    .await?;
    assert_eq!(st, 401, "a ten-year token: {b}");
    assert_eq!(b["error"], "unauthorized");
    assert!(
        b["message"].as_str().unwrap_or_default().contains("lifetime"),
        "{b}"
    );
    // An `iat` in the future does not buy a longer life: a ten-year token that claims it was
    // issued an hour before it expires is still ten years from now.
    let far = auth::now_s() + 10 * 365 * 24 * 3600;
    let future_iat = auth::sign(
        JWT_SECRET.as_bytes(),
        &Claims {
            sub: "ann".into(),
            dev: "watch".into(),
            exp: far,
            iat: Some(far - 3600),
        },
    );
    let (st, b) = answer(r.http.get(&me).bearer_auth(future_iat).send().await?).await?;
    assert_eq!(st, 401, "a ten-year token with a future iat: {b}");
    // Admin issuance is capped by the same maximum.
    let (st, b) = r
        .admin(
            Method::POST,
            "/v1/admin/tokens",
            Some(json!({"user_id": "ann", "device_id": "d", "ttl_s": 7200})),
        )
        .await?;
    assert_eq!(st, 400, "{b}");
    assert_eq!(b["field"], "ttl_s");
    r.stop().await
}
