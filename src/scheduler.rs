//! The scheduler: the one task that owns "when". It keeps every queued message's due time in
//! a heap and wakes on a new message, a due retry or a finished attempt. It hands due messages
//! to at most `queue.workers` delivery attempts at a time. It never touches files.
//!
//! Due times are kept on tokio's monotonic clock. Stored wall-clock times (from the spool)
//! are turned into delays once, capped at the longest retry interval, so a wall clock moved
//! by hours cannot stall the queue nor cause a burst (behaviour.md A11).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::delivery::Delivery;
use crate::spool::{Queued, now_ms};

#[derive(Debug)]
pub enum Event {
    /// A message was committed (or recovered at start-up, or requeued).
    Queued(Queued),
    /// An attempt finished; `next_attempt_ms` is set if the message stays queued.
    Done {
        id: String,
        next_attempt_ms: Option<u64>,
    },
    /// Entry `id` changed (retried, released, unclaimed): schedule it again from the index.
    Wake(String),
}

/// What the scheduler knows about one queued message: the in-memory index that the queue
/// summary (metrics, status) reads without touching files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub arrival_ms: u64,
    pub next_attempt_ms: u64,
    /// Attempts started so far.
    pub attempts: u32,
    /// Held by an operator: never started.
    pub held: bool,
    /// An attempt runs now.
    pub in_flight: bool,
    /// An operator command is changing its files now: not started meanwhile.
    pub claimed: bool,
    /// Which heap entry is current; older ones are skipped when they come up.
    generation: u64,
    /// Announced again while an attempt ran (a requeue from failed/ racing the attempt's
    /// end): kept in the index even if that attempt reports that it left the queue.
    announced: bool,
}

/// Counts over the index, for the queue summary.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IndexSummary {
    pub messages: u64,
    /// Attempted at least once, not held.
    pub deferred: u64,
    pub held: u64,
    pub in_flight: u64,
    pub oldest_arrival_ms: Option<u64>,
}

#[derive(Debug, Default)]
struct Shared {
    index: Mutex<BTreeMap<String, Entry>>,
    /// Woken whenever an attempt ends or a claim is given back.
    changed: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Entry>> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Why an operator command could not take a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClaimError {
    #[error("no message {0} in the queue (see `mailbridge queue list`)")]
    NotQueued(String),
    #[error(
        "a delivery attempt for {0} is running now; wait for it to end (see `mailbridge queue show {0}`) and run the command again"
    )]
    InFlight(String),
    #[error("another command is changing {0} right now; run the command again")]
    Busy(String),
}

/// Cheap to clone; sessions use it to announce new messages, operator commands to steer
/// the queue.
#[derive(Clone, Debug)]
pub struct SchedulerHandle {
    tx: mpsc::UnboundedSender<Event>,
    shared: Arc<Shared>,
}

impl SchedulerHandle {
    pub fn queued(&self, q: Queued) {
        // If the scheduler has stopped (shutdown), the message is safe on disk and is found
        // by recovery at the next start.
        let _ = self.tx.send(Event::Queued(q));
    }

    /// The index entry of `id`.
    pub fn entry(&self, id: &str) -> Option<Entry> {
        self.shared.lock().get(id).cloned()
    }

    /// Counts over the queue, from memory.
    pub fn summary(&self) -> IndexSummary {
        let index = self.shared.lock();
        let mut s = IndexSummary {
            messages: index.len() as u64,
            ..Default::default()
        };
        for e in index.values() {
            if e.held {
                s.held += 1;
            } else if e.attempts > 0 {
                s.deferred += 1;
            }
            if e.in_flight {
                s.in_flight += 1;
            }
            s.oldest_arrival_ms = Some(match s.oldest_arrival_ms {
                Some(o) => o.min(e.arrival_ms),
                None => e.arrival_ms,
            });
        }
        s
    }

    /// Makes `id` due now. Refused for a held message (release it instead), and while an
    /// attempt for it runs.
    pub fn retry(&self, id: &str) -> Result<(), String> {
        {
            let mut index = self.shared.lock();
            let e = index
                .get_mut(id)
                .ok_or_else(|| ClaimError::NotQueued(id.into()).to_string())?;
            if e.held {
                return Err(format!(
                    "message {id} is held; release it with `mailbridge queue release {id}`"
                ));
            }
            if e.in_flight {
                return Err(ClaimError::InFlight(id.into()).to_string());
            }
            e.next_attempt_ms = now_ms();
        }
        let _ = self.tx.send(Event::Wake(id.into()));
        Ok(())
    }

    /// Makes every queued message that is not held, claimed or being attempted due now;
    /// returns how many.
    pub fn retry_all(&self) -> u64 {
        let ids: Vec<String> = {
            let mut index = self.shared.lock();
            let now = now_ms();
            index
                .iter_mut()
                .filter(|(_, e)| !e.held && !e.in_flight && !e.claimed)
                .map(|(id, e)| {
                    e.next_attempt_ms = now;
                    id.clone()
                })
                .collect()
        };
        for id in &ids {
            let _ = self.tx.send(Event::Wake(id.clone()));
        }
        ids.len() as u64
    }

    /// Takes `id` away from the scheduler while an operator command changes its files: no
    /// attempt starts until the claim is finished or dropped. If an attempt runs, waits up
    /// to `wait` for it to end (zero: refuse at once).
    pub async fn claim(&self, id: &str, wait: Duration) -> Result<Claim, ClaimError> {
        let deadline = Instant::now() + wait;
        loop {
            let notified = self.shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut index = self.shared.lock();
                let e = index
                    .get_mut(id)
                    .ok_or_else(|| ClaimError::NotQueued(id.into()))?;
                if e.claimed {
                    return Err(ClaimError::Busy(id.into()));
                }
                if !e.in_flight {
                    e.claimed = true;
                    return Ok(Claim {
                        handle: self.clone(),
                        id: id.to_string(),
                        done: false,
                    });
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(ClaimError::InFlight(id.into()));
            }
        }
    }

    fn unclaim(&self, id: &str, change: Option<Change>) {
        {
            let mut index = self.shared.lock();
            match change {
                Some(Change::Removed) => {
                    index.remove(id);
                }
                Some(Change::Kept {
                    held,
                    next_attempt_ms,
                }) => {
                    if let Some(e) = index.get_mut(id) {
                        e.claimed = false;
                        e.held = held;
                        e.next_attempt_ms = next_attempt_ms;
                    }
                }
                None => {
                    if let Some(e) = index.get_mut(id) {
                        e.claimed = false;
                    }
                }
            }
        }
        self.shared.changed.notify_waiters();
        let _ = self.tx.send(Event::Wake(id.to_string()));
    }
}

enum Change {
    Removed,
    Kept { held: bool, next_attempt_ms: u64 },
}

/// An operator's hold on one message (see [`SchedulerHandle::claim`]). Dropped without
/// [`Claim::kept`] or [`Claim::removed`], the message is scheduled as before.
#[derive(Debug)]
pub struct Claim {
    handle: SchedulerHandle,
    id: String,
    done: bool,
}

impl Claim {
    /// The message stays queued with this hold flag and next attempt time.
    pub fn kept(mut self, held: bool, next_attempt_ms: u64) {
        self.done = true;
        self.handle.unclaim(
            &self.id,
            Some(Change::Kept {
                held,
                next_attempt_ms,
            }),
        );
    }

    /// The message left the queue.
    pub fn removed(mut self) {
        self.done = true;
        self.handle.unclaim(&self.id, Some(Change::Removed));
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if !self.done {
            self.handle.unclaim(&self.id, None);
        }
    }
}

pub struct Scheduler {
    rx: mpsc::UnboundedReceiver<Event>,
    tx: mpsc::UnboundedSender<Event>,
    shared: Arc<Shared>,
    delivery: Arc<Delivery>,
    workers: usize,
    max_delay: Duration,
}

type Heap = BinaryHeap<Reverse<(Instant, u64, String)>>;

impl Scheduler {
    pub fn new(
        delivery: Arc<Delivery>,
        workers: usize,
        max_delay: Duration,
    ) -> (Scheduler, SchedulerHandle) {
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared::default());
        let handle = SchedulerHandle {
            tx: tx.clone(),
            shared: shared.clone(),
        };
        (
            Scheduler {
                rx,
                tx,
                shared,
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

    /// Puts `id`'s current schedule on the heap (a new generation: older heap entries for it
    /// are skipped), unless it is held, claimed or in flight.
    fn schedule(&self, heap: &mut Heap, id: &str) {
        let mut index = self.shared.lock();
        let Some(e) = index.get_mut(id) else { return };
        e.generation += 1;
        if !e.held && !e.claimed && !e.in_flight {
            heap.push(Reverse((
                self.due(e.next_attempt_ms),
                e.generation,
                id.into(),
            )));
        }
    }

    fn apply(&self, heap: &mut Heap, ev: Event) {
        match ev {
            Event::Queued(q) => {
                {
                    let mut index = self.shared.lock();
                    let e = index.entry(q.id.clone()).or_insert(Entry {
                        arrival_ms: q.arrival_ms,
                        next_attempt_ms: q.next_attempt_ms,
                        attempts: q.attempts,
                        held: q.held,
                        in_flight: false,
                        claimed: false,
                        generation: 0,
                        announced: false,
                    });
                    // Announced twice (an id never is, but be safe): the newest facts, and
                    // a running attempt stays the only one.
                    e.next_attempt_ms = q.next_attempt_ms;
                    e.held = q.held;
                    e.announced = e.in_flight;
                }
                self.schedule(heap, &q.id);
            }
            Event::Done {
                id,
                next_attempt_ms,
            } => {
                {
                    let mut index = self.shared.lock();
                    match next_attempt_ms {
                        Some(ms) => {
                            if let Some(e) = index.get_mut(&id) {
                                e.in_flight = false;
                                e.announced = false;
                                e.next_attempt_ms = ms;
                            }
                        }
                        // Announced again meanwhile (requeued): it is queued once more;
                        // at worst an attempt finds nothing to load and ends.
                        None if index.get(&id).is_some_and(|e| e.announced) => {
                            if let Some(e) = index.get_mut(&id) {
                                e.in_flight = false;
                                e.announced = false;
                            }
                        }
                        None => {
                            index.remove(&id);
                        }
                    }
                }
                self.shared.changed.notify_waiters();
                self.schedule(heap, &id);
            }
            Event::Wake(id) => self.schedule(heap, &id),
        }
    }

    /// Pops the next due heap entry that is current and may start, marking it in flight.
    fn take_due(&self, heap: &mut Heap, now: Instant) -> Option<String> {
        while heap.peek().is_some_and(|Reverse((due, _, _))| *due <= now) {
            let Some(Reverse((_, generation, id))) = heap.pop() else {
                break;
            };
            let mut index = self.shared.lock();
            let Some(e) = index.get_mut(&id) else {
                continue;
            };
            if e.generation != generation || e.held || e.claimed || e.in_flight {
                continue;
            }
            e.in_flight = true;
            e.attempts += 1;
            return Some(id);
        }
        None
    }

    /// Runs until `stop` is cancelled. Attempts already running go on; the caller waits for
    /// them through `workers`.
    pub async fn run(mut self, stop: CancellationToken, workers: TaskTracker) {
        let slots = Arc::new(Semaphore::new(self.workers));
        let mut heap: Heap = BinaryHeap::new();
        loop {
            // Hand out every due message while a worker slot is free.
            let now = Instant::now();
            loop {
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    break;
                };
                let Some(id) = self.take_due(&mut heap, now) else {
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
                    Some(ev) => self.apply(&mut heap, ev),
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use crate::config::QueueConfig;
    use crate::spool::{Envelope, Spool, new_id};
    use crate::upstream::{Attempt, BoxFuture, RcptOutcome, Report, Upstream};

    /// Holds every attempt until the test lets it go; notes any id attempted twice at once.
    struct Gate {
        running: Mutex<HashMap<String, usize>>,
        calls: Mutex<Vec<String>>,
        double: AtomicBool,
        go: tokio::sync::Semaphore,
        started: Notify,
    }

    impl Upstream for Gate {
        fn name(&self) -> &str {
            "gate"
        }
        fn deliver(&self, attempt: Attempt) -> BoxFuture<'_, Report> {
            Box::pin(async move {
                let id = attempt.stored.envelope.id.clone();
                {
                    let mut r = self.running.lock().unwrap();
                    let n = r.entry(id.clone()).or_default();
                    *n += 1;
                    if *n > 1 {
                        self.double.store(true, Ordering::SeqCst);
                    }
                    self.calls.lock().unwrap().push(id.clone());
                }
                self.started.notify_waiters();
                self.go.acquire().await.unwrap().forget();
                *self.running.lock().unwrap().get_mut(&id).unwrap() -= 1;
                vec![RcptOutcome::deferred("451 4.3.0 later".into()); attempt.recipients.len()]
                    .into()
            })
        }
    }

    impl Gate {
        fn new() -> Gate {
            Gate {
                running: Mutex::default(),
                calls: Mutex::default(),
                double: AtomicBool::new(false),
                go: tokio::sync::Semaphore::new(0),
                started: Notify::new(),
            }
        }

        fn calls(&self, id: &str) -> usize {
            self.calls
                .lock()
                .unwrap()
                .iter()
                .filter(|c| *c == id)
                .count()
        }
    }

    async fn enqueue(spool: &Spool) -> Queued {
        let env = Envelope::for_test(&new_id(), "s@example.com", &["a@example.com"]);
        let mut inc = spool.begin(&env);
        inc.write(b"Subject: t\r\n\r\nhi\r\n").await;
        inc.commit().await.unwrap()
    }

    async fn until(mut f: impl FnMut() -> bool) {
        tokio::time::timeout(Duration::from_secs(20), async {
            while !f() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("condition within 20 s");
    }

    /// `queue requeue` can move a message back from failed/ after its attempt moved it
    /// there but before the scheduler handled that attempt's end: the end ("left the
    /// queue") must not drop the requeued message from the index (never attempted again
    /// until a restart).
    #[tokio::test]
    async fn a_message_requeued_while_its_attempt_ends_stays_scheduled() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let queue = QueueConfig {
            retry: vec![Duration::from_secs(3600)],
            max_age: Duration::from_secs(86_400),
            workers: 1,
            bounce: false,
            postmaster: None,
        };
        let delivery = Arc::new(Delivery::new(spool.clone(), Arc::new(Gate::new()), queue));
        let (sched, handle) = Scheduler::new(delivery, 1, Duration::from_secs(3600));
        let mut heap = Heap::new();
        let a = enqueue(&spool).await;
        sched.apply(&mut heap, Event::Queued(a.clone()));
        let later = Instant::now() + Duration::from_secs(1);
        assert_eq!(sched.take_due(&mut heap, later), Some(a.id.clone()));
        // The attempt moved it to failed/; the operator requeues it (announced while the
        // attempt's end is still on its way), then the end arrives.
        sched.apply(&mut heap, Event::Queued(a.clone()));
        sched.apply(
            &mut heap,
            Event::Done {
                id: a.id.clone(),
                next_attempt_ms: None,
            },
        );
        let e = handle.entry(&a.id).expect("still in the index");
        assert!(!e.in_flight);
        assert_eq!(sched.take_due(&mut heap, later), Some(a.id.clone()));
        // Its next end without a requeue removes it as before.
        sched.apply(
            &mut heap,
            Event::Done {
                id: a.id.clone(),
                next_attempt_ms: None,
            },
        );
        assert!(handle.entry(&a.id).is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_message_is_never_attempted_twice_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let gate = Arc::new(Gate::new());
        let queue = QueueConfig {
            retry: vec![Duration::from_secs(3600)],
            max_age: Duration::from_secs(86_400),
            workers: 4,
            bounce: false,
            postmaster: None,
        };
        let delivery = Arc::new(Delivery::new(spool.clone(), gate.clone(), queue));
        let (sched, handle) = Scheduler::new(delivery, 4, Duration::from_secs(3600));
        let stop = CancellationToken::new();
        let workers = TaskTracker::new();
        let run = tokio::spawn(sched.run(stop.clone(), workers.clone()));

        let a = enqueue(&spool).await;
        handle.queued(a.clone());
        until(|| gate.calls(&a.id) == 1).await;
        assert!(handle.entry(&a.id).unwrap().in_flight);

        // Everything that could start it again while its attempt runs.
        assert!(handle.retry(&a.id).unwrap_err().contains("running now"));
        assert_eq!(handle.retry_all(), 0);
        handle.queued(a.clone());
        handle.queued(a.clone());
        assert_eq!(
            handle.claim(&a.id, Duration::ZERO).await.unwrap_err(),
            ClaimError::InFlight(a.id.clone())
        );
        // A second message due now starts after those events were handled: had they
        // started `a` again, it would have started first.
        let b = enqueue(&spool).await;
        handle.queued(b.clone());
        until(|| gate.calls(&b.id) == 1).await;
        assert_eq!(gate.calls(&a.id), 1);

        // Both attempts end (deferred for an hour); a retry now starts `a` once more.
        gate.go.add_permits(2);
        until(|| handle.entry(&a.id).is_some_and(|e| !e.in_flight)).await;
        until(|| handle.entry(&b.id).is_some_and(|e| !e.in_flight)).await;
        handle.retry(&a.id).unwrap();
        handle.retry(&a.id).unwrap_or_default();
        until(|| gate.calls(&a.id) == 2).await;

        // A claim waits for the running attempt, and holds off the scheduler meanwhile.
        let claiming = {
            let handle = handle.clone();
            let id = a.id.clone();
            tokio::spawn(async move { handle.claim(&id, Duration::from_secs(20)).await })
        };
        gate.go.add_permits(1);
        let claim = claiming.await.unwrap().unwrap();
        let e = handle.entry(&a.id).unwrap();
        assert!(e.claimed && !e.in_flight);
        assert!(handle.retry_all() == 1, "only b");
        until(|| gate.calls(&b.id) == 2).await;
        assert_eq!(gate.calls(&a.id), 2, "claimed: not started");
        claim.kept(true, now_ms());
        assert!(handle.entry(&a.id).unwrap().held);
        assert_eq!(handle.summary().held, 1);

        assert!(!gate.double.load(Ordering::SeqCst));
        gate.go.add_permits(10);
        stop.cancel();
        run.await.unwrap();
        workers.close();
        workers.wait().await;
    }
}
