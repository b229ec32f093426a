//! What `disk` and `geo` durability (docs/design.md §6) need from the bus.
//!
//! - Group commit: under `jetstream { sync_interval: always }` nats-server fsyncs every
//!   stored message before its PubAck, one fsync per message however many publishes are
//!   pipelined (measured here with nats-server 2.15.1: about 850 acked msg/s pipelined in
//!   batches of 8..512, the same as one at a time). An atomic batch (ADR-50, the stream's
//!   `allow_atomic`) is stored with one fsync: [`Bus::publish_batch`] sends concurrent
//!   sends as one (19,000 msg/s in batches of 64 on the same disk).
//! - Geo acks: [`Bus::mirrored_seq`] asks another region's JetStream, through its domain's
//!   API over the leafnode link, how far its mirror of this region's stream reaches.

use std::time::Duration;

use async_nats::jetstream::message::PublishMessage;
use async_nats::HeaderMap;
use meridian_model::events::EventEnvelope;
use meridian_model::RegionId;
use serde::Deserialize;

use crate::{prepare, Bus, BusError, PublishAck};

/// The most events one atomic batch carries; nats-server refuses batches above 1,000.
pub const MAX_ATOMIC_BATCH: usize = 256;
/// How long the commit of an atomic batch may take before the batch is published the
/// ordinary way (which retries until `publish_timeout_s`).
const COMMIT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long another region's JetStream has to answer a stream info request.
const REMOTE_INFO_TIMEOUT: Duration = Duration::from_secs(2);

const BATCH_ID: &str = "Nats-Batch-Id";
const BATCH_SEQUENCE: &str = "Nats-Batch-Sequence";
const BATCH_COMMIT: &str = "Nats-Batch-Commit";

impl Bus {
    /// Publishes `envs` to the region's stream as atomic batches of up to
    /// [`MAX_ATOMIC_BATCH`] events: JetStream stores each batch whole or not at all, with one
    /// fsync under `sync_interval: always`, and answers only its last message. The events of
    /// a batch get consecutive sequences in slice order.
    ///
    /// A batch that holds an event id the stream already has is refused whole by the server
    /// (error 10201), as is one whose commit is lost to a reconnect or a timeout; such a
    /// batch is published again the ordinary way ([`Bus::publish_events`], same ids), which
    /// answers each event, deduplicated ones with the original's sequence. Either way every
    /// event is in the stream exactly once when this returns `Ok`.
    pub async fn publish_batch(&self, envs: &[EventEnvelope]) -> Result<Vec<PublishAck>, BusError> {
        let mut acks = Vec::with_capacity(envs.len());
        for chunk in envs.chunks(MAX_ATOMIC_BATCH) {
            if chunk.len() == 1 {
                acks.extend(self.publish_events(chunk).await?);
                continue;
            }
            match self.publish_atomic(chunk).await {
                Ok(last_seq) => {
                    let first = last_seq + 1 - chunk.len() as u64;
                    acks.extend((0..chunk.len() as u64).map(|i| PublishAck {
                        stream: self.stream(),
                        stream_seq: first + i,
                        duplicate: false,
                    }));
                }
                Err(reason) => {
                    tracing::debug!(%reason, events = chunk.len(), "atomic batch not committed; publishing one by one");
                    acks.extend(self.publish_events(chunk).await?);
                }
            }
        }
        Ok(acks)
    }

    /// One atomic batch: every message but the last without a reply subject, the last with
    /// the commit header; answers the sequence of the last. Any failure is a reason to fall
    /// back, not an error: the fallback decides.
    async fn publish_atomic(&self, chunk: &[EventEnvelope]) -> Result<u64, String> {
        let prepared = chunk
            .iter()
            .map(prepare)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        let batch_id = meridian_model::EventId::new_v7().to_string();
        let subject = self.inner.events_subject.clone();
        let last = prepared.len() - 1;
        for (i, p) in prepared.iter().enumerate() {
            let mut headers: HeaderMap = p.headers.clone();
            headers.insert(BATCH_ID, batch_id.as_str());
            headers.insert(BATCH_SEQUENCE, (i + 1).to_string().as_str());
            if i < last {
                self.inner
                    .client
                    .publish_with_headers(subject.clone(), headers, p.payload.clone())
                    .await
                    .map_err(|e| e.to_string())?;
                continue;
            }
            headers.insert(BATCH_COMMIT, "1");
            let msg = PublishMessage::build()
                .payload(p.payload.clone())
                .headers(headers);
            let ack = tokio::time::timeout(COMMIT_TIMEOUT, async {
                self.inner
                    .js
                    .send_publish(subject.clone(), msg)
                    .await
                    .map_err(|e| e.to_string())?
                    .await
                    .map_err(|e| e.to_string())
            })
            .await
            .map_err(|_| "commit not acked in time".to_string())??;
            if ack.batch_size != Some(chunk.len() as u64) {
                return Err(format!(
                    "batch committed {:?} of {} events",
                    ack.batch_size,
                    chunk.len()
                ));
            }
            return Ok(ack.sequence);
        }
        Err("empty batch".into())
    }

    /// The highest sequence of this region's stream that `region`'s mirror of it holds:
    /// the mirror's last sequence, read through `$JS.<region>.API` (mirror sequences equal
    /// the origin's). `Ok(None)` when that region has no such mirror (yet).
    pub async fn mirrored_seq(&self, region: &RegionId) -> Result<Option<u64>, BusError> {
        let subject = format!(
            "{}.STREAM.INFO.{}",
            self.inner.cfg.domain_api(region),
            self.inner.stream
        );
        let reply = tokio::time::timeout(
            REMOTE_INFO_TIMEOUT,
            self.inner.client.request(subject.clone(), bytes::Bytes::new()),
        )
        .await
        .map_err(|_| BusError::Unavailable(format!("{subject}: no answer within {REMOTE_INFO_TIMEOUT:?}")))?
        .map_err(|e| BusError::Unavailable(format!("{subject}: {e}")))?;
        let info: RemoteStreamInfo =
            serde_json::from_slice(&reply.payload).map_err(|e| BusError::nats("remote stream info", e))?;
        if let Some(error) = info.error {
            if error.err_code == STREAM_NOT_FOUND {
                return Ok(None);
            }
            return Err(BusError::Nats(format!("{subject}: {}", error.description)));
        }
        if info.mirror.is_none() {
            // A stream of that name that is not a mirror holds something else.
            return Ok(None);
        }
        Ok(Some(info.state.map_or(0, |s| s.last_seq)))
    }
}

const STREAM_NOT_FOUND: u64 = 10059;

#[derive(Deserialize)]
struct RemoteStreamInfo {
    #[serde(default)]
    state: Option<RemoteStreamState>,
    #[serde(default)]
    mirror: Option<serde_json::Value>,
    #[serde(default)]
    error: Option<RemoteApiError>,
}

#[derive(Deserialize)]
struct RemoteStreamState {
    #[serde(default)]
    last_seq: u64,
}

#[derive(Deserialize)]
struct RemoteApiError {
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
}
