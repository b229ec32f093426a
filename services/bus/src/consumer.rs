//! [`EventConsumer`]: a durable pull consumer that hands out a stream's events in order and
//! without holes.
//!
//! A pull consumer alone does not promise that. Messages buffered for a pull subscription
//! that is torn down (a NATS restart, a missed heartbeat, a cancelled caller) stay pending
//! on the server until their ack wait runs out, while newer ones keep flowing; and after a
//! server is killed it may redeliver what was already acked (docs/design.md §4). With
//! `AckPolicy::All` an applier acking a later event would then silently cover the skipped
//! one. So the consumer tracks the sequence it expects next and:
//! - drops anything below it (a redelivery of something already handed out);
//! - on anything above it, asks the stream whether the missing sequences exist at all (a
//!   stream can lack them: aged out by `max_age`, or a mirror that skipped ahead). If they
//!   exist, it resets the durable to the expected sequence (JetStream's consumer reset,
//!   nats-server 2.14) and pulls again; if they do not, it moves on and logs the hole;
//! - resets the durable to the expected sequence whenever it (re)builds its pull
//!   subscription, which also aligns it with the applier's store checkpoint at start.
//!
//! Sequences only mean something within one instance of a stream (see
//! [`crate::StreamState::instance`]): a stream deleted and recreated, or lost with its
//! server's storage, numbers its events from 1 again. The consumer remembers the instance it
//! was opened on and checks it each time it rebuilds its subscription, which every outage
//! that could have replaced the stream (a server restart, a deleted consumer) leads to; if
//! the stream is gone or another instance, it fails with [`BusError::StreamReplaced`] and
//! the caller decides from its own checkpoint where to start in the new one.

use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::Subject;
use futures::{FutureExt, StreamExt};
use meridian_model::events::EventEnvelope;
use prost::Message as _;
use tokio::time::Instant;

use crate::{stream_instance, Bus, BusError, TRACEPARENT, TRACESTATE};

/// Pull requests expire and are re-issued this often, so requests left behind by a torn
/// down subscription do not linger on the server.
const PULL_EXPIRES: Duration = Duration::from_secs(10);
/// The server sends an idle heartbeat this often; two missed ones end the subscription,
/// which is then rebuilt (this is how a silently dead connection is noticed).
const PULL_HEARTBEAT: Duration = Duration::from_secs(2);
/// Longer than any apply batch should take; when it runs out the server redelivers, and the
/// redeliveries are dropped as below the expected sequence.
const ACK_WAIT: Duration = Duration::from_secs(60);
/// Large, so a consumer with acks outstanding never stalls the pull subscription.
const MAX_ACK_PENDING: i64 = 100_000;

/// One event as it came off the stream.
#[derive(Clone, Debug)]
pub struct ReceivedEvent {
    pub stream_seq: u64,
    /// `None` when the payload is not a valid `EventEnvelope`: the applier logs it and moves
    /// its checkpoint past it rather than wedging the stream.
    pub envelope: Option<EventEnvelope>,
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
    /// The `Nats-Msg-Id` it was published with (the event id).
    pub msg_id: Option<String>,
    /// How many times the server has delivered it (1 the first time).
    pub delivered: i64,
    reply: Option<Subject>,
}

/// See the module docs.
pub struct EventConsumer {
    bus: Bus,
    stream_name: String,
    durable: String,
    stream: jetstream::stream::Stream<()>,
    /// The stream instance this consumer was opened on.
    instance: u64,
    consumer: PullConsumer,
    /// Kept to recreate the durable if someone deletes it.
    config: pull::Config,
    messages: Option<pull::Stream>,
    /// The stream sequence the next handed-out event must carry. `None` until the first
    /// reset of an [`Bus::event_consumer`] (which resumes at the durable's ack floor).
    expected: Option<u64>,
    /// Events admitted but not yet handed out (a cancelled `next_batch`, or more than `max`).
    ready: Vec<ReceivedEvent>,
}

enum Admit {
    Event(Box<ReceivedEvent>),
    Skip,
    /// `msg` is past the expected sequence; it is kept so it can be handed out if the hole
    /// turns out to be in the stream itself.
    Hole {
        expected: u64,
        got: u64,
        msg: Box<jetstream::Message>,
    },
}

impl EventConsumer {
    pub(crate) async fn open(
        bus: Bus,
        stream_name: &str,
        durable: &str,
        after_seq: Option<u64>,
    ) -> Result<Self, BusError> {
        if durable.is_empty()
            || !durable
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(BusError::config(
                "durable_name",
                "must be 1+ characters of [A-Za-z0-9_-]",
            ));
        }
        let stream = bus
            .with_api_retry("get stream", || bus.jetstream().get_stream_no_info(stream_name))
            .await?;
        let info = bus.with_api_retry("stream info", || stream.get_info()).await?;
        let instance = stream_instance(&info);
        let config = pull::Config {
            durable_name: Some(durable.to_string()),
            description: Some("Meridian applier: the store checkpoint decides what is new".into()),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::All,
            ack_wait: ACK_WAIT,
            max_ack_pending: MAX_ACK_PENDING,
            ..Default::default()
        };
        let consumer = bus
            .with_api_retry("create consumer", || stream.create_consumer(config.clone()))
            .await?;
        let mut me = Self {
            bus,
            stream_name: stream_name.to_string(),
            durable: durable.to_string(),
            stream,
            instance,
            consumer,
            config,
            messages: None,
            expected: after_seq.map(|s| s + 1),
            ready: Vec::new(),
        };
        me.reset().await?;
        Ok(me)
    }

    /// The stream this consumer reads.
    pub fn stream_name(&self) -> &str {
        &self.stream_name
    }

    /// The instance of the stream this consumer reads (see [`crate::StreamState::instance`]).
    pub fn instance(&self) -> u64 {
        self.instance
    }

    /// The stream sequence the next event handed out will have, when known.
    pub fn expected_seq(&self) -> Option<u64> {
        self.expected
    }

    /// Up to `max` events in stream order, waiting at most `wait` for the first. Each
    /// carries its stream sequence; undecodable payloads come back with `envelope: None`.
    /// An error means NATS is unreachable or JetStream refused; call again after a pause.
    /// Cancel-safe: events taken off the subscription are kept for the next call.
    pub async fn next_batch(&mut self, max: usize, wait: Duration) -> Result<Vec<ReceivedEvent>, BusError> {
        let max = max.max(1);
        if self.ready.len() < max {
            self.fill(max, wait).await?;
        }
        let n = self.ready.len().min(max);
        Ok(self.ready.drain(..n).collect())
    }

    async fn fill(&mut self, max: usize, wait: Duration) -> Result<(), BusError> {
        if self.messages.is_none() {
            self.reset().await?;
            let batch = (max * 2).clamp(64, 4096);
            let messages = self
                .consumer
                .stream()
                .max_messages_per_batch(batch)
                .expires(PULL_EXPIRES)
                .heartbeat(PULL_HEARTBEAT)
                .messages()
                .await
                .map_err(|e| BusError::Unavailable(format!("pull from {}: {e}", self.stream_name)))?;
            self.messages = Some(messages);
        }
        let deadline = Instant::now() + wait;
        while self.ready.len() < max {
            let Some(messages) = self.messages.as_mut() else {
                break;
            };
            // Wait (up to the deadline) only for the first event; after that take what is
            // already buffered, so a batch never adds latency to a lone event.
            let item = if self.ready.is_empty() {
                match tokio::time::timeout_at(deadline, messages.next()).await {
                    Ok(item) => item,
                    Err(_) => break,
                }
            } else {
                match messages.next().now_or_never() {
                    Some(item) => item,
                    None => break,
                }
            };
            let msg = match item {
                Some(Ok(msg)) => msg,
                failed => {
                    let why = match failed {
                        Some(Err(e)) => e.to_string(),
                        _ => "subscription ended".to_string(),
                    };
                    tracing::warn!(stream = %self.stream_name, error = %why, "pull subscription failed; rebuilding");
                    // The next call resets the durable to `expected` and pulls again.
                    self.messages = None;
                    if self.ready.is_empty() {
                        return Err(BusError::Unavailable(format!(
                            "pull from {}: {why}",
                            self.stream_name
                        )));
                    }
                    break;
                }
            };
            match self.admit(msg) {
                Admit::Event(ev) => self.ready.push(*ev),
                Admit::Skip => {}
                Admit::Hole { expected, got, msg } => match self.stream_lacks(expected, got).await {
                    Ok(true) => {
                        tracing::warn!(
                            stream = %self.stream_name, from = expected, to = got - 1,
                            "stream has no events in this range (aged out or skipped by a mirror); moving on"
                        );
                        self.expected = Some(got);
                        if let Admit::Event(ev) = self.admit(*msg) {
                            self.ready.push(*ev);
                        }
                    }
                    lacks => {
                        if let Err(e) = lacks {
                            tracing::warn!(stream = %self.stream_name, error = %e, "could not check a hole");
                        }
                        tracing::info!(
                            stream = %self.stream_name, expected, got,
                            "events skipped by the pull subscription; resetting the consumer"
                        );
                        self.messages = None;
                        break;
                    }
                },
            }
        }
        Ok(())
    }

    /// Acks everything up to and including the last event of `batch` (the consumer uses
    /// `AckPolicy::All`). Acks only keep the server's view of progress tidy (monitoring,
    /// fewer redeliveries); correctness rests on the store checkpoint.
    pub async fn ack(&mut self, batch: &[ReceivedEvent]) -> Result<(), BusError> {
        let Some(last) = batch.last() else { return Ok(()) };
        let Some(reply) = last.reply.clone() else {
            return Ok(());
        };
        let acker = jetstream::message::Acker::new(self.bus.jetstream().clone(), Some(reply));
        acker
            .ack()
            .await
            .map_err(|e| BusError::Unavailable(format!("ack on {}: {e}", self.stream_name)))
    }

    /// Points the durable at `expected` (or at its ack floor when nothing is expected yet),
    /// dropping whatever it had pending.
    async fn reset(&mut self) -> Result<(), BusError> {
        // Drop the old subscription first so its unsubscribe reaches the server before the
        // reset: no leftover pull request can then take the events we reset to.
        self.messages = None;
        self.check_instance().await?;
        let seq = self.expected;
        let mut recreated = false;
        loop {
            match self.stream.reset_consumer(&self.durable, seq).await {
                Ok(resp) => {
                    // The ack floor now sits right below the next event delivered (for a
                    // given n it is n - 1; `reset_seq` itself echoes n, or 1 for a fresh
                    // consumer reset to its floor, so the floor is what to go by).
                    let next = resp.info.ack_floor.stream_sequence + 1;
                    if let Some(want) = seq {
                        if next != want {
                            tracing::warn!(stream = %self.stream_name, want, next, "consumer reset landed elsewhere");
                        }
                    }
                    self.expected = Some(seq.unwrap_or(next));
                    tracing::debug!(stream = %self.stream_name, durable = %self.durable, next = ?self.expected, "consumer reset");
                    return Ok(());
                }
                Err(e) => {
                    let text = e.to_string();
                    // Someone deleted the durable: make it again (it then starts from the
                    // beginning, and the reset puts it back where we are).
                    if !recreated && text.to_ascii_lowercase().contains("not found") {
                        recreated = true;
                        self.consumer = self
                            .stream
                            .create_consumer(self.config.clone())
                            .await
                            .map_err(|e| BusError::Unavailable(format!("recreate consumer: {e}")))?;
                        continue;
                    }
                    return Err(BusError::Unavailable(format!(
                        "reset consumer {} on {}: {text}",
                        self.durable, self.stream_name
                    )));
                }
            }
        }
    }

    /// Fails with [`BusError::StreamReplaced`] if the stream is gone or is no longer the
    /// instance this consumer was opened on.
    async fn check_instance(&self) -> Result<(), BusError> {
        let replaced = |reason: String| BusError::StreamReplaced {
            stream: self.stream_name.clone(),
            reason,
        };
        match self.stream.get_info().await {
            Ok(info) => {
                let now = stream_instance(&info);
                if now == self.instance {
                    Ok(())
                } else {
                    Err(replaced(format!(
                        "opened on instance {}, the stream is now instance {now}",
                        self.instance
                    )))
                }
            }
            Err(e) => {
                let text = e.to_string();
                if text.to_ascii_lowercase().contains("not found") {
                    Err(replaced(text))
                } else {
                    Err(BusError::Unavailable(format!(
                        "stream info of {}: {text}",
                        self.stream_name
                    )))
                }
            }
        }
    }

    fn admit(&mut self, msg: jetstream::Message) -> Admit {
        let (seq, delivered) = match msg.info() {
            Ok(info) => (info.stream_sequence, info.delivered),
            Err(e) => {
                tracing::warn!(stream = %self.stream_name, error = %e, "message without JetStream metadata; ignored");
                return Admit::Skip;
            }
        };
        let expected = *self.expected.get_or_insert(seq);
        if seq < expected {
            return Admit::Skip;
        }
        if seq > expected {
            return Admit::Hole {
                expected,
                got: seq,
                msg: Box::new(msg),
            };
        }
        self.expected = Some(seq + 1);
        Admit::Event(Box::new(received(seq, delivered, msg)))
    }

    /// Whether `stream` really has no events in `[from, to)`: the first event at or after
    /// `from` is `to` itself (or later).
    async fn stream_lacks(&self, from: u64, to: u64) -> Result<bool, BusError> {
        match self.stream.get_first_raw_message_by_subject(">", from).await {
            Ok(m) => Ok(m.sequence >= to),
            Err(e) => {
                let text = e.to_string();
                if text.to_ascii_lowercase().contains("not found") {
                    // Nothing at or after `from` any more (the stream was purged under us):
                    // the event we hold is what there is.
                    Ok(true)
                } else {
                    Err(BusError::Unavailable(format!(
                        "look up {} in {}: {text}",
                        from, self.stream_name
                    )))
                }
            }
        }
    }
}

fn received(seq: u64, delivered: i64, msg: jetstream::Message) -> ReceivedEvent {
    let msg = msg.message;
    let header = |name: &str| {
        msg.headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| v.as_str().to_string())
    };
    let envelope = match EventEnvelope::decode(msg.payload.as_ref()) {
        Ok(env) => Some(env),
        Err(e) => {
            tracing::warn!(seq, error = %e, "undecodable event payload");
            None
        }
    };
    ReceivedEvent {
        stream_seq: seq,
        envelope,
        traceparent: header(TRACEPARENT),
        tracestate: header(TRACESTATE),
        msg_id: header(crate::MSG_ID),
        delivered,
        reply: msg.reply.clone(),
    }
}
