//! How much one apply transaction may hold. Every staged write stays in memory until the
//! commit (in the embedded backend's write buffer, or TiKV's), and a restart re-reads the
//! same batch: an unbounded batch of large messages into large groups would take the region
//! process down and then crash-loop on the same events. So a batch stops planning once it
//! passes a bound, commits the prefix it planned with the checkpoint at its last event, and
//! the applier applies the rest in the following transactions.

use crate::apply::{ApplyConfig, Plan, Write};

/// What a batch has staged so far, against the bounds of its `ApplyConfig`.
pub(crate) struct BatchBudget {
    max_bytes: usize,
    max_inbox_appends: usize,
    bytes: usize,
    inbox_appends: usize,
}

impl BatchBudget {
    pub(crate) fn new(cfg: &ApplyConfig) -> Self {
        Self {
            max_bytes: cfg.batch_max_bytes,
            max_inbox_appends: cfg.batch_max_inbox_appends,
            bytes: 0,
            inbox_appends: 0,
        }
    }

    /// Adds what one event's plan stages.
    pub(crate) fn charge(&mut self, plan: &Plan) {
        self.bytes += plan
            .writes
            .iter()
            .map(|w| match w {
                Write::Put(k, v) => k.len() + v.len(),
                Write::Delete(k) => k.len(),
            })
            .sum::<usize>();
        self.inbox_appends += plan.deliveries.len();
    }

    /// Whether the batch has reached a bound: plan no further event. The first event is
    /// always planned (the budget starts empty), so every batch makes progress.
    pub(crate) fn spent(&self) -> bool {
        self.bytes >= self.max_bytes || self.inbox_appends >= self.max_inbox_appends
    }
}
