//! `GET /v1/ws`: live delivery and sends over one WebSocket.
//!
//! Each connection subscribes to its user's subjects (entries and typing, one subscription)
//! when it opens, but sends nothing live until the client's `hello`: the hello replays from
//! the store what came after the client's checkpoint (everything delivered before it is in
//! the store), then live entries follow. Entries at or below the last seq sent are dropped,
//! and a jump past it is filled from the store first, so entries leave in seq order with no
//! gaps and no repeats, whatever NATS does. The subscription buffers only
//! `ws_subscription_capacity` messages: a socket that cannot keep up loses live entries to
//! NATS and fills the gap from the store instead of queueing without bound.
//!
//! Frames are requests like any other: each pays the user's rate limit, and sends, typing
//! and replay pages go through [`crate::service`], so a limit cannot be skipped by using the
//! socket instead of HTTP. Refusals are `{"op": "error", "ref", "error", "message", ...}`
//! frames with the HTTP error codes. Close codes: 4401 `token_expired` when the token's
//! `exp` passes (the client reconnects with a fresh token), 1009 for a frame over the frame
//! limit, 4421 after a `{"op": "wrong_region", "region", "endpoint"}` frame when the user is
//! served by another region: at the upgrade (a browser cannot read an upgrade's refusal, so
//! the socket opens only to say where to go), at any frame (each re-reads the directory), or
//! while the socket only receives (the fence, [`crate::live::run_fence`], polls the
//! directory). A user holds at most `max_sockets_per_user` sockets per gateway (429 at
//! upgrade).
//!
//! Tracing: a `send` frame is a "WS send" span (joining the frame's optional `traceparent`
//! field), and each live delivery a "WS deliver" span continuing the trace named by the
//! delivery's `traceparent` NATS header, so one trace runs from the send to the devices.
//! Delivery spans are made only while an exporter is installed: there is one per device per
//! message, and unexported they would only cost.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{close_code, CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
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
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tracing::Instrument as _;

use crate::error::{ApiError, ApiResult};
use crate::extract::{Authenticated, Caller, WrongRegion};
use crate::service::{self, SendMessage, SocketSlot};
use crate::state::AppState;

/// Sends one connection may have waiting for their PubAck at once.
const MAX_SENDS_IN_FLIGHT: usize = 64;
/// Replay and gap-fill page size.
const PAGE: usize = 500;
/// Deliveries already waiting that one turn of the serve loop takes before it flushes.
const DELIVERY_BATCH: usize = 64;
/// The close code for an expired token (4000-4999 are the application's).
pub const CLOSE_TOKEN_EXPIRED: u16 = 4401;
/// The close code after a `wrong_region` frame: the user is served by another region.
pub const CLOSE_WRONG_REGION: u16 = 4421;

/// The largest frame a client may send: a send frame carries one message body (at most
/// `max_body_bytes`, checked by the service layer as for POST) plus a few short fields;
/// twice the body limit leaves room for those and for escaping. Larger frames close the
/// socket with 1009.
fn frame_limit(s: &AppState) -> usize {
    s.cfg.max_body_bytes * 2
}

pub async fn upgrade(
    who: Authenticated,
    State(s): State<Arc<AppState>>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    let caller = who.served_here(&s.cfg);
    // A plain request here is answered in JSON like every other error (a 421 for a user
    // served elsewhere).
    let ws = match ws {
        Ok(ws) => ws,
        Err(e) => {
            caller?;
            return Err(ApiError::new(
                e.status(),
                "websocket_upgrade_required",
                e.body_text(),
            ));
        }
    };
    let caller = match caller {
        Ok(caller) => caller,
        // Opened only to say where to go: no slot, no subscription.
        Err(moved) => {
            return Ok(ws
                .read_buffer_size(4 * 1024)
                .on_upgrade(move |mut socket| async move {
                    let _ = socket.send(Message::Text(moved.frame().into())).await;
                    let _ = socket.send(Message::Close(Some(wrong_region_close()))).await;
                }))
        }
    };
    let slot = service::open_socket(&s, &caller)?;
    let shutdown = s.shutdown.clone();
    let limit = frame_limit(&s);
    // tungstenite's default 128 KiB read buffer per socket would cost ~6 GiB at 50k idle
    // connections; frames are small, and a bigger one just takes a few more reads.
    Ok(ws
        .max_message_size(limit)
        .max_frame_size(limit)
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
                slot,
            };
            conn.run(shutdown).await
        }))
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
        /// The durability level asked for, like the `Meridian-Durability` header.
        #[serde(default)]
        durability: Option<String>,
        #[serde(flatten)]
        message: SendMessage,
    },
    Typing {
        #[serde(rename = "ref", default)]
        reference: Value,
        conversation_id: String,
    },
    Ping,
}

impl ClientFrame {
    fn reference(&self) -> Value {
        match self {
            ClientFrame::Send { reference, .. } | ClientFrame::Typing { reference, .. } => reference.clone(),
            ClientFrame::Hello { .. } | ClientFrame::Ping => Value::Null,
        }
    }
}

struct Connection {
    s: Arc<AppState>,
    caller: Caller,
    socket: WebSocket,
    /// The last seq sent; `None` until `hello`, and nothing live is sent before it.
    last_seq: Option<u64>,
    epoch: Option<String>,
    /// Held for the connection's life: counts it against the user's cap and for presence,
    /// and says when the user is no longer served here.
    slot: SocketSlot,
}

type SendResult = (Value, ApiResult<Value>);

/// Why the serve loop ended.
enum Closed {
    /// The client closed, or the gateway is stopping.
    Normally,
    /// Closed by us with this code and reason.
    With(u16, &'static str),
    /// The user is served by another region: a `wrong_region` frame, then close 4421.
    Moved(WrongRegion),
    /// The connection failed.
    Failed(String),
}

impl From<String> for Closed {
    fn from(e: String) -> Self {
        Closed::Failed(e)
    }
}

impl Connection {
    async fn run(mut self, shutdown: tokio_util::sync::CancellationToken) {
        let s = self.s.clone();
        let user = self.caller.user.clone();
        s.metrics.ws_connections.inc();
        match self.serve(shutdown).await {
            Closed::Normally => {}
            Closed::With(code, reason) => {
                tracing::debug!(user = %user, code, reason, "websocket closed by the gateway");
                let frame = CloseFrame {
                    code,
                    reason: Utf8Bytes::from_static(reason),
                };
                let _ = self.socket.send(Message::Close(Some(frame))).await;
            }
            Closed::Moved(moved) => {
                tracing::debug!(user = %user, region = %moved.region, "websocket closed: served by another region");
                let _ = self.socket.feed(Message::Text(moved.frame().into())).await;
                let _ = self.socket.send(Message::Close(Some(wrong_region_close()))).await;
            }
            Closed::Failed(e) => tracing::debug!(user = %user, reason = %e, "websocket closed"),
        }
        s.metrics.ws_connections.dec();
    }

    async fn serve(&mut self, shutdown: tokio_util::sync::CancellationToken) -> Closed {
        // One subscription for the user's entries and ephemeral frames alike, on the bounded
        // connection.
        let subject = self.s.live_bus.user_subjects(&self.caller.user);
        let mut entries = match self.s.live_bus.subscribe(subject).await {
            Ok(sub) => sub,
            Err(e) => return Closed::Failed(e.to_string()),
        };
        let mut sends: FuturesUnordered<futures::future::BoxFuture<'static, SendResult>> =
            FuturesUnordered::new();
        let mut losses = self.s.live_bus.delivery_losses();
        losses.mark_unchanged();
        let mut keepalive = tokio::time::interval(Duration::from_secs(30));
        keepalive.tick().await;
        let expiry = token_expiry(self.caller.token_expires_at_s);
        tokio::pin!(expiry);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    let _ = self.socket.send(Message::Close(None)).await;
                    return Closed::Normally;
                }
                _ = &mut expiry => return Closed::With(CLOSE_TOKEN_EXPIRED, "token_expired"),
                Ok(()) = self.slot.fence.changed() => {
                    let moved = self.slot.fence.borrow_and_update().clone();
                    if let Some(moved) = moved {
                        return Closed::Moved(moved);
                    }
                }
                frame = self.socket.recv() => {
                    let frame = match frame {
                        Some(Ok(frame)) => frame,
                        Some(Err(e)) if is_too_large(&e) => {
                            return Closed::With(close_code::SIZE, "frame_too_large");
                        }
                        _ => return Closed::Failed("client went away".into()),
                    };
                    let turn = match frame {
                        Message::Text(t) => match self.client_frame(t.as_str()).await {
                            Ok(Some(fut)) => {
                                if sends.len() >= MAX_SENDS_IN_FLIGHT {
                                    // Push back: finish one before taking more.
                                    if let Some((r, res)) = sends.next().await {
                                        if let Err(e) = self.send_answer(r, res).await {
                                            return e.into();
                                        }
                                    }
                                }
                                sends.push(fut);
                                Ok(())
                            }
                            Ok(None) => Ok(()),
                            Err(closed) => return closed,
                        },
                        Message::Binary(_) => {
                            // Paid for like any frame.
                            let e = service::admit(&self.s, &self.caller.user).err().unwrap_or_else(|| {
                                ApiError::bad_request("malformed_frame", "frames are JSON text")
                            });
                            self.error(Value::Null, e).await
                        }
                        Message::Close(_) => return Closed::Normally,
                        Message::Ping(_) | Message::Pong(_) => Ok(()),
                    };
                    if let Err(e) = turn {
                        return e.into();
                    }
                }
                Some(msg) = entries.next() => {
                    if let Err(e) = self.deliveries(msg, &mut entries).await {
                        return e.into();
                    }
                }
                // Deliveries may have been dropped (a full buffer on the bounded connection,
                // or a reconnect), possibly the last of a burst, which no later entry would
                // reveal as a gap: read whatever the store has beyond what was sent.
                Ok(()) = losses.changed() => {
                    if self.last_seq.is_some() {
                        self.s.metrics.ws_gap_fills.inc();
                        if let Err(e) = self.catch_up(None).await {
                            return e.into();
                        }
                    }
                }
                Some((r, res)) = sends.next(), if !sends.is_empty() => {
                    if let Err(e) = self.send_answer(r, res).await {
                        return e.into();
                    }
                }
                _ = keepalive.tick() => {
                    if let Err(e) = self.socket.feed(Message::Ping(Default::default())).await {
                        return Closed::Failed(e.to_string());
                    }
                }
            }
            // Frames are fed, not sent: one flush (one write to the socket) per turn.
            if let Err(e) = self.socket.flush().await {
                return Closed::Failed(e.to_string());
            }
        }
    }

    /// `first` and whatever else is already waiting, so a burst leaves in one write.
    async fn deliveries(
        &mut self,
        first: async_nats::Message,
        entries: &mut async_nats::Subscriber,
    ) -> Result<(), String> {
        self.delivery(first).await?;
        for _ in 0..DELIVERY_BATCH {
            match entries.next().now_or_never() {
                Some(Some(msg)) => self.delivery(msg).await?,
                _ => break,
            }
        }
        Ok(())
    }

    /// One message from the user's subjects: an ephemeral frame, or an inbox entry.
    async fn delivery(&mut self, msg: async_nats::Message) -> Result<(), String> {
        if self.last_seq.is_none() {
            // Before `hello` nothing goes out: an entry is replayed from the store by the
            // hello, and typing from before it is stale.
            return Ok(());
        }
        if Bus::is_ephemeral_subject(&msg.subject) {
            if let Ok(text) = std::str::from_utf8(&msg.payload) {
                self.write(text.to_string()).await?;
            }
            return Ok(());
        }
        let entry = match LiveEntry::decode(msg.payload.as_ref()) {
            // An entry of another epoch than the socket's (the user's inbox moved with a
            // failover or failback): its seq means nothing here. Reread the inbox, which
            // reads the current epoch and tells a stale socket `resync_required`.
            Ok(live) if !live.epoch.is_empty() && self.epoch.as_deref().is_some_and(|e| e != live.epoch) => {
                return self.catch_up(None).await;
            }
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
    ) -> Result<Option<futures::future::BoxFuture<'static, SendResult>>, Closed> {
        // Every frame pays the user's rate limit, like an HTTP request, malformed ones too.
        let admitted = service::admit(&self.s, &self.caller.user);
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
        if let Err(e) = admitted {
            self.error(frame.reference(), e).await?;
            return Ok(None);
        }
        if !matches!(frame, ClientFrame::Ping) {
            // Like every HTTP call, every frame that reads or writes for the user checks
            // the directory: the region may have stopped serving the user since the upgrade.
            match self.moved_away().await {
                Ok(None) => {}
                Ok(Some(moved)) => return Err(Closed::Moved(moved)),
                // When it cannot tell, it refuses (docs/design.md §5), and the client retries.
                Err(e) => {
                    self.error(frame.reference(), e).await?;
                    return Ok(None);
                }
            }
        }
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
                durability,
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
                        let send = async {
                            let requested = crate::durability::requested_in_frame(durability.as_deref())?;
                            service::send_message(&s, &caller, &conversation_id, message, requested).await
                        };
                        let res = span.scope(send).await;
                        if let Err(e) = &res {
                            span.set_attribute("meridian.error", e.code);
                            // As for HTTP: a refused send is the client's error, not ours.
                            if e.status.is_server_error() {
                                span.set_error(e.message.clone());
                            }
                        }
                        (reference, res.map(|accepted| json!(accepted)))
                    }
                    .instrument(log),
                )));
            }
            ClientFrame::Typing {
                reference,
                conversation_id,
            } => {
                if let Err(e) = service::typing(&self.s, &self.caller, &conversation_id).await {
                    self.error(reference, e).await?;
                }
            }
        }
        Ok(None)
    }

    /// Where the user is served now, when the directory says that is not here.
    async fn moved_away(&mut self) -> ApiResult<Option<WrongRegion>> {
        let s = self.s.clone();
        Ok(s.store
            .user(&self.caller.user)
            .await?
            .and_then(|view| WrongRegion::of(&s.cfg, &view)))
    }

    async fn send_answer(&mut self, reference: Value, res: ApiResult<Value>) -> Result<(), String> {
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
            // No hello yet (`delivery` keeps these away): the hello replays it.
            None => Ok(()),
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
            let page = service::inbox_page(
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
        self.s.metrics.observe_delivery(entry);
        self.write(crate::render::entry_frame(entry)).await
    }

    /// Queues a frame; the serve loop flushes once per turn.
    async fn write(&mut self, text: String) -> Result<(), String> {
        self.socket
            .feed(Message::Text(text.into()))
            .await
            .map_err(|e| e.to_string())
    }
}

fn wrong_region_close() -> CloseFrame {
    CloseFrame {
        code: CLOSE_WRONG_REGION,
        reason: Utf8Bytes::from_static("wrong_region"),
    }
}

/// Sleeps until the token's `exp` (seconds since the Unix epoch).
async fn token_expiry(expires_at_s: u64) {
    let now_ms = crate::live::now_ms();
    let left_ms = expires_at_s.saturating_mul(1000).saturating_sub(now_ms);
    tokio::time::sleep(Duration::from_millis(left_ms)).await;
}

/// Whether a read failed because the client's frame is over the frame limit.
fn is_too_large(e: &axum::Error) -> bool {
    use std::error::Error as _;
    e.source()
        .and_then(|inner| inner.downcast_ref::<WsError>())
        .is_some_and(|e| matches!(e, WsError::Capacity(CapacityError::MessageTooLong { .. })))
}
