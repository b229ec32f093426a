//! What a drill's workload records (every acknowledged send, every received entry, samples)
//! and what the checker and the report read. Plain serde types; timestamps are unix ms.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use super::DrillError;

/// One region of the deployment under drill: its name and its gateway's base URL.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RegionTarget {
    pub region: String,
    pub endpoint: String,
}

/// A send the gateway answered 202: stored, so it must be everywhere in the end.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AckedSend {
    pub message_id: String,
    pub conversation_id: String,
    pub sender: String,
    pub client_msg_id: String,
    /// The region whose gateway answered the 202.
    pub region: String,
    pub sent_at_ms: u64,
    pub acked_at_ms: u64,
    /// Every member but the sender at send time.
    pub recipients: Vec<String>,
}

/// How an entry reached a device, as the SDK tells it.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Via {
    /// A WebSocket entry frame.
    Live,
    /// An inbox page read over HTTP (catch-up after a reconnect or a gap).
    Sync,
    /// A message found missing in the storage timelines after the inbox epoch changed.
    Resync,
}

/// One message a device received.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Receipt {
    pub user: String,
    pub device: String,
    pub message_id: String,
    pub conversation_id: String,
    pub via: Via,
    /// The inbox epoch and seq of the entry (`None` for a resync, which reads timelines).
    pub epoch: Option<String>,
    pub seq: Option<u64>,
    pub at_ms: u64,
}

/// One second of the workload. Counts are of that second; latency is send → first receipt
/// by a recipient, over the messages first received in that second.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Sample {
    /// Seconds since the workload started, at the end of the second.
    pub t_s: f64,
    pub sent: u64,
    pub acked: u64,
    pub delivered: u64,
    pub errors: u64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

/// A run of consecutive inbox seqs a device was handed within one epoch: every seq in
/// `after + 1 ..= last`. A device's spans of one epoch must join up (`after` of each is
/// `last` of the one before); `last == after` is a start with nothing received yet.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct InboxSpan {
    pub user: String,
    pub device: String,
    pub epoch: String,
    /// The seq the device held before the span (its checkpoint, or the head after a resync).
    pub after: u64,
    pub last: u64,
}

/// Everything a workload run recorded.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct WorkloadRecord {
    pub started_at_ms: u64,
    pub acked: Vec<AckedSend>,
    pub receipts: Vec<Receipt>,
    pub samples: Vec<Sample>,
    /// Ids of messages recalled (they stay in the timelines as tombstones).
    pub recalled: Vec<String>,
    /// Evidence lines: a read index read back lower than one the user saw before.
    pub read_regressions: Vec<String>,
    /// Operations by kind (send, send_failed, history, mark_read, recall, reconnect, ...).
    pub counts: BTreeMap<String, u64>,
    /// Every user's devices (each runs a sync loop): whose receipts the checker expects.
    #[serde(default)]
    pub devices: BTreeMap<String, Vec<String>>,
    /// The inbox seqs every device was handed (see [`InboxSpan`]).
    #[serde(default)]
    pub inbox: Vec<InboxSpan>,
}

/// Unix time in ms.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// An admin call (`X-Admin-Key`) to one region: status and JSON body (`Null` when empty).
pub async fn admin_call(
    http: &reqwest::Client,
    endpoint: &str,
    admin_key: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<(u16, serde_json::Value), DrillError> {
    let http_err = |e: reqwest::Error| DrillError::Http {
        endpoint: endpoint.to_string(),
        message: e.to_string(),
    };
    let mut req = http
        .request(method, format!("{}{path}", endpoint.trim_end_matches('/')))
        .header("X-Admin-Key", admin_key);
    if let Some(b) = body {
        req = req.json(b);
    }
    let resp = req.send().await.map_err(http_err)?;
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await.map_err(http_err)?;
    let value = if bytes.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&bytes).map_err(|e| DrillError::Http {
            endpoint: endpoint.to_string(),
            message: format!("{status}: not JSON: {e}"),
        })?
    };
    Ok((status, value))
}
