//! The invariants checked at the end of every drill, against what the workload recorded and
//! what every region stores:
//!
//! 1. all regions converge: every `GET /v1/admin/digest` settled and equal (bounded wait;
//!    the time it took is `converge_s`);
//! 2. every acknowledged message is in every region's storage timeline exactly once (read
//!    through `GET /v1/admin/conversations/{cid}/messages`);
//! 3. every recipient's device received it exactly once (WebSocket, sync or resync);
//! 4. every device's inbox seqs have no gap within an epoch;
//! 5. read indexes never moved back (the workload's read-back evidence);
//! 6. all regions' digests are equal.
//!
//! A violation carries its evidence: which message, where it was expected, what was found.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::record::{admin_call, InboxSpan, RegionTarget, Via, WorkloadRecord};

/// One broken invariant, with its evidence.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Violation {
    /// `converge`, `digests_equal`, `stored_once`, `delivered_once`, `inbox_gap_free`,
    /// `read_index_monotonic`, or `storage_readable`.
    pub invariant: String,
    pub message_id: Option<String>,
    pub conversation_id: Option<String>,
    pub region: Option<String>,
    pub user: Option<String>,
    pub expected: String,
    pub found: String,
}

/// The checker's verdict.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CheckOutcome {
    pub acked: u64,
    /// Acked messages missing from at least one region's storage timeline.
    pub lost: u64,
    /// Acked messages stored more than once in at least one region.
    pub duplicated: u64,
    /// Seconds until every region's digest was settled and equal (`None`: not within the
    /// bound).
    pub converge_s: Option<f64>,
    pub digests_equal: bool,
    /// The last digest read per region.
    pub digests: BTreeMap<String, String>,
    pub violations: Vec<Violation>,
}

impl CheckOutcome {
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }
}

/// Violations kept in full; beyond this many, one more says how many were left out (the
/// counts stay exact).
pub const MAX_VIOLATIONS: usize = 1000;
/// Largest page of the admin timeline read.
const TIMELINE_PAGE: usize = 1000;
/// Bound on the pages read of one conversation in one region.
const MAX_TIMELINE_PAGES: usize = 100_000;

struct Findings {
    violations: Vec<Violation>,
    left_out: u64,
}

impl Findings {
    fn push(&mut self, v: Violation) {
        if self.violations.len() < MAX_VIOLATIONS {
            self.violations.push(v);
        } else {
            self.left_out += 1;
        }
    }
}

fn violation(invariant: &str, expected: impl Into<String>, found: impl Into<String>) -> Violation {
    Violation {
        invariant: invariant.to_string(),
        message_id: None,
        conversation_id: None,
        region: None,
        user: None,
        expected: expected.into(),
        found: found.into(),
    }
}

/// Checks `record` against every region in `regions`.
pub async fn check(
    record: &WorkloadRecord,
    regions: &[RegionTarget],
    admin_key: &str,
    converge_timeout: Duration,
) -> CheckOutcome {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap_or_default();
    let mut f = Findings {
        violations: Vec::new(),
        left_out: 0,
    };

    // 1 and 6: convergence and equal digests.
    let started = Instant::now();
    let mut digests = BTreeMap::new();
    let mut converge_s = None;
    let mut last_problem = String::new();
    // The first reading of a run of settled, equal digests: a run of two readings counts
    // (one could catch every region between the same two events of a stream still moving).
    let mut equal_since: Option<(f64, String)> = None;
    loop {
        let mut settled = true;
        digests.clear();
        last_problem.clear();
        for r in regions {
            match admin_call(
                &http,
                &r.endpoint,
                admin_key,
                reqwest::Method::GET,
                "/v1/admin/digest",
                None,
            )
            .await
            {
                Ok((200, b)) => {
                    settled &= b["settled"].as_bool().unwrap_or(false);
                    digests.insert(
                        r.region.clone(),
                        b["digest"].as_str().unwrap_or_default().to_string(),
                    );
                }
                Ok((st, b)) => {
                    settled = false;
                    last_problem = format!("{}: {st} {b}", r.region);
                }
                Err(e) => {
                    settled = false;
                    last_problem = format!("{}: {e}", r.region);
                }
            }
        }
        let equal =
            digests.len() == regions.len() && digests.values().all(|d| Some(d) == digests.values().next());
        if settled && equal {
            let digest = digests.values().next().cloned().unwrap_or_default();
            match &equal_since {
                Some((at, d)) if *d == digest => {
                    converge_s = Some(*at);
                    break;
                }
                _ => equal_since = Some((started.elapsed().as_secs_f64(), digest)),
            }
        } else {
            equal_since = None;
        }
        if started.elapsed() >= converge_timeout {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let digests_equal =
        digests.len() == regions.len() && digests.values().all(|d| Some(d) == digests.values().next());
    if converge_s.is_none() {
        f.push(violation(
            "converge",
            format!("every region's digest settled and equal within {converge_timeout:?}"),
            if last_problem.is_empty() {
                format!("digests {digests:?}")
            } else {
                format!("digests {digests:?}; {last_problem}")
            },
        ));
    }
    if !digests_equal {
        f.push(violation(
            "digests_equal",
            "the same digest in every region",
            format!("{digests:?}"),
        ));
    }

    // 2: every acked message stored exactly once in every region.
    let mut by_conversation: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, a) in record.acked.iter().enumerate() {
        by_conversation
            .entry(a.conversation_id.as_str())
            .or_default()
            .push(i);
    }
    let mut lost = vec![false; record.acked.len()];
    let mut duplicated = vec![false; record.acked.len()];
    for r in regions {
        for (cid, acked) in &by_conversation {
            let stored = match read_timeline(&http, r, admin_key, cid).await {
                Ok(s) => s,
                Err(e) => {
                    let mut v = violation("storage_readable", "the conversation's timeline", e);
                    v.region = Some(r.region.clone());
                    v.conversation_id = Some(cid.to_string());
                    f.push(v);
                    Stored::default()
                }
            };
            for &i in acked {
                let a = &record.acked[i];
                let by_id = stored
                    .by_id
                    .get(&a.message_id)
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                // The same send stored again under another id (a retry not deduplicated)
                // is a duplicate too.
                let others: Vec<String> = stored
                    .by_client_msg_id
                    .get(&(a.sender.clone(), a.client_msg_id.clone()))
                    .into_iter()
                    .flatten()
                    .filter(|(id, _)| *id != a.message_id)
                    .map(|(id, d)| format!("message {id}: {d}"))
                    .collect();
                let found: Vec<String> = by_id.iter().cloned().chain(others).collect();
                if found.len() == 1 && by_id.len() == 1 {
                    continue;
                }
                if found.is_empty() {
                    lost[i] = true;
                } else {
                    duplicated[i] = true;
                }
                f.push(Violation {
                    invariant: "stored_once".into(),
                    message_id: Some(a.message_id.clone()),
                    conversation_id: Some(a.conversation_id.clone()),
                    region: Some(r.region.clone()),
                    user: Some(a.sender.clone()),
                    expected: format!(
                        "once in the storage timeline (client_msg_id {}, acked by {} at {} ms)",
                        a.client_msg_id, a.region, a.acked_at_ms
                    ),
                    found: if found.is_empty() {
                        format!("absent from the {} messages of the timeline", stored.messages)
                    } else {
                        format!("{} times: {}", found.len(), found.join("; "))
                    },
                });
            }
        }
    }

    // 3: every recipient's every device received it exactly once.
    let mut receipts: HashMap<(&str, &str, &str), Vec<Via>> = HashMap::new();
    for rc in &record.receipts {
        receipts
            .entry((rc.user.as_str(), rc.device.as_str(), rc.message_id.as_str()))
            .or_default()
            .push(rc.via);
    }
    let one_device = vec![String::new()];
    for a in &record.acked {
        for user in &a.recipients {
            let devices = record.devices.get(user).unwrap_or(&one_device);
            for device in devices {
                let vias = receipts
                    .get(&(user.as_str(), device.as_str(), a.message_id.as_str()))
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                if vias.len() == 1 {
                    continue;
                }
                f.push(Violation {
                    invariant: "delivered_once".into(),
                    message_id: Some(a.message_id.clone()),
                    conversation_id: Some(a.conversation_id.clone()),
                    region: None,
                    user: Some(user.clone()),
                    expected: format!("received once by device {device} of {user}"),
                    found: if vias.is_empty() {
                        "never received".to_string()
                    } else {
                        format!("received {} times, via {vias:?}", vias.len())
                    },
                });
            }
        }
    }

    // 4: inbox seqs gap-free within an epoch, per device.
    let mut spans: BTreeMap<(&str, &str, &str), Vec<&InboxSpan>> = BTreeMap::new();
    for s in &record.inbox {
        spans
            .entry((s.user.as_str(), s.device.as_str(), s.epoch.as_str()))
            .or_default()
            .push(s);
    }
    for ((user, device, epoch), mut list) in spans {
        list.sort_by_key(|s| (s.after, s.last));
        let mut held = list[0].last;
        for s in &list[1..] {
            if s.after > held {
                let mut v = violation(
                    "inbox_gap_free",
                    format!("device {device} handed seq {} of epoch {epoch} next", held + 1),
                    format!(
                        "next seq handed was {} (seqs {}..={} never handed)",
                        s.after + 1,
                        held + 1,
                        s.after
                    ),
                );
                v.user = Some(user.to_string());
                f.push(v);
            }
            held = held.max(s.last);
        }
    }

    // 5: read indexes never moved back.
    for line in &record.read_regressions {
        f.push(violation(
            "read_index_monotonic",
            "a read index that never moves back",
            line.clone(),
        ));
    }

    let lost_n = lost.iter().filter(|x| **x).count() as u64;
    let dup_n = duplicated.iter().filter(|x| **x).count() as u64;
    if f.left_out > 0 {
        let left_out = f.left_out;
        f.violations.push(violation(
            "truncated",
            format!("at most {MAX_VIOLATIONS} violations listed"),
            format!("{left_out} more left out"),
        ));
    }
    CheckOutcome {
        acked: record.acked.len() as u64,
        lost: lost_n,
        duplicated: dup_n,
        converge_s,
        digests_equal,
        digests,
        violations: f.violations,
    }
}

/// What one region stores of a conversation.
#[derive(Default)]
struct Stored {
    /// Message id → each stored copy, described.
    by_id: HashMap<String, Vec<String>>,
    /// (sender, client_msg_id) → (message id, description) of each message.
    by_client_msg_id: HashMap<(String, String), Vec<(String, String)>>,
    messages: usize,
}

/// A region's storage timeline of `cid`, through the admin timeline read.
async fn read_timeline(
    http: &reqwest::Client,
    r: &RegionTarget,
    admin_key: &str,
    cid: &str,
) -> Result<Stored, String> {
    let mut out = Stored::default();
    let mut after = String::new();
    for _ in 0..MAX_TIMELINE_PAGES {
        let path = format!("/v1/admin/conversations/{cid}/messages?limit={TIMELINE_PAGE}&after={after}");
        let (st, body) = admin_call(http, &r.endpoint, admin_key, reqwest::Method::GET, &path, None)
            .await
            .map_err(|e| e.to_string())?;
        if st == 404 {
            return Ok(out); // the region holds no such conversation: every message is absent
        }
        if st != 200 {
            return Err(format!("{st} {body}"));
        }
        for m in body["messages"].as_array().into_iter().flatten() {
            let id = m["message_id"].as_str().unwrap_or_default().to_string();
            let key = (
                m["sender"].as_str().unwrap_or_default().to_string(),
                m["client_msg_id"].as_str().unwrap_or_default().to_string(),
            );
            out.by_id.entry(id.clone()).or_default().push(describe(m));
            out.by_client_msg_id
                .entry(key)
                .or_default()
                .push((id, describe(m)));
            out.messages += 1;
        }
        match body["next_cursor"].as_str() {
            Some(next) => after = next.to_string(),
            None => return Ok(out),
        }
    }
    Err(format!("more than {MAX_TIMELINE_PAGES} pages"))
}

fn describe(m: &Value) -> String {
    format!(
        "cursor {} client_msg_id {} sender {} recalled {}",
        m["cursor"].as_str().unwrap_or("?"),
        m["client_msg_id"].as_str().unwrap_or("?"),
        m["sender"].as_str().unwrap_or("?"),
        m["recalled"]
    )
}
