//! Digests of the replicated state. A digest is SHA-256 over every replicated record
//! (namespace stripped) in key order, so two regions' digests are equal exactly when their
//! replicated records are (up to hash collisions). Region-local and derived families
//! (inboxes, checkpoints, applied-event marks, activity) are left out: they legitimately
//! differ between regions. Computed on demand by scanning: an operator call, not a hot path.
//!
//! Covered (`keys::REPLICATED_TAGS`): storage timelines, conversation registers, member
//! records (with their membership history), read indexes, recalls, deleted-for-me marks,
//! per-user settings, message locators (the winning copy's), the user directory, push
//! devices and which region serves each region's users (the epochs derive from it). Left
//! out: inboxes and their heads (fan-out happens only in the serving region), applied
//! markers and checkpoints (per region), and what is derived from covered records in each
//! region (conversation lists `L`, activity `A`, member lists `N`, the latest membership
//! change `J`, read diffusion's windows and markers `W`/`Q`), plus idempotency keys `K`.

use meridian_model::ConversationId;
use sha2::{Digest, Sha256};

use crate::keys::{CONVERSATION_TAGS, REPLICATED_TAGS};
use crate::kv::prefix_end;
use crate::{KvTxn, Result, ScanOrder, Store};

impl Store {
    /// The digest of everything replicated, hex.
    pub async fn digest(&self) -> Result<String> {
        let mut txn = self.kv().begin_read().await?;
        let mut h = Sha256::new();
        for &tag in REPLICATED_TAGS {
            let prefix = self.keys().family(tag);
            self.hash_range(txn.as_mut(), &mut h, &prefix).await?;
        }
        Ok(hex::encode(h.finalize()))
    }

    /// The digest of one conversation's replicated records, hex.
    pub async fn conversation_digest(&self, cid: &ConversationId) -> Result<String> {
        let mut txn = self.kv().begin_read().await?;
        let mut h = Sha256::new();
        for &tag in CONVERSATION_TAGS {
            let exact = self.keys().prefix(tag, &[]);
            // C/cid is a single key; the others are C/cid/... prefixes.
            let mut single = exact.clone();
            single.extend_from_slice(cid.as_str().as_bytes());
            if let Some(v) = txn.get(&single).await? {
                feed(&mut h, &single[self.keys().namespace().len()..], &v);
            }
            let prefix = self.keys().prefix(tag, &[cid.as_str().as_bytes()]);
            self.hash_range(txn.as_mut(), &mut h, &prefix).await?;
        }
        Ok(hex::encode(h.finalize()))
    }

    async fn hash_range(&self, txn: &mut dyn KvTxn, h: &mut Sha256, prefix: &[u8]) -> Result<()> {
        const PAGE: usize = 1024;
        let end = prefix_end(prefix);
        let ns = self.keys().namespace().len();
        let mut from = prefix.to_vec();
        loop {
            let rows = txn.scan(&from, &end, PAGE, ScanOrder::Forward).await?;
            for (k, v) in &rows {
                feed(h, &k[ns..], v);
            }
            match rows.last() {
                Some((k, _)) if rows.len() == PAGE => {
                    from = k.clone();
                    from.push(0);
                }
                _ => return Ok(()),
            }
        }
    }
}

fn feed(h: &mut Sha256, key: &[u8], value: &[u8]) {
    h.update((key.len() as u32).to_be_bytes());
    h.update(key);
    h.update((value.len() as u32).to_be_bytes());
    h.update(value);
}
