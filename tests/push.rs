//! Offline push wired into the region process: a user with no WebSocket open gets a webhook
//! notification carrying the inbox seq and device token; an online user does not.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use axum::routing::post;
use axum::{Json, Router};
use meridian_e2e::TestRegion;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_users_get_a_webhook_push_and_online_ones_do_not() -> Result<()> {
    let received: Arc<Mutex<Vec<Value>>> = Arc::default();
    let sink = received.clone();
    let app = Router::new().route(
        "/push",
        post(move |Json(v): Json<Value>| {
            let sink = sink.clone();
            async move {
                sink.lock().unwrap().push(v);
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let hook = format!("http://{}/push", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });

    let r = TestRegion::start_with(|c| {
        let mut p = meridian_push::PushConfig::new(c.region.clone());
        p.webhook_url = Some(hook.clone());
        c.push = Some(p);
    })
    .await?;
    let ann = r.user("ann", "laptop").await?;
    let bob = r.user("bob", "phone").await?;
    let (st, b) = bob
        .put(
            "/v1/devices/phone",
            json!({"platform": "webhook", "token": "bob-phone-token"}),
        )
        .await?;
    assert_eq!(st, 200, "{b}");
    let cid = ann.direct("bob").await?;

    // Bob is offline: one push for the message, with the seq to pull and the device token.
    let sent = ann.send(&cid, "p-1", "are you there?").await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let push = loop {
        let got: Vec<Value> = received
            .lock()
            .unwrap()
            .iter()
            .filter(|p| p["kind"] == "message")
            .cloned()
            .collect();
        if let Some(p) = got.first() {
            break p.clone();
        }
        assert!(tokio::time::Instant::now() < deadline, "no push arrived");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert_eq!(push["user_id"], "bob");
    assert_eq!(push["token"], "bob-phone-token");
    assert_eq!(push["conversation_id"], cid.as_str());
    let seq = push["seq"].as_u64().unwrap();
    let entries = bob.sync_all(seq - 1).await?;
    assert_eq!(
        entries[0]["message_id"], sent["message_id"],
        "the seq in the push is the message's"
    );

    // Bob comes online: no more pushes while his socket is open.
    let mut ws = bob.ws().await?;
    ws.send(json!({"op": "hello", "after": seq})).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = received.lock().unwrap().len();
    ann.send(&cid, "p-2", "now you are").await?;
    let live = ws.next_op("entry", Duration::from_secs(10)).await?;
    assert_eq!(live["body"]["text"], "now you are");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        received.lock().unwrap().len(),
        before,
        "an online user gets no push"
    );
    // Ann (the sender) never got a push for her own messages.
    assert!(received.lock().unwrap().iter().all(|p| p["user_id"] != "ann"));
    r.stop().await
}
