//! Reading single events back from a stream by sequence.

use meridian_model::events::EventEnvelope;
use prost::Message as _;

use crate::{Bus, BusError};

impl Bus {
    /// The event stored at `stream_seq` of this region's stream. The gateway uses it to
    /// answer a deduplicated retry with the original event's HLC (and so its cursor).
    pub async fn get_event(&self, stream_seq: u64) -> Result<EventEnvelope, BusError> {
        let name = self.stream();
        let stream = self
            .with_api_retry("get stream", || self.jetstream().get_stream_no_info(&name))
            .await?;
        let msg = self
            .with_api_retry("get message", || stream.get_raw_message(stream_seq))
            .await?;
        EventEnvelope::decode(msg.payload.as_ref())
            .map_err(|e| BusError::nats("decode event", format!("seq {stream_seq}: {e}")))
    }
}
