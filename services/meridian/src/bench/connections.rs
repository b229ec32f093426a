//! The generator's WebSocket connections and what they record: the 100-byte bodies that carry
//! their send time, and per step the latencies and receipts of every intended recipient.
//!
//! The sockets are the generator's own, not the SDK's sync loop: thousands of them share two
//! cores with the server, and the SDK's loop (a task, a channel and a typed copy of every
//! entry, a checkpoint lock, an HTTP catch-up before each connect) costs more per message
//! than reading the few fields the tally needs; it also has no way to send frames. HTTP
//! calls (the head at connect, read-diffusion pulls) go through the SDK client.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::{SinkExt, StreamExt};
use meridian_client::Client;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_util::sync::CancellationToken;

use super::target::Target;
use super::{setup_err, BenchError};

/// A message body of exactly 100 bytes of JSON carrying its send time (µs since `base`).
pub(super) fn body_100(sent_us: u64, id: &str) -> Value {
    let head = format!("{sent_us:016}|{id}|");
    // `{"text":"` + text + `"}` is 11 bytes of framing.
    let pad = 100usize.saturating_sub(11 + head.len());
    let v = json!({"text": format!("{head}{}", "x".repeat(pad))});
    debug_assert_eq!(v.to_string().len(), 100);
    v
}

fn parse_body(text: &str) -> Option<(u64, &str)> {
    let mut parts = text.splitn(3, '|');
    let sent = parts.next()?.parse().ok()?;
    Some((sent, parts.next()?))
}

/// What the receivers saw during one step.
#[derive(Default)]
pub(super) struct Tally {
    pub(super) latencies_us: Vec<u64>,
    /// Receipts per message id (by the intended recipient only).
    pub(super) seen: HashMap<String, u32>,
}

pub(super) struct Shared {
    base: Instant,
    pub(super) tally: Mutex<Tally>,
    /// Only messages of the current step are counted.
    pub(super) step_tag: Mutex<String>,
    pub(super) received: AtomicU64,
}

impl Shared {
    pub(super) fn new() -> Arc<Shared> {
        Arc::new(Shared {
            base: Instant::now(),
            tally: Mutex::default(),
            step_tag: Mutex::default(),
            received: AtomicU64::new(0),
        })
    }

    /// `me` received message `id`, sent at `sent_us`, at `now_us`.
    fn record(&self, id: &str, me: &str, sent_us: u64, now_us: u64) {
        self.received.fetch_add(1, Ordering::Relaxed);
        let mut tally = self.tally.lock().unwrap_or_else(|p| p.into_inner());
        tally.latencies_us.push(now_us.saturating_sub(sent_us));
        *tally.seen.entry(format!("{id}>{me}")).or_default() += 1;
    }

    pub(super) fn now_us(&self) -> u64 {
        self.base.elapsed().as_micros() as u64
    }
}

/// One connected bench user: a WebSocket with a writer channel and a reader task.
pub(super) struct Conn {
    pub(super) user: String,
    /// The user's SDK client, for calls over HTTP.
    pub(super) client: Client,
    pub(super) tx: mpsc::Sender<String>,
}

async fn connect(
    target: &Target,
    user: String,
    token: String,
    shared: Arc<Shared>,
    stop: CancellationToken,
) -> Result<Conn, BenchError> {
    let url = format!(
        "{}/v1/ws?token={token}",
        target.endpoint.replacen("http", "ws", 1)
    );
    let (socket, _) = tokio_tungstenite::connect_async(url).await.map_err(setup_err)?;
    let (mut write, mut read) = socket.split();
    let (tx, mut rx) = mpsc::channel::<String>(4096);
    // Start live from the current head: everything before the bench is not ours.
    let client = target.client(&token);
    let head = client.sync_page(0, None, 1).await.map(|p| p.head).unwrap_or(0);
    write
        .send(WsMessage::text(json!({"op": "hello", "after": head}).to_string()))
        .await
        .map_err(setup_err)?;
    let stop_w = stop.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop_w.cancelled() => break,
                frame = rx.recv() => match frame {
                    Some(f) => if write.send(WsMessage::text(f)).await.is_err() { break },
                    None => break,
                },
            }
        }
        let _ = write.close().await;
    });
    let me = user.clone();
    let reader_client = client.clone();
    tokio::spawn(async move {
        let mut cursors: HashMap<String, String> = HashMap::new();
        loop {
            let msg = tokio::select! {
                _ = stop.cancelled() => break,
                m = read.next() => m,
            };
            let Some(Ok(WsMessage::Text(t))) = msg else {
                if msg.is_none() || matches!(msg, Some(Err(_))) {
                    break;
                }
                continue;
            };
            let now = shared.now_us();
            let Ok(v) = serde_json::from_str::<Value>(t.as_str()) else {
                continue;
            };
            match v["op"].as_str() {
                Some("entry") if v["kind"] == "message" && v["sender"] != me.as_str() => {
                    let Some((sent, id)) = v["body"]["text"].as_str().and_then(parse_body) else {
                        continue;
                    };
                    let tag = shared.step_tag.lock().map(|t| t.clone()).unwrap_or_default();
                    if !id.starts_with(&tag) {
                        continue;
                    }
                    shared.record(id, &me, sent, now);
                }
                Some("entry") if v["kind"] == "conversation_advanced" => {
                    // Read diffusion: the inbox only says the group moved on; pull the
                    // storage timeline after what this client has seen, like an app would.
                    let cid = v["conversation_id"].as_str().unwrap_or_default().to_string();
                    let after = cursors.get(&cid).cloned().unwrap_or_default();
                    let Ok(page) = reader_client.history(&cid, Some(&after), None, 200).await else {
                        continue;
                    };
                    let now = shared.now_us();
                    let tag = shared.step_tag.lock().map(|t| t.clone()).unwrap_or_default();
                    for m in &page.items {
                        cursors.insert(cid.clone(), m.cursor.clone());
                        if m.sender == me {
                            continue;
                        }
                        let Some((sent, id)) = m
                            .body
                            .as_ref()
                            .and_then(|b| b["text"].as_str())
                            .and_then(parse_body)
                        else {
                            continue;
                        };
                        if !id.starts_with(&tag) {
                            continue;
                        }
                        shared.record(id, &me, sent, now);
                    }
                }
                _ => {}
            }
        }
    });
    Ok(Conn { user, client, tx })
}

/// One WebSocket per user, opened 32 at a time, in `users` order.
pub(super) async fn connect_all(
    target: &Target,
    users: &[(String, String)],
    shared: &Arc<Shared>,
    stop: &CancellationToken,
) -> Result<Vec<Conn>, BenchError> {
    futures::stream::iter(
        users
            .iter()
            .map(|(u, t)| connect(target, u.clone(), t.clone(), shared.clone(), stop.clone())),
    )
    .buffered(32)
    .collect::<Vec<_>>()
    .await
    .into_iter()
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_exactly_100_bytes_and_parse_back() {
        for (t, id) in [(0u64, "a"), (1_732_600_000_000_000, "b1234w1r20000_599999")] {
            let b = body_100(t, id);
            assert_eq!(b.to_string().len(), 100, "{b}");
            assert_eq!(parse_body(b["text"].as_str().unwrap()), Some((t, id)));
        }
    }
}
