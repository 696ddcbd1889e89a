//! Client-side limits for submitting to Exchange Online, so that we hold mail back *before*
//! the service starts refusing it. Exchange enforces, per mailbox:
//!
//! - **3 concurrent SMTP connections.** A fourth gets `432 4.3.2 STOREDRV; mailbox server is
//!   too busy` (too many connections). [`ConnLimit`] caps our connections, and lowers the cap
//!   by one each time we see `432 4.3.2` anyway (another client of the same mailbox, e.g. a
//!   second relay or a desktop client, uses some of the 3), recovering slowly afterwards.
//! - **30 messages per minute.** [`Pacer`] spaces submissions evenly (one every 2 s) instead
//!   of sending a burst and then being throttled.
//! - **10,000 recipients per rolling 24 hours.** Past it, Exchange refuses with
//!   `554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException` and the
//!   mailbox cannot send for up to a day; a permanent 5xx would also fail the message.
//!   [`DailyRecipients`] counts recipients in the same rolling window, persisted to disk so a
//!   restart does not forget what was sent, and tells the caller how long to hold mail.
//!
//! Each type is `Send + Sync` and meant to be shared through an `Arc`. `Pacer` and
//! `ConnLimit` run on tokio's clock (testable with a paused clock); `DailyRecipients` takes
//! the wall time as an argument, because its window must survive restarts.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio::time::Instant;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------------
// Pacer
// ---------------------------------------------------------------------------------------------

/// Spaces sends evenly: at most `per_minute` per minute, one every `60 s / per_minute`.
///
/// Each caller reserves the next free slot, so concurrent callers are spaced too. An idle
/// pacer does not save up credit: after a pause, the first send goes at once and the next
/// one a full interval later (never a burst). In any half-open 60 s window there are at most
/// `per_minute` slots.
#[derive(Debug)]
pub struct Pacer {
    /// The earliest instant the next slot may be given out; `None` before the first send.
    next_free: Mutex<Option<Instant>>,
    /// Zero = unlimited.
    interval: Duration,
    /// The slots given out in the last minute (for `mailbridge status`), at most
    /// [`RECENT_MAX`].
    recent: Mutex<std::collections::VecDeque<Instant>>,
}

/// The most slots [`Pacer::this_minute`] counts.
const RECENT_MAX: usize = 100_000;

impl Pacer {
    /// `per_minute` = 0 means unlimited.
    pub fn new(per_minute: u32) -> Pacer {
        let interval = if per_minute == 0 {
            Duration::ZERO
        } else {
            Duration::from_secs(60) / per_minute
        };
        Pacer {
            next_free: Mutex::new(None),
            interval,
            recent: Mutex::new(std::collections::VecDeque::new()),
        }
    }

    /// Slots given out in the last 60 s (messages this minute).
    pub fn this_minute(&self) -> u64 {
        let mut recent = lock(&self.recent);
        let now = Instant::now();
        while recent
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= Duration::from_secs(60))
        {
            recent.pop_front();
        }
        recent.len() as u64
    }

    fn note(&self, slot: Instant) {
        let mut recent = lock(&self.recent);
        if recent.len() >= RECENT_MAX {
            recent.pop_front();
        }
        recent.push_back(slot);
    }

    /// Reserves the next send slot and returns how long to wait for it (`ZERO` if free now).
    /// The slot is taken even if the caller then does not wait for it.
    pub fn reserve(&self) -> Duration {
        match self.try_reserve(Duration::MAX) {
            Ok(wait) | Err(wait) => wait,
        }
    }

    /// Reserves only if the wait would be `<= max_wait`; `Err(wait)` otherwise, with nothing
    /// reserved.
    pub fn try_reserve(&self, max_wait: Duration) -> Result<Duration, Duration> {
        if self.interval.is_zero() {
            self.note(Instant::now());
            return Ok(Duration::ZERO);
        }
        let now = Instant::now();
        let mut next_free = lock(&self.next_free);
        let slot = match *next_free {
            Some(t) if t > now => t,
            _ => now,
        };
        let wait = slot - now;
        if wait > max_wait {
            return Err(wait);
        }
        *next_free = Some(slot + self.interval);
        drop(next_free);
        self.note(slot);
        Ok(wait)
    }

    /// Reserves a slot and sleeps until it. Cancelling the future still uses up the slot.
    pub async fn acquire(&self) {
        let wait = self.reserve();
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// ConnLimit
// ---------------------------------------------------------------------------------------------

/// How long after the last [`ConnLimit::reduce`] the cap goes back up by one (and then by one
/// more per period, up to the maximum).
pub const DEFAULT_RECOVER_AFTER: Duration = Duration::from_secs(5 * 60);

/// Caps concurrent upstream connections. The cap starts at `max`; [`ConnLimit::reduce`]
/// (on `432 4.3.2`) lowers it by one, not below 1. Once `recover_after` passes with no
/// further `reduce`, the cap rises by one per `recover_after` period back to `max`. Recovery
/// is computed from tokio's clock when needed (no background task); tasks waiting in
/// [`ConnLimit::acquire`] wake up by themselves when the cap rises.
#[derive(Debug)]
pub struct ConnLimit {
    max: usize,
    recover_after: Duration,
    state: Mutex<ConnState>,
    /// Signalled when a permit is released.
    released: Notify,
}

#[derive(Debug)]
struct ConnState {
    active: usize,
    /// The cap right after the last `reduce`, and when that was; `None` = cap is `max`.
    reduced: Option<(usize, Instant)>,
}

/// One connection slot; released on drop.
#[derive(Debug)]
pub struct ConnPermit {
    limit: Arc<ConnLimit>,
}

impl ConnLimit {
    /// `max` = 0 is treated as 1. Recovers after [`DEFAULT_RECOVER_AFTER`].
    pub fn new(max: usize) -> Arc<ConnLimit> {
        ConnLimit::with_recover_after(max, DEFAULT_RECOVER_AFTER)
    }

    /// Like [`ConnLimit::new`] with a different recovery period (zero = recover at once).
    pub fn with_recover_after(max: usize, recover_after: Duration) -> Arc<ConnLimit> {
        Arc::new(ConnLimit {
            max: max.max(1),
            recover_after,
            state: Mutex::new(ConnState {
                active: 0,
                reduced: None,
            }),
            released: Notify::new(),
        })
    }

    /// The cap at `now`, forgetting the reduction once fully recovered.
    fn cap_at(&self, st: &mut ConnState, now: Instant) -> usize {
        let Some((cap, at)) = st.reduced else {
            return self.max;
        };
        let cap = if self.recover_after.is_zero() {
            self.max
        } else {
            let steps =
                now.saturating_duration_since(at).as_nanos() / self.recover_after.as_nanos();
            let steps = usize::try_from(steps).unwrap_or(usize::MAX);
            cap.saturating_add(steps).min(self.max)
        };
        if cap >= self.max {
            st.reduced = None;
        }
        cap
    }

    /// When the cap next goes up by one, if it is below `max` (call after `cap_at`).
    fn next_recovery(&self, st: &ConnState, now: Instant) -> Option<Instant> {
        let (_, at) = st.reduced?;
        let elapsed = now.saturating_duration_since(at).as_nanos();
        let period = self.recover_after.as_nanos();
        let next = (elapsed / period + 1) * period;
        let next = Duration::from_nanos(u64::try_from(next).unwrap_or(u64::MAX));
        Some(at + next)
    }

    /// Waits until fewer than the current cap are active, then takes a slot.
    pub async fn acquire(self: &Arc<Self>) -> ConnPermit {
        loop {
            // Registered before looking at the state, so a release in between is not missed.
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            let wake_at = {
                let mut st = lock(&self.state);
                let now = Instant::now();
                if st.active < self.cap_at(&mut st, now) {
                    st.active += 1;
                    return ConnPermit {
                        limit: Arc::clone(self),
                    };
                }
                self.next_recovery(&st, now)
            };
            match wake_at {
                Some(t) => {
                    tokio::select! {
                        _ = released => {}
                        _ = tokio::time::sleep_until(t) => {}
                    }
                }
                None => released.await,
            }
        }
    }

    /// Takes a slot if one is free now.
    pub fn try_acquire(self: &Arc<Self>) -> Option<ConnPermit> {
        let mut st = lock(&self.state);
        if st.active < self.cap_at(&mut st, Instant::now()) {
            st.active += 1;
            Some(ConnPermit {
                limit: Arc::clone(self),
            })
        } else {
            None
        }
    }

    /// The upstream said "too many connections" (`432 4.3.2`): lower the cap by one (not
    /// below 1) and restart the recovery period. Permits already held stay valid; new ones
    /// wait until `active` falls below the new cap.
    pub fn reduce(&self) {
        let mut st = lock(&self.state);
        let now = Instant::now();
        let cap = self.cap_at(&mut st, now);
        st.reduced = Some((cap.saturating_sub(1).max(1), now));
    }

    pub fn current_cap(&self) -> usize {
        let mut st = lock(&self.state);
        self.cap_at(&mut st, Instant::now())
    }

    pub fn active(&self) -> usize {
        lock(&self.state).active
    }
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        lock(&self.limit.state).active -= 1;
        // Every waiter re-checks; one of them gets the slot.
        self.limit.released.notify_waiters();
    }
}

// ---------------------------------------------------------------------------------------------
// DailyRecipients
// ---------------------------------------------------------------------------------------------

/// Length of the rolling window, in minutes.
const WINDOW_MINUTES: u64 = 24 * 60;
/// A state file bigger than this is not ours (at most ~2,900 buckets are ever written).
const MAX_FILE_BYTES: u64 = 1 << 20;
/// `flush_if_due` writes at most this often.
const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// Recipients submitted in the last 24 hours (rolling), in per-minute buckets keyed by unix
/// minute, persisted to a small JSON file so the count survives restarts.
///
/// Window rules:
/// - A bucket for minute `m` counts until `(m + 1) * 60 s + 24 h`, i.e. 24 h after the *end*
///   of its minute: up to a minute longer than Exchange's window, never shorter.
/// - Buckets dated in the future (the clock went back, or the file was written by a clock
///   that was ahead) are counted and expire 24 h after their own time. A date more than 24 h
///   ahead is treated as exactly 24 h ahead, so a wildly wrong clock holds mail for at most
///   48 h instead of for as long as the error.
/// - `limit` = 0 means unlimited (recipients are still counted).
/// - A message with more recipients than `limit` fits only when the window is empty (and
///   then overshoots it); Exchange will likely refuse it, but it is not held forever.
///
/// [`DailyRecipients::reserve`] and [`DailyRecipients::release`] write the file themselves
/// (through [`DailyRecipients::flush_if_due`], at most once per second; failures are logged);
/// call [`DailyRecipients::flush`] at shutdown to write the last changes.
#[derive(Debug)]
pub struct DailyRecipients {
    path: PathBuf,
    limit: u64,
    state: Mutex<DailyState>,
    /// Serialises file writes (taken before `state`, never after).
    io: Mutex<()>,
}

#[derive(Debug, Default)]
struct DailyState {
    buckets: BTreeMap<u64, u64>,
    dirty: bool,
    last_flush: Option<SystemTime>,
}

#[derive(Serialize, Deserialize)]
struct DailyFile {
    version: u32,
    /// unix minute -> recipients.
    buckets: BTreeMap<u64, u64>,
}

fn since_epoch(t: SystemTime) -> Duration {
    t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO)
}

/// When the bucket for minute `m` stops counting, as time since the epoch.
fn bucket_expiry(m: u64) -> Duration {
    Duration::from_secs(m.saturating_add(1 + WINDOW_MINUTES).saturating_mul(60))
}

impl DailyState {
    /// Drops expired buckets and pulls far-future ones back to 24 h ahead.
    fn prune(&mut self, now_min: u64) {
        let horizon = now_min.saturating_add(WINDOW_MINUTES);
        if horizon < u64::MAX {
            let far = self.buckets.split_off(&(horizon + 1));
            if !far.is_empty() {
                let moved = far.values().fold(0u64, |a, c| a.saturating_add(*c));
                let b = self.buckets.entry(horizon).or_insert(0);
                *b = b.saturating_add(moved);
            }
        }
        // Bucket m has expired iff (m + 1 + WINDOW) * 60 <= now, i.e. m + 1 + WINDOW <= now_min.
        self.buckets = self
            .buckets
            .split_off(&now_min.saturating_sub(WINDOW_MINUTES));
    }

    fn total(&self) -> u64 {
        self.buckets
            .values()
            .fold(0u64, |a, c| a.saturating_add(*c))
    }
}

impl DailyRecipients {
    /// Loads `path` if it exists. A missing file starts empty; an unreadable or corrupt one
    /// logs a warning and starts empty (never fails start-up). Creates the parent directory
    /// if missing (a failure there is logged and shows up again at the first write).
    pub fn open(path: PathBuf, limit: u64) -> DailyRecipients {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty())
            && let Err(e) = fs::create_dir_all(parent)
        {
            tracing::warn!(path = %parent.display(), error = %e, "cannot create the directory for the recipient counter");
        }
        let buckets = match load(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the recipient counter; starting from zero");
                BTreeMap::new()
            }
        };
        DailyRecipients {
            path,
            limit,
            state: Mutex::new(DailyState {
                buckets,
                ..DailyState::default()
            }),
            io: Mutex::new(()),
        }
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Reserves `n` recipients at wall time `now`. `Ok(())` if the count in the last 24 h plus
    /// `n` is within the limit; they are then counted at once. `Err(wait)` otherwise: how long
    /// until enough old buckets expire for `n` to fit (nothing is counted). See the type's
    /// docs for `n > limit`.
    pub fn reserve(&self, n: u64, now: SystemTime) -> Result<(), Duration> {
        self.reserve_within(n, self.limit, now)
    }

    /// [`DailyRecipients::reserve`] against `limit` instead of the limit it was opened with:
    /// after a reload changes `recipients_per_day`, the new mailbox keeps counting in the
    /// same counter (one file, one count) with its own limit.
    pub fn reserve_within(&self, n: u64, limit: u64, now: SystemTime) -> Result<(), Duration> {
        let now_d = since_epoch(now);
        let now_min = now_d.as_secs() / 60;
        {
            let mut st = lock(&self.state);
            st.prune(now_min);
            if n > 0 && limit > 0 {
                // Fits iff total + n <= limit; n > limit fits only an empty window.
                let allowed = limit.saturating_sub(n);
                let mut total = st.total();
                if total > allowed {
                    let mut wait = Duration::ZERO;
                    for (m, c) in &st.buckets {
                        total -= c;
                        if total <= allowed {
                            wait = bucket_expiry(*m).saturating_sub(now_d);
                            break;
                        }
                    }
                    return Err(wait);
                }
            }
            if n == 0 {
                return Ok(());
            }
            let b = st.buckets.entry(now_min).or_insert(0);
            *b = b.saturating_add(n);
            st.dirty = true;
        }
        self.flush_logged(now);
        Ok(())
    }

    /// Gives back recipients that were reserved but not accepted upstream (taken from the
    /// newest buckets first; the count never goes below zero).
    pub fn release(&self, n: u64, now: SystemTime) {
        if n == 0 {
            return;
        }
        {
            let mut st = lock(&self.state);
            st.prune(since_epoch(now).as_secs() / 60);
            let mut left = n;
            while left > 0 {
                let Some(mut last) = st.buckets.last_entry() else {
                    break;
                };
                let take = left.min(*last.get());
                *last.get_mut() -= take;
                left -= take;
                if *last.get() == 0 {
                    last.remove();
                }
            }
            st.dirty = true;
        }
        self.flush_logged(now);
    }

    /// Recipients counted in the 24 h window at `now`.
    pub fn count(&self, now: SystemTime) -> u64 {
        let mut st = lock(&self.state);
        st.prune(since_epoch(now).as_secs() / 60);
        st.total()
    }

    fn flush_logged(&self, now: SystemTime) {
        if let Err(e) = self.flush_if_due(now) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot save the recipient counter");
        }
    }

    /// Writes the file if something changed and the last write (or attempt) was at least a
    /// second ago (or the clock went back).
    pub fn flush_if_due(&self, now: SystemTime) -> io::Result<()> {
        let _io = lock(&self.io);
        let snapshot = {
            let mut st = lock(&self.state);
            let due = match st.last_flush {
                None => true,
                Some(last) => now.duration_since(last).map_or(true, |d| d >= FLUSH_EVERY),
            };
            if !st.dirty || !due {
                return Ok(());
            }
            st.last_flush = Some(now);
            st.dirty = false;
            st.buckets.clone()
        };
        self.write_or_mark_dirty(snapshot)
    }

    /// Writes the file now if anything changed since the last write (for shutdown).
    pub fn flush(&self) -> io::Result<()> {
        let _io = lock(&self.io);
        let snapshot = {
            let mut st = lock(&self.state);
            if !st.dirty {
                return Ok(());
            }
            st.dirty = false;
            st.buckets.clone()
        };
        self.write_or_mark_dirty(snapshot)
    }

    fn write_or_mark_dirty(&self, buckets: BTreeMap<u64, u64>) -> io::Result<()> {
        let r = write_file(
            &self.path,
            &DailyFile {
                version: 1,
                buckets,
            },
        );
        if r.is_err() {
            lock(&self.state).dirty = true;
        }
        r
    }
}

fn load(path: &Path) -> io::Result<BTreeMap<u64, u64>> {
    let f = File::open(path)?;
    let mut text = String::new();
    f.take(MAX_FILE_BYTES + 1).read_to_string(&mut text)?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "file too large"));
    }
    let file: DailyFile =
        serde_json::from_str(&text).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    if file.version != 1 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unknown version {}", file.version),
        ));
    }
    Ok(file.buckets.into_iter().filter(|(_, c)| *c > 0).collect())
}

/// tmp + fsync + rename + directory fsync.
fn write_file(path: &Path, file: &DailyFile) -> io::Result<()> {
    let json = serde_json::to_vec(file).map_err(io::Error::other)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)?;
    f.write_all(&json)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, path)?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const MS: Duration = Duration::from_millis(1);

    // ---- Pacer ----

    #[tokio::test(start_paused = true)]
    async fn pacer_spaces_sequential_sends() {
        let p = Pacer::new(30);
        let start = Instant::now();
        let mut times = Vec::new();
        for _ in 0..65 {
            p.acquire().await;
            times.push(Instant::now() - start);
        }
        for (k, t) in times.iter().enumerate() {
            assert_eq!(*t, Duration::from_secs(2 * k as u64), "send {k}");
        }
        // Any half-open 60 s window holds at most 30 sends.
        for k in 0..times.len() - 30 {
            assert!(times[k + 30] - times[k] >= Duration::from_secs(60));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn pacer_counts_the_sends_of_the_last_minute() {
        let p = Pacer::new(6000);
        assert_eq!(p.this_minute(), 0);
        for _ in 0..3 {
            p.acquire().await;
        }
        assert_eq!(p.this_minute(), 3);
        tokio::time::advance(Duration::from_secs(59)).await;
        p.acquire().await;
        assert_eq!(p.this_minute(), 4);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(p.this_minute(), 1, "the first three are over a minute old");
        let unlimited = Pacer::new(0);
        unlimited.acquire().await;
        assert_eq!(unlimited.this_minute(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn pacer_uneven_interval_never_exceeds_the_rate() {
        let p = Pacer::new(7); // 8.571428571 s
        let start = Instant::now();
        let mut times = Vec::new();
        for _ in 0..22 {
            p.acquire().await;
            times.push(Instant::now() - start);
        }
        let i = Duration::from_secs(60) / 7;
        for (k, t) in times.iter().enumerate() {
            let ideal = i * k as u32;
            assert!(
                *t >= ideal && *t <= ideal + MS,
                "send {k} at {t:?}, ideal {ideal:?}"
            );
        }
        for k in 0..times.len() - 7 {
            assert!(times[k + 7] - times[k] >= Duration::from_secs(60) - MS);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn pacer_spaces_concurrent_tasks() {
        let p = Arc::new(Pacer::new(30));
        let start = Instant::now();
        let tasks: Vec<_> = (0..10)
            .map(|_| {
                let p = Arc::clone(&p);
                tokio::spawn(async move {
                    p.acquire().await;
                    Instant::now() - start
                })
            })
            .collect();
        let mut times = Vec::new();
        for t in tasks {
            times.push(t.await.unwrap());
        }
        times.sort();
        let expected: Vec<_> = (0..10).map(|k| Duration::from_secs(2 * k)).collect();
        assert_eq!(times, expected);
    }

    #[tokio::test(start_paused = true)]
    async fn pacer_no_burst_after_idle() {
        let p = Pacer::new(30);
        for _ in 0..3 {
            p.acquire().await;
        }
        tokio::time::advance(Duration::from_secs(600)).await;
        assert_eq!(p.reserve(), Duration::ZERO);
        assert_eq!(p.reserve(), Duration::from_secs(2));
        assert_eq!(p.reserve(), Duration::from_secs(4));
    }

    #[tokio::test(start_paused = true)]
    async fn pacer_try_reserve_and_unlimited() {
        let p = Pacer::new(30);
        assert_eq!(p.try_reserve(Duration::ZERO), Ok(Duration::ZERO));
        assert_eq!(
            p.try_reserve(Duration::from_secs(1)),
            Err(Duration::from_secs(2))
        );
        // Nothing was reserved by the refusal.
        assert_eq!(
            p.try_reserve(Duration::from_secs(2)),
            Ok(Duration::from_secs(2))
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(p.reserve(), Duration::from_secs(3));

        let u = Pacer::new(0);
        for _ in 0..1000 {
            assert_eq!(u.reserve(), Duration::ZERO);
        }
        let start = Instant::now();
        u.acquire().await;
        assert_eq!(Instant::now(), start);
    }

    // ---- ConnLimit ----

    /// Spawns `n` tasks that each take a permit, hold it for 1 s, and record the peak number
    /// of holders.
    fn spawn_holders(
        limit: &Arc<ConnLimit>,
        n: usize,
        peak: &Arc<AtomicUsize>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let holding = Arc::new(AtomicUsize::new(0));
        (0..n)
            .map(|_| {
                let (limit, peak, holding) =
                    (Arc::clone(limit), Arc::clone(peak), Arc::clone(&holding));
                tokio::spawn(async move {
                    let _permit = limit.acquire().await;
                    let now = holding.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    assert!(limit.active() <= limit.current_cap());
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    holding.fetch_sub(1, Ordering::SeqCst);
                })
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn conn_limit_caps_concurrency() {
        let limit = ConnLimit::new(3);
        let peak = Arc::new(AtomicUsize::new(0));
        let start = Instant::now();
        for t in spawn_holders(&limit, 10, &peak) {
            t.await.unwrap();
        }
        assert_eq!(peak.load(Ordering::SeqCst), 3);
        // 10 tasks, 3 at a time, 1 s each: 4 rounds.
        assert_eq!(Instant::now() - start, Duration::from_secs(4));
        assert_eq!(limit.active(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn conn_limit_try_acquire() {
        let limit = ConnLimit::new(2);
        let a = limit.try_acquire().unwrap();
        let _b = limit.try_acquire().unwrap();
        assert!(limit.try_acquire().is_none());
        assert_eq!(limit.active(), 2);
        drop(a);
        assert!(limit.try_acquire().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn conn_limit_reduce_then_waiters_go_one_at_a_time() {
        let limit = ConnLimit::new(3);
        let held: Vec<_> = (0..3).map(|_| limit.try_acquire().unwrap()).collect();
        limit.reduce();
        limit.reduce();
        limit.reduce(); // not below 1
        assert_eq!(limit.current_cap(), 1);
        assert_eq!(limit.active(), 3);

        let peak = Arc::new(AtomicUsize::new(0));
        let tasks = spawn_holders(&limit, 5, &peak);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(peak.load(Ordering::SeqCst), 0);
        let start = Instant::now();
        drop(held);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(peak.load(Ordering::SeqCst), 1);
        assert_eq!(Instant::now() - start, Duration::from_secs(5));
        assert_eq!(limit.current_cap(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn conn_limit_recovers_one_step_per_period() {
        let limit = ConnLimit::new(3);
        let min = Duration::from_secs(60);
        limit.reduce();
        assert_eq!(limit.current_cap(), 2);
        tokio::time::advance(4 * min).await;
        assert_eq!(limit.current_cap(), 2);
        // Another 432 restarts the period.
        limit.reduce();
        assert_eq!(limit.current_cap(), 1);
        tokio::time::advance(5 * min - MS).await;
        assert_eq!(limit.current_cap(), 1);
        tokio::time::advance(MS).await;
        assert_eq!(limit.current_cap(), 2);
        tokio::time::advance(5 * min).await;
        assert_eq!(limit.current_cap(), 3);
        tokio::time::advance(50 * min).await;
        assert_eq!(limit.current_cap(), 3);
        // A reduce after full recovery starts from max again.
        limit.reduce();
        assert_eq!(limit.current_cap(), 2);

        let quick = ConnLimit::with_recover_after(2, Duration::from_secs(10));
        quick.reduce();
        assert_eq!(quick.current_cap(), 1);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(quick.current_cap(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn conn_limit_waiter_wakes_on_recovery() {
        let limit = ConnLimit::new(2);
        limit.reduce();
        let _held = limit.try_acquire().unwrap();
        let start = Instant::now();
        let waiter = {
            let limit = Arc::clone(&limit);
            tokio::spawn(async move { limit.acquire().await })
        };
        // No permit is released: only the cap's recovery lets the waiter in.
        let permit = waiter.await.unwrap();
        assert_eq!(Instant::now() - start, DEFAULT_RECOVER_AFTER);
        assert_eq!(limit.active(), 2);
        drop(permit);
        assert_eq!(limit.active(), 1);
    }

    // ---- DailyRecipients ----

    /// A minute-aligned wall time.
    const T0: u64 = 28_333_333 * 60;
    const HOUR: u64 = 3600;
    const DAY: u64 = 24 * HOUR;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(T0 + secs)
    }

    #[test]
    fn daily_limit_is_respected() {
        let dir = tempfile::tempdir().unwrap();
        let d = DailyRecipients::open(dir.path().join("r.json"), 10);
        assert_eq!(d.reserve(6, at(0)), Ok(()));
        assert!(d.reserve(5, at(1)).is_err());
        assert_eq!(d.count(at(1)), 6);
        assert_eq!(d.reserve(4, at(2)), Ok(()));
        assert_eq!(d.count(at(2)), 10);
        assert!(d.reserve(1, at(3)).is_err());
        assert_eq!(d.reserve(0, at(3)), Ok(()));
    }

    #[test]
    fn daily_count_rolls_off_after_24h() {
        let dir = tempfile::tempdir().unwrap();
        let d = DailyRecipients::open(dir.path().join("r.json"), 10);
        d.reserve(6, at(0)).unwrap();
        d.reserve(4, at(HOUR + 30)).unwrap();
        assert_eq!(d.count(at(DAY)), 10);
        // Minute 0's bucket counts until 24 h after the end of its minute.
        assert_eq!(d.count(at(DAY + 59)), 10);
        assert_eq!(d.count(at(DAY + 60)), 4);
        assert_eq!(d.count(at(DAY + HOUR + 59)), 4);
        assert_eq!(d.count(at(DAY + HOUR + 60)), 0);
    }

    #[test]
    fn daily_wait_time() {
        let dir = tempfile::tempdir().unwrap();
        let d = DailyRecipients::open(dir.path().join("r.json"), 10);
        d.reserve(6, at(0)).unwrap();
        d.reserve(4, at(HOUR)).unwrap();
        let now = at(2 * HOUR) + Duration::from_millis(500);
        // 5 fit once the 6 from minute 0 expire, at DAY + 60.
        let expect = Duration::from_secs(DAY + 60 - 2 * HOUR) - Duration::from_millis(500);
        assert_eq!(d.reserve(5, now), Err(expect));
        // 7 need both buckets gone.
        let expect7 = Duration::from_secs(DAY + HOUR + 60 - 2 * HOUR) - Duration::from_millis(500);
        assert_eq!(d.reserve(7, now), Err(expect7));
        assert_eq!(d.count(now), 10);
        assert!(d.reserve(5, now + expect - MS).is_err());
        assert_eq!(d.reserve(5, now + expect), Ok(()));
        assert_eq!(d.count(now + expect), 9);
    }

    #[test]
    fn daily_more_than_limit_needs_an_empty_window() {
        let dir = tempfile::tempdir().unwrap();
        let d = DailyRecipients::open(dir.path().join("r.json"), 10);
        d.reserve(1, at(0)).unwrap();
        assert_eq!(
            d.reserve(11, at(60)),
            Err(Duration::from_secs(DAY + 60 - 60))
        );
        assert_eq!(d.reserve(11, at(DAY + 60)), Ok(()));
        assert_eq!(d.count(at(DAY + 60)), 11);
        assert!(d.reserve(1, at(DAY + 61)).is_err());

        let unlimited = DailyRecipients::open(dir.path().join("u.json"), 0);
        assert_eq!(unlimited.reserve(1_000_000, at(0)), Ok(()));
        assert_eq!(unlimited.reserve(1_000_000, at(0)), Ok(()));
        assert_eq!(unlimited.count(at(0)), 2_000_000);
    }

    #[test]
    fn daily_release() {
        let dir = tempfile::tempdir().unwrap();
        let d = DailyRecipients::open(dir.path().join("r.json"), 10);
        d.reserve(3, at(0)).unwrap();
        d.reserve(7, at(HOUR)).unwrap();
        assert!(d.reserve(1, at(HOUR)).is_err());
        d.release(5, at(HOUR));
        assert_eq!(d.count(at(HOUR)), 5);
        assert_eq!(d.reserve(5, at(HOUR)), Ok(()));
        // Released from the newest buckets first.
        d.release(8, at(HOUR + 1));
        assert_eq!(d.count(at(HOUR + 1)), 2);
        assert_eq!(d.count(at(DAY + 60)), 0);
        d.release(100, at(HOUR + 2));
        assert_eq!(d.count(at(HOUR + 2)), 0);
    }

    #[test]
    fn daily_survives_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state").join("nested").join("r.json");
        {
            let d = DailyRecipients::open(path.clone(), 10);
            d.reserve(4, at(0)).unwrap();
            d.reserve(3, at(HOUR)).unwrap();
            d.release(1, at(HOUR));
            d.flush().unwrap();
        }
        assert!(!path.with_extension("json.tmp").exists());
        let d = DailyRecipients::open(path.clone(), 10);
        assert_eq!(d.count(at(HOUR)), 6);
        assert!(d.reserve(5, at(HOUR)).is_err());
        assert_eq!(d.count(at(DAY + 60)), 2);
    }

    #[test]
    fn daily_flush_if_due_writes_at_most_once_per_second() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.json");
        let on_disk = |now| DailyRecipients::open(path.clone(), 10).count(now);
        let d = DailyRecipients::open(path.clone(), 10);
        d.reserve(1, at(0)).unwrap();
        assert_eq!(on_disk(at(0)), 1);
        d.reserve(1, at(0) + Duration::from_millis(500)).unwrap();
        assert_eq!(on_disk(at(1)), 1);
        d.reserve(1, at(1)).unwrap();
        assert_eq!(on_disk(at(1)), 3);
        d.release(1, at(1));
        assert_eq!(on_disk(at(1)), 3);
        d.flush().unwrap();
        assert_eq!(on_disk(at(1)), 2);
    }

    #[test]
    fn daily_corrupt_or_missing_file_starts_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.json");
        assert_eq!(DailyRecipients::open(path.clone(), 10).count(at(0)), 0);
        for junk in [
            &b"not json at all"[..],
            b"{\"version\":1,\"buckets\":{\"x\":1}}",
            b"{\"version\":2,\"buckets\":{}}",
            b"{\"version\":1,\"buckets\":{\"5\":-1}}",
            b"\xff\xfe\x00",
            b"",
        ] {
            fs::write(&path, junk).unwrap();
            let d = DailyRecipients::open(path.clone(), 10);
            assert_eq!(d.count(at(0)), 0);
            // The next write replaces it.
            d.reserve(2, at(0)).unwrap();
            assert_eq!(DailyRecipients::open(path.clone(), 10).count(at(0)), 2);
        }
        // A directory where the file should be: unreadable, no panic.
        let as_dir = dir.path().join("dir.json");
        fs::create_dir(&as_dir).unwrap();
        let d = DailyRecipients::open(as_dir, 10);
        assert_eq!(d.count(at(0)), 0);
        assert_eq!(d.reserve(1, at(0)), Ok(()));
        assert!(d.flush().is_err());
    }

    #[test]
    fn daily_future_buckets_count_and_expire_after_their_own_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.json");
        {
            let d = DailyRecipients::open(path.clone(), 10);
            d.reserve(4, at(10 * HOUR)).unwrap();
            d.flush().unwrap();
        }
        // The clock went back 10 h.
        let d = DailyRecipients::open(path.clone(), 10);
        assert_eq!(d.count(at(0)), 4);
        assert_eq!(
            d.reserve(7, at(0)),
            Err(Duration::from_secs(10 * HOUR + DAY + 60))
        );
        assert_eq!(d.reserve(6, at(0)), Ok(()));
        assert_eq!(d.count(at(DAY + 60)), 4);
        assert_eq!(d.count(at(10 * HOUR + DAY + 59)), 4);
        assert_eq!(d.count(at(10 * HOUR + DAY + 60)), 0);
    }

    #[test]
    fn daily_far_future_buckets_are_capped_at_24h_ahead() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.json");
        let far = (T0 + 365 * DAY) / 60;
        fs::write(
            &path,
            format!(
                "{{\"version\":1,\"buckets\":{{\"{far}\":3,\"{}\":2}}}}",
                u64::MAX
            ),
        )
        .unwrap();
        let d = DailyRecipients::open(path, 10);
        assert_eq!(d.count(at(0)), 5);
        assert_eq!(d.count(at(2 * DAY + 59)), 5);
        assert_eq!(d.count(at(2 * DAY + 60)), 0);
    }

    #[test]
    fn types_are_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Pacer>();
        check::<ConnLimit>();
        check::<ConnPermit>();
        check::<DailyRecipients>();
    }
}
