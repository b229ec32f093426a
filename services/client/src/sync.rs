//! The WebSocket sync loop.
//!
//! A background task owns the socket. It says `hello` from the device checkpoint, hands
//! entries out in seq order exactly once, pulls any gap over HTTP before going on, reconnects
//! with backoff when the socket drops (at once, with a fresh token from the client's
//! [`crate::TokenProvider`], when the gateway closes it with 4401 at the token's expiry),
//! follows the user's serving region (a `wrong_region` frame or close code 4421: it switches
//! the client to the endpoint the gateway names and reconnects there at once), and
//! reports [`SyncEvent::ResyncRequired`] when the
//! checkpoint cannot be continued (the inbox epoch changed, or the checkpoint fell out of the
//! TTL), after reading the storage timelines itself and handing out what the device missed
//! ([`SyncEvent::Recovered`], deduplicated by message id against [`Timelines`]); it then
//! carries on from the new epoch's head.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::{Client, ClientError, Entry, Timelines};

/// Where a device is in its inbox. Persist it (it is `Serialize`) to resume after restarts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub epoch: Option<String>,
    /// The last seq the app received.
    pub seq: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum SyncEvent {
    /// The next inbox entry (seq = checkpoint + 1).
    Entry(Entry),
    /// A message the loop found missing while resyncing from the storage timelines (each
    /// once, never one this device already had), handed out before the `ResyncRequired`.
    Recovered {
        conversation_id: String,
        message: crate::Message,
    },
    /// The next inbox entry (seq = checkpoint + 1) is a message this device already has: it
    /// read it from a storage timeline while resyncing, and the message reached the new
    /// epoch's inbox too. Not handed out again, but its seq is, so an app that follows seqs
    /// sees every one and can tell a deduplicated entry from a missing one.
    AlreadyHad {
        seq: u64,
        conversation_id: String,
        message_id: String,
    },
    /// The inbox epoch changed: the loop has read the storage timelines (the `Recovered`
    /// events before this one) and continues from `head` of `epoch`.
    ResyncRequired { epoch: String, head: u64 },
    /// Ephemeral frames (typing, presence) and answers to sends made on this socket.
    Signal(Value),
    /// The socket dropped; the loop reconnects by itself.
    Disconnected(String),
}

/// The gateway's close code when the socket's token expires.
const CLOSE_TOKEN_EXPIRED: u16 = 4401;
/// The gateway's close code after a `wrong_region` frame: another region serves the user.
const CLOSE_WRONG_REGION: u16 = 4421;
/// Entries buffered between the socket task and the app.
const BUFFER: usize = 1024;
const GAP_PAGE: usize = 500;

/// The app's end of the sync loop. Dropping it stops the loop.
pub struct SyncStream {
    rx: mpsc::Receiver<Result<SyncEvent, ClientError>>,
    /// The loop's own position and timelines: ahead of the app by what is buffered.
    checkpoint: Arc<Mutex<Checkpoint>>,
    timelines: Arc<Mutex<Timelines>>,
    /// What the app has taken: a resume from these hands out exactly what it has not.
    handed: Checkpoint,
    handed_timelines: Timelines,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SyncStream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SyncStream {
    pub(crate) fn new(client: Client, checkpoint: Checkpoint, timelines: Timelines) -> SyncStream {
        let (tx, rx) = mpsc::channel(BUFFER);
        let handed = checkpoint.clone();
        let handed_timelines = timelines.clone();
        let checkpoint = Arc::new(Mutex::new(checkpoint));
        let timelines = Arc::new(Mutex::new(timelines));
        let task = tokio::spawn(run(client, checkpoint.clone(), timelines.clone(), tx));
        SyncStream {
            rx,
            checkpoint,
            timelines,
            handed,
            handed_timelines,
            task,
        }
    }

    /// What the device holds of the storage timelines, as of the last event the app took
    /// (persist it with the checkpoint).
    pub fn timelines(&self) -> Timelines {
        self.handed_timelines.clone()
    }

    /// The next event; `None` only if the loop ended (it runs until dropped).
    pub async fn next(&mut self) -> Option<Result<SyncEvent, ClientError>> {
        let ev = self.rx.recv().await;
        if let Some(Ok(ev)) = &ev {
            self.took(ev);
        }
        ev
    }

    /// The checkpoint after the last entry the app took (not what the loop has buffered:
    /// resuming from it after a drop hands the buffered entries out again).
    pub fn checkpoint(&self) -> Checkpoint {
        self.handed.clone()
    }

    /// The loop learns the epoch before it hands out the first entry; the app's checkpoint
    /// takes it with that entry.
    fn learn_epoch(&mut self) {
        if self.handed.epoch.is_none() {
            self.handed.epoch = self
                .checkpoint
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .epoch
                .clone();
        }
    }

    /// Moves the app's checkpoint and timelines past `ev`, as the loop moved its own when it
    /// emitted it.
    fn took(&mut self, ev: &SyncEvent) {
        match ev {
            SyncEvent::Entry(e) => {
                self.learn_epoch();
                self.handed.seq = e.seq;
                if let (true, Some(id)) = (e.kind == "message", &e.message_id) {
                    self.handed_timelines.seen.insert(id.clone());
                }
            }
            SyncEvent::AlreadyHad { seq, .. } => {
                self.learn_epoch();
                self.handed.seq = *seq;
            }
            SyncEvent::Recovered {
                conversation_id,
                message,
            } => {
                self.handed_timelines.seen.insert(message.message_id.clone());
                self.handed_timelines
                    .cursors
                    .insert(conversation_id.clone(), message.cursor.clone());
            }
            SyncEvent::ResyncRequired { epoch, head } => {
                self.handed = Checkpoint {
                    epoch: Some(epoch.clone()),
                    seq: *head,
                };
                // The resync read each timeline to its end (past messages the device had):
                // its cursors are where a later resync starts.
                let cursors = self
                    .timelines
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .cursors
                    .clone();
                self.handed_timelines.cursors.extend(cursors);
            }
            SyncEvent::Signal(_) | SyncEvent::Disconnected(_) => {}
        }
    }
}

struct Loop {
    client: Client,
    checkpoint: Arc<Mutex<Checkpoint>>,
    timelines: Arc<Mutex<Timelines>>,
    tx: mpsc::Sender<Result<SyncEvent, ClientError>>,
}

async fn run(
    client: Client,
    checkpoint: Arc<Mutex<Checkpoint>>,
    timelines: Arc<Mutex<Timelines>>,
    tx: mpsc::Sender<Result<SyncEvent, ClientError>>,
) {
    let l = Loop {
        client,
        checkpoint,
        timelines,
        tx,
    };
    let mut backoff = Duration::from_millis(100);
    // Whether the last session ended by following the user to another region: a second
    // move in a row backs off like any failure, so two gateways that disagree about where
    // the user is served cannot make the loop spin.
    let mut just_moved = false;
    loop {
        let moved = std::mem::take(&mut just_moved);
        match l.session().await {
            Ok(()) => return, // the app went away
            Err(ClientError::WrongRegion { region, endpoint }) => {
                let text = format!("served by region {region} ({endpoint})");
                if l.tx.send(Ok(SyncEvent::Disconnected(text))).await.is_err() {
                    return;
                }
                if !moved {
                    just_moved = true;
                    backoff = Duration::from_millis(100);
                    continue;
                }
            }
            Err(ClientError::TokenExpired) => {
                if l.tx
                    .send(Ok(SyncEvent::Disconnected("token expired".into())))
                    .await
                    .is_err()
                {
                    return;
                }
                // Reconnect at once with a fresh token; without one, report and retry slowly.
                match l.client.refresh_token().await {
                    Ok(()) => {
                        backoff = Duration::from_millis(100);
                        continue;
                    }
                    Err(e) => {
                        let _ = l.tx.send(Err(e)).await;
                        backoff = Duration::from_secs(30);
                    }
                }
            }
            Err(e) => {
                if l.tx
                    .send(Ok(SyncEvent::Disconnected(e.to_string())))
                    .await
                    .is_err()
                {
                    return;
                }
                // Permanent errors (a bad token) are reported and retried slowly.
                if let ClientError::Api { status, .. } = &e {
                    if *status < 500 && *status != 429 {
                        let _ = l.tx.send(Err(e)).await;
                        backoff = Duration::from_secs(30);
                    }
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

impl Loop {
    fn cp(&self) -> Checkpoint {
        self.checkpoint.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_cp(&self, cp: Checkpoint) {
        *self.checkpoint.lock().unwrap_or_else(|p| p.into_inner()) = cp;
    }

    /// Emits an event; `Err` when the app dropped the stream.
    async fn emit(&self, ev: SyncEvent) -> Result<(), ()> {
        self.tx.send(Ok(ev)).await.map_err(|_| ())
    }

    /// One connection's life. `Ok(())` means the app is gone; errors mean reconnect.
    async fn session(&self) -> Result<(), ClientError> {
        // Check the checkpoint over HTTP first: it learns the epoch and turns a stale
        // checkpoint into a resync before anything is streamed.
        if self.catch_up(None).await.is_err() {
            return Ok(());
        }
        let ws_url = format!(
            "{}/v1/ws?token={}",
            self.client.base_url().replacen("http", "ws", 1),
            self.client.token()
        );
        let (mut socket, _) = tokio_tungstenite::connect_async(ws_url)
            .await
            .map_err(|e| match e {
                tokio_tungstenite::tungstenite::Error::Http(resp) if resp.status() == 401 => {
                    ClientError::TokenExpired
                }
                // A gateway may refuse the upgrade itself rather than say so in a frame.
                tokio_tungstenite::tungstenite::Error::Http(resp) if resp.status() == 421 => {
                    let body: Value = resp
                        .body()
                        .as_deref()
                        .and_then(|b| serde_json::from_slice(b).ok())
                        .unwrap_or_default();
                    self.moved(&body)
                }
                e => ClientError::Transport(e.to_string()),
            })?;
        let cp = self.cp();
        socket
            .send(WsMessage::text(
                json!({"op": "hello", "after": cp.seq, "epoch": cp.epoch}).to_string(),
            ))
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        while let Some(frame) = socket.next().await {
            let frame = frame.map_err(|e| ClientError::Transport(e.to_string()))?;
            if let WsMessage::Close(Some(close)) = &frame {
                match u16::from(close.code) {
                    CLOSE_TOKEN_EXPIRED => return Err(ClientError::TokenExpired),
                    // Without the frame (or after it): the next session's first call over
                    // HTTP is answered 421 with the endpoint, and follows it.
                    CLOSE_WRONG_REGION => {
                        return Err(ClientError::WrongRegion {
                            region: String::new(),
                            endpoint: String::new(),
                        })
                    }
                    _ => {}
                }
            }
            let WsMessage::Text(text) = frame else { continue };
            let v: Value =
                serde_json::from_str(text.as_str()).map_err(|e| ClientError::Decode(e.to_string()))?;
            let gone = match v["op"].as_str() {
                Some("entry") => {
                    let entry = Entry::from_value(v)?;
                    let last = self.cp().seq;
                    if entry.seq <= last {
                        Ok(()) // already handed out
                    } else if entry.seq == last + 1 {
                        self.deliver(entry).await
                    } else {
                        // A gap: pull what is missing before this entry.
                        match self.catch_up(Some(entry.seq - 1)).await {
                            Ok(()) if self.cp().seq + 1 == entry.seq => self.deliver(entry).await,
                            other => other,
                        }
                    }
                }
                Some("wrong_region") => return Err(self.moved(&v)),
                Some("resync_required") => {
                    let epoch = v["epoch"].as_str().unwrap_or_default().to_string();
                    let head = v["head"].as_u64().unwrap_or(0);
                    self.resync(epoch, head).await
                }
                _ => self.emit(SyncEvent::Signal(v)).await,
            };
            if gone.is_err() {
                return Ok(());
            }
        }
        Err(ClientError::Transport("socket closed".into()))
    }

    /// Switches the client to the endpoint of a `wrong_region` answer (frame or body).
    fn moved(&self, answer: &Value) -> ClientError {
        let region = answer["region"].as_str().unwrap_or_default().to_string();
        let endpoint = answer["endpoint"].as_str().unwrap_or_default().to_string();
        self.client.follow(&endpoint);
        ClientError::WrongRegion { region, endpoint }
    }

    async fn deliver(&self, entry: Entry) -> Result<(), ()> {
        // A message already read from a timeline during a resync (it also reached the new
        // epoch's inbox) is not handed out twice.
        let fresh = match (entry.kind == "message", &entry.message_id) {
            (true, Some(id)) => self
                .timelines
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .seen
                .insert(id.clone()),
            _ => true,
        };
        let mut cp = self.cp();
        cp.seq = entry.seq;
        self.set_cp(cp);
        if !fresh {
            return self
                .emit(SyncEvent::AlreadyHad {
                    seq: entry.seq,
                    conversation_id: entry.conversation_id,
                    message_id: entry.message_id.unwrap_or_default(),
                })
                .await;
        }
        self.emit(SyncEvent::Entry(entry)).await
    }

    /// Reads the storage timelines (bounded retries; a last failure is reported to the app,
    /// which can call [`Client::resync_timelines`] itself), hands out what was missing,
    /// then continues at `head` of the new epoch.
    async fn resync(&self, epoch: String, head: u64) -> Result<(), ()> {
        let mut backoff = Duration::from_millis(100);
        for attempt in 1..=5 {
            let mut t = self.timelines.lock().unwrap_or_else(|p| p.into_inner()).clone();
            match self.client.resync_timelines(&mut t).await {
                Ok(found) => {
                    *self.timelines.lock().unwrap_or_else(|p| p.into_inner()) = t;
                    for (conversation_id, message) in found {
                        self.emit(SyncEvent::Recovered {
                            conversation_id,
                            message,
                        })
                        .await?;
                    }
                    break;
                }
                Err(e) if attempt == 5 => {
                    self.tx.send(Err(e)).await.map_err(|_| ())?;
                }
                Err(e) => {
                    tracing::debug!(error = %e, attempt, "reading the timelines failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
            }
        }
        self.set_cp(Checkpoint {
            epoch: Some(epoch.clone()),
            seq: head,
        });
        self.emit(SyncEvent::ResyncRequired { epoch, head }).await
    }

    /// Pulls entries over HTTP after the checkpoint, through `upto` (or to the head).
    /// Transport errors are logged and left to the socket; `Err` means the app is gone.
    async fn catch_up(&self, upto: Option<u64>) -> Result<(), ()> {
        loop {
            let cp = self.cp();
            if upto.is_some_and(|u| cp.seq >= u) {
                return Ok(());
            }
            match self.client.sync_page(cp.seq, cp.epoch.as_deref(), GAP_PAGE).await {
                Ok(page) => {
                    if cp.epoch.is_none() {
                        self.set_cp(Checkpoint {
                            epoch: Some(page.epoch.clone()),
                            seq: cp.seq,
                        });
                    }
                    for e in page.entries {
                        if upto.is_some_and(|u| e.seq > u) {
                            return Ok(());
                        }
                        self.deliver(e).await?;
                    }
                    if !page.has_more {
                        return Ok(());
                    }
                }
                Err(ClientError::ResyncRequired { epoch, head }) => return self.resync(epoch, head).await,
                Err(e) => {
                    tracing::debug!(error = %e, "catch-up over HTTP failed");
                    return Ok(());
                }
            }
        }
    }
}
