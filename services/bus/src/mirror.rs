//! The region's mirrors of the other regions' streams (docs/design.md §3): each region holds
//! a mirror of every other region's `SYNC_<x>`, named like its origin, in its own JetStream
//! domain, copying through the leafnode link with `external.api = "$JS.<x>.API"`. Mirror
//! sequence numbers equal the origin's, so an event is `(stream, seq)` in every region.
//!
//! Health comes from the mirror's `active` age, not its lag: a mirror cut off from its
//! origin reports lag 0 and no error (it cannot know what it is missing), while the time
//! since it last heard from the origin keeps growing.

use std::time::Duration;

use async_nats::jetstream::{self, response::Response};
use meridian_model::RegionId;
use serde::Deserialize;

use crate::{Bus, BusError};

/// How one mirror is doing, from its stream info (see [`Bus::mirror_health`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MirrorHealth {
    /// The region whose stream this mirrors.
    pub region: RegionId,
    /// The mirror's stream name (equal to the origin's).
    pub stream: String,
    /// Events the origin holds that the mirror has not copied yet: the origin's last
    /// sequence (asked of the origin through its domain, `origin_last_seq`) minus the
    /// mirror's, or JetStream's own figure when that is larger. JetStream's figure alone is
    /// refreshed too rarely to show events in flight (0–5 while 50–1,000 were, measured
    /// under the X1 bench) and is 0 while cut off.
    pub lag: u64,
    /// The origin's last sequence, when the origin answered through the link (within
    /// [`ORIGIN_TIMEOUT`]); `None` while it cannot be reached.
    pub origin_last_seq: Option<u64>,
    /// Since the mirror last heard from its origin; `None`: never (or not attached now).
    /// This is the health signal: it grows while the link or the origin is down.
    pub active_age: Option<Duration>,
    /// The mirror's last sequence (equal to the origin's sequence of that event).
    pub last_seq: u64,
    /// What is wrong, when the server or this check knows: the mirror's own error, a
    /// missing mirror stream, or a stream of that name that is not the right mirror.
    pub error: Option<String>,
}

/// The parts of a stream info answer the mirror code reads. Our own type rather than
/// async-nats' `stream::Info` because its `SourceInfo` drops the mirror's `error`.
#[derive(Deserialize)]
struct MirrorStreamInfo {
    config: jetstream::stream::Config,
    state: MirrorStreamState,
    #[serde(default)]
    mirror: Option<MirrorSourceInfo>,
}

#[derive(Deserialize)]
struct MirrorStreamState {
    #[serde(default)]
    last_seq: u64,
}

#[derive(Deserialize)]
struct MirrorSourceInfo {
    #[serde(default)]
    lag: u64,
    /// Nanoseconds since the mirror last heard from its origin; negative: never.
    #[serde(default = "never")]
    active: i64,
    #[serde(default)]
    error: Option<jetstream::Error>,
}

fn never() -> i64 {
    -1
}

/// JetStream's "stream not found" error code.
const STREAM_NOT_FOUND: u64 = 10059;

impl Bus {
    /// The streams this region applies: its own first, then its mirror of each region in
    /// `mirrors`, in that order.
    pub fn applied_streams(&self) -> Vec<String> {
        let cfg = self.config();
        std::iter::once(self.stream())
            .chain(cfg.mirrors.iter().map(|m| cfg.stream_name(m)))
            .collect()
    }

    /// Creates this region's mirror of every region in `mirrors` (idempotent: a correct
    /// mirror is left alone, or only has its limits updated). A stream of a mirror's name
    /// that mirrors something else, or is not a mirror at all, is deleted and created anew:
    /// JetStream does not allow changing what a stream mirrors. That new mirror is a new
    /// stream instance, so appliers apply it from its start (idempotently).
    pub async fn ensure_mirrors(&self) -> Result<(), BusError> {
        for origin in &self.config().mirrors {
            self.ensure_mirror(origin).await?;
        }
        Ok(())
    }

    /// [`Bus::ensure_mirrors`] for the mirror of `origin`'s stream only (the applier's task
    /// for that mirror ensures it before consuming).
    pub async fn ensure_mirror(&self, origin: &RegionId) -> Result<(), BusError> {
        let want = self.mirror_config(origin);
        let name = want.name.clone();
        let Some(current) = self.mirror_stream_info(&name).await? else {
            return self.create_mirror(&want).await;
        };
        if !same_mirror(current.config.mirror.as_ref(), &want) || !current.config.subjects.is_empty() {
            tracing::warn!(
                stream = %name,
                found = ?current.config.mirror,
                "stream is not the mirror of region {origin} it should be; recreating it"
            );
            self.with_api_retry("delete wrong mirror", || {
                self.jetstream().delete_stream(name.as_str())
            })
            .await?;
            return self.create_mirror(&want).await;
        }
        if limits_differ(&current.config, &want) {
            self.with_api_retry("update mirror", || {
                let want = want.clone();
                async move { self.jetstream().update_stream(want).await }
            })
            .await?;
        }
        Ok(())
    }

    async fn create_mirror(&self, want: &jetstream::stream::Config) -> Result<(), BusError> {
        self.with_api_retry("create mirror", || {
            let want = want.clone();
            async move { self.jetstream().create_stream(want).await }
        })
        .await?;
        Ok(())
    }

    /// The stream config of this region's mirror of `origin`'s stream: the same limits as
    /// the region's own stream (a mirror is the other regions' record here), no subjects.
    fn mirror_config(&self, origin: &RegionId) -> jetstream::stream::Config {
        let cfg = self.config();
        let name = cfg.stream_name(origin);
        jetstream::stream::Config {
            description: Some(format!(
                "Meridian: region {}'s mirror of region {origin}'s events",
                cfg.region
            )),
            mirror: Some(jetstream::stream::Source {
                name: name.clone(),
                external: Some(jetstream::stream::External {
                    api_prefix: cfg.domain_api(origin),
                    delivery_prefix: None,
                }),
                ..Default::default()
            }),
            ..self.stored_stream_config(name)
        }
    }

    /// The info of stream `name`; `None` when there is no such stream.
    async fn mirror_stream_info(&self, name: &str) -> Result<Option<MirrorStreamInfo>, BusError> {
        let subject = format!("STREAM.INFO.{name}");
        let answer: Response<MirrorStreamInfo> = self
            .with_api_retry("stream info", || self.jetstream().request(subject.clone(), &()))
            .await?;
        match answer {
            Response::Ok(info) => Ok(Some(info)),
            Response::Err { error } if error.error_code().0 == STREAM_NOT_FOUND => Ok(None),
            Response::Err { error } => Err(BusError::nats("stream info", error)),
        }
    }

    /// How each of this region's mirrors is doing, in `mirrors` order. A missing or wrong
    /// mirror stream is reported in its entry's `error`; `Err` only when JetStream itself
    /// does not answer.
    pub async fn mirror_health(&self) -> Result<Vec<MirrorHealth>, BusError> {
        let cfg = self.config();
        let mut out = Vec::with_capacity(cfg.mirrors.len());
        for origin in &cfg.mirrors {
            let stream = cfg.stream_name(origin);
            let mut health = MirrorHealth {
                region: origin.clone(),
                stream: stream.clone(),
                lag: 0,
                origin_last_seq: None,
                active_age: None,
                last_seq: 0,
                error: None,
            };
            match self.mirror_stream_info(&stream).await? {
                None => {
                    health.error = Some(format!("mirror stream {stream} does not exist"));
                }
                Some(info) => {
                    health.last_seq = info.state.last_seq;
                    match info.mirror {
                        Some(m) if same_mirror(info.config.mirror.as_ref(), &self.mirror_config(origin)) => {
                            health.lag = m.lag;
                            health.active_age = u64::try_from(m.active).ok().map(Duration::from_nanos);
                            health.error = m.error.map(|e| e.to_string());
                        }
                        _ => {
                            health.error = Some(format!(
                                "stream {stream} is not the mirror of region {origin} (ensure_mirrors repairs it)"
                            ));
                        }
                    }
                }
            }
            out.push(health);
        }
        // Each origin's last sequence, asked of all origins at once: a cut link costs one
        // timeout, not one per mirror.
        let origins = futures::future::join_all(out.iter().map(|h| self.origin_last_seq(&h.region))).await;
        for (health, origin) in out.iter_mut().zip(origins) {
            if let Some(last) = origin {
                health.origin_last_seq = Some(last);
                health.lag = health.lag.max(last.saturating_sub(health.last_seq));
            }
        }
        Ok(out)
    }

    /// The last sequence of `origin`'s stream as the origin itself reports it, through its
    /// JetStream domain over the link; `None` when it does not answer in time.
    async fn origin_last_seq(&self, origin: &RegionId) -> Option<u64> {
        let cfg = self.config();
        // The origin's JetStream API under its domain (`$JS.<origin>.API`), over the link.
        let remote = jetstream::with_domain(self.client().clone(), origin.as_str());
        let subject = format!("STREAM.INFO.{}", cfg.stream_name(origin));
        let request = remote.request::<_, (), Response<OriginStreamInfo>>(subject, &());
        match tokio::time::timeout(ORIGIN_TIMEOUT, request).await.ok()?.ok()? {
            Response::Ok(info) => Some(info.state.last_seq),
            Response::Err { .. } => None,
        }
    }
}

/// How long `mirror_health` waits for an origin to report its stream's end.
pub const ORIGIN_TIMEOUT: Duration = Duration::from_millis(500);

#[derive(Deserialize)]
struct OriginStreamInfo {
    state: MirrorStreamState,
}

/// Whether `found` mirrors what `want` mirrors, through the same API prefix.
fn same_mirror(found: Option<&jetstream::stream::Source>, want: &jetstream::stream::Config) -> bool {
    let (Some(found), Some(want)) = (found, want.mirror.as_ref()) else {
        return false;
    };
    let api = |s: &jetstream::stream::Source| s.external.as_ref().map(|e| e.api_prefix.clone());
    found.name == want.name
        && api(found) == api(want)
        && found.filter_subject.as_deref().unwrap_or("").is_empty()
        && found.start_sequence.unwrap_or(0) <= 1
}

/// Whether the limits ensure_mirror sets differ from the stream's.
fn limits_differ(found: &jetstream::stream::Config, want: &jetstream::stream::Config) -> bool {
    found.max_age != want.max_age
        || found.max_bytes != want.max_bytes
        || found.discard != want.discard
        || found.deny_delete != want.deny_delete
        || found.allow_direct != want.allow_direct
        || found.compression != want.compression
        || found.description != want.description
}
