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

// Issue 8 item 4: WebSocket traffic obeys the limits HTTP does.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item4_socket_closes_with_4401_when_its_token_expires() -> Result<()> {
    let r = TestRegion::start().await?;
    r.user("ann", "d").await?;
    let short = r.session_with_ttl("ann", "d", 2).await?;
    let mut ws = hello(&short, 0).await?;
    // The token lives 2 s (its exp is whole seconds, so up to 3 s): well within the wait.
    let (code, reason) = ws.closed(Duration::from_secs(15)).await?;
    assert_eq!((code, reason.as_str()), (4401, "token_expired"));
    r.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item4_send_frames_are_rate_limited() -> Result<()> {
    let r = TestRegion::start_with(|c| {
        c.gateway.rate_limit_per_s = 0.2;
        c.gateway.rate_limit_burst = 4.0;
    })
    .await?;
    r.user("ann", "d").await?;
    let bob = r.user("bob", "d").await?;
    let cid = bob.direct("ann").await?;
    let ann = r.session("ann", "d").await?;
    // The upgrade request takes one token; the frames share the rest of the burst.
    let mut ws = ann.ws().await?;
    const FRAMES: usize = 10;
    for i in 0..FRAMES {
        ws.send(
            json!({"op": "send", "ref": format!("r{i}"), "conversation_id": cid,
                       "client_msg_id": format!("m{i}"), "type": "text", "body": {"text": "hi"}}),
        )
        .await?;
    }
    let mut acks = 0;
    let mut limited = Vec::new();
    for _ in 0..FRAMES {
        let f = ws.next(WAIT).await?;
        match f["op"].as_str() {
            Some("ack") => acks += 1,
            Some("error") => limited.push(f),
            _ => panic!("unexpected frame {f}"),
        }
    }
    assert!(acks <= 4, "at most the burst is accepted: {acks} acks");
    assert!(!limited.is_empty(), "some send frames are refused");
    for f in &limited {
        assert_eq!(f["error"], "rate_limited", "{f}");
        assert!(f["ref"].as_str().is_some_and(|r| r.starts_with('r')), "{f}");
        assert!(f["retry_after_ms"].as_u64().is_some_and(|ms| ms > 0), "{f}");
    }
    r.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item4_message_limit_on_send_frames_and_1009_for_oversized_frames() -> Result<()> {
    let r = TestRegion::start().await?;
    let ann = r.user("ann", "d").await?;
    r.user("bob", "d").await?;
    let cid = ann.direct("bob").await?;
    let mut ws = ann.ws().await?;
    // 100 KiB of body: over the 64 KiB message limit, under the frame limit.
    let big = "x".repeat(100 * 1024);
    ws.send(
        json!({"op": "send", "ref": "big", "conversation_id": cid, "client_msg_id": "big",
                   "type": "text", "body": {"text": big}}),
    )
    .await?;
    let f = ws.next_op("error", WAIT).await?;
    assert_eq!(
        (f["ref"].as_str(), f["error"].as_str()),
        (Some("big"), Some("too_large")),
        "{f}"
    );
    // The socket is still usable.
    ws.send(json!({"op": "ping"})).await?;
    ws.next_op("pong", WAIT).await?;
    // Over the frame limit: closed with 1009, not dropped.
    ws.send_text(format!(
        r#"{{"op": "ping", "pad": "{}"}}"#,
        "y".repeat(140 * 1024)
    ))
    .await?;
    let (code, _) = ws.closed(WAIT).await?;
    assert_eq!(code, 1009);
    // Nothing was stored.
    assert!(ann.sync_all(0).await?.iter().all(|e| e["kind"] != "message"));
    r.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item4_typing_in_a_large_group_is_refused() -> Result<()> {
    let r = TestRegion::start().await?;
    let ann = r.user("ann", "d").await?;
    let mut members = Vec::new();
    for i in 0..=100 {
        let u = format!("u{i:03}");
        r.user(&u, "d").await?;
        members.push(u);
    }
    let (st, body) = ann
        .post(
            "/v1/conversations",
            json!({"kind": "group", "name": "big", "members": members}),
        )
        .await?;
    assert_eq!(st, 201, "{body}");
    let cid = body["conversation_id"].as_str().unwrap().to_string();
    let mut ws = hello(&ann, 0).await?;
    ws.send(json!({"op": "typing", "ref": "t1", "conversation_id": cid}))
        .await?;
    let f = ws.next_op("error", WAIT).await?;
    assert_eq!(
        (f["ref"].as_str(), f["error"].as_str()),
        (Some("t1"), Some("group_too_large")),
        "{f}"
    );
    r.stop().await
}

/// `GatewayConfig`'s default `max_sockets_per_user`.
const DEFAULT_SOCKET_CAP: usize = 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item4_a_user_holds_at_most_the_socket_cap() -> Result<()> {
    let r = TestRegion::start().await?;
    let ann = r.user("ann", "d").await?;
    let mut open = Vec::new();
    for _ in 0..DEFAULT_SOCKET_CAP {
        open.push(ann.ws().await?);
    }
    let refused = ann.try_ws().await?;
    let Err((status, body)) = refused else {
        panic!("socket {} was accepted", DEFAULT_SOCKET_CAP + 1);
    };
    assert_eq!(
        (status, body["error"].as_str()),
        (429, Some("too_many_sockets")),
        "{body}"
    );
    // Another user is not affected.
    let bob = r.user("bob", "d").await?;
    bob.ws().await?;
    // Closing one frees a slot (the server notices the close asynchronously).
    drop(open.pop());
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if ann.try_ws().await?.is_ok() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no slot freed");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    r.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item4_nothing_live_before_hello() -> Result<()> {
    let r = TestRegion::start().await?;
    let ann = r.user("ann", "d").await?;
    let bob = r.user("bob", "d").await?;
    let cid = ann.direct("bob").await?;
    let head = bob.wait_entries(1).await?.len() as u64;
    let mut ws = bob.ws().await?;
    for i in 1..=3 {
        ann.send(&cid, &format!("m{i}"), &format!("before hello {i}"))
            .await?;
    }
    bob.wait_entries(head as usize + 3).await?;
    // Let the live deliveries reach the socket before the hello.
    tokio::time::sleep(Duration::from_millis(300)).await;
    ws.send(json!({"op": "hello", "after": head})).await?;
    // The ping is answered after the hello's replay: every entry before the pong.
    ws.send(json!({"op": "ping"})).await?;
    let mut seqs = Vec::new();
    loop {
        let f = ws.next(WAIT).await?;
        match f["op"].as_str() {
            Some("pong") => break,
            Some("entry") => seqs.push(f["seq"].as_u64().unwrap()),
            _ => {}
        }
    }
    assert_eq!(seqs, [head + 1, head + 2, head + 3], "each seq exactly once");
    r.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item4_a_socket_that_falls_behind_its_small_buffer_fills_from_the_store() -> Result<()> {
    // One buffered live message per socket: whatever arrives while the socket is busy is
    // dropped by NATS and must come from the store.
    let r = TestRegion::start_with(|c| c.gateway.ws_subscription_capacity = 1).await?;
    let ann = r.user("ann", "d").await?;
    let bob = r.user("bob", "d").await?;
    let cid = ann.direct("bob").await?;
    let head = bob.wait_entries(1).await?.len() as u64;
    let mut ws = hello(&bob, head).await?;
    ws.send(json!({"op": "ping"})).await?;
    ws.next_op("pong", WAIT).await?;
    // A burst of large messages that bob does not read while it lasts.
    const N: usize = 60;
    let pad = "p".repeat(20 * 1024);
    let sends = (0..N).map(|i| {
        let (ann, cid, pad) = (ann.clone(), cid.clone(), pad.clone());
        async move { ann.send(&cid, &format!("b{i}"), &format!("{i} {pad}")).await }
    });
    for sent in futures::future::join_all(sends).await {
        sent?;
    }
    bob.wait_entries(head as usize + N).await?;
    // Every entry, in order, no gaps, no repeats.
    let got = entries(&mut ws, head, N).await?;
    assert_eq!(got.len(), N);
    let metrics = r
        .http
        .get(format!("{}/metrics", r.base))
        .send()
        .await?
        .text()
        .await?;
    let gap_fills: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("meridian_gateway_ws_gap_fills_total "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    assert!(
        gap_fills > 0,
        "the burst overflowed the buffer and was filled from the store"
    );
    r.stop().await
}
