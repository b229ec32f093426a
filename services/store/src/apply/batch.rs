//! `Store::apply_batch`: one transaction per batch with the stream checkpoint, bounded by
//! the batch budget.

use meridian_model::events::event_envelope::Body;

use crate::budget::BatchBudget;
use crate::checkpoint::{self, StreamRef};
use crate::{Result, Store};

use super::{now_ms, plan_event, ApplyConfig, ApplyReport, SequencedEvent, Write};

const MAX_CONFLICT_RETRIES: usize = 64;

impl Store {
    /// Applies `events` (from `stream`, in stream order) in one transaction with the stream
    /// checkpoint: all of them, or a prefix when the staged writes reach a bound of `cfg`
    /// (`ApplyReport::consumed` says how many; the checkpoint is the prefix's last event).
    /// On a conflict the batch is planned again from fresh state.
    /// `stream` is a name (instance unknown) or a [`StreamRef`] naming the instance the
    /// events come from: a checkpoint of another instance counts as nothing applied.
    pub async fn apply_batch<'a>(
        &self,
        cfg: &ApplyConfig,
        stream: impl Into<StreamRef<'a>>,
        events: &[SequencedEvent],
    ) -> Result<ApplyReport> {
        self.apply_batch_at(cfg, stream, events, now_ms()).await
    }

    /// `apply_batch` with the wall time given (inbox TTLs count from it).
    pub async fn apply_batch_at<'a>(
        &self,
        cfg: &ApplyConfig,
        stream: impl Into<StreamRef<'a>>,
        events: &[SequencedEvent],
        now_ms: u64,
    ) -> Result<ApplyReport> {
        let stream = stream.into();
        let mut retries = 0;
        loop {
            match self.try_apply_batch(cfg, stream, events, now_ms).await {
                Err(e) if e.is_conflict() && retries < MAX_CONFLICT_RETRIES => {
                    retries += 1;
                    let backoff = std::time::Duration::from_micros(200 * (1 << retries.min(8)) as u64);
                    tokio::time::sleep(backoff).await;
                }
                Ok(mut report) => {
                    report.retries = retries;
                    return Ok(report);
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn try_apply_batch(
        &self,
        cfg: &ApplyConfig,
        stream: StreamRef<'_>,
        events: &[SequencedEvent],
        now_ms: u64,
    ) -> Result<ApplyReport> {
        let keys = self.keys();
        let mut txn = self.kv().begin().await?;
        let cp_key = keys.checkpoint(stream.name);
        let stored = checkpoint::read(txn.as_mut(), &cp_key).await?;
        let mut next = stored.for_instance(stream.instance);
        let mut report = ApplyReport {
            checkpoint: next.seq,
            ..Default::default()
        };
        let mut budget = BatchBudget::new(cfg);
        for ev in events {
            if budget.spent() {
                break;
            }
            report.consumed += 1;
            if ev.stream_seq <= report.checkpoint {
                report.below_checkpoint += 1;
                continue;
            }
            let plan = plan_event(txn.as_mut(), keys, cfg, now_ms, &ev.envelope).await?;
            budget.charge(&plan);
            let new_message = !plan.duplicate
                && plan.rejected.is_none()
                && matches!(ev.envelope.body, Some(Body::MessageSent(_)));
            if plan.duplicate {
                report.duplicates += 1;
            } else if let Some(reason) = &plan.rejected {
                tracing::warn!(stream = stream.name, seq = ev.stream_seq, %reason, "event rejected by apply");
                report.rejected += 1;
            } else {
                report.applied += 1;
            }
            if plan.rejected.is_none() {
                next.max_hlc = next.max_hlc.max(ev.envelope.hlc);
            }
            for w in plan.writes {
                match w {
                    Write::Put(k, v) => txn.put(k, v).await?,
                    Write::Delete(k) => txn.delete(k).await?,
                }
            }
            if new_message {
                // The search indexer reads committed messages from here (search_feed.rs).
                let feed = keys.search_feed(stream.name, next.instance, ev.stream_seq);
                txn.put(feed, ev.envelope.event_id.clone()).await?;
            }
            report.deliveries.extend(plan.deliveries);
            report.checkpoint = ev.stream_seq;
        }
        next.seq = report.checkpoint;
        if next == stored {
            txn.rollback().await?;
            return Ok(report);
        }
        txn.put(cp_key, next.encode()).await?;
        // Before the commit: once it is visible the watermark must already cover it.
        self.raise_applied_hlc(next.max_hlc);
        txn.commit().await?;
        Ok(report)
    }
}
