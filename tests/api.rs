//! Every call of docs/api.md's Identity, Conversations, Messages and Sync sections and the health
//! calls, with their error cases, against a real nats-server and the embedded store.

use std::time::Duration;

use anyhow::Result;
use meridian_e2e::{answer, TestRegion, ADMIN_KEY, JWT_SECRET};
use meridian_gateway::auth::{self, Claims};
use reqwest::Method;
use serde_json::{json, Value};

fn is_error(body: &Value, code: &str) -> bool {
    body["error"] == code && body["message"].is_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_tokens_and_auth_errors() -> Result<()> {
    let r = TestRegion::start().await?;
    let ann = r.user("ann", "laptop").await?;

    // /v1/me
    let (st, me) = ann.get("/v1/me").await?;
    assert_eq!(st, 200, "{me}");
    assert_eq!(me["user_id"], "ann");
    assert_eq!(me["home_region"], "us");
    assert_eq!(me["serving_region"], "us");
    assert_eq!(me["served_by"], "us");

    // Admin calls without / with a wrong key.
    let url = format!("{}/v1/admin/users/bob", r.base);
    let (st, b) = answer(
        r.http
            .put(&url)
            .json(&json!({"home_region": "us"}))
            .send()
            .await?,
    )
    .await?;
    assert_eq!(st, 401, "{b}");
    assert!(is_error(&b, "unauthorized"));
    let (st, _) = answer(
        r.http
            .put(&url)
            .header("X-Admin-Key", "wrong-key-wrong-key")
            .json(&json!({"home_region": "us"}))
            .send()
            .await?,
    )
    .await?;
    assert_eq!(st, 401);

    // Invalid input to admin calls.
    let (st, b) = r
        .admin(
            Method::PUT,
            "/v1/admin/users/bad%20id",
            Some(json!({"home_region": "us"})),
        )
        .await?;
    assert_eq!(st, 400, "{b}");
    assert_eq!(b["field"], "user_id");
    let long = "x".repeat(65);
    let (st, _) = r
        .admin(
            Method::PUT,
            &format!("/v1/admin/users/{long}"),
            Some(json!({"home_region": "us"})),
        )
        .await?;
    assert_eq!(st, 400);
    let (st, b) = r
        .admin(
            Method::PUT,
            "/v1/admin/users/zed",
            Some(json!({"home_region": "mars"})),
        )
        .await?;
    assert_eq!(st, 400, "{b}");
    assert!(is_error(&b, "unknown_region"));
    let (st, b) = r
        .admin(Method::PUT, "/v1/admin/users/zed", Some(json!({"home": "us"})))
        .await?;
    assert_eq!(st, 400, "{b}");
    assert!(is_error(&b, "malformed_json"));
    let (st, b) = answer(
        r.http
            .put(format!("{}/v1/admin/users/zed", r.base))
            .header("X-Admin-Key", ADMIN_KEY)
            .body("{not json")
            .send()
            .await?,
    )
    .await?;
    assert_eq!(st, 400);
    assert!(is_error(&b, "malformed_json"));
    let (st, b) = r
        .admin(
            Method::POST,
            "/v1/admin/tokens",
            Some(json!({"user_id": "ann", "device_id": "d", "ttl_s": 0})),
        )
        .await?;
    assert_eq!(st, 400, "{b}");
    assert_eq!(b["field"], "ttl_s");
    let (st, b) = r
        .admin(
            Method::POST,
            "/v1/admin/tokens",
            Some(json!({"user_id": "nobody", "device_id": "d"})),
        )
        .await?;
    assert_eq!(st, 404, "{b}");
    let (st, _) = r
        .admin(
            Method::POST,
            "/v1/admin/tokens",
            Some(json!({"user_id": "ann", "device_id": "bad device"})),
        )
        .await?;
    assert_eq!(st, 400);

    // Client calls: missing, garbage, forged, expired tokens, and a token for nobody.
    let me_url = format!("{}/v1/me", r.base);
    let (st, b) = answer(r.http.get(&me_url).send().await?).await?;
    assert_eq!(st, 401);
    assert!(is_error(&b, "unauthorized"));
    let (st, _) = answer(r.http.get(&me_url).bearer_auth("garbage").send().await?).await?;
    assert_eq!(st, 401);
    let exp = auth::now_s() + 600;
    let forged = auth::sign(
        b"some-other-key-some-other-key-123",
        &Claims {
            sub: "ann".into(),
            dev: "x".into(),
            exp,
            iat: None,
        },
    );
    let (st, _) = answer(r.http.get(&me_url).bearer_auth(forged).send().await?).await?;
    assert_eq!(st, 401);
    let expired = auth::sign(
        JWT_SECRET.as_bytes(),
        &Claims {
            sub: "ann".into(),
            dev: "x".into(),
            exp: auth::now_s() - 1,
            iat: None,
        },
    );
    let (st, b) = answer(r.http.get(&me_url).bearer_auth(expired).send().await?).await?;
    assert_eq!(st, 401);
    assert!(b["message"].as_str().unwrap().contains("expired"));
    // Apps may mint tokens with the shared key themselves.
    let own = auth::sign(
        JWT_SECRET.as_bytes(),
        &Claims {
            sub: "ann".into(),
            dev: "watch".into(),
            exp,
            iat: None,
        },
    );
    let (st, b) = answer(r.http.get(&me_url).bearer_auth(own).send().await?).await?;
    assert_eq!(st, 200, "{b}");
    let ghost = auth::sign(
        JWT_SECRET.as_bytes(),
        &Claims {
            sub: "ghost".into(),
            dev: "x".into(),
            exp,
            iat: None,
        },
    );
    let (st, b) = answer(r.http.get(&me_url).bearer_auth(ghost).send().await?).await?;
    assert_eq!(st, 403, "{b}");
    r.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_conversation_send_history_and_sync() -> Result<()> {
    let r = TestRegion::start().await?;
    let ann = r.user("ann", "laptop").await?;
    let bob = r.user("bob", "phone").await?;
    let carol = r.user("carol", "phone").await?;

    let (st, created) = ann
        .post("/v1/conversations", json!({"kind": "direct", "members": ["bob"]}))
        .await?;
    assert_eq!(st, 201, "{created}");
    let cid = created["conversation_id"].as_str().unwrap().to_string();
    assert_eq!(created["kind"], "direct");
    assert_eq!(created["member_count"], 2);
    // The same id whoever creates it; creating it again is not an error.
    assert_eq!(bob.direct("ann").await?, cid);

    // Invalid creates.
    let (st, b) = ann
        .post("/v1/conversations", json!({"kind": "direct", "members": []}))
        .await?;
    assert_eq!(st, 400, "{b}");
    let (st, b) = ann
        .post(
            "/v1/conversations",
            json!({"kind": "direct", "members": ["nobody"]}),
        )
        .await?;
    assert_eq!(st, 400, "{b}");
    assert!(is_error(&b, "unknown_user"));
    let (st, _) = ann
        .post(
            "/v1/conversations",
            json!({"kind": "channel", "members": ["bob"]}),
        )
        .await?;
    assert_eq!(st, 400);
    let (st, _) = ann
        .post(
            "/v1/conversations",
            json!({"kind": "direct", "members": ["bad id!"]}),
        )
        .await?;
    assert_eq!(st, 400);

    // Send, and retry with the same client_msg_id.
    let path = format!("/v1/conversations/{cid}/messages");
    let first = ann.send(&cid, "m-1", "hello bob").await?;
    let again = ann.send(&cid, "m-1", "hello bob").await?;
    assert_eq!(first["message_id"], again["message_id"]);
    assert_eq!(
        first["cursor"], again["cursor"],
        "a retry answers with the original cursor"
    );
    for i in 2..=5 {
        ann.send(&cid, &format!("m-{i}"), &format!("message {i}")).await?;
    }
    bob.send(&cid, "b-1", "hi ann").await?;

    // Bad sends.
    let (st, b) = ann
        .post(
            &path,
            json!({"client_msg_id": "", "type": "text", "body": {"text": "x"}}),
        )
        .await?;
    assert_eq!((st, b["field"].clone()), (400, json!("client_msg_id")));
    let (st, b) = ann
        .post(
            &path,
            json!({"client_msg_id": "z", "type": "text", "body": "not an object"}),
        )
        .await?;
    assert_eq!((st, b["field"].clone()), (400, json!("body")));
    let (st, b) = ann
        .post(
            &path,
            json!({"client_msg_id": "z", "type": "bad type!", "body": {}}),
        )
        .await?;
    assert_eq!(st, 400, "{b}");
    let big = "x".repeat(70 * 1024);
    let (st, b) = ann
        .post(
            &path,
            json!({"client_msg_id": "big", "type": "text", "body": {"text": big}}),
        )
        .await?;
    assert_eq!(st, 413, "{b}");
    assert!(is_error(&b, "too_large"));
    let (st, b) = answer(
        r.http
            .post(format!("{}{path}", r.base))
            .bearer_auth(&ann.token)
            .body("{\"client_msg_id\": ")
            .send()
            .await?,
    )
    .await?;
    assert_eq!(st, 400);
    assert!(is_error(&b, "malformed_json"));

    // A non-member learns nothing: the same answer as for an id that does not exist.
    let unknown = "d_00000000000000000000000000000000";
    let (st_nm, b_nm) = carol.get(&format!("/v1/conversations/{cid}")).await?;
    let (st_un, b_un) = carol.get(&format!("/v1/conversations/{unknown}")).await?;
    assert_eq!((st_nm, st_un), (404, 404));
    assert_eq!(b_nm, b_un);
    let (st, b) = carol
        .post(
            &path,
            json!({"client_msg_id": "c-1", "type": "text", "body": {"text": "let me in"}}),
        )
        .await?;
    assert_eq!(st, 404, "{b}");
    let (st, _) = carol.get(&format!("{path}?limit=5")).await?;
    assert_eq!(st, 404);
    let (st, b) = ann.get("/v1/conversations/not-an-id").await?;
    assert_eq!(st, 400, "{b}");

    // History: latest page, then pages forward and backward.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let all = wait_history(&bob, &cid, 6).await?;
    let texts: Vec<&str> = all.iter().map(|m| m["body"]["text"].as_str().unwrap()).collect();
    assert_eq!(
        texts,
        [
            "hello bob",
            "message 2",
            "message 3",
            "message 4",
            "message 5",
            "hi ann"
        ]
    );
    assert_eq!(all[0]["message_id"], first["message_id"]);
    assert_eq!(all[0]["sender"], "ann");
    assert_eq!(all[5]["sender"], "bob");
    let (st, page) = bob.get(&format!("{path}?after=&limit=2")).await?;
    assert_eq!(st, 200);
    assert_eq!(page["messages"].as_array().unwrap().len(), 2);
    let next = page["next_cursor"].as_str().unwrap();
    let (_, page2) = bob.get(&format!("{path}?after={next}&limit=10")).await?;
    assert_eq!(page2["messages"][0]["body"]["text"], "message 3");
    assert_eq!(page2["messages"].as_array().unwrap().len(), 4);
    assert!(page2["next_cursor"].is_null());
    let last_cursor = all[5]["cursor"].as_str().unwrap();
    let (_, before) = bob.get(&format!("{path}?before={last_cursor}&limit=2")).await?;
    let texts: Vec<&str> = before["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["body"]["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["message 4", "message 5"], "oldest first within a page");
    let (_, latest) = bob.get(&format!("{path}?limit=1")).await?;
    assert_eq!(latest["messages"][0]["body"]["text"], "hi ann");
    for bad in [
        "?limit=0",
        "?limit=201",
        "?after=%%%",
        "?before=AAAA",
        "?after=&before=x",
        "?limit=abc",
    ] {
        let (st, b) = bob.get(&format!("{path}{bad}")).await?;
        assert_eq!(st, 400, "{bad}: {b}");
    }

    // Sync: both inboxes hold every message once (the sender's too), seqs consecutive from 1.
    for (who, s) in [("ann", &ann), ("bob", &bob)] {
        let entries = s.sync_all(0).await?;
        for (i, e) in entries.iter().enumerate() {
            assert_eq!(e["seq"].as_u64().unwrap(), i as u64 + 1, "{who}: {e}");
        }
        let msgs: Vec<&Value> = entries.iter().filter(|e| e["kind"] == "message").collect();
        assert_eq!(msgs.len(), 6, "{who}");
        assert_eq!(msgs[0]["message_id"], first["message_id"]);
        assert_eq!(msgs[0]["conversation_id"], cid.as_str());
        assert_eq!(msgs[0]["body"]["text"], "hello bob");
        assert!(msgs[0]["cursor"].is_string() && msgs[0]["sent_at"].is_u64());
    }
    let (st, page) = bob.get("/v1/sync?after=2&limit=2").await?;
    assert_eq!(st, 200);
    assert_eq!(page["entries"][0]["seq"], 3);
    assert_eq!(page["has_more"], true);
    let epoch = page["epoch"].as_str().unwrap().to_string();
    let (st, _) = bob.get(&format!("/v1/sync?after=0&epoch={epoch}")).await?;
    assert_eq!(st, 200);
    let (st, b) = bob.get("/v1/sync?after=0&epoch=eu.99").await?;
    assert_eq!(st, 409, "{b}");
    assert!(is_error(&b, "resync_required"));
    assert_eq!(b["epoch"], epoch.as_str());
    let (st, b) = bob.get("/v1/sync?after=999999").await?;
    assert_eq!(st, 409, "a checkpoint beyond the head cannot be continued: {b}");
    let (st, _) = bob.get("/v1/sync?after=-1").await?;
    assert_eq!(st, 400);

    // The conversation list shows it with the last message and bob's unread count.
    let (st, list) = bob.get("/v1/conversations").await?;
    assert_eq!(st, 200, "{list}");
    let c = &list["conversations"][0];
    assert_eq!(c["conversation_id"], cid.as_str());
    assert_eq!(c["last_message"]["body"]["text"], "hi ann");
    assert_eq!(c["unread"], 5);
    assert_eq!(c["member_count"], 2);

    // Read index: a max register.
    let read_path = format!("/v1/conversations/{cid}/read");
    let (st, b) = bob.put(&read_path, json!({"cursor": all[4]["cursor"]})).await?;
    assert_eq!(st, 200, "{b}");
    let (_, b) = bob.put(&read_path, json!({"cursor": all[1]["cursor"]})).await?;
    assert_eq!(
        b["cursor"], all[4]["cursor"],
        "an older cursor never moves it back"
    );
    let (_, seen) = ann.get(&read_path).await?;
    assert_eq!(
        seen["members"],
        json!([{"user_id": "bob", "cursor": all[4]["cursor"]}])
    );
    let (_, list) = bob.get("/v1/conversations").await?;
    assert_eq!(
        list["conversations"][0]["unread"], 0,
        "only bob's own message follows the read index"
    );
    let (st, _) = bob.put(&read_path, json!({"cursor": "garbage"})).await?;
    assert_eq!(st, 400);

    // Recall: the sender within the window; anyone else is refused.
    let mid = all[1]["message_id"].as_str().unwrap();
    let (st, _) = bob.post(&format!("{path}/{mid}/recall"), json!({})).await?;
    assert_eq!(st, 403);
    let (st, b) = ann.post(&format!("{path}/{mid}/recall"), json!({})).await?;
    assert_eq!(st, 200, "{b}");
    let recalled = wait_history(&bob, &cid, 6).await?;
    assert_eq!(recalled[1]["recalled"], true);
    assert!(recalled[1]["body"].is_null());
    let (st, _) = ann
        .post(
            &format!("{path}/00000000-0000-7000-8000-000000000000/recall"),
            json!({}),
        )
        .await?;
    assert_eq!(st, 404);
    let (st, _) = ann.post(&format!("{path}/not-a-uuid/recall"), json!({})).await?;
    assert_eq!(st, 400);

    // Delete for me hides it for bob only.
    let mid3 = all[2]["message_id"].as_str().unwrap();
    let (st, _) = bob.delete(&format!("{path}/{mid3}")).await?;
    assert_eq!(st, 204);
    let bobs = wait_history(&bob, &cid, 5).await?;
    assert!(bobs.iter().all(|m| m["message_id"] != mid3));
    assert_eq!(wait_history(&ann, &cid, 6).await?.len(), 6);

    // Hiding a direct conversation removes it from the caller's list only.
    let (st, _) = bob.delete(&format!("/v1/conversations/{cid}")).await?;
    assert_eq!(st, 204);
    let (_, list) = bob.get("/v1/conversations").await?;
    assert_eq!(list["conversations"].as_array().unwrap().len(), 0);
    let (_, list) = ann.get("/v1/conversations").await?;
    assert_eq!(list["conversations"].as_array().unwrap().len(), 1);
    r.stop().await
}

/// Polls history (oldest first, following pages) until it holds `n` messages.
async fn wait_history(s: &meridian_e2e::Session, cid: &str, n: usize) -> Result<Vec<Value>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (st, page) = s
            .get(&format!("/v1/conversations/{cid}/messages?after=&limit=200"))
            .await?;
        anyhow::ensure!(st == 200, "history: {st} {page}");
        let msgs = page["messages"].as_array().cloned().unwrap_or_default();
        if msgs.len() == n || tokio::time::Instant::now() > deadline {
            anyhow::ensure!(
                msgs.len() == n,
                "history has {} messages, expected {n}",
                msgs.len()
            );
            return Ok(msgs);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_roles_members_settings() -> Result<()> {
    let r = TestRegion::start().await?;
    let ann = r.user("ann", "d").await?;
    let bob = r.user("bob", "d").await?;
    let carol = r.user("carol", "d").await?;
    let dave = r.user("dave", "d").await?;

    let (st, g) = ann
        .post(
            "/v1/conversations",
            json!({"kind": "group", "name": "team", "members": ["bob", "carol", "bob"]}),
        )
        .await?;
    assert_eq!(st, 201, "{g}");
    let cid = g["conversation_id"].as_str().unwrap().to_string();
    let c = format!("/v1/conversations/{cid}");
    let (_, info) = bob.get(&c).await?;
    assert_eq!(info["name"], "team");
    assert_eq!(info["member_count"], 3);
    let roles: Vec<(String, String)> = info["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["user_id"].as_str().unwrap().into(),
                m["role"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert!(roles.contains(&("ann".into(), "owner".into())));
    assert!(roles.contains(&("bob".into(), "member".into())));

    // Update: owner/admin only.
    let (st, _) = bob.patch(&c, json!({"name": "bob's"})).await?;
    assert_eq!(st, 403);
    let (st, b) = ann
        .patch(&c, json!({"name": "core team", "announcement": "ship it"}))
        .await?;
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["name"], "core team");
    assert_eq!(b["announcement"], "ship it");
    let (st, _) = ann.patch(&c, json!({})).await?;
    assert_eq!(st, 400);
    let (st, _) = ann.patch(&c, json!({"name": "x".repeat(200)})).await?;
    assert_eq!(st, 400);

    // Roles: owner only; only admin/member may be given.
    let (st, _) = bob
        .patch(&format!("{c}/members/carol"), json!({"role": "admin"}))
        .await?;
    assert_eq!(st, 403);
    let (st, _) = ann
        .patch(&format!("{c}/members/bob"), json!({"role": "owner"}))
        .await?;
    assert_eq!(st, 400);
    let (st, b) = ann
        .patch(&format!("{c}/members/bob"), json!({"role": "admin"}))
        .await?;
    assert_eq!(st, 200, "{b}");
    let (st, _) = ann
        .patch(&format!("{c}/members/dave"), json!({"role": "admin"}))
        .await?;
    assert_eq!(st, 404, "dave is not a member");

    // Adding members: admins (bob now), not plain members unless members_can_add.
    let (st, _) = carol
        .post(&format!("{c}/members"), json!({"user_ids": ["dave"]}))
        .await?;
    assert_eq!(st, 403);
    let (st, b) = bob
        .post(&format!("{c}/members"), json!({"user_ids": ["dave"]}))
        .await?;
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["member_count"], 4);
    let (st, b) = bob
        .post(&format!("{c}/members"), json!({"user_ids": ["nobody"]}))
        .await?;
    assert_eq!(st, 400, "{b}");
    let (st, _) = bob.post(&format!("{c}/members"), json!({"user_ids": []})).await?;
    assert_eq!(st, 400);
    let (st, _) = ann.patch(&c, json!({"members_can_add": true})).await?;
    assert_eq!(st, 200);
    let eve = r.user("eve", "d").await?;
    let (st, _) = carol
        .post(&format!("{c}/members"), json!({"user_ids": ["eve"]}))
        .await?;
    assert_eq!(st, 200);
    let (st, _) = eve.get(&c).await?;
    assert_eq!(st, 200);

    // Removing: nobody removes the owner; a member cannot remove others; anyone can leave.
    let (st, _) = bob.delete(&format!("{c}/members/ann")).await?;
    assert_eq!(st, 403);
    let (st, _) = carol.delete(&format!("{c}/members/dave")).await?;
    assert_eq!(st, 403);
    let (st, _) = bob.delete(&format!("{c}/members/dave")).await?;
    assert_eq!(st, 204);
    let (st, _) = dave.get(&c).await?;
    assert_eq!(st, 404, "a removed member sees nothing");
    let (st, _) = carol.delete(&format!("{c}/members/carol")).await?;
    assert_eq!(st, 204);
    let (st, _) = carol.get(&c).await?;
    assert_eq!(st, 404);

    // Settings are the caller's own and show in the list.
    let (st, b) = bob.put(&format!("{c}/settings"), json!({"muted": true})).await?;
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["muted"], true);
    let (st, _) = bob.put(&format!("{c}/settings"), json!({})).await?;
    assert_eq!(st, 400);
    let (st, _) = bob.put(&format!("{c}/settings"), json!({"muted": "yes"})).await?;
    assert_eq!(st, 400);
    ann.send(&cid, "g-1", "hello team").await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, list) = bob.get("/v1/conversations").await?;
        let item = &list["conversations"][0];
        if item["unread"] == 1 {
            assert_eq!(item["muted"], true);
            assert_eq!(item["name"], "core team");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{list}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let (_, annlist) = ann.get("/v1/conversations").await?;
    assert_eq!(annlist["conversations"][0]["muted"], false);

    // A group admin may recall anyone's message.
    let msgs = bob.get(&format!("{c}/messages")).await?.1;
    let mid = msgs["messages"][0]["message_id"].as_str().unwrap().to_string();
    let (st, _) = bob.post(&format!("{c}/messages/{mid}/recall"), json!({})).await?;
    assert_eq!(st, 200);

    // Membership events reach the members' inboxes.
    let kinds: Vec<String> = bob
        .sync_all(0)
        .await?
        .iter()
        .map(|e| e["kind"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(kinds.contains(&"member_added".to_string()), "{kinds:?}");
    assert!(kinds.contains(&"message".to_string()), "{kinds:?}");

    // Dissolve: the owner only; afterwards no more sends.
    let (st, _) = bob.delete(&c).await?;
    assert_eq!(st, 403);
    let (st, _) = ann.delete(&c).await?;
    assert_eq!(st, 204);
    let (st, b) = ann
        .post(
            &format!("{c}/messages"),
            json!({"client_msg_id": "late", "type": "text", "body": {"text": "x"}}),
        )
        .await?;
    assert!(st == 409 || st == 404, "{st} {b}");
    r.stop().await
}

/// The role of each member of `c`, by user id.
async fn roles(s: &meridian_e2e::Session, c: &str) -> Result<Vec<(String, String)>> {
    let (st, info) = s.get(c).await?;
    assert_eq!(st, 200, "{info}");
    let mut out: Vec<(String, String)> = info["members"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            (
                m["user_id"].as_str().unwrap_or_default().to_string(),
                m["role"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    out.sort();
    Ok(out)
}

/// With `members_can_add`, a plain member who "adds" people who are already members changes
/// nothing: the owner stays owner, an admin stays admin. Only new people are added (as plain
/// members), and a member who left and is added again comes back as a plain member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item2_adding_current_members_keeps_their_roles() -> Result<()> {
    let r = TestRegion::start().await?;
    let ann = r.user("ann", "d").await?;
    let bob = r.user("bob", "d").await?;
    let carol = r.user("carol", "d").await?;
    r.user("dave", "d").await?;
    let (st, g) = ann
        .post(
            "/v1/conversations",
            json!({"kind": "group", "name": "team", "members": ["bob", "carol"]}),
        )
        .await?;
    assert_eq!(st, 201, "{g}");
    let cid = g["conversation_id"].as_str().unwrap_or_default().to_string();
    let c = format!("/v1/conversations/{cid}");
    let (st, b) = ann.patch(&c, json!({"members_can_add": true})).await?;
    assert_eq!(st, 200, "{b}");
    let (st, b) = ann
        .patch(&format!("{c}/members/bob"), json!({"role": "admin"}))
        .await?;
    assert_eq!(st, 200, "{b}");
    let pair = |u: &str, r: &str| (u.to_string(), r.to_string());

    // Only current members: success, nothing changes.
    let (st, b) = carol
        .post(&format!("{c}/members"), json!({"user_ids": ["ann", "bob"]}))
        .await?;
    assert_eq!(st, 200, "{b}");
    assert_eq!(
        roles(&ann, &c).await?,
        [
            pair("ann", "owner"),
            pair("bob", "admin"),
            pair("carol", "member")
        ]
    );

    // Current members mixed with a new one: only the new one is added.
    let (st, b) = carol
        .post(
            &format!("{c}/members"),
            json!({"user_ids": ["ann", "bob", "dave"]}),
        )
        .await?;
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["member_count"], 4, "{b}");
    assert_eq!(
        roles(&ann, &c).await?,
        [
            pair("ann", "owner"),
            pair("bob", "admin"),
            pair("carol", "member"),
            pair("dave", "member")
        ]
    );
    // The one "member_added" entry the members saw names dave alone.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let added: Vec<Value> = loop {
        let added: Vec<Value> = bob
            .sync_all(0)
            .await?
            .into_iter()
            .filter(|e| e["kind"] == "member_added")
            .map(|e| e["user_ids"].clone())
            .collect();
        if !added.is_empty() || tokio::time::Instant::now() > deadline {
            break added;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert_eq!(added, [json!(["dave"])]);

    // An admin who leaves and is added back by a plain member is a plain member again.
    let (st, _) = bob.delete(&format!("{c}/members/bob")).await?;
    assert_eq!(st, 204);
    let (st, b) = carol
        .post(&format!("{c}/members"), json!({"user_ids": ["bob"]}))
        .await?;
    assert_eq!(st, 200, "{b}");
    assert_eq!(
        roles(&ann, &c).await?,
        [
            pair("ann", "owner"),
            pair("bob", "member"),
            pair("carol", "member"),
            pair("dave", "member")
        ]
    );
    r.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_answers_429_with_retry_after() -> Result<()> {
    let r = TestRegion::start_with(|c| {
        c.gateway.rate_limit_per_s = 0.5;
        c.gateway.rate_limit_burst = 3.0;
    })
    .await?;
    let ann = r.user("ann", "d").await?;
    for _ in 0..3 {
        assert_eq!(ann.get("/v1/me").await?.0, 200);
    }
    let resp = r
        .http
        .get(format!("{}/v1/me", r.base))
        .bearer_auth(&ann.token)
        .send()
        .await?;
    assert_eq!(resp.status().as_u16(), 429);
    let retry: u64 = resp.headers()["retry-after"].to_str()?.parse()?;
    assert!(retry >= 1);
    let (_, b) = answer(resp).await?;
    assert!(is_error(&b, "rate_limited"));
    r.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_metrics_openapi_devices_presence() -> Result<()> {
    let r = TestRegion::start().await?;
    let get = |p: &str| r.http.get(format!("{}{p}", r.base)).send();
    assert_eq!(answer(get("/healthz").await?).await?.0, 200);
    let (st, ready) = answer(get("/readyz").await?).await?;
    assert_eq!(st, 200, "{ready}");
    assert_eq!(ready["status"], "ready");

    let (st, doc) = answer(get("/openapi.json").await?).await?;
    assert_eq!(st, 200);
    assert_eq!(doc["openapi"], "3.1.0");
    for (path, method) in [
        ("/v1/conversations/{cid}/messages", "post"),
        ("/v1/sync", "get"),
        ("/v1/admin/users/{user_id}", "put"),
        ("/v1/ws", "get"),
    ] {
        assert!(doc["paths"][path][method].is_object(), "{path} {method}");
    }

    let (st, b) = answer(get("/v1/nope").await?).await?;
    assert_eq!(st, 404);
    assert!(is_error(&b, "not_found"));
    let (st, b) = answer(r.http.delete(format!("{}/v1/me", r.base)).send().await?).await?;
    assert_eq!(st, 405);
    assert!(is_error(&b, "method_not_allowed"));

    let ann = r.user("ann", "phone").await?;
    let _bob = r.user("bob", "phone").await?;
    let (st, b) = ann
        .put(
            "/v1/devices/phone",
            json!({"platform": "carrier-pigeon", "token": "t"}),
        )
        .await?;
    assert_eq!(st, 400, "{b}");
    let (st, _) = ann
        .put("/v1/devices/phone", json!({"platform": "apns", "token": ""}))
        .await?;
    assert_eq!(st, 400);
    let (st, b) = ann
        .put(
            "/v1/devices/phone",
            json!({"platform": "apns", "token": "abc123"}),
        )
        .await?;
    assert_eq!(st, 200, "{b}");
    let (st, _) = ann
        .put(
            "/v1/devices/bad%20device",
            json!({"platform": "apns", "token": "abc"}),
        )
        .await?;
    assert_eq!(st, 400);
    let (st, _) = ann.delete("/v1/devices/phone").await?;
    assert_eq!(st, 204);

    let (st, p) = ann.get("/v1/presence?user_ids=bob,ann").await?;
    assert_eq!(st, 200, "{p}");
    assert_eq!(
        p["users"][0],
        json!({"user_id": "bob", "online": false, "last_seen": null})
    );
    let mut ws = ann.ws().await?;
    ws.send(json!({"op": "ping"})).await?;
    ws.next_op("pong", Duration::from_secs(5)).await?;
    let (_, p) = ann.get("/v1/presence?user_ids=ann").await?;
    assert_eq!(p["users"][0]["online"], true);
    let (st, _) = ann.get("/v1/presence?user_ids=").await?;
    assert_eq!(st, 400);

    let metrics = get("/metrics").await?.text().await?;
    assert!(metrics.contains("meridian_gateway_requests_total"), "{metrics}");
    assert!(metrics.contains("meridian_gateway_ws_connections 1"), "{metrics}");
    assert!(
        metrics.contains("meridian_applier_"),
        "applier counters are exported: {metrics}"
    );

    let (st, d) = r.admin(Method::GET, "/v1/admin/digest", None).await?;
    assert_eq!(st, 200, "{d}");
    assert!(d["digest"].is_string());
    let (st, regions) = r.admin(Method::GET, "/v1/admin/regions", None).await?;
    assert_eq!(st, 200, "{regions}");
    assert_eq!(regions["regions"][0]["status"], "active");
    r.stop().await
}

// Issue 8 item 3: the idempotency key of a send is (sender, conversation, client_msg_id).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item3_same_client_msg_id_in_two_conversations_is_two_messages() -> Result<()> {
    let r = TestRegion::start().await?;
    let ann = r.user("ann", "d").await?;
    let bob = r.user("bob", "d").await?;
    let cat = r.user("cat", "d").await?;
    let with_bob = ann.direct("bob").await?;
    let with_cat = ann.direct("cat").await?;
    let to_bob = ann.send(&with_bob, "c-1", "to bob").await?;
    let to_cat = ann.send(&with_cat, "c-1", "to cat").await?;
    assert_ne!(to_bob["message_id"], to_cat["message_id"], "two messages");
    // Both stored and delivered.
    let bob_msgs = wait_history(&bob, &with_bob, 1).await?;
    assert_eq!(bob_msgs[0]["body"]["text"], "to bob");
    let cat_msgs = wait_history(&cat, &with_cat, 1).await?;
    assert_eq!(cat_msgs[0]["body"]["text"], "to cat");
    assert_eq!(cat_msgs[0]["message_id"], to_cat["message_id"]);
    let cat_inbox = cat.wait_entries(2).await?;
    assert!(cat_inbox
        .iter()
        .any(|e| e["kind"] == "message" && e["body"]["text"] == "to cat"));
    r.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item3_same_key_other_content_is_409_and_same_content_the_original_answer() -> Result<()> {
    let r = TestRegion::start().await?;
    let ann = r.user("ann", "d").await?;
    let bob = r.user("bob", "d").await?;
    let cid = ann.direct("bob").await?;
    let path = format!("/v1/conversations/{cid}/messages");
    let send = |cmid: &str, ty: &str, text: &str| {
        let (ann, path) = (ann.clone(), path.clone());
        let body = json!({"client_msg_id": cmid, "type": ty, "body": {"text": text}});
        async move { ann.post(&path, body).await }
    };
    let conflict = |(st, b): &(u16, Value), original: &Value| {
        assert_eq!(*st, 409, "{b}");
        assert!(is_error(b, "idempotency_conflict"), "{b}");
        assert_eq!(b["message_id"], original["message_id"], "{b}");
    };

    // Two sends with one key in flight at once, different bodies: one is the message, the
    // other a conflict naming it. Usually both pass the store check before either is applied
    // and the second meets the first in JetStream's duplicate window (the original is read
    // back from the stream); repeated with fresh keys until that path has been taken.
    let duplicates = || async {
        let body = r
            .http
            .get(format!("{}/metrics", r.base))
            .send()
            .await?
            .text()
            .await?;
        let n = body
            .lines()
            .find_map(|l| l.strip_prefix("meridian_gateway_duplicate_publishes_total "))
            .and_then(|n| n.trim().parse::<u64>().ok());
        n.ok_or_else(|| anyhow::anyhow!("no duplicate counter in /metrics"))
    };
    let before = duplicates().await?;
    let mut pairs = Vec::new();
    for i in 0..20 {
        let key = format!("k-1-{i}");
        let (a, b) = tokio::join!(send(&key, "text", "first"), send(&key, "text", "second"));
        let ((st_a, a), (st_b, b)) = (a?, b?);
        let (winner, loser) = match (st_a, st_b) {
            (202, _) => (a, (st_b, b)),
            (_, 202) => (b, (st_a, a)),
            _ => panic!("one of them is accepted: {st_a} {a} / {st_b} {b}"),
        };
        conflict(&loser, &winner);
        pairs.push((key, winner));
        if duplicates().await? > before {
            break;
        }
    }
    assert!(
        duplicates().await? > before,
        "no pair met in the duplicate window"
    );
    let pairs_sent = pairs.len();
    let (key, winner) = pairs.swap_remove(0);

    // Retries with the same content get the original answer, before and after it is applied;
    // other content (body or type) is a conflict either way. Which body won decides what
    // "the same content" is.
    let stored = wait_history(&bob, &cid, pairs_sent).await?;
    let won_text = stored
        .iter()
        .find(|m| m["message_id"] == winner["message_id"])
        .and_then(|m| m["body"]["text"].as_str())
        .unwrap()
        .to_string();
    let (st, again) = send(&key, "text", &won_text).await?;
    assert_eq!(st, 202, "{again}");
    assert_eq!(
        (&again["message_id"], &again["cursor"]),
        (&winner["message_id"], &winner["cursor"])
    );
    conflict(&send(&key, "text", "something else").await?, &winner);
    conflict(&send(&key, "note", &won_text).await?, &winner);

    // A fresh key, sent and retried at once.
    let (st, first) = send("k-2", "text", "one").await?;
    assert_eq!(st, 202, "{first}");
    conflict(&send("k-2", "text", "two").await?, &first);
    let (st, same) = send("k-2", "text", "one").await?;
    assert_eq!(st, 202, "{same}");
    assert_eq!(
        (&same["message_id"], &same["cursor"]),
        (&first["message_id"], &first["cursor"])
    );

    // Over the WebSocket: an error frame with the same code and id.
    let mut ws = ann.ws().await?;
    ws.send(
        json!({"op": "send", "ref": "w", "conversation_id": cid, "client_msg_id": "k-2",
                   "type": "text", "body": {"text": "three"}}),
    )
    .await?;
    let f = ws.next_op("error", Duration::from_secs(10)).await?;
    assert_eq!(
        (f["ref"].as_str(), f["error"].as_str(), &f["message_id"]),
        (Some("w"), Some("idempotency_conflict"), &first["message_id"]),
        "{f}"
    );

    // Stored once each: one message per key.
    let msgs = wait_history(&bob, &cid, pairs_sent + 1).await?;
    let last = msgs.last().unwrap();
    assert_eq!(
        (&last["message_id"], &last["body"]["text"]),
        (&first["message_id"], &json!("one"))
    );
    r.stop().await
}
