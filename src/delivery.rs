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
            Err(e @ SpoolError::Invalid { .. }) => {
                tracing::error!(queue_id = %id, error = %e, "queued message failed validation, moved to corrupt/ (alert: it was not delivered; inspect it)");
                let spool = self.spool.clone();
                let id = id.to_string();
                let _ = tokio::task::spawn_blocking(move || spool.quarantine_message(&id)).await;
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
        let spool = self.spool.clone();
        let (sid, state) = (id.to_string(), stored.state.clone());
        if let Err(e) = blocking(move || spool.begin_attempt(&sid, &state)).await {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::Scheduler;
    use crate::spool::{Envelope, Recipient, new_id};
    use crate::upstream::{BoxFuture, Upstream};
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;
    use tokio::time::Instant;
    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    /// An upstream that answers from a script and records when and what it was asked.
    struct Scripted {
        script: Mutex<Vec<Vec<RcptOutcome>>>,
        calls: Mutex<Vec<(Instant, Vec<usize>, crate::spool::State)>>,
        running: AtomicUsize,
        max_running: AtomicUsize,
        hold: Duration,
    }

    impl Scripted {
        fn new(script: Vec<Vec<RcptOutcome>>) -> Arc<Scripted> {
            Arc::new(Scripted {
                script: Mutex::new(script),
                calls: Mutex::new(Vec::new()),
                running: AtomicUsize::new(0),
                max_running: AtomicUsize::new(0),
                hold: Duration::ZERO,
            })
        }
    }

    impl Upstream for Scripted {
        fn name(&self) -> &str {
            "scripted"
        }
        fn deliver(&self, attempt: Attempt) -> BoxFuture<'_, Vec<RcptOutcome>> {
            Box::pin(async move {
                let n = self.running.fetch_add(1, Ordering::SeqCst) + 1;
                self.max_running.fetch_max(n, Ordering::SeqCst);
                // What the spool says while the attempt runs.
                let on_disk = attempt
                    .spool
                    .load(&attempt.stored.envelope.id)
                    .unwrap()
                    .state;
                self.calls.lock().unwrap().push((
                    Instant::now(),
                    attempt.recipients.clone(),
                    on_disk,
                ));
                if !self.hold.is_zero() {
                    tokio::time::sleep(self.hold).await;
                }
                self.running.fetch_sub(1, Ordering::SeqCst);
                let mut s = self.script.lock().unwrap();
                // The script applies to messages for a@x; everything else is delivered.
                let scripted = attempt.stored.envelope.recipients[0].address == "a@x";
                if s.is_empty() || !scripted {
                    vec![RcptOutcome::Delivered("250 ok".into()); attempt.recipients.len()]
                } else {
                    s.remove(0)
                }
            })
        }
    }

    fn queue_cfg(retry: &[u64], max_age: Duration, workers: usize) -> QueueConfig {
        QueueConfig {
            retry: retry.iter().map(|&s| Duration::from_secs(s)).collect(),
            max_age,
            workers,
        }
    }

    async fn enqueue(spool: &Spool, rcpts: &[&str], arrival_ms: u64) -> crate::spool::Queued {
        let env = Envelope {
            id: new_id(),
            sender: "s@example.com".into(),
            recipients: rcpts
                .iter()
                .map(|r| Recipient {
                    address: r.to_string(),
                })
                .collect(),
            client_ip: "127.0.0.1".parse().unwrap(),
            helo: "t".into(),
            auth_user: None,
            arrival_ms,
            body: None,
            smtputf8: false,
        };
        let mut inc = spool.begin(&env);
        inc.write(b"Subject: t\r\n\r\nx\r\n").await;
        inc.commit().await.unwrap()
    }

    fn files(dir: &std::path::Path, sub: &str) -> usize {
        std::fs::read_dir(dir.join(sub)).unwrap().count()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn partial_failure_journals_delivered_recipient_a5() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let up = Scripted::new(vec![vec![
            RcptOutcome::Delivered("250 ok".into()),
            RcptOutcome::Failed("550 5.1.1 no such user".into()),
            RcptOutcome::Deferred("451 4.3.0 try later".into()),
        ]]);
        let d = Delivery::new(
            spool.clone(),
            up.clone(),
            queue_cfg(&[60], Duration::from_secs(3600), 1),
        );
        let q = enqueue(&spool, &["a@x", "b@x", "c@x"], now_ms()).await;
        let next = d.attempt(&q.id).await;
        assert!(next.is_some(), "c@x is deferred, the message stays queued");
        let st = spool.load(&q.id).unwrap().state;
        assert_eq!(st.recipients[0].status, RcptStatus::Delivered);
        assert_eq!(st.recipients[1].status, RcptStatus::Failed);
        assert_eq!(st.recipients[2].status, RcptStatus::Pending);
        assert!(!st.in_flight);
        // Second attempt offers only c@x; then the message goes to failed/ (b@x failed).
        assert_eq!(d.attempt(&q.id).await, None);
        let calls = up.calls.lock().unwrap();
        assert_eq!(calls[0].1, vec![0, 1, 2]);
        assert_eq!(calls[1].1, vec![2]);
        assert_eq!(files(dir.path(), "queue"), 0);
        assert_eq!(files(dir.path(), "failed"), 2);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn next_attempt_is_recorded_before_the_attempt() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let up = Scripted::new(vec![]);
        let d = Delivery::new(
            spool.clone(),
            up.clone(),
            queue_cfg(&[300], Duration::from_secs(3600), 1),
        );
        let q = enqueue(&spool, &["a@x"], now_ms()).await;
        let before = now_ms();
        assert_eq!(d.attempt(&q.id).await, None);
        let calls = up.calls.lock().unwrap();
        let seen = &calls[0].2;
        assert!(seen.in_flight);
        assert_eq!(seen.attempts, 1);
        assert!(seen.next_attempt_ms >= before + 300_000);
        assert_eq!(files(dir.path(), "queue"), 0, "delivered message removed");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn expired_message_moves_to_failed_with_reason_a8() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let up = Scripted::new(vec![]);
        let d = Delivery::new(
            spool.clone(),
            up.clone(),
            queue_cfg(&[60], Duration::from_secs(120), 1),
        );
        let q = enqueue(&spool, &["a@x"], now_ms() - 121_000).await;
        assert_eq!(d.attempt(&q.id).await, None);
        assert!(
            up.calls.lock().unwrap().is_empty(),
            "no attempt after max_age"
        );
        let state = std::fs::read(dir.path().join(format!("failed/{}.state", q.id))).unwrap();
        let state = crate::spool::format::decode_state(&state, 1).unwrap();
        assert!(
            state
                .last_error
                .unwrap()
                .starts_with("4.4.7 delivery time expired")
        );
        assert_eq!(state.recipients[0].status, RcptStatus::Failed);
    }

    #[tokio::test(start_paused = true)]
    async fn scheduler_follows_retry_intervals_and_worker_limit() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let deferred = |n: usize| vec![RcptOutcome::Deferred("421 4.3.0 busy".into()); n];
        // Message 1 is deferred twice, then delivered.
        let up = Arc::new(Scripted {
            hold: Duration::from_millis(500),
            ..Arc::into_inner(Scripted::new(vec![deferred(1), deferred(1)])).unwrap()
        });
        let d = Arc::new(Delivery::new(
            spool.clone(),
            up.clone(),
            queue_cfg(&[10, 30], Duration::from_secs(86400), 2),
        ));
        let (sched, handle) = Scheduler::new(d, 2, Duration::from_secs(30));
        let stop = CancellationToken::new();
        let workers = TaskTracker::new();
        let task = tokio::spawn(sched.run(stop.clone(), workers.clone()));
        let start = Instant::now();
        let first = enqueue(&spool, &["a@x"], now_ms()).await;
        handle.queued(first);
        // Let the first attempt start before the others arrive.
        tokio::time::sleep(Duration::from_millis(100)).await;
        for _ in 0..5 {
            handle.queued(enqueue(&spool, &["b@x"], now_ms()).await);
        }
        // Wait (in paused time) until the queue is empty.
        for _ in 0..1000 {
            if files(dir.path(), "queue") == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        assert_eq!(files(dir.path(), "queue"), 0);
        stop.cancel();
        task.await.unwrap();
        workers.close();
        workers.wait().await;
        assert!(
            up.max_running.load(Ordering::SeqCst) <= 2,
            "never more than queue.workers attempts"
        );
        let calls = up.calls.lock().unwrap();
        assert_eq!(
            calls.len(),
            8,
            "3 attempts for the first message, 1 for each other"
        );
        let first_attempt = &calls[0];
        assert_eq!(first_attempt.2.attempts, 1);
        assert!((first_attempt.0 - start) < Duration::from_millis(100));
        let retries: Vec<u64> = calls
            .iter()
            .filter(|c| c.2.attempts > 1)
            .inspect(|c| assert_eq!(c.1, vec![0]))
            .map(|c| (c.0 - start).as_millis() as u64)
            .collect();
        assert_eq!(retries.len(), 2, "{retries:?}");
        assert!((10_000..11_500).contains(&retries[0]), "{retries:?}");
        assert!((40_000..42_000).contains(&retries[1]), "{retries:?}");
    }
}
