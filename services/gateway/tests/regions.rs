//! Issue 9 at the gateway: pinning (item 5), typing and presence across regions (item 4) and
//! the clock observing applied remote events (item 3), through the public API of real
//! gateways over a real nats-server and embedded stores (see `common`).

mod common;

use std::time::Duration;

use anyhow::{bail, Context, Result};
use common::{eventually, Cluster, Frame};
use meridian_model::events::{event_envelope::Body, EventEnvelope, RegionFailover, UserUpserted};
use meridian_model::{EventId, Hlc};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(10);

/// A value the path parameter `name` accepts; the 421 comes before anything reads it.
fn placeholder(name: &str) -> &'static str {
    match name {
        "cid" => "d.x",
        "mid" => "0190b4c2-0000-7000-8000-000000000000",
        _ => "x",
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item5_every_user_call_for_a_user_served_elsewhere_is_421_wrong_region() -> Result<()> {
    let c = Cluster::start(&["us", "eu"], &[]).await?;
    c.provision_in(&["us"], "ann", "eu").await?;
    let ann = c.session("us", "ann").await?;
    let eu = c.region("eu").base.clone();
    let (st, doc) = ann.get("/openapi.json").await?;
    assert_eq!(st, 200);
    let mut checked = 0;
    for (path, ops) in doc["paths"].as_object().context("paths")? {
        for (method, op) in ops.as_object().context("operation")? {
            if op["security"][0].get("bearer").is_none() || path == "/v1/ws" {
                continue;
            }
            let concrete = path
                .split('/')
                .map(
                    |seg| match seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                        Some(name) => placeholder(name),
                        None => seg,
                    },
                )
                .collect::<Vec<_>>()
                .join("/");
            let concrete = if path == "/v1/presence" {
                format!("{concrete}?user_ids=bob")
            } else {
                concrete
            };
            let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes())?;
            let body = op.get("requestBody").map(|_| json!({}));
            let (st, body) = ann.call(method.clone(), &concrete, body).await?;
            assert_eq!(
                (st, &body["error"], &body["region"], &body["endpoint"]),
                (421, &json!("wrong_region"), &json!("eu"), &json!(eu)),
                "{method} {concrete}: {body}"
            );
            checked += 1;
        }
    }
    assert!(checked >= 20, "only {checked} user calls in the document");
    Ok(())
}

/// The frames a socket gets before it closes, and the close code.
async fn frames_until_close(ws: &mut common::Ws) -> Result<(Vec<Value>, Option<u16>)> {
    let mut frames = Vec::new();
    for _ in 0..100 {
        match ws.next(WAIT).await? {
            Frame::Json(v) => frames.push(v),
            Frame::Closed(code) => return Ok((frames, code)),
        }
    }
    bail!("no close after 100 frames: {frames:?}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item5_a_websocket_of_a_user_served_elsewhere_gets_wrong_region_and_4421() -> Result<()> {
    let c = Cluster::start(&["us", "eu"], &[]).await?;
    c.provision_in(&["us"], "ann", "eu").await?;
    let ann = c.session("us", "ann").await?;
    let mut ws = match ann.try_ws().await? {
        Ok(ws) => ws,
        Err((status, body)) => {
            bail!("the upgrade was refused ({status} {body}) instead of a wrong_region frame")
        }
    };
    let (frames, code) = frames_until_close(&mut ws).await?;
    assert_eq!(
        frames,
        vec![json!({"op": "wrong_region", "region": "eu", "endpoint": c.region("eu").base})]
    );
    assert_eq!(code, Some(4421));
    // A plain GET (no upgrade) is answered 421 like any other call.
    let (st, body) = ann.get("/v1/ws").await?;
    assert_eq!(
        (st, body["error"].as_str()),
        (421, Some("wrong_region")),
        "{body}"
    );
    Ok(())
}

/// The socket's last frame says `wrong_region` to `region` at `endpoint`, then it closes 4421.
async fn closed_to(ws: &mut common::Ws, region: &str, endpoint: &str) -> Result<()> {
    let (frames, code) = frames_until_close(ws).await?;
    assert_eq!(
        frames.last(),
        Some(&json!({"op": "wrong_region", "region": region, "endpoint": endpoint})),
        "{frames:?}"
    );
    assert_eq!(code, Some(4421));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item5_an_open_websocket_closes_with_4421_when_its_user_moves_to_another_region() -> Result<()> {
    let c = Cluster::start(&["us", "eu"], &[]).await?;
    c.provision_in(&["us"], "bob", "us").await?;
    let bob = c.session("us", "bob").await?;
    let mut ws = bob.ws().await?;
    ws.hello().await?;
    // Re-homed while the socket only listens: no frame of bob's own reveals it.
    c.provision_in(&["us"], "bob", "eu").await?;
    closed_to(&mut ws, "eu", &c.region("eu").base).await?;
    // And every later call of his here is refused.
    let (st, _) = bob.get("/v1/me").await?;
    assert_eq!(st, 421);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item5_open_websockets_close_with_4421_when_their_region_fails_over() -> Result<()> {
    let c = Cluster::start(&["us", "eu"], &[]).await?;
    c.provision_in(&["us"], "bob", "us").await?;
    let bob = c.session("us", "bob").await?;
    let mut ws = bob.ws().await?;
    ws.hello().await?;
    // us's users are failed over to eu (the event the failover call of issue 10 publishes,
    // applied from the stream like any other).
    c.region("us")
        .bus
        .publish_event(&EventEnvelope {
            event_id: EventId::new_v7().as_bytes().to_vec(),
            origin_region: "eu".into(),
            hlc: Hlc::new(now_ms(), 0).0,
            actor: "admin".into(),
            body: Some(Body::RegionFailover(RegionFailover {
                region: "us".into(),
                to: "eu".into(),
                applied: vec![],
            })),
            ..Default::default()
        })
        .await?;
    closed_to(&mut ws, "eu", &c.region("eu").base).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item4_typing_reaches_a_member_served_by_another_region() -> Result<()> {
    let c = Cluster::start(&["us", "eu"], &[]).await?;
    for r in ["us", "eu"] {
        c.provision_in(&[r], "ann", "us").await?;
        c.provision_in(&[r], "bob", "eu").await?;
    }
    let ann = c.session("us", "ann").await?;
    let bob = c.session("eu", "bob").await?;
    let cid = ann.direct("bob").await?;
    let mut bob_ws = bob.ws().await?;
    bob_ws.hello().await?;
    let mut ann_ws = ann.ws().await?;
    ann_ws.hello().await?;
    ann_ws
        .send(json!({"op": "typing", "conversation_id": cid, "ref": "t1"}))
        .await?;
    let typing = bob_ws.next_op("typing", WAIT).await?;
    assert_eq!(typing["user_id"], "ann");
    assert_eq!(typing["conversation_id"], json!(cid));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item4_presence_of_a_user_served_by_another_region_is_asked_of_that_region() -> Result<()> {
    // "ap" is in the deployment but nothing of it runs: its users read as never seen.
    let c = Cluster::start(&["us", "eu"], &["ap"]).await?;
    for r in ["us", "eu"] {
        c.provision_in(&[r], "ann", "us").await?;
        c.provision_in(&[r], "bob", "eu").await?;
        c.provision_in(&[r], "cat", "ap").await?;
    }
    let ann = c.session("us", "ann").await?;
    let bob = c.session("eu", "bob").await?;
    ann.direct("bob").await?;
    ann.direct("cat").await?;
    let mut bob_ws = bob.ws().await?;
    bob_ws.hello().await?;
    let (st, body) = ann.get("/v1/presence?user_ids=bob,cat").await?;
    assert_eq!(st, 200, "{body}");
    let users = body["users"].as_array().context("users")?;
    assert_eq!(users[0]["user_id"], "bob");
    assert_eq!(users[0]["online"], true, "{body}");
    assert!(users[0]["last_seen"].as_u64().is_some(), "{body}");
    assert_eq!(
        users[1],
        json!({"user_id": "cat", "online": false, "last_seen": null})
    );
    // Closed there: offline, last seen when the socket closed.
    drop(bob_ws);
    eventually(WAIT, "bob offline", || async {
        let (_, body) = ann.get("/v1/presence?user_ids=bob").await?;
        Ok(body["users"][0]["online"] == false && body["users"][0]["last_seen"].is_u64())
    })
    .await?;
    Ok(())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item3_a_send_after_applying_a_remote_event_stamped_ahead_sorts_after_it() -> Result<()> {
    let c = Cluster::start(&["us"], &["eu"]).await?;
    c.provision("ann", "us").await?;
    c.provision("bob", "us").await?;
    let ann = c.session("us", "ann").await?;
    let cid = ann.direct("bob").await?;
    // An event of a region whose clock runs an hour ahead, applied here (it touches nothing
    // of this conversation, so only the clock can carry its time over).
    let ahead = Hlc::new(now_ms() + 3_600_000, 0);
    let us = c.region("us");
    us.bus
        .publish_event(&EventEnvelope {
            event_id: EventId::new_v7().as_bytes().to_vec(),
            origin_region: "eu".into(),
            hlc: ahead.0,
            actor: "admin".into(),
            body: Some(Body::UserUpserted(UserUpserted {
                user_id: "zed".into(),
                home_region: "eu".into(),
                display_name: "Zed".into(),
            })),
            ..Default::default()
        })
        .await?;
    let zed = meridian_model::UserId::parse("zed")?;
    eventually(WAIT, "the remote event applied", || async {
        Ok(us.store.store.user(&zed).await?.is_some())
    })
    .await?;
    let (st, sent) = ann
        .post(
            &format!("/v1/conversations/{cid}/messages"),
            json!({"client_msg_id": "after-ahead", "body": {"text": "hi"}}),
        )
        .await?;
    assert_eq!(st, 202, "{sent}");
    let accepted_at = sent["accepted_at"].as_u64().context("accepted_at")?;
    assert!(
        accepted_at >= ahead.physical_ms(),
        "the send was stamped at {accepted_at}, before the applied remote event at {}",
        ahead.physical_ms()
    );
    Ok(())
}
