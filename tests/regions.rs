//! Regions replicate (issue 9, item 10): several regions on real nats-servers (one JetStream
//! domain each, leafnodes of a hub), each applying its own stream and a mirror of every other
//! region's; users pinned to their home region. Every region must end up holding every
//! conversation's full history, with equal digests, and serve only its own users.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use meridian_e2e::regions::REPLICATION_WAIT;
use meridian_e2e::{Session, TestRegions, Ws};
use serde_json::{json, Value};

const FRAME_WAIT: Duration = Duration::from_secs(15);

/// Polls `GET /v1/conversations/{cid}` at the session's region until it answers 200 (the
/// conversation reached that region through the mirrors).
async fn wait_conversation(s: &Session, cid: &str) -> Result<Value> {
    let deadline = tokio::time::Instant::now() + REPLICATION_WAIT;
    loop {
        let (st, body) = s.get(&format!("/v1/conversations/{cid}")).await?;
        if st == 200 {
            return Ok(body);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{} never saw {cid}: {st} {body}", s.user);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Polls the history at the session's region until it holds at least `n` messages; returns
/// their texts, oldest first.
async fn wait_history(s: &Session, cid: &str, n: usize) -> Result<Vec<String>> {
    let deadline = tokio::time::Instant::now() + REPLICATION_WAIT;
    loop {
        let (st, body) = s
            .get(&format!("/v1/conversations/{cid}/messages?limit=200"))
            .await?;
        let messages = body["messages"].as_array().cloned().unwrap_or_default();
        if st == 200 && messages.len() >= n {
            return Ok(messages
                .iter()
                .map(|m| m["body"]["text"].as_str().unwrap_or_default().to_string())
                .collect());
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "{} reads {} messages of {cid}, expected {n}: {st} {body}",
                s.user,
                messages.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A WebSocket at the session's region, live from its inbox head.
async fn live(s: &Session) -> Result<Ws> {
    let (st, body) = s.get("/v1/sync?after=0&limit=1").await?;
    if st != 200 {
        bail!("sync: {st} {body}");
    }
    let head = body["head"].as_u64().context("head")?;
    let mut ws = s.ws().await?;
    ws.send(json!({"op": "hello", "after": head})).await?;
    Ok(ws)
}

/// Reads message entries of `cid` from `ws` until every text of `want` arrived; returns them
/// in arrival order. Fails on a text that arrives twice.
async fn live_texts(ws: &mut Ws, cid: &str, want: &[&str]) -> Result<Vec<String>> {
    let deadline = tokio::time::Instant::now() + FRAME_WAIT;
    let mut got: Vec<String> = Vec::new();
    while !want.iter().all(|w| got.iter().any(|g| g == w)) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let f = ws
            .next_op("entry", left)
            .await
            .with_context(|| format!("live entries of {cid}: have {got:?}, want {want:?}"))?;
        if f["kind"] == "message" && f["conversation_id"] == cid {
            let text = f["body"]["text"].as_str().unwrap_or_default().to_string();
            if got.contains(&text) {
                bail!("{text:?} delivered twice on one socket");
            }
            got.push(text);
        }
    }
    Ok(got)
}

/// The members of a conversation as `s` reads it at its region: user id -> role.
async fn members(s: &Session, cid: &str) -> Result<BTreeMap<String, String>> {
    let (st, body) = s.get(&format!("/v1/conversations/{cid}")).await?;
    if st != 200 {
        bail!("conversation {cid} for {}: {st} {body}", s.user);
    }
    Ok(body["members"]
        .as_array()
        .context("members")?
        .iter()
        .map(|m| {
            (
                m["user_id"].as_str().unwrap_or_default().to_string(),
                m["role"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect())
}

/// `s` creates a group of itself and `members`; returns its id.
async fn create_group(s: &Session, name: &str, members: &[&str]) -> Result<String> {
    let (st, body) = s
        .post(
            "/v1/conversations",
            json!({"kind": "group", "name": name, "members": members}),
        )
        .await?;
    if st != 201 {
        bail!("create group: {st} {body}");
    }
    Ok(body["conversation_id"]
        .as_str()
        .context("conversation_id")?
        .to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item10_direct_and_group_messages_reach_members_homed_in_three_regions() -> Result<()> {
    let rs = TestRegions::start(&["us", "eu", "ap"]).await?;
    // Every user is provisioned through us: eu and ap learn of theirs through the mirrors.
    for (user, home) in [("ann", "us"), ("bob", "eu"), ("cat", "ap")] {
        rs.provision("us", user, home).await?;
    }
    let ann = rs.session_at("us", "ann", "laptop").await?;
    let bob = rs.session_at("eu", "bob", "phone").await?;
    let cat = rs.session_at("ap", "cat", "phone").await?;
    let mut bob_ws = live(&bob).await?;
    let mut cat_ws = live(&cat).await?;

    // Direct, created in us; bob reads it live and from history in eu, and answers from eu.
    let direct = ann.direct("bob").await?;
    ann.send(&direct, "d1", "hello bob").await?;
    assert_eq!(
        live_texts(&mut bob_ws, &direct, &["hello bob"]).await?,
        ["hello bob"]
    );
    assert_eq!(wait_history(&bob, &direct, 1).await?, ["hello bob"]);
    bob.send(&direct, "d2", "hi ann").await?;
    assert_eq!(wait_history(&ann, &direct, 2).await?, ["hello bob", "hi ann"]);

    // A group created in ap; each member sends from its own region.
    let group = create_group(&cat, "tri", &["ann", "bob"]).await?;
    wait_conversation(&ann, &group).await?;
    wait_conversation(&bob, &group).await?;
    ann.send(&group, "g-us", "from us").await?;
    bob.send(&group, "g-eu", "from eu").await?;
    cat.send(&group, "g-ap", "from ap").await?;

    // Every member reads all three from its own region, in the same order everywhere.
    let in_us = wait_history(&ann, &group, 3).await?;
    let in_eu = wait_history(&bob, &group, 3).await?;
    let in_ap = wait_history(&cat, &group, 3).await?;
    assert_eq!(
        in_us.iter().cloned().collect::<BTreeSet<_>>(),
        BTreeSet::from(["from us".to_string(), "from eu".into(), "from ap".into()])
    );
    assert_eq!(in_us, in_eu, "history in us and eu");
    assert_eq!(in_us, in_ap, "history in us and ap");

    // Live delivery across regions: each socket gets the other members' messages.
    live_texts(&mut bob_ws, &group, &["from us", "from ap"]).await?;
    live_texts(&mut cat_ws, &group, &["from us", "from eu"]).await?;

    rs.wait_converged().await?;
    for r in ["us", "eu", "ap"] {
        assert_eq!(
            rs.stored_messages(r, &group, "ann").await?.len(),
            3,
            "group in {r}"
        );
        assert_eq!(
            rs.stored_messages(r, &direct, "ann").await?.len(),
            2,
            "direct in {r}"
        );
    }
    rs.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item10_direct_conversation_created_at_once_in_two_regions_is_one() -> Result<()> {
    let mut rs = TestRegions::start(&["us", "eu"]).await?;
    rs.provision("us", "ann", "us").await?;
    rs.provision("eu", "bob", "eu").await?;
    rs.wait_directory(&["ann", "bob"]).await?;
    let ann = rs.session_at("us", "ann", "laptop").await?;
    let bob = rs.session_at("eu", "bob", "phone").await?;

    // The link between the regions is cut (the hub is gone) while both create and write,
    // so neither has seen the other's creation when it creates its own.
    rs.cluster.hub_mut().kill();
    let (a, b) = tokio::join!(ann.direct("bob"), bob.direct("ann"));
    let (a, b) = (a?, b?);
    assert_eq!(a, b, "both regions derive the same direct conversation id");
    let (sa, sb) = tokio::join!(
        ann.send(&a, "from-ann", "ann in us"),
        bob.send(&b, "from-bob", "bob in eu")
    );
    sa?;
    sb?;
    // Before the link heals, each region holds only its own side.
    assert_eq!(wait_history(&ann, &a, 1).await?, ["ann in us"]);
    assert_eq!(wait_history(&bob, &a, 1).await?, ["bob in eu"]);
    let healed = std::time::Instant::now();
    rs.cluster.hub_mut().restart()?;

    let in_us = wait_history(&ann, &a, 2).await?;
    let in_eu = wait_history(&bob, &a, 2).await?;
    eprintln!(
        "both sides in both regions {:?} after the link healed",
        healed.elapsed()
    );
    assert_eq!(in_us, in_eu);
    assert_eq!(
        in_us.iter().cloned().collect::<BTreeSet<_>>(),
        BTreeSet::from(["ann in us".to_string(), "bob in eu".into()])
    );
    rs.wait_converged().await?;
    // One conversation, not two: each lists exactly one, and each region stores both
    // messages once.
    for s in [&ann, &bob] {
        let (st, list) = s.get("/v1/conversations").await?;
        assert_eq!(st, 200, "{list}");
        let ids: Vec<&str> = list["conversations"]
            .as_array()
            .context("conversations")?
            .iter()
            .filter_map(|c| c["conversation_id"].as_str())
            .collect();
        assert_eq!(ids, [a.as_str()], "{} lists {list}", s.user);
    }
    for r in ["us", "eu"] {
        let mut stored = rs.stored_messages(r, &a, "ann").await?;
        stored.sort();
        assert_eq!(
            stored,
            [
                ("from-ann".to_string(), "ann".to_string()),
                ("from-bob".to_string(), "bob".to_string())
            ],
            "messages stored in {r}"
        );
    }
    rs.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item10_concurrent_membership_and_settings_changes_converge() -> Result<()> {
    let mut rs = TestRegions::start(&["us", "eu", "ap"]).await?;
    for (user, home) in [
        ("ann", "us"),
        ("bob", "eu"),
        ("cat", "ap"),
        ("dan", "us"),
        ("eve", "eu"),
    ] {
        rs.provision(home, user, home).await?;
    }
    rs.wait_directory(&["ann", "bob", "cat", "dan", "eve"]).await?;
    let ann = rs.session_at("us", "ann", "d").await?;
    let bob = rs.session_at("eu", "bob", "d").await?;
    let cat = rs.session_at("ap", "cat", "d").await?;

    let cid = create_group(&ann, "start", &["bob", "cat", "dan"]).await?;
    let c = format!("/v1/conversations/{cid}");
    let (st, body) = ann
        .patch(&format!("{c}/members/bob"), json!({"role": "admin"}))
        .await?;
    assert_eq!(st, 200, "{body}");
    // bob acts as an admin in eu only once eu knows he is one.
    let deadline = tokio::time::Instant::now() + REPLICATION_WAIT;
    while members(&bob, &cid)
        .await
        .ok()
        .and_then(|m| m.get("bob").cloned())
        .as_deref()
        != Some("admin")
    {
        if tokio::time::Instant::now() > deadline {
            bail!("eu never saw bob become an admin");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    wait_conversation(&cat, &cid).await?;

    // At once, in three regions cut off from each other (the hub is gone): two renames, a
    // removal and an addition, per-user settings and a message.
    rs.cluster.hub_mut().kill();
    let (r_us, r_eu, r_ap) = tokio::join!(
        async {
            let a = ann.patch(&c, json!({"name": "named in us"})).await?;
            let b = ann.delete(&format!("{c}/members/dan")).await?;
            let s = ann.put(&format!("{c}/settings"), json!({"muted": true})).await?;
            anyhow::Ok([a, b, s])
        },
        async {
            let a = bob.patch(&c, json!({"name": "named in eu"})).await?;
            let b = bob
                .post(&format!("{c}/members"), json!({"user_ids": ["eve"]}))
                .await?;
            let s = bob.put(&format!("{c}/settings"), json!({"pinned": true})).await?;
            anyhow::Ok([a, b, s])
        },
        async {
            let a = cat.put(&format!("{c}/settings"), json!({"muted": true})).await?;
            let b = cat
                .post(
                    &format!("{c}/messages"),
                    json!({"client_msg_id": "cat-1", "type": "text", "body": {"text": "meanwhile in ap"}}),
                )
                .await?;
            let s = cat.patch(&c, json!({"announcement": "from ap"})).await;
            // cat is a plain member: the announcement is refused (403), which must not
            // disturb anything else.
            anyhow::Ok([a, b, s?])
        },
    );
    for (st, body) in r_us?.iter().chain(r_eu?.iter()) {
        assert!(matches!(st, 200 | 204), "{st} {body}");
    }
    let [a, b, s] = r_ap?;
    assert_eq!(a.0, 200, "{}", a.1);
    assert_eq!(b.0, 202, "{}", b.1);
    assert_eq!(s.0, 403, "{}", s.1);
    // Cut off, each region shows its own rename.
    assert_eq!(ann.get(&c).await?.1["name"], "named in us");
    assert_eq!(bob.get(&c).await?.1["name"], "named in eu");
    rs.cluster.hub_mut().restart()?;

    rs.wait_converged().await?;
    // Every region answers the same conversation: one name, the same members and roles.
    let (_, in_us) = ann.get(&c).await?;
    let (_, in_eu) = bob.get(&c).await?;
    let (_, in_ap) = cat.get(&c).await?;
    for (r, v) in [("eu", &in_eu), ("ap", &in_ap)] {
        assert_eq!(v["name"], in_us["name"], "name in {r} and us");
        assert_eq!(
            v["announcement"], in_us["announcement"],
            "announcement in {r} and us"
        );
    }
    assert!(
        ["named in us", "named in eu"].contains(&in_us["name"].as_str().unwrap_or_default()),
        "{in_us}"
    );
    let m = members(&ann, &cid).await?;
    assert_eq!(members(&bob, &cid).await?, m);
    assert_eq!(members(&cat, &cid).await?, m);
    assert_eq!(
        m.keys().map(String::as_str).collect::<Vec<_>>(),
        ["ann", "bob", "cat", "eve"],
        "dan removed in us, eve added in eu"
    );
    for r in ["us", "eu", "ap"] {
        assert_eq!(
            rs.stored_messages(r, &cid, "ann").await?,
            [("cat-1".to_string(), "cat".to_string())],
            "messages in {r}"
        );
    }
    rs.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item10_pinning_answers_421_over_http_and_4421_over_websocket() -> Result<()> {
    let rs = TestRegions::start(&["us", "eu"]).await?;
    let eu_endpoint = rs.node("eu").base.clone();
    let us_endpoint = rs.node("us").base.clone();

    // ann is provisioned through us, homed in eu: us refuses her at once.
    rs.provision("us", "ann", "eu").await?;
    let ann_at_us = rs.session_at("us", "ann", "laptop").await?;
    let (st, body) = ann_at_us.get("/v1/me").await?;
    assert_eq!(st, 421, "{body}");
    assert_eq!(body["error"], "wrong_region", "{body}");
    assert_eq!(body["region"], "eu", "{body}");
    assert_eq!(body["endpoint"], eu_endpoint.as_str(), "{body}");
    // Writes too: a send is refused the same way, before anything is published.
    let (st, body) = ann_at_us
        .post(
            "/v1/conversations",
            json!({"kind": "group", "name": "x", "members": []}),
        )
        .await?;
    assert_eq!(st, 421, "{body}");

    // The endpoint is real: the same token works there once eu knows her.
    let ann_at_eu = Session {
        base: body["endpoint"].as_str().context("endpoint")?.to_string(),
        ..ann_at_us.clone()
    };
    let deadline = tokio::time::Instant::now() + REPLICATION_WAIT;
    loop {
        let (st, me) = ann_at_eu.get("/v1/me").await?;
        if st == 200 {
            assert_eq!(me["user_id"], "ann", "{me}");
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("eu never served ann: {st} {me}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    // A WebSocket at the wrong region: a wrong_region frame naming the region and its
    // endpoint, then close code 4421.
    let mut ws = match ann_at_us.try_ws().await? {
        Ok(ws) => ws,
        Err((status, body)) => {
            bail!("the upgrade was refused with {status} {body}: expected a frame and 4421")
        }
    };
    let frame = ws.next_op("wrong_region", FRAME_WAIT).await?;
    assert_eq!(frame["region"], "eu", "{frame}");
    assert_eq!(frame["endpoint"], eu_endpoint.as_str(), "{frame}");
    let (code, _) = ws.closed(FRAME_WAIT).await?;
    assert_eq!(code, 4421);
    // At home the socket stays open and serves.
    let mut home = live(&ann_at_eu).await?;
    home.send(json!({"op": "ping"})).await?;

    // The other way round, learnt through the mirrors: bob is provisioned through us, homed
    // in us; eu has never seen a call about him and must answer 421 once the directory
    // reaches it (before that, 403: not provisioned there).
    rs.provision("us", "bob", "us").await?;
    let bob_at_eu = Session {
        base: eu_endpoint.clone(),
        ..rs.session_at("us", "bob", "phone").await?
    };
    let deadline = tokio::time::Instant::now() + REPLICATION_WAIT;
    loop {
        let (st, body) = bob_at_eu.get("/v1/me").await?;
        if st == 421 {
            assert_eq!(body["region"], "us", "{body}");
            assert_eq!(body["endpoint"], us_endpoint.as_str(), "{body}");
            break;
        }
        assert_eq!(st, 403, "before the directory reaches eu: {body}");
        if tokio::time::Instant::now() > deadline {
            bail!("eu never learnt that bob is served by us");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    rs.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item10_killed_nats_server_restarted_while_others_send_loses_and_doubles_nothing() -> Result<()> {
    let mut rs = TestRegions::start(&["us", "eu", "ap"]).await?;
    for (user, home) in [("ann", "us"), ("bob", "eu"), ("cat", "ap")] {
        rs.provision(home, user, home).await?;
    }
    rs.wait_directory(&["ann", "bob", "cat"]).await?;
    let ann = rs.session_at("us", "ann", "d").await?;
    let bob = rs.session_at("eu", "bob", "d").await?;
    let cat = rs.session_at("ap", "cat", "d").await?;
    let group = create_group(&ann, "outage", &["bob", "cat"]).await?;
    let direct = ann.direct("cat").await?;
    wait_conversation(&cat, &group).await?;
    wait_conversation(&cat, &direct).await?;
    wait_conversation(&bob, &group).await?;

    // us and ap keep sending, paced, across eu's outage.
    const EACH: usize = 40;
    let sender = |s: Session, targets: Vec<String>, tag: &'static str| {
        tokio::spawn(async move {
            let mut sent = Vec::new();
            for i in 0..EACH {
                let cid = &targets[i % targets.len()];
                let id = format!("{tag}-{i}");
                s.send(cid, &id, &id).await?;
                sent.push((cid.clone(), id));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            anyhow::Ok(sent)
        })
    };
    let ann_task = sender(ann.clone(), vec![group.clone(), direct.clone()], "ann");
    let cat_task = sender(cat.clone(), vec![group.clone(), direct.clone()], "cat");
    tokio::time::sleep(Duration::from_millis(500)).await;
    rs.kill_nats("eu");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    rs.restart_nats("eu")?;
    // eu's own users send again once its server is back (publishes retry through the
    // reconnect, so each is answered 202 or fails the test).
    let mut sent: Vec<(String, String)> = Vec::new();
    for i in 0..5 {
        let id = format!("bob-{i}");
        bob.send(&group, &id, &id).await?;
        sent.push((group.clone(), id));
    }
    sent.extend(ann_task.await??);
    sent.extend(cat_task.await??);

    // A mirror of the restarted origin re-attaches when its server retries, not at once
    // (docs/design.md §3): a longer bound than the other tests'.
    rs.wait_converged_within(Duration::from_secs(90)).await?;
    // Every acknowledged message exactly once in every region, and nothing else.
    for cid in [&group, &direct] {
        let mut want: Vec<&str> = sent
            .iter()
            .filter(|(c, _)| c == cid)
            .map(|(_, id)| id.as_str())
            .collect();
        want.sort_unstable();
        for r in ["us", "eu", "ap"] {
            let stored = rs.stored_messages(r, cid, "ann").await?;
            let mut got: Vec<&str> = stored.iter().map(|(id, _)| id.as_str()).collect();
            got.sort_unstable();
            assert_eq!(got, want, "messages of {cid} stored in {r}");
        }
    }
    // And the members read them at home.
    let n_group = sent.iter().filter(|(c, _)| *c == group).count();
    assert_eq!(wait_history(&bob, &group, n_group).await?.len(), n_group);
    assert_eq!(wait_history(&cat, &group, n_group).await?.len(), n_group);
    rs.stop().await
}

/// Found by the region-loss drill (issue 11): a user of a lost region could not keep
/// messaging after the failover. Their gateway is gone (connection refused), so nothing can
/// answer them `421` with the acting region; the SDK kept calling the dead endpoint. Given
/// every region's endpoint, it now asks the others who serves the user and follows the one
/// that does — and, before any failover, follows nobody (the others name the lost home).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn item4_the_sdk_finds_the_acting_region_when_its_home_region_is_unreachable() -> Result<()> {
    let mut regions = TestRegions::start(&["us", "eu"]).await?;
    let ann = regions.user("us", "ann", "laptop").await?;
    regions.provision("us", "bob", "eu").await?;
    regions.wait_directory(&["ann", "bob"]).await?;
    let (st, conv) = ann
        .post("/v1/conversations", json!({"kind": "direct", "members": ["bob"]}))
        .await?;
    if st != 201 && st != 200 {
        bail!("create: {st} {conv}");
    }
    let cid = conv["conversation_id"].as_str().context("cid")?.to_string();
    // Bob's token (any region mints it with the shared key); then his home region, eu, is
    // lost: nothing listens at its endpoint any more.
    let bob_token = regions.session_at("us", "bob", "phone").await?.token;
    let lost = regions.node("eu").base.clone();
    let us = regions.node("us").base.clone();
    regions.stop_region("eu").await?;
    // Two attempts per send: the refused one before the failover fails fast.
    let retry = meridian_client::RetryPolicy {
        attempts: 2,
        ..Default::default()
    };
    let bob = meridian_client::Client::new(&lost, &bob_token)
        .with_retry(retry)
        .with_region_endpoints([us.clone(), lost.clone()]);

    // No failover yet: us says eu serves Bob, so the SDK stays (and the call fails).
    match bob.send_text(&cid, "before the failover").await {
        Err(meridian_client::ClientError::Transport(_)) => {}
        other => bail!("expected a transport error before the failover, got {other:?}"),
    }
    assert_eq!(bob.base_url(), lost, "nobody else serves Bob yet");

    let (st, body) = regions
        .admin(
            "us",
            reqwest::Method::POST,
            "/v1/admin/failover",
            Some(json!({"region": "eu", "to": "us"})),
        )
        .await?;
    if st != 200 {
        bail!("failover: {st} {body}");
    }
    let sent = bob.send_text(&cid, "after the failover").await?;
    assert_eq!(bob.base_url(), us, "the SDK follows the acting region");
    let history = wait_history(&ann, &cid, 1).await?;
    assert_eq!(history, ["after the failover"], "sent {}", sent.message_id);
    regions.stop().await
}
