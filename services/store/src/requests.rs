//! Client request idempotency (`Idempotency-Key`): one record per (user, route, key) that
//! claims the key, names the event the request publishes, and then holds the first answer.
//!
//! Region-local and written directly (not through the stream): a user is served by one
//! region, and the record only has to outlive the gateway process, not replicate.
//!
//! Why the record names the event id: a request that stops between publishing and
//! recording its answer (a crash, a timeout) leaves a pending claim. Its retry takes the
//! claim over once the lease has passed and publishes the *same* event id, which JetStream's
//! duplicate window and the applier's applied markers turn into a no-op. So two requests
//! with one key can never create two things, even when the first one's fate is unknown.

use meridian_model::{EventId, UserId};
use prost::Message;
use sha2::{Digest, Sha256};

use crate::kv::{prefix_end, ScanOrder};
use crate::records::decode;
use crate::{Result, Store};

/// How long a key is remembered after its request first ran.
pub const REQUEST_RECORD_TTL_MS: u64 = 24 * 3600 * 1000;

/// The record of one idempotency key.
#[derive(Clone, PartialEq, Message)]
pub struct RequestRecord {
    /// Digest of the request the key was first used with.
    #[prost(bytes = "vec", tag = "1")]
    pub fingerprint: Vec<u8>,
    /// The event the request publishes; every attempt publishes this one.
    #[prost(bytes = "vec", tag = "2")]
    pub event_id: Vec<u8>,
    #[prost(uint64, tag = "3")]
    pub claimed_at_ms: u64,
    /// Until when the current attempt holds the key; 0 once it gave up.
    #[prost(uint64, tag = "4")]
    pub lease_until_ms: u64,
    /// The first answer's status; 0 while no attempt has finished.
    #[prost(uint32, tag = "5")]
    pub status: u32,
    /// The first answer's body, opaque to the store.
    #[prost(bytes = "vec", tag = "6")]
    pub answer: Vec<u8>,
}

/// One idempotency key: whose, on which route (method and concrete path), and the key.
#[derive(Debug, Clone, Copy)]
pub struct RequestKey<'a> {
    pub user: &'a UserId,
    pub route: &'a str,
    pub key: &'a str,
}

impl RequestKey<'_> {
    /// Route and key hashed: fixed length, and no separator can make two pairs collide.
    fn digest(&self) -> String {
        let mut h = Sha256::new();
        h.update((self.route.len() as u64).to_be_bytes());
        h.update(self.route.as_bytes());
        h.update(self.key.as_bytes());
        hex::encode(h.finalize())
    }
}

/// What a request carrying a key may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestClaim {
    /// Run it, publishing `event_id` (the first attempt's, when this one takes over).
    Run { event_id: EventId },
    /// It ran before: answer with the first answer.
    Answered { status: u16, answer: Vec<u8> },
    /// Another attempt holds the key right now.
    InProgress,
    /// The key was first used with a different request.
    Mismatch,
}

impl Store {
    /// Claims `req` for a request with `fingerprint` at `now_ms`, holding it for `lease_ms`.
    /// Concurrent claims of one key race in a transaction: one wins, the others see it.
    pub async fn claim_request(
        &self,
        req: &RequestKey<'_>,
        fingerprint: &[u8],
        now_ms: u64,
        lease_ms: u64,
    ) -> Result<RequestClaim> {
        let key = self.keys().request(req.user, &req.digest());
        for _ in 0..3 {
            let mut txn = self.kv().begin().await?;
            let existing: Option<RequestRecord> = match txn.get(&key).await? {
                Some(b) => Some(decode(&key, &b)?),
                None => None,
            };
            let existing =
                existing.filter(|r| r.claimed_at_ms.saturating_add(REQUEST_RECORD_TTL_MS) > now_ms);
            let (record, claim) = match existing {
                Some(r) if r.fingerprint != fingerprint => return Ok(RequestClaim::Mismatch),
                Some(r) if r.status != 0 => {
                    return Ok(RequestClaim::Answered {
                        status: u16::try_from(r.status).unwrap_or(500),
                        answer: r.answer,
                    })
                }
                Some(r) if r.lease_until_ms > now_ms => return Ok(RequestClaim::InProgress),
                Some(mut r) => {
                    let event_id = EventId::from_bytes(&r.event_id)?;
                    r.lease_until_ms = now_ms.saturating_add(lease_ms);
                    (r, RequestClaim::Run { event_id })
                }
                None => {
                    let event_id = EventId::new_v7();
                    let r = RequestRecord {
                        fingerprint: fingerprint.to_vec(),
                        event_id: event_id.as_bytes().to_vec(),
                        claimed_at_ms: now_ms,
                        lease_until_ms: now_ms.saturating_add(lease_ms),
                        status: 0,
                        answer: Vec::new(),
                    };
                    (r, RequestClaim::Run { event_id })
                }
            };
            txn.put(key.clone(), record.encode_to_vec()).await?;
            match txn.commit().await {
                Ok(()) => return Ok(claim),
                // Another attempt claimed it between our read and commit: look again.
                Err(e) if e.is_conflict() => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(RequestClaim::InProgress)
    }

    /// Records the first answer of a claimed request.
    pub async fn finish_request(&self, req: &RequestKey<'_>, status: u16, answer: Vec<u8>) -> Result<()> {
        self.update_request(req, |r| {
            r.status = u32::from(status);
            r.answer.clone_from(&answer);
            r.lease_until_ms = 0;
            true
        })
        .await
    }

    /// Ends a claimed attempt that failed. `forget`: nothing was published (the request was
    /// refused), so the key is free for any request again. Otherwise the claim stays with
    /// its event id and the next attempt takes it over at once.
    pub async fn abandon_request(&self, req: &RequestKey<'_>, forget: bool) -> Result<()> {
        if forget {
            let key = self.keys().request(req.user, &req.digest());
            let mut txn = self.kv().begin().await?;
            txn.delete(key).await?;
            return txn.commit().await;
        }
        self.update_request(req, |r| {
            r.lease_until_ms = 0;
            r.status == 0
        })
        .await
    }

    async fn update_request(
        &self,
        req: &RequestKey<'_>,
        mut change: impl FnMut(&mut RequestRecord) -> bool,
    ) -> Result<()> {
        let key = self.keys().request(req.user, &req.digest());
        loop {
            let mut txn = self.kv().begin().await?;
            let Some(b) = txn.get(&key).await? else {
                return txn.rollback().await;
            };
            let mut record: RequestRecord = decode(&key, &b)?;
            if !change(&mut record) {
                return txn.rollback().await;
            }
            txn.put(key.clone(), record.encode_to_vec()).await?;
            match txn.commit().await {
                Err(e) if e.is_conflict() => continue,
                other => return other,
            }
        }
    }

    /// Deletes request records claimed before `cutoff_ms`; returns how many.
    pub async fn sweep_requests(&self, cutoff_ms: u64) -> Result<usize> {
        const PAGE: usize = 512;
        let family = self.keys().family(b'K');
        let end = prefix_end(&family);
        let mut from = family.clone();
        let mut deleted = 0;
        loop {
            let mut txn = self.kv().begin().await?;
            let rows = txn.scan(&from, &end, PAGE, ScanOrder::Forward).await?;
            let full = rows.len() == PAGE;
            let mut expired = 0;
            for (k, v) in &rows {
                let r: RequestRecord = decode(k, v)?;
                if r.claimed_at_ms < cutoff_ms {
                    txn.delete(k.clone()).await?;
                    expired += 1;
                }
            }
            match txn.commit().await {
                Ok(()) => deleted += expired,
                // A request claimed a key in this page meanwhile; the next sweep gets it.
                Err(e) if e.is_conflict() => {}
                Err(e) => return Err(e),
            }
            match rows.last() {
                Some((k, _)) if full => {
                    from = k.clone();
                    from.push(0);
                }
                _ => return Ok(deleted),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_key_runs_once_is_taken_over_with_its_event_and_expires() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| crate::StoreError::Backend(e.to_string()))?;
        let store = Store::open(&dir.path().join("s").display().to_string(), b"req/").await?;
        let ann = UserId::parse("ann")?;
        let req = RequestKey {
            user: &ann,
            route: "POST /v1/conversations",
            key: "k-1",
        };
        let lease = 1_000;
        let RequestClaim::Run { event_id } = store.claim_request(&req, b"fp", 10, lease).await? else {
            panic!("a new key runs");
        };
        // Held: another attempt waits; another request with the key is a mismatch.
        assert_eq!(
            store.claim_request(&req, b"fp", 20, lease).await?,
            RequestClaim::InProgress
        );
        assert_eq!(
            store.claim_request(&req, b"other", 20, lease).await?,
            RequestClaim::Mismatch
        );
        // The lease passes (the first attempt died): the retry runs with the same event.
        assert_eq!(
            store.claim_request(&req, b"fp", 10 + lease, lease).await?,
            RequestClaim::Run { event_id }
        );
        store.finish_request(&req, 201, b"{\"id\":1}".to_vec()).await?;
        assert_eq!(
            store.claim_request(&req, b"fp", 5_000, lease).await?,
            RequestClaim::Answered {
                status: 201,
                answer: b"{\"id\":1}".to_vec()
            }
        );
        // Keys are per user and route.
        let bob = UserId::parse("bob")?;
        let bobs = RequestKey { user: &bob, ..req };
        assert!(matches!(
            store.claim_request(&bobs, b"fp", 5_000, lease).await?,
            RequestClaim::Run { .. }
        ));
        // A refused request forgets its key; a failed one keeps its event for the retry.
        store.abandon_request(&bobs, true).await?;
        let RequestClaim::Run { event_id: fresh } = store.claim_request(&bobs, b"new", 5_001, lease).await?
        else {
            panic!("a forgotten key runs again");
        };
        store.abandon_request(&bobs, false).await?;
        assert_eq!(
            store.claim_request(&bobs, b"new", 5_002, lease).await?,
            RequestClaim::Run { event_id: fresh }
        );
        // Records expire after the TTL, and the sweeper deletes them.
        assert!(matches!(
            store
                .claim_request(&req, b"other", 10 + REQUEST_RECORD_TTL_MS, lease)
                .await?,
            RequestClaim::Run { .. }
        ));
        assert_eq!(
            store.sweep_requests(5_001).await?,
            0,
            "bob's claim at 5_001 stays"
        );
        assert_eq!(store.sweep_requests(u64::MAX).await?, 2);
        Ok(())
    }
}
