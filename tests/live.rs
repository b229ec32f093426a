//! WebSocket live delivery: every device gets every entry in seq order, replay on `hello`,
//! gap fill from the store, sends over the socket acked like POST, typing never stored.

use std::time::Duration;

use anyhow::Result;
use meridian_e2e::{Session, TestRegion, Ws};
use meridian_model::events::{event_envelope::Body, EventEnvelope, MessageSent};
use meridian_model::{EventId, HybridClock, RegionId};
use meridian_store::{ApplyConfig, SequencedEvent};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(10);

/// Reads `n` entry frames, checking their seqs follow `after` with no gap or repeat.
async fn entries(ws: &mut Ws, after: u64, n: usize) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    let mut expect = after + 1;
    while out.len() < n {
        let f = ws.next_op("entry", WAIT).await?;
        assert_eq!(
            f["seq"].as_u64(),
            Some(expect),
            "entries arrive in seq order without gaps: {f}"
        );
        expect += 1;
        out.push(f);
    }
    Ok(out)
}

async fn hello(s: &Session, after: u64) -> Result<Ws> {
    let mut ws = s.ws().await?;
    ws.send(json!({"op": "hello", "after": after})).await?;
    Ok(ws)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_devices_get_every_entry_in_order_and_replay_after_reconnect() -> Result<()> {
    let r = TestRegion::start().await?;
    let ann = r.user("ann", "laptop").await?;
    let bob_phone = r.user("bob", "phone").await?;
    let bob_laptop = r.session("bob", "laptop").await?;
    let cid = ann.direct("bob").await?;
    let head = bob_phone.wait_entries(1).await?.len() as u64; // conversation_created

    let mut phone = hello(&bob_phone, head).await?;
    let mut laptop = hello(&bob_laptop, head).await?;
    let mut ann_ws = hello(&ann, ann.sync_all(0).await?.len() as u64).await?;
    // Let the hellos land before sending, so nothing is replayed twice by accident.
    tokio::time::sleep(Duration::from_millis(100)).await;
    for i in 1..=5 {
        ann.send(&cid, &format!("m{i}"), &format!("live {i}")).await?;
    }
    for ws in [&mut phone, &mut laptop] {
        let got = entries(ws, head, 5).await?;
        let texts: Vec<&str> = got.iter().map(|e| e["body"]["text"].as_str().unwrap()).collect();
        assert_eq!(texts, ["live 1", "live 2", "live 3", "live 4", "live 5"]);
        assert!(got
            .iter()
            .all(|e| e["kind"] == "message" && e["sender"] == "ann" && e["conversation_id"] == cid.as_str()));
    }
    // The sender's other devices see what it sent: its own inbox gets the messages too.
    let own = ann_ws.next_op("entry", WAIT).await?;
    assert_eq!(own["body"]["text"], "live 1");

    // The laptop goes away; messages keep coming; on reconnect `hello` replays exactly the rest.
    drop(laptop);
    for i in 6..=8 {
        ann.send(&cid, &format!("m{i}"), &format!("live {i}")).await?;
    }
    entries(&mut phone, head + 5, 3).await?;
    let mut laptop = hello(&bob_laptop, head + 5).await?;
    let replayed = entries(&mut laptop, head + 5, 3).await?;
    assert_eq!(replayed[0]["body"]["text"], "live 6");
    // ...and then goes live without repeating anything.
    ann.send(&cid, "m9", "live 9").await?;
    let next = entries(&mut laptop, head + 8, 1).await?;
    assert_eq!(next[0]["body"]["text"], "live 9");

    // A stale epoch gets resync_required.
    let mut stale = bob_laptop.ws().await?;
    stale
        .send(json!({"op": "hello", "after": 0, "epoch": "eu.1"}))
        .await?;
    let f = stale.next_op("resync_required", WAIT).await?;
    assert!(f["epoch"].is_string());
    r.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_in_live_delivery_is_filled_from_the_store() -> Result<()> {
    let r = TestRegion::start().await?;
    let ann = r.user("ann", "d").await?;
    let bob = r.user("bob", "d").await?;
    let cid = ann.direct("bob").await?;
    let head = bob.wait_entries(1).await?.len() as u64;
    let mut ws = hello(&bob, head).await?;
    tokio::time::sleep(Duration::from_millis(100)).await;

    // Two messages reach bob's inbox without any live publish (applied through a side
    // stream straight into the store), as if their deliveries had been lost.
    let clock = HybridClock::new();
    let side: Vec<SequencedEvent> = (1..=2)
        .map(|i| SequencedEvent {
            stream_seq: i,
            envelope: EventEnvelope {
                event_id: EventId::new_v7().as_bytes().to_vec(),
                origin_region: "us".into(),
                hlc: clock.now().0,
                actor: "ann".into(),
                body: Some(Body::MessageSent(MessageSent {
                    conversation_id: cid.clone(),
                    client_msg_id: format!("side-{i}"),
                    msg_type: "text".into(),
                    body_json: json!({"text": format!("lost {i}")}).to_string(),
                })),
                ..Default::default()
            },
        })
        .collect();
    let report = r
        .running()
        .store
        .apply_batch(&ApplyConfig::new(RegionId::parse("us")?), "SIDE_STREAM", &side)
        .await?;
    assert_eq!(report.applied, 2);

    // The next live entry reveals the gap; the gateway fills it before sending it.
    ann.send(&cid, "after-gap", "after the gap").await?;
    let got = entries(&mut ws, head, 3).await?;
    let texts: Vec<&str> = got.iter().map(|e| e["body"]["text"].as_str().unwrap()).collect();
    assert_eq!(texts, ["lost 1", "lost 2", "after the gap"]);
    r.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_over_the_websocket_behave_like_post() -> Result<()> {
    let r = TestRegion::start().await?;
    let ann = r.user("ann", "d").await?;
    let bob = r.user("bob", "d").await?;
    let cid = ann.direct("bob").await?;
    let mut ws = hello(&ann, 0).await?;

    let send = |reference: &str, cmid: &str| {
        json!({"op": "send", "ref": reference, "conversation_id": cid, "client_msg_id": cmid,
               "type": "text", "body": {"text": format!("via ws {cmid}")}})
    };
    ws.send(send("r1", "ws-1")).await?;
    let ack = ws.next_op("ack", WAIT).await?;
    assert_eq!(ack["ref"], "r1");
    assert!(ack["message_id"].is_string() && ack["cursor"].is_string());
    // The same client_msg_id over HTTP is the same message.
    let post = ann.send(&cid, "ws-1", "via ws ws-1").await?;
    assert_eq!(post["message_id"], ack["message_id"]);
    assert_eq!(post["cursor"], ack["cursor"]);
    // And again over the socket.
    ws.send(send("r2", "ws-1")).await?;
    let again = ws.next_op("ack", WAIT).await?;
    assert_eq!(
        (again["ref"].clone(), again["message_id"].clone()),
        (json!("r2"), ack["message_id"].clone())
    );

    // Errors come back as error frames carrying the ref.
    ws.send(
        json!({"op": "send", "ref": "r3", "conversation_id": "g_00000000000000000000000000000000",
                   "client_msg_id": "x", "type": "text", "body": {"text": "?"}}),
    )
    .await?;
    let err = ws.next_op("error", WAIT).await?;
    assert_eq!(
        (err["ref"].clone(), err["error"].clone()),
        (json!("r3"), json!("conversation_not_found"))
    );
    ws.send(json!({"op": "send", "ref": "r4", "conversation_id": cid}))
        .await?;
    let err = ws.next_op("error", WAIT).await?;
    assert_eq!(
        (err["ref"].clone(), err["error"].clone()),
        (json!("r4"), json!("malformed_frame"))
    );
    ws.send(json!({"op": "dance"})).await?;
    assert_eq!(ws.next_op("error", WAIT).await?["error"], "malformed_frame");

    // Stored once: bob's inbox holds one message.
    let msgs = loop {
        let all = bob.sync_all(0).await?;
        let m: Vec<Value> = all.into_iter().filter(|e| e["kind"] == "message").collect();
        if !m.is_empty() {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(msgs.len(), 1);
    assert_eq!(
        bob.sync_all(0)
            .await?
            .iter()
            .filter(|e| e["kind"] == "message")
            .count(),
        1
    );

    // Typing reaches the other member live and is never stored.
    let mut bob_ws = hello(&bob, 0).await?;
    let before = bob.sync_all(0).await?.len();
    tokio::time::sleep(Duration::from_millis(100)).await;
    ws.send(json!({"op": "typing", "conversation_id": cid})).await?;
    let t = bob_ws.next_op("typing", WAIT).await?;
    assert_eq!(
        (t["user_id"].clone(), t["conversation_id"].clone()),
        (json!("ann"), json!(cid))
    );
    assert_eq!(bob.sync_all(0).await?.len(), before);
    r.stop().await
}
