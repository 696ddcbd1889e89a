//! The scheduler: the one task that owns "when". It keeps every queued message's due time in
//! a heap and wakes on a new message, a due retry or a finished attempt. It hands due messages
//! to at most `queue.workers` delivery attempts at a time. It never touches files.
//!
//! Due times are kept on tokio's monotonic clock. Stored wall-clock times (from the spool)
//! are turned into delays once, capped at the longest retry interval, so a wall clock moved
//! by hours cannot stall the queue nor cause a burst (behaviour.md A11).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::delivery::Delivery;
use crate::spool::{Queued, now_ms};

#[derive(Debug)]
pub enum Event {
    /// A message was committed (or recovered at start-up).
    Queued(Queued),
    /// An attempt finished; `next_attempt_ms` is set if the message stays queued.
    Done {
        id: String,
        next_attempt_ms: Option<u64>,
    },
}

/// Cheap to clone; sessions use it to announce new messages.
#[derive(Clone, Debug)]
pub struct SchedulerHandle {
    tx: mpsc::UnboundedSender<Event>,
}

impl SchedulerHandle {
    pub fn queued(&self, q: Queued) {
        // If the scheduler has stopped (shutdown), the message is safe on disk and is found
        // by recovery at the next start.
        let _ = self.tx.send(Event::Queued(q));
    }
}

pub struct Scheduler {
    rx: mpsc::UnboundedReceiver<Event>,
    tx: mpsc::UnboundedSender<Event>,
    delivery: Arc<Delivery>,
    workers: usize,
    max_delay: Duration,
}

impl Scheduler {
    pub fn new(
        delivery: Arc<Delivery>,
        workers: usize,
        max_delay: Duration,
    ) -> (Scheduler, SchedulerHandle) {
        let (tx, rx) = mpsc::unbounded_channel();
        let handle = SchedulerHandle { tx: tx.clone() };
        (
            Scheduler {
                rx,
                tx,
                delivery,
                workers,
                max_delay,
            },
            handle,
        )
    }

    fn due(&self, next_attempt_ms: u64) -> Instant {
        let delay = Duration::from_millis(next_attempt_ms.saturating_sub(now_ms()));
        Instant::now() + delay.min(self.max_delay)
    }

    /// Runs until `stop` is cancelled. Attempts already running go on; the caller waits for
    /// them through `workers`.
    pub async fn run(mut self, stop: CancellationToken, workers: TaskTracker) {
        let slots = Arc::new(Semaphore::new(self.workers));
        let mut heap: BinaryHeap<Reverse<(Instant, u64, String)>> = BinaryHeap::new();
        let mut seq = 0u64;
        loop {
            // Hand out every due message while a worker slot is free.
            let now = Instant::now();
            while heap.peek().is_some_and(|Reverse((due, _, _))| *due <= now) {
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    break;
                };
                let Some(Reverse((_, _, id))) = heap.pop() else {
                    break;
                };
                let delivery = self.delivery.clone();
                let tx = self.tx.clone();
                workers.spawn(async move {
                    // The attempt runs as its own task so that a panic in it (a bug, or an
                    // upstream reply nobody foresaw) ends as a JoinError here instead of
                    // taking the `Done` event with it: the slot is freed and the message is
                    // rescheduled, never stuck until a restart.
                    let run = {
                        let (delivery, id) = (delivery.clone(), id.clone());
                        tokio::spawn(async move { delivery.attempt(&id).await })
                    };
                    let next_attempt_ms = match run.await {
                        Ok(next) => next,
                        Err(e) => {
                            let what = panic_text(e);
                            tracing::error!(
                                queue_id = %id,
                                error = %what,
                                "delivery attempt crashed (a bug in mailbridge: please report it with this line); the message stays queued and is retried on its schedule"
                            );
                            delivery.after_crash(&id).await
                        }
                    };
                    drop(permit);
                    let _ = tx.send(Event::Done {
                        id,
                        next_attempt_ms,
                    });
                });
            }
            let next_due = heap.peek().map(|Reverse((due, _, _))| *due);
            let can_start = slots.available_permits() > 0;
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                ev = self.rx.recv() => match ev {
                    Some(Event::Queued(q)) => {
                        seq += 1;
                        heap.push(Reverse((self.due(q.next_attempt_ms), seq, q.id)));
                    }
                    Some(Event::Done { id, next_attempt_ms: Some(ms) }) => {
                        seq += 1;
                        heap.push(Reverse((self.due(ms), seq, id)));
                    }
                    Some(Event::Done { next_attempt_ms: None, .. }) => {}
                    None => break,
                },
                _ = tokio::time::sleep_until(next_due.unwrap_or(now)), if next_due.is_some() && can_start => {}
            }
        }
        tracing::debug!(waiting = heap.len(), "scheduler stopped");
    }
}

/// What a crashed attempt's task said, for the log: the panic message, if it is text.
fn panic_text(e: tokio::task::JoinError) -> String {
    if !e.is_panic() {
        return e.to_string();
    }
    let p = e.into_panic();
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}
