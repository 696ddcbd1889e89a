//! Delivery workers: claim one message, record the next attempt time, hand it to the
//! upstream, and write the per-recipient outcomes back through the spool.
//!
//! The next attempt time (and an in-flight mark) is written *before* the upstream is called,
//! so a crash during an attempt can never turn into a hot retry loop; an attempt found
//! in flight at start-up is logged as a possible duplicate (behaviour.md A4).

use std::sync::Arc;

use crate::config::QueueConfig;
use crate::spool::{RcptStatus, Spool, SpoolError, Stored, now_ms};
use crate::upstream::{Attempt, RcptOutcome, Upstream};

pub struct Delivery {
    spool: Spool,
    upstream: Arc<dyn Upstream>,
    queue: QueueConfig,
}

/// Runs blocking spool work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SpoolError> + Send + 'static,
) -> Result<T, SpoolError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or(Err(SpoolError::WriterGone))
}

impl Delivery {
    pub fn new(spool: Spool, upstream: Arc<dyn Upstream>, queue: QueueConfig) -> Delivery {
        Delivery {
            spool,
            upstream,
            queue,
        }
    }

    /// One attempt for message `id`. Returns when the next attempt is due, or `None` when the
    /// message left the queue (delivered, failed or unreadable).
    pub async fn attempt(&self, id: &str) -> Option<u64> {
        let spool = self.spool.clone();
        let owned_id = id.to_string();
        let mut stored = match blocking(move || spool.load(&owned_id)).await {
            Ok(s) => s,
            Err(SpoolError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return None;
            }
            Err(e) => {
                tracing::error!(queue_id = %id, error = %e, "cannot read queued message; retrying later");
                return Some(now_ms() + self.queue.retry_after(1).as_millis() as u64);
            }
        };
        let pending: Vec<usize> = stored.state.pending().collect();
        if pending.is_empty() {
            self.finish(stored).await;
            return None;
        }

        let now = now_ms();
        let age_ms = now.saturating_sub(stored.envelope.arrival_ms);
        if age_ms > self.queue.max_age.as_millis() as u64 {
            let last = stored.state.last_error.clone().unwrap_or_default();
            let reason = format!(
                "4.4.7 delivery time expired after {} in the queue ({} attempts); last error: {last}",
                humantime::format_duration(std::time::Duration::from_secs(age_ms / 1000)),
                stored.state.attempts
            );
            for &i in &pending {
                stored.state.recipients[i].status = RcptStatus::Failed;
                stored.state.recipients[i].reply = Some(reason.clone());
            }
            stored.state.last_error = Some(reason);
            self.finish(stored).await;
            return None;
        }

        // Record the next attempt before trying (no hot loop after a crash).
        stored.state.attempts += 1;
        let next = now + self.queue.retry_after(stored.state.attempts).as_millis() as u64;
        stored.state.next_attempt_ms = next;
        stored.state.in_flight = true;
        if let Err(e) = self.save(&stored).await {
            tracing::error!(queue_id = %id, error = %e, "cannot record the attempt in the spool; deferring");
            return Some(next);
        }

        let stored = Arc::new(stored);
        let outcomes = self
            .upstream
            .deliver(Attempt {
                spool: self.spool.clone(),
                stored: stored.clone(),
                recipients: pending.clone(),
            })
            .await;
        let mut stored = Arc::unwrap_or_clone(stored);
        stored.state.in_flight = false;

        let (mut delivered, mut failed, mut deferred) = (0, 0, 0);
        for (k, &i) in pending.iter().enumerate() {
            let outcome = outcomes.get(k).cloned().unwrap_or_else(|| {
                RcptOutcome::Deferred("upstream returned no result for this recipient".into())
            });
            let r = &mut stored.state.recipients[i];
            match outcome {
                RcptOutcome::Delivered(reply) => {
                    r.status = RcptStatus::Delivered;
                    r.reply = Some(reply);
                    delivered += 1;
                }
                RcptOutcome::Failed(reply) => {
                    r.status = RcptStatus::Failed;
                    r.reply = Some(reply.clone());
                    stored.state.last_error = Some(reply);
                    failed += 1;
                }
                RcptOutcome::Deferred(reply) => {
                    r.reply = Some(reply.clone());
                    stored.state.last_error = Some(reply);
                    deferred += 1;
                }
            }
        }
        let upstream = self.upstream.name();
        if delivered > 0 {
            tracing::info!(queue_id = %id, upstream, recipients = delivered, attempt = stored.state.attempts, "delivered");
        }
        if failed > 0 {
            tracing::warn!(queue_id = %id, upstream, recipients = failed, error = stored.state.last_error.as_deref().unwrap_or(""), "delivery failed permanently");
        }
        if deferred > 0 {
            tracing::warn!(
                queue_id = %id,
                upstream,
                recipients = deferred,
                attempt = stored.state.attempts,
                retry_in = %humantime::format_duration(std::time::Duration::from_secs(next.saturating_sub(now_ms()) / 1000)),
                error = stored.state.last_error.as_deref().unwrap_or(""),
                "delivery deferred"
            );
            if let Err(e) = self.save(&stored).await {
                tracing::error!(queue_id = %id, error = %e, "cannot record delivery outcomes; the attempt will be repeated");
            }
            return Some(next);
        }
        self.finish(stored).await;
        None
    }

    async fn save(&self, stored: &Stored) -> Result<(), SpoolError> {
        let spool = self.spool.clone();
        let id = stored.envelope.id.clone();
        let state = stored.state.clone();
        blocking(move || spool.save_state(&id, &state)).await
    }

    /// Every recipient is final: remove the message, or keep it in `failed/` if any failed.
    async fn finish(&self, stored: Stored) {
        let spool = self.spool.clone();
        let id = stored.envelope.id.clone();
        let any_failed = stored
            .state
            .recipients
            .iter()
            .any(|r| r.status == RcptStatus::Failed);
        let state = stored.state;
        let res = if any_failed {
            let reason = state.last_error.clone().unwrap_or_default();
            tracing::warn!(queue_id = %id, reason, "message moved to failed/");
            blocking(move || spool.move_to_failed(&id, &state)).await
        } else {
            blocking(move || spool.remove(&id)).await
        };
        if let Err(e) = res {
            tracing::error!(queue_id = %stored.envelope.id, error = %e, "cannot update the spool after delivery");
        }
    }
}
