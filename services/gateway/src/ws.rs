//! `GET /v1/ws`: live delivery and sends over one WebSocket.
//!
//! Each connection subscribes to its user's subjects (entries and typing, one subscription)
//! *before* replaying from the store, so nothing published during the replay is missed; entries at or below the last
//! seq sent are dropped, and a jump past it is filled from the store first. Entries
//! therefore leave in seq order with no gaps and no repeats, whatever NATS does.
//!
//! Tracing: a `send` frame is a "WS send" span (joining the frame's optional `traceparent`
//! field), and each live delivery a "WS deliver" span continuing the trace named by the
//! delivery's `traceparent` NATS header, so one trace runs from the send to the devices.
//! Delivery spans are made only while an exporter is installed: there is one per device per
//! message, and unexported they would only cost.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use futures::stream::FuturesUnordered;
use futures::{FutureExt as _, SinkExt as _, StreamExt};
use meridian_bus::Bus;
use meridian_model::events::LiveEntry;
use meridian_store::records::InboxEntry;
use meridian_telemetry::{Role, SpanKind};
use prost::Message as _;
use serde::Deserialize;
use serde_json::{json, Value};
use tracing::Instrument as _;

use crate::error::ApiError;
use crate::extract::Caller;
use crate::routes::messages::{send_message, SendMessage};
use crate::routes::sync::inbox_page;
use crate::state::AppState;

/// Sends one connection may have waiting for their PubAck at once.
const MAX_SENDS_IN_FLIGHT: usize = 64;
/// Replay and gap-fill page size.
const PAGE: usize = 500;
/// Deliveries already waiting that one turn of the serve loop takes before it flushes.
const DELIVERY_BATCH: usize = 64;
/// Largest frame a client may send.
const MAX_FRAME: usize = 256 * 1024;

pub async fn upgrade(caller: Caller, State(s): State<Arc<AppState>>, ws: WebSocketUpgrade) -> Response {
    let shutdown = s.shutdown.clone();
    // tungstenite's default 128 KiB read buffer per socket would cost ~6 GiB at 50k idle
    // connections; frames are small, and a bigger one just takes a few more reads.
    ws.max_message_size(MAX_FRAME.max(s.cfg.max_body_bytes * 2))
        .read_buffer_size(4 * 1024)
        // Frames are fed and flushed once per turn; the buffer is allocated on first use.
        .write_buffer_size(16 * 1024)
        .on_upgrade(move |socket| async move {
            let conn = Connection {
                s,
                caller,
                socket,
                last_seq: None,
                epoch: None,
            };
            conn.run(shutdown).await
        })
}

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum ClientFrame {
    Hello {
        #[serde(default)]
        after: u64,
        #[serde(default)]
        epoch: Option<String>,
    },
    Send {
        #[serde(rename = "ref", default)]
        reference: Value,
        conversation_id: String,
        /// Optional W3C trace context: the send joins the client's trace.
        #[serde(default)]
        traceparent: Option<String>,
        #[serde(flatten)]
        message: SendMessage,
    },
    Typing {
        conversation_id: String,
    },
    Ping,
}

struct Connection {
    s: Arc<AppState>,
    caller: Caller,
    socket: WebSocket,
    /// The last seq sent; `None` until the first entry or `hello`.
    last_seq: Option<u64>,
    epoch: Option<String>,
}

type SendResult = (Value, Result<Value, ApiError>);

impl Connection {
    async fn run(mut self, shutdown: tokio_util::sync::CancellationToken) {
        let s = self.s.clone();
        let user = self.caller.user.clone();
        s.hub.connected(&user);
        s.metrics.ws_connections.inc();
        if let Err(e) = self.serve(shutdown).await {
            tracing::debug!(user = %user, reason = %e, "websocket closed");
        }
        s.metrics.ws_connections.dec();
        s.hub.disconnected(&user);
    }

    async fn serve(&mut self, shutdown: tokio_util::sync::CancellationToken) -> Result<(), String> {
        // One subscription for the user's entries and ephemeral frames alike.
        let subject = self.s.bus.user_subjects(&self.caller.user);
        let mut entries = self.s.bus.subscribe(subject).await.map_err(|e| e.to_string())?;
        let mut sends: FuturesUnordered<futures::future::BoxFuture<'static, SendResult>> =
            FuturesUnordered::new();
        let mut keepalive = tokio::time::interval(Duration::from_secs(30));
        keepalive.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    let _ = self.socket.send(Message::Close(None)).await;
                    return Ok(());
                }
                frame = self.socket.recv() => {
                    let Some(Ok(frame)) = frame else { return Err("client went away".into()) };
                    match frame {
                        Message::Text(t) => {
                            if let Some(fut) = self.client_frame(t.as_str()).await? {
                                if sends.len() >= MAX_SENDS_IN_FLIGHT {
                                    // Push back: finish one before taking more.
                                    if let Some((r, res)) = sends.next().await {
                                        self.send_answer(r, res).await?;
                                    }
                                }
                                sends.push(fut);
                            }
                        }
                        Message::Binary(_) => self.error(Value::Null, ApiError::bad_request("malformed_frame", "frames are JSON text")).await?,
                        Message::Close(_) => return Ok(()),
                        Message::Ping(_) | Message::Pong(_) => {}
                    }
                }
                Some(msg) = entries.next() => {
                    self.delivery(msg).await?;
                    // Take whatever else is already waiting, so a burst leaves in one write.
                    for _ in 0..DELIVERY_BATCH {
                        match entries.next().now_or_never() {
                            Some(Some(msg)) => self.delivery(msg).await?,
                            _ => break,
                        }
                    }
                }
                Some((r, res)) = sends.next(), if !sends.is_empty() => self.send_answer(r, res).await?,
                _ = keepalive.tick() => {
                    self.socket.feed(Message::Ping(Default::default())).await.map_err(|e| e.to_string())?;
                }
            }
            // Frames are fed, not sent: one flush (one write to the socket) per turn.
            self.socket.flush().await.map_err(|e| e.to_string())?;
        }
    }

    /// One message from the user's subjects: an ephemeral frame, or an inbox entry.
    async fn delivery(&mut self, msg: async_nats::Message) -> Result<(), String> {
        if Bus::is_ephemeral_subject(&msg.subject) {
            if let Ok(text) = std::str::from_utf8(&msg.payload) {
                self.write(text.to_string()).await?;
            }
            return Ok(());
        }
        let entry = match LiveEntry::decode(msg.payload.as_ref()) {
            Ok(live) => InboxEntry::from(live),
            Err(e) => {
                tracing::warn!(error = %e, "undecodable delivery");
                return Ok(());
            }
        };
        if !meridian_telemetry::exporting() {
            return self.live_entry(entry).await;
        }
        // The last hop of the message's trace: the applier put its "apply" span's context
        // on the delivery.
        let parent = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(meridian_telemetry::TRACEPARENT))
            .map(|v| v.as_str());
        let mut span =
            meridian_telemetry::start_with_kind(Role::Gateway, "WS deliver", SpanKind::Consumer, parent);
        span.set_attribute("meridian.user", self.caller.user.to_string());
        span.set_attribute("meridian.inbox_seq", entry.seq as i64);
        let log = span.log_span();
        span.scope(self.live_entry(entry)).instrument(log).await
    }

    /// Handles a text frame; a send returns the future that publishes it.
    async fn client_frame(
        &mut self,
        text: &str,
    ) -> Result<Option<futures::future::BoxFuture<'static, SendResult>>, String> {
        let frame: ClientFrame = match serde_json::from_str(text) {
            Ok(f) => f,
            Err(e) => {
                let reference = serde_json::from_str::<Value>(text)
                    .ok()
                    .and_then(|v| v.get("ref").cloned())
                    .unwrap_or(Value::Null);
                self.error(
                    reference,
                    ApiError::bad_request("malformed_frame", format!("frame: {e}")),
                )
                .await?;
                return Ok(None);
            }
        };
        match frame {
            ClientFrame::Ping => self.write(json!({"op": "pong"}).to_string()).await?,
            ClientFrame::Hello { after, epoch } => {
                self.epoch = epoch;
                self.last_seq = Some(after);
                self.catch_up(None).await?;
            }
            ClientFrame::Send {
                reference,
                conversation_id,
                traceparent,
                message,
            } => {
                let s = self.s.clone();
                let caller = self.caller.clone();
                // Like an HTTP request: the frame's span is current while it is published.
                let mut span = meridian_telemetry::start_with_kind(
                    Role::Gateway,
                    "WS send",
                    SpanKind::Server,
                    traceparent.as_deref(),
                );
                let log = span.log_span();
                return Ok(Some(Box::pin(
                    async move {
                        let res = span
                            .scope(send_message(&s, &caller, &conversation_id, message))
                            .await;
                        if let Err(e) = &res {
                            span.set_attribute("meridian.error", e.code);
                            // As for HTTP: a refused send is the client's error, not ours.
                            if e.status.is_server_error() {
                                span.set_error(e.message.clone());
                            }
                        }
                        (reference, res)
                    }
                    .instrument(log),
                )));
            }
            ClientFrame::Typing { conversation_id } => self.typing(&conversation_id).await?,
        }
        Ok(None)
    }

    async fn send_answer(&mut self, reference: Value, res: Result<Value, ApiError>) -> Result<(), String> {
        match res {
            Ok(mut ack) => {
                ack["op"] = json!("ack");
                ack["ref"] = reference;
                self.write(ack.to_string()).await
            }
            Err(e) => self.error(reference, e).await,
        }
    }

    async fn error(&mut self, reference: Value, e: ApiError) -> Result<(), String> {
        let mut body = serde_json::Map::new();
        body.insert("op".into(), json!("error"));
        body.insert("ref".into(), reference);
        body.insert("error".into(), json!(e.code));
        body.insert("message".into(), json!(e.message));
        body.insert("status".into(), json!(e.status.as_u16()));
        body.extend(e.extra);
        self.write(Value::Object(body).to_string()).await
    }

    async fn live_entry(&mut self, entry: InboxEntry) -> Result<(), String> {
        match self.last_seq {
            // No hello yet: go live from here.
            None => {
                self.last_seq = Some(entry.seq);
                self.send_entry(&entry).await
            }
            Some(last) if entry.seq <= last => Ok(()),
            Some(last) if entry.seq == last + 1 => {
                self.last_seq = Some(entry.seq);
                self.send_entry(&entry).await
            }
            Some(_) => {
                self.s.metrics.ws_gap_fills.inc();
                self.catch_up(Some(entry.seq)).await
            }
        }
    }

    /// Sends everything after `last_seq` from the store (through `upto` when given).
    async fn catch_up(&mut self, upto: Option<u64>) -> Result<(), String> {
        loop {
            let after = self.last_seq.unwrap_or(0);
            if upto.is_some_and(|u| after >= u) {
                return Ok(());
            }
            // This socket may outlive a failover: read the current epoch each page.
            let current = match self.s.store.user(&self.caller.user).await {
                Ok(Some(v)) => v.epoch,
                Ok(None) => self.caller.view.epoch.clone(),
                Err(e) => return Err(e.to_string()),
            };
            let page = inbox_page(
                &self.s,
                &self.caller,
                &current,
                self.epoch.as_deref(),
                after,
                PAGE,
            )
            .await
            .map_err(|e| e.message)?;
            let page = match page {
                Ok(p) => p,
                Err((epoch, head)) => {
                    let frame = json!({"op": "resync_required", "epoch": epoch, "head": head});
                    self.write(frame.to_string()).await?;
                    // Follow the new epoch from its head while the client resyncs.
                    self.epoch = Some(epoch);
                    self.last_seq = Some(head);
                    return Ok(());
                }
            };
            if self.epoch.is_none() {
                self.epoch = page["epoch"].as_str().map(str::to_string);
            }
            let entries = page["entries"].as_array().cloned().unwrap_or_default();
            for mut e in entries {
                let seq = e["seq"].as_u64().unwrap_or(0);
                e["op"] = json!("entry");
                self.write(e.to_string()).await?;
                self.s.metrics.ws_entries_sent.inc();
                self.last_seq = Some(seq);
            }
            if !page["has_more"].as_bool().unwrap_or(false) {
                return Ok(());
            }
        }
    }

    async fn send_entry(&mut self, entry: &InboxEntry) -> Result<(), String> {
        self.s.metrics.ws_entries_sent.inc();
        self.write(crate::render::entry_frame(entry)).await
    }

    async fn typing(&mut self, cid: &str) -> Result<(), String> {
        let s = self.s.clone();
        let Ok((cid, _)) = crate::routes::conversations::require_member(&s, cid, &self.caller.user).await
        else {
            return self.error(Value::Null, ApiError::conversation_not_found()).await;
        };
        let Ok(Some(view)) = s.store.conversation(&cid).await else {
            return Ok(());
        };
        // Typing in very large groups is noise, and each frame would cost one publish per member.
        if view.members.len() > 100 {
            return Ok(());
        }
        let frame =
            json!({"op": "typing", "conversation_id": cid.as_str(), "user_id": self.caller.user.as_str()})
                .to_string();
        for m in view.members.iter().filter(|m| m.user_id != self.caller.user) {
            let _ = s
                .bus
                .publish_ephemeral(s.bus.ephemeral_subject(&m.user_id), frame.clone().into())
                .await;
        }
        Ok(())
    }

    /// Queues a frame; the serve loop flushes once per turn.
    async fn write(&mut self, text: String) -> Result<(), String> {
        self.socket
            .feed(Message::Text(text.into()))
            .await
            .map_err(|e| e.to_string())
    }
}
