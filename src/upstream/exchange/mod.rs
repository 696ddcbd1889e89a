//! The Exchange Online upstream: client submission on smtp.office365.com:587 with STARTTLS
//! and SASL XOAUTH2, tokens from a shared [`TokenHandle`].
//!
//! - Connections: at most `limits.connections` per upstream (Exchange allows 3 per mailbox),
//!   authenticated connections are reused (RSET between messages) until idle for
//!   [`IDLE_MAX`] or the token they authenticated with nears its renewal point. A `432 4.3.2`
//!   lowers the cap for a while ([`ConnLimit`]).
//! - Pacing: `messages_per_minute`, evenly spaced ([`Pacer`]); `recipients_per_day` counted in
//!   a rolling window that survives restarts ([`DailyRecipients`]): mail is held before
//!   Exchange would reject it.
//! - Every step's result goes through [`classify::classify`]. Problems that would fail every
//!   message the same way (authentication, permissions, TLS, unreachable) *pause* the upstream:
//!   mail is deferred without trying, and one delivery at a time probes it again on the
//!   retry schedule; when a probe succeeds it resumes by itself. Each state change is logged
//!   once with its meaning and remedy, and sent to `queue.postmaster` as an alert.

pub mod classify;
pub mod conn;
pub mod rewrite;

use std::collections::{HashSet, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use self::classify::{Problem, Step, Verdict, classify_reply};
use self::conn::{Endpoint, Session, StepError, Timeouts};
use super::limits::{ConnLimit, ConnPermit, DailyRecipients, Pacer};
use super::{Attempt, BoxFuture, RcptOutcome, Report, Upstream};
use crate::config::exchange::{ExchangeConfig, SenderRewrite};
use crate::outcome::{Diagnosis, UpstreamReply, Verdict as Decided};
use crate::spool::Envelope;
use crate::token::{Token, TokenHandle};

/// Locks `m` even if a panic (a bug) poisoned it: the upstream's state stays consistent
/// enough (each change is one assignment), and a poisoned lock would otherwise turn every
/// later delivery through this upstream into another panic.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// An idle authenticated connection is closed after this long.
pub const IDLE_MAX: Duration = Duration::from_secs(30);
/// How often a certificate credential's expiry is checked.
const CERTIFICATE_CHECK: Duration = Duration::from_secs(24 * 3600);
/// The longest a delivery waits for its pacing slot before deferring instead.
const MAX_PACE_WAIT: Duration = Duration::from_secs(5 * 60);
/// The largest header section read for `sender_rewrite`.
const MAX_HEAD: usize = 1024 * 1024;

/// A message for `queue.postmaster` about a change of an upstream's state.
#[derive(Debug, Clone)]
pub struct Alert {
    pub upstream: String,
    pub subject: String,
    pub body: String,
}

/// The upstream's state, as logged and as reported to admin commands.
#[derive(Debug, Clone)]
pub enum State {
    Ok,
    /// Every message would fail the same way: wait for a probe.
    Paused {
        problem: Problem,
        reason: String,
        next_probe: Instant,
        /// Index into the retry schedule for the next back-off.
        backoff: usize,
        probing: bool,
    },
    /// Not sending until `until` (recipient quota).
    Held {
        until: Instant,
        reason: String,
        problem: Option<Problem>,
    },
}

/// What a caller learns about the upstream's state.
#[derive(Debug, Clone)]
pub struct Status {
    pub state: &'static str,
    pub problem: Option<String>,
    pub meaning: Option<String>,
    pub remedy: Option<String>,
    /// When the pause or hold began, milliseconds since the Unix epoch.
    pub since_ms: Option<u64>,
    /// What the upstream said that caused it.
    pub reply: Option<String>,
    /// Paused: when the next probe may run; held: when sending resumes.
    pub next_ms: Option<u64>,
}

struct Idle {
    session: Session,
    permit: ConnPermit,
    since: Instant,
    /// When the token this session authenticated with reaches its renewal point.
    stale_at: Instant,
}

/// A session in use.
struct Lease {
    session: Session,
    permit: ConnPermit,
    stale_at: Instant,
    reused: bool,
}

/// Why a transaction could not even start or ended for every recipient at once.
#[derive(Debug, Clone)]
struct Failure {
    verdict: Verdict,
    text: String,
    /// The step that failed (`None`: before connecting, e.g. no token).
    step: Option<Step>,
    reply: UpstreamReply,
}

/// What Exchange limits per mailbox: concurrent connections (with the idle authenticated
/// ones, which can serve any upstream sending as this mailbox), the message rate and the
/// rolling recipient count.
pub struct Mailbox {
    conns: Arc<ConnLimit>,
    pool: Mutex<Vec<Idle>>,
    pool_returned: Notify,
    pacer: Pacer,
    /// Shared with the mailbox this one replaced in a reload (same server and mailbox), so
    /// that the rolling count and its file have one owner.
    daily: Arc<DailyRecipients>,
    /// `limits.recipients_per_day` of this mailbox (the counter may be older).
    recipients_per_day: u64,
}

impl Mailbox {
    /// `counter_path` keeps the rolling recipient count across restarts.
    pub fn new(
        limits: &crate::config::exchange::ExchangeLimits,
        counter_path: PathBuf,
    ) -> Arc<Mailbox> {
        Arc::new(Mailbox {
            conns: ConnLimit::new(limits.connections),
            pool: Mutex::new(Vec::new()),
            pool_returned: Notify::new(),
            pacer: Pacer::new(limits.messages_per_minute),
            daily: Arc::new(DailyRecipients::open(
                counter_path,
                limits.recipients_per_day,
            )),
            recipients_per_day: limits.recipients_per_day,
        })
    }

    /// A mailbox with new `limits` that goes on counting recipients in `previous`'s rolling
    /// counter (a reload changed the limits of the same mailbox on the same server).
    pub fn with_counter_of(
        limits: &crate::config::exchange::ExchangeLimits,
        previous: &Mailbox,
    ) -> Arc<Mailbox> {
        Arc::new(Mailbox {
            conns: ConnLimit::new(limits.connections),
            pool: Mutex::new(Vec::new()),
            pool_returned: Notify::new(),
            pacer: Pacer::new(limits.messages_per_minute),
            daily: previous.daily.clone(),
            recipients_per_day: limits.recipients_per_day,
        })
    }

    /// Recipients counted in the rolling day (shared with a mailbox it replaced).
    pub fn recipients_day(&self) -> u64 {
        self.daily.count(SystemTime::now())
    }
}

pub struct Exchange {
    name: String,
    cfg: ExchangeConfig,
    tokens: TokenHandle,
    endpoint: Endpoint,
    /// Connections and limits of the sending mailbox, shared by every upstream that sends
    /// as the same mailbox on the same server.
    mb: Arc<Mailbox>,
    state: Mutex<State>,
    state_changed: Notify,
    /// When the current pause or hold began and the reply behind it (`mailbridge status`).
    since: Mutex<Option<(u64, String)>>,
    /// Problems already explained in the log (per key + detail), so a remedy is written once.
    noted: Mutex<Noted>,
    retry: Vec<Duration>,
    alerts: Option<mpsc::UnboundedSender<Alert>>,
    /// Cancelled when the daemon stops taking messages off the queue: waits for a send slot
    /// end at once (the message stays queued).
    draining: CancellationToken,
}

impl Exchange {
    /// Builds the upstream and starts its idle-connection reaper (stops with `stop`).
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        name: &str,
        cfg: ExchangeConfig,
        tokens: TokenHandle,
        mailbox: Arc<Mailbox>,
        retry: Vec<Duration>,
        alerts: Option<mpsc::UnboundedSender<Alert>>,
        stop: CancellationToken,
        draining: CancellationToken,
    ) -> Result<Arc<Exchange>, String> {
        Self::start_with(
            name,
            cfg,
            tokens,
            mailbox,
            retry,
            alerts,
            stop,
            draining,
            Timeouts::default(),
        )
    }

    #[allow(clippy::too_many_arguments)]
    pub fn start_with(
        name: &str,
        cfg: ExchangeConfig,
        tokens: TokenHandle,
        mailbox: Arc<Mailbox>,
        retry: Vec<Duration>,
        alerts: Option<mpsc::UnboundedSender<Alert>>,
        stop: CancellationToken,
        draining: CancellationToken,
        timeouts: Timeouts,
    ) -> Result<Arc<Exchange>, String> {
        let tls = Endpoint::tls_parameters(&cfg.host, cfg.ca_file.as_deref())?;
        let endpoint = Endpoint {
            host: cfg.host.clone(),
            port: cfg.port,
            helo: cfg.helo_name.clone(),
            tls,
            timeouts,
        };
        let x = Arc::new(Exchange {
            name: name.to_string(),
            mb: mailbox,
            cfg,
            tokens,
            endpoint,
            state: Mutex::new(State::Ok),
            state_changed: Notify::new(),
            since: Mutex::new(None),
            noted: Mutex::new(Noted::default()),
            retry: if retry.is_empty() {
                vec![Duration::from_secs(60)]
            } else {
                retry
            },
            alerts,
            draining,
        });
        x.check_certificate();
        let weak = Arc::downgrade(&x);
        tokio::spawn(async move {
            let mut next_certificate_check = Instant::now() + CERTIFICATE_CHECK;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(IDLE_MAX / 3) => {}
                }
                let Some(x) = weak.upgrade() else { return };
                x.reap(false).await;
                if Instant::now() >= next_certificate_check {
                    next_certificate_check = Instant::now() + CERTIFICATE_CHECK;
                    x.check_certificate();
                }
                // Changes newer than the last write (writes are at most once per second).
                if let Err(e) = x.mb.daily.flush_if_due(SystemTime::now()) {
                    tracing::warn!(upstream = %x.name, error = %e, "cannot save the recipient counter");
                }
            }
            if let Some(x) = weak.upgrade() {
                x.reap(true).await;
                if let Err(e) = x.mb.daily.flush() {
                    tracing::warn!(upstream = %x.name, error = %e, "cannot save the recipient counter");
                }
            }
        });
        Ok(x)
    }

    /// Warns (daily) while a certificate credential expires within 30 days or has expired.
    fn check_certificate(&self) {
        let crate::token::ClientSecret::Certificate(c) = &self.cfg.credentials.secret else {
            return;
        };
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        if let Some(warning) = c.expiry_warning(now) {
            if c.not_after().is_some_and(|t| t <= now) {
                tracing::error!(upstream = %self.name, problem = "certificate_expired", "{warning}");
            } else {
                tracing::warn!(upstream = %self.name, problem = "certificate_expires_soon", "{warning}");
            }
        }
    }

    pub fn mailbox(&self) -> &str {
        &self.cfg.mailbox
    }

    pub fn status(&self) -> Status {
        let st = lock(&self.state).clone();
        let since = lock(&self.since).clone();
        let (m, c) = (&self.cfg.mailbox, &self.cfg.credentials.client_id);
        let wall = |at: Instant| {
            crate::spool::now_ms() + at.saturating_duration_since(Instant::now()).as_millis() as u64
        };
        let (since_ms, reply) = match since {
            Some((ms, r)) => (Some(ms), Some(r)),
            None => (None, None),
        };
        match st {
            State::Ok => Status {
                state: "ok",
                problem: None,
                meaning: None,
                remedy: None,
                since_ms: None,
                reply: None,
                next_ms: None,
            },
            State::Paused {
                problem,
                next_probe,
                ..
            } => Status {
                state: "paused",
                problem: Some(problem.key().into()),
                meaning: Some(problem.meaning()),
                remedy: Some(problem.remedy(m, c)),
                since_ms,
                reply,
                next_ms: Some(wall(next_probe)),
            },
            State::Held {
                reason,
                until,
                problem,
            } => Status {
                state: "held",
                problem: Some(problem.as_ref().map_or("held", |p| p.key()).into()),
                meaning: Some(reason),
                remedy: problem.as_ref().map(|p| p.remedy(m, c)),
                since_ms,
                reply,
                next_ms: Some(wall(until)),
            },
        }
    }

    /// Closes idle sessions past [`IDLE_MAX`] (all of them when `all`).
    async fn reap(&self, all: bool) {
        let old: Vec<Idle> = {
            let mut pool = lock(&self.mb.pool);
            let now = Instant::now();
            let (old, keep): (Vec<Idle>, Vec<Idle>) = pool
                .drain(..)
                .partition(|i| all || now.duration_since(i.since) >= IDLE_MAX || now >= i.stale_at);
            *pool = keep;
            old
        };
        for i in old {
            i.session.quit().await;
            drop(i.permit);
        }
    }

    // ---- state ----

    /// Waits for permission to try. `Ok(true)` = this attempt is the probe of a paused
    /// upstream; `Err((outcome, retry_in))` = defer without trying (paused or held).
    async fn gate(&self) -> Result<bool, (RcptOutcome, Duration)> {
        let wait_limit = Instant::now() + Duration::from_secs(60);
        loop {
            let notified = self.state_changed.notified();
            {
                let mut st = lock(&self.state);
                let now = Instant::now();
                match &mut *st {
                    State::Ok => return Ok(false),
                    State::Held {
                        until,
                        reason,
                        problem,
                    } => {
                        if now >= *until {
                            *st = State::Ok;
                            tracing::info!(upstream = %self.name, "upstream hold ended; sending again");
                            return Ok(false);
                        }
                        let o =
                            RcptOutcome::new(Decided::Held { until_ms: 0 }, reason.as_str().into())
                                .with_problem(problem.as_ref().map(|p| self.diagnose(p)));
                        return Err((o, *until - now));
                    }
                    State::Paused {
                        next_probe,
                        probing,
                        reason,
                        problem,
                        ..
                    } => {
                        if !*probing && now >= *next_probe {
                            *probing = true;
                            return Ok(true);
                        }
                        if !*probing || now >= wait_limit {
                            let wait = next_probe
                                .saturating_duration_since(now)
                                .max(Duration::from_secs(1));
                            let o = RcptOutcome::new(
                                Decided::Paused { until_ms: 0 },
                                format!("upstream paused: {reason}").into(),
                            )
                            .with_problem(Some(self.diagnose(problem)));
                            return Err((o, wait));
                        }
                    }
                }
            }
            // A probe is running: wait for its result rather than deferring at once.
            let _ = tokio::time::timeout_at(wait_limit, notified).await;
        }
    }

    /// The probe reached the upstream: unpause. Only a pause whose probe is still running
    /// ends here; if the probe itself paused again (or a hold began), that state stays.
    fn resume(&self) {
        let mut st = lock(&self.state);
        let State::Paused {
            problem,
            probing: true,
            ..
        } = &*st
        else {
            return;
        };
        tracing::info!(upstream = %self.name, problem = problem.key(), "upstream works again; delivery resumed");
        if !problem.is_transient() {
            self.send_alert(
                format!("mailbridge: upstream {} works again", self.name),
                format!(
                    "Upstream {} (mailbox {}) works again after: {}\r\nQueued mail is being delivered.\r\n",
                    self.name,
                    self.cfg.mailbox,
                    problem.meaning()
                ),
            );
        }
        lock(&self.noted).clear();
        *st = State::Ok;
        drop(st);
        self.state_changed.notify_waiters();
    }

    /// A probe (or a delivery) ended without resolving anything: let the next one try.
    fn end_probe(&self) {
        let mut st = lock(&self.state);
        if let State::Paused { probing, .. } = &mut *st {
            *probing = false;
        }
        drop(st);
        self.state_changed.notify_waiters();
    }

    /// Pauses (or keeps paused, with a longer back-off). Returns the delay to the next probe.
    fn pause(&self, problem: Problem, detail: &str) -> Duration {
        let mut st = lock(&self.state);
        let backoff = match &*st {
            State::Paused {
                backoff,
                problem: p,
                ..
            } if p.key() == problem.key() => backoff + 1,
            _ => 0,
        };
        let changed = !matches!(&*st, State::Paused { problem: p, .. } if p.key() == problem.key());
        let delay = self.probe_delay(&problem, backoff);
        let reason = format!("{} ({detail})", problem.meaning());
        if changed {
            *lock(&self.since) = Some((crate::spool::now_ms(), detail.to_string()));
            let remedy = problem.remedy(&self.cfg.mailbox, &self.cfg.credentials.client_id);
            tracing::error!(
                upstream = %self.name,
                problem = problem.key(),
                reply = detail,
                remedy = %remedy,
                meaning = %problem.meaning(),
                next_probe = %humantime::format_duration(delay),
                "upstream paused"
            );
            if !problem.is_transient() {
                self.send_alert(
                format!("mailbridge: upstream {} paused: {}", self.name, problem.key()),
                format!(
                    "mailbridge stopped delivering through upstream {} (mailbox {}).\r\n\r\nCause: {}\r\nUpstream said: {detail}\r\n\r\nRemedy: {remedy}\r\n\r\nMail stays queued; mailbridge tries again by itself ({}) and resumes when it works.\r\n",
                    self.name,
                    self.cfg.mailbox,
                    problem.meaning(),
                    match problem.probe_every() {
                        Some(_) => format!("every {}", humantime::format_duration(delay)),
                        None => format!(
                            "back-off up to {}",
                            humantime::format_duration(*self.retry.last().unwrap())
                        ),
                    },
                ),
            );
            }
        } else {
            tracing::warn!(upstream = %self.name, problem = problem.key(), reply = detail, next_probe = %humantime::format_duration(delay), "upstream still paused");
        }
        *st = State::Paused {
            problem,
            reason,
            next_probe: Instant::now() + delay,
            backoff,
            probing: false,
        };
        drop(st);
        self.state_changed.notify_waiters();
        delay
    }

    /// When to probe a paused upstream: the next step of `queue.retry`, or, for blocks that
    /// Microsoft lifts on its own schedule (5.1.8, 5.7.705), a fixed slow pace (15 min, or
    /// the longest `queue.retry` interval if that is shorter).
    fn probe_delay(&self, problem: &Problem, backoff: usize) -> Duration {
        match problem.probe_every() {
            Some(every) => every.min(*self.retry.last().unwrap()),
            None => self.retry[backoff.min(self.retry.len() - 1)],
        }
    }

    fn hold(&self, for_: Duration, reason: String, problem: Option<&Problem>) {
        let mut st = lock(&self.state);
        let until = Instant::now() + for_;
        if !matches!(&*st, State::Held { .. }) {
            *lock(&self.since) = Some((crate::spool::now_ms(), reason.clone()));
            tracing::warn!(
                upstream = %self.name,
                problem = problem.map_or("held", |p| p.key()),
                hold = %humantime::format_duration(for_),
                reason = %reason,
                remedy = problem.map(|p| p.remedy(&self.cfg.mailbox, &self.cfg.credentials.client_id)),
                "upstream held"
            );
        }
        if !matches!(&*st, State::Held { until: u, .. } if *u >= until) {
            *st = State::Held {
                until,
                reason,
                problem: problem.cloned(),
            };
        }
        drop(st);
        self.state_changed.notify_waiters();
    }

    /// The typed diagnosis of `problem` for this upstream (mailbox and client id filled in).
    fn diagnose(&self, problem: &Problem) -> Diagnosis {
        problem.diagnose(&self.cfg.mailbox, &self.cfg.credentials.client_id)
    }

    /// The typed outcome of a failed step for one recipient.
    fn outcome(&self, f: &Failure) -> RcptOutcome {
        let (verdict, problem) = match &f.verdict {
            Verdict::Ok => (Decided::Delivered, None),
            Verdict::Fail { problem } => (Decided::Bounced, problem.as_ref()),
            Verdict::Defer {
                problem,
                pause: true,
                ..
            } => (Decided::Paused { until_ms: 0 }, problem.as_ref()),
            Verdict::Defer {
                problem,
                hold: Some(_),
                ..
            } => (Decided::Held { until_ms: 0 }, problem.as_ref()),
            Verdict::Defer { problem, .. } => (Decided::Deferred { until_ms: 0 }, problem.as_ref()),
            Verdict::RefreshAndRetry => (Decided::Deferred { until_ms: 0 }, None),
        };
        RcptOutcome {
            step: f.step,
            ..RcptOutcome::new(verdict, f.reply.clone())
                .with_problem(problem.map(|p| self.diagnose(p)))
        }
    }

    fn send_alert(&self, subject: String, body: String) {
        if let Some(tx) = &self.alerts {
            let _ = tx.send(Alert {
                upstream: self.name.clone(),
                subject,
                body,
            });
        }
    }

    /// Logs a problem's remedy the first time it is seen (per key and detail).
    fn note_once(&self, problem: &Problem, detail: &str) {
        if !lock(&self.noted).first(problem.key(), detail) {
            return;
        }
        tracing::warn!(
            upstream = %self.name,
            problem = problem.key(),
            meaning = %problem.meaning(),
            detail,
            remedy = %problem.remedy(&self.cfg.mailbox, &self.cfg.credentials.client_id),
            "upstream problem"
        );
    }

    /// Applies a verdict's side effects on the upstream; returns the retry hint.
    fn apply(&self, v: &Verdict, text: &str, sender: &str) -> Option<Duration> {
        match v {
            Verdict::Defer {
                problem: Some(p),
                pause: true,
                ..
            } => Some(self.pause(p.clone(), text)),
            Verdict::Defer {
                problem,
                hold: Some(h),
                ..
            } => {
                let why = problem
                    .as_ref()
                    .map(|p| format!("{} ({text})", p.meaning()))
                    .unwrap_or_else(|| text.to_string());
                self.hold(*h, why, problem.as_ref());
                Some(*h)
            }
            Verdict::Defer {
                fewer_connections: true,
                ..
            } => {
                self.mb.conns.reduce();
                let p = Problem::TooManyConnections;
                tracing::warn!(
                    upstream = %self.name,
                    problem = p.key(),
                    cap = self.mb.conns.current_cap(),
                    reply = text,
                    remedy = %p.remedy(&self.cfg.mailbox, &self.cfg.credentials.client_id),
                    "too many connections for this mailbox; using fewer for a while"
                );
                Some(self.retry[0].min(Duration::from_secs(60)))
            }
            Verdict::Defer {
                problem: Some(p), ..
            } => {
                self.note_once(p, text);
                None
            }
            Verdict::Fail { problem: Some(p) } => {
                self.note_once(p, sender);
                None
            }
            _ => None,
        }
    }

    // ---- connections ----

    async fn lease(&self) -> Result<Lease, Failure> {
        loop {
            let returned = self.mb.pool_returned.notified();
            let idle = {
                let mut pool = lock(&self.mb.pool);
                let now = Instant::now();
                let mut found = None;
                while let Some(i) = pool.pop() {
                    if now.duration_since(i.since) < IDLE_MAX && now < i.stale_at {
                        found = Some(i);
                        break;
                    }
                    // Too old: close it in the background.
                    tokio::spawn(async move {
                        i.session.quit().await;
                    });
                }
                found
            };
            if let Some(mut i) = idle {
                if i.session.rset().await.is_ok() {
                    return Ok(Lease {
                        session: i.session,
                        permit: i.permit,
                        stale_at: i.stale_at,
                        reused: true,
                    });
                }
                continue;
            }
            let permit = tokio::select! {
                p = self.mb.conns.acquire() => p,
                _ = returned => continue,
            };
            return self.connect(permit).await;
        }
    }

    fn give_back(&self, l: Lease) {
        if l.session.is_broken() || Instant::now() >= l.stale_at {
            tokio::spawn(async move {
                l.session.quit().await;
                drop(l.permit);
            });
            return;
        }
        lock(&self.mb.pool).push(Idle {
            session: l.session,
            permit: l.permit,
            since: Instant::now(),
            stale_at: l.stale_at,
        });
        self.mb.pool_returned.notify_one();
    }

    fn token_failure(&self, e: &crate::token::TokenError) -> Failure {
        let problem = Problem::Token {
            meaning: format!("no OAuth token: {e}"),
            remedy: e.remedy().to_string(),
            temporary: e.is_temporary(),
        };
        Failure {
            verdict: Verdict::Defer {
                problem: Some(problem),
                pause: true,
                hold: None,
                fewer_connections: false,
            },
            text: format!("cannot get an OAuth token: {e}"),
            step: None,
            reply: format!("4.7.0 cannot get an OAuth token: {e}").into(),
        }
    }

    async fn connect(&self, permit: ConnPermit) -> Result<Lease, Failure> {
        let token = self
            .tokens
            .get()
            .await
            .map_err(|e| self.token_failure(&e))?;
        match self.open_and_auth(&token, false).await {
            Ok(session) => Ok(self.leased(session, permit, &token)),
            Err(Failure {
                verdict: Verdict::RefreshAndRetry,
                text,
                ..
            }) => {
                tracing::info!(upstream = %self.name, reply = %text, "token refused; fetching a new one and retrying once");
                let fresh = self
                    .tokens
                    .force_refresh(&token)
                    .await
                    .map_err(|e| self.token_failure(&e))?;
                let session = self.open_and_auth(&fresh, true).await?;
                Ok(self.leased(session, permit, &fresh))
            }
            Err(f) => Err(f),
        }
    }

    fn leased(&self, session: Session, permit: ConnPermit, token: &Token) -> Lease {
        // Reuse the connection until the token reaches its renewal point.
        let keep = crate::token::refresh_at(token.lifetime);
        let stale_at = (token.expires_at - token.lifetime) + keep;
        Lease {
            session,
            permit,
            stale_at,
            reused: false,
        }
    }

    async fn open_and_auth(&self, token: &Token, retried: bool) -> Result<Session, Failure> {
        let mut s = conn::open(&self.endpoint)
            .await
            .map_err(|e| failure(&e, retried))?;
        match s.auth_xoauth2(&self.cfg.mailbox, &token.value).await {
            Ok(()) => Ok(s),
            Err(e) => {
                s.quit().await;
                Err(failure(&e, retried))
            }
        }
    }

    // ---- delivery ----

    async fn deliver_all(&self, attempt: Attempt) -> Report {
        let env = &attempt.stored.envelope;
        let n = attempt.recipients.len();
        let probe = match self.gate().await {
            Ok(p) => p,
            Err((outcome, wait)) => {
                return Report {
                    outcomes: vec![outcome; n],
                    retry_in: Some(wait),
                };
            }
        };
        let mut outcomes: Vec<Option<RcptOutcome>> = vec![None; n];
        let mut retry_in = None;
        let mut resolved = false;
        let positions: Vec<usize> = (0..n).collect();
        for chunk in positions.chunks(self.cfg.limits.recipients_per_message) {
            let r = self.transaction(&attempt, env, chunk).await;
            resolved |= r.reached_upstream;
            for (k, o) in r.outcomes {
                outcomes[k] = Some(o);
            }
            if r.retry_in.is_some() {
                retry_in = r.retry_in;
            }
            if let Some(rest) = r.stop {
                for o in outcomes.iter_mut().filter(|o| o.is_none()) {
                    *o = Some(rest.clone());
                }
                break;
            }
        }
        if probe {
            if resolved {
                self.resume();
            } else {
                self.end_probe();
            }
        }
        Report {
            outcomes: outcomes
                .into_iter()
                .map(|o| o.unwrap_or_else(|| RcptOutcome::deferred("not attempted".into())))
                .collect(),
            retry_in,
        }
    }

    /// One SMTP transaction for `chunk` (positions into `attempt.recipients`).
    async fn transaction(&self, attempt: &Attempt, env: &Envelope, chunk: &[usize]) -> TxResult {
        let mut r = TxResult::default();
        let all_deferred = |r: &mut TxResult, o: RcptOutcome| {
            r.outcomes = chunk.iter().map(|&k| (k, o.clone())).collect();
            r.stop = Some(o);
        };
        let count = chunk.len() as u64;
        if let Err(wait) =
            self.mb
                .daily
                .reserve_within(count, self.mb.recipients_per_day, SystemTime::now())
        {
            let why = format!(
                "limits.recipients_per_day ({}) reached for mailbox {} in the last 24 hours; holding mail for {} instead of sending into a 554 5.2.0 rejection",
                self.cfg.limits.recipients_per_day,
                self.cfg.mailbox,
                humantime::format_duration(Duration::from_secs(wait.as_secs()))
            );
            self.hold(wait, why.clone(), None);
            all_deferred(
                &mut r,
                RcptOutcome::new(Decided::Held { until_ms: 0 }, format!("4.5.3 {why}").into()),
            );
            r.retry_in = Some(wait);
            return r;
        }
        let mut reserved = count;
        let release = |n: u64| self.mb.daily.release(n, SystemTime::now());

        // A reused connection the server has meanwhile closed fails on its first command:
        // then one fresh connection is tried.
        let mut lease;
        let mut fresh_tries = 0;
        let mut paced = false;
        loop {
            lease = match self.lease().await {
                Ok(l) => l,
                Err(f) => {
                    release(reserved);
                    r.retry_in = self.apply(&f.verdict, &f.text, &env.sender);
                    all_deferred(&mut r, self.outcome(&f));
                    return r;
                }
            };
            // Connected and authenticated: the upstream works.
            r.reached_upstream = true;
            // The send slot is taken with a connection in hand, so a message that waited
            // for a connection cannot go out right next to the one after it.
            if !paced {
                paced = true;
                let wait = match self.mb.pacer.try_reserve(MAX_PACE_WAIT) {
                    Ok(wait) => wait,
                    Err(wait) => {
                        release(reserved);
                        all_deferred(
                            &mut r,
                            RcptOutcome::deferred(
                                "4.4.5 pacing: limits.messages_per_minute reached; waiting for a send slot".into(),
                            ),
                        );
                        r.retry_in = Some(wait);
                        self.finish(lease, true).await;
                        return r;
                    }
                };
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = self.draining.cancelled() => {
                        // Shutting down: the message stays queued for the next start.
                        release(reserved);
                        all_deferred(
                            &mut r,
                            RcptOutcome::deferred("4.3.2 mailbridge is shutting down".into()),
                        );
                        self.finish(lease, true).await;
                        return r;
                    }
                }
            }
            let from = self.envelope_sender(env);
            match lease
                .session
                .mail(&from, env.body.as_deref(), env.smtputf8)
                .await
            {
                Ok(_) => break,
                Err(StepError::Broken { .. }) if lease.reused && fresh_tries == 0 => {
                    fresh_tries += 1;
                    drop(lease);
                    continue;
                }
                Err(e) => {
                    release(reserved);
                    let f = failure(&e, true);
                    r.retry_in = self.apply(&f.verdict, &f.text, &env.sender);
                    let o = self.outcome(&f);
                    r.outcomes = chunk.iter().map(|&k| (k, o.clone())).collect();
                    if is_upstream_wide(&f.verdict) {
                        r.stop = Some(o);
                    }
                    self.finish(lease, matches!(e, StepError::Reply { .. }))
                        .await;
                    return r;
                }
            }
        }

        let mut accepted = Vec::new();
        for &k in chunk {
            let addr = &env.recipients[attempt.recipients[k]].address;
            match lease.session.rcpt(addr).await {
                Ok(_) => accepted.push(k),
                Err(e @ StepError::Reply { .. }) => {
                    let f = failure(&e, true);
                    if let Some(h) = self.apply(&f.verdict, &f.text, &env.sender) {
                        r.retry_in = Some(h);
                    }
                    r.outcomes.push((k, self.outcome(&f)));
                }
                Err(e) => {
                    // The connection broke: nothing of this transaction was sent.
                    release(reserved);
                    let o = RcptOutcome::deferred(UpstreamReply {
                        text: e.to_string(),
                        ..UpstreamReply::default()
                    })
                    .at(e.step());
                    r.outcomes = chunk.iter().map(|&k| (k, o.clone())).collect();
                    self.finish(lease, false).await;
                    return r;
                }
            }
        }
        let refused = (chunk.len() - accepted.len()) as u64;
        if refused > 0 {
            release(refused);
            reserved -= refused;
        }
        if accepted.is_empty() {
            self.finish(lease, true).await;
            return r;
        }

        // The content: the stored file, with a rewritten header section if configured.
        let spool = attempt.spool.clone();
        let stored = attempt.stored.clone();
        let rewrite =
            (self.cfg.sender_rewrite == SenderRewrite::Mailbox).then(|| self.cfg.mailbox.clone());
        let opened = tokio::task::spawn_blocking(
            move || -> std::io::Result<(Vec<u8>, std::io::Take<std::fs::File>)> {
                let mut f = spool.open_content(&stored).map_err(std::io::Error::other)?;
                match rewrite {
                    None => Ok((Vec::new(), f)),
                    Some(mailbox) => {
                        let (head, rest) = read_head(&mut f, MAX_HEAD)?;
                        let mut out = rewrite::rewrite_from(&head, &mailbox);
                        out.extend_from_slice(&rest);
                        Ok((out, f))
                    }
                }
            },
        )
        .await;
        let (head, reader) = match opened {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => {
                release(reserved);
                let o = RcptOutcome::deferred(
                    format!("4.3.0 cannot read the queued message: {e}").into(),
                );
                for &k in &accepted {
                    r.outcomes.push((k, o.clone()));
                }
                self.finish(lease, true).await;
                return r;
            }
            Err(e) => {
                release(reserved);
                let o = RcptOutcome::deferred(format!("4.3.0 internal error: {e}").into());
                for &k in &accepted {
                    r.outcomes.push((k, o.clone()));
                }
                self.finish(lease, false).await;
                return r;
            }
        };

        let len = attempt.stored.content_len + head.len() as u64;
        match lease.session.data(head, len, reader).await {
            Ok(reply) => {
                let o = RcptOutcome::delivered(reply.as_str().into()).at(Step::Dot);
                for &k in &accepted {
                    r.outcomes.push((k, o.clone()));
                }
                lease.session.used += 1;
                self.give_back(lease);
            }
            Err(e @ StepError::Reply { .. }) => {
                release(reserved);
                let f = failure(&e, true);
                if let Some(h) = self.apply(&f.verdict, &f.text, &env.sender) {
                    r.retry_in = Some(h);
                }
                let o = self.outcome(&f);
                for &k in &accepted {
                    r.outcomes.push((k, o.clone()));
                }
                if is_upstream_wide(&f.verdict) {
                    r.stop = Some(o);
                }
                self.finish(lease, true).await;
            }
            Err(e) => {
                let text = if e.step() == Step::Dot {
                    tracing::warn!(
                        upstream = %self.name,
                        queue_id = %env.id,
                        error = %e,
                        "possible duplicate: the connection was lost while or after the message was sent, before Exchange confirmed it; it will be sent again"
                    );
                    format!(
                        "4.4.2 connection lost after the final dot, before the reply (possible duplicate): {e}"
                    )
                } else {
                    release(reserved);
                    format!("4.4.2 {e}")
                };
                let o = RcptOutcome::deferred(text.into()).at(e.step());
                for &k in &accepted {
                    r.outcomes.push((k, o.clone()));
                }
                self.finish(lease, false).await;
            }
        }
        r
    }

    /// After a failed transaction: RSET and keep the connection if it still works.
    async fn finish(&self, mut lease: Lease, usable: bool) {
        if usable && !lease.session.is_broken() && lease.session.rset().await.is_ok() {
            self.give_back(lease);
        } else {
            tokio::spawn(async move {
                lease.session.quit().await;
                drop(lease.permit);
            });
        }
    }

    fn envelope_sender(&self, env: &Envelope) -> String {
        if self.cfg.sender_rewrite == SenderRewrite::Mailbox || env.sender.is_empty() {
            // Exchange client submission sends as the mailbox; a null sender (our own DSNs
            // and alerts) goes out as the mailbox too and is never bounced again.
            self.cfg.mailbox.clone()
        } else {
            env.sender.clone()
        }
    }
}

/// How many (problem, detail) pairs are remembered as already logged.
const NOTED_MAX: usize = 1024;

/// The warn-once memory: which (problem, detail) pairs were already logged with their
/// remedy. The detail is a sender address or a reply text, so it comes from outside and
/// can take endless values: only a 64-bit keyed hash of each pair is kept (never the text),
/// at most [`NOTED_MAX`] of them, the oldest forgotten first. A forgotten pair is at worst
/// logged once more.
#[derive(Default)]
struct Noted {
    hasher: RandomState,
    seen: HashSet<u64>,
    order: VecDeque<u64>,
}

impl Noted {
    /// `true` the first time `(key, detail)` is seen (since it was forgotten).
    fn first(&mut self, key: &str, detail: &str) -> bool {
        let h = self.hasher.hash_one((key, detail));
        if !self.seen.insert(h) {
            return false;
        }
        self.order.push_back(h);
        while self.order.len() > NOTED_MAX {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        true
    }

    fn clear(&mut self) {
        self.seen.clear();
        self.order.clear();
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.seen.len()
    }
}

#[derive(Default)]
struct TxResult {
    outcomes: Vec<(usize, RcptOutcome)>,
    retry_in: Option<Duration>,
    /// Set when the rest of the message's recipients should not be tried now: their outcome.
    stop: Option<RcptOutcome>,
    /// Connected and authenticated (the upstream itself works).
    reached_upstream: bool,
}

fn is_upstream_wide(v: &Verdict) -> bool {
    matches!(
        v,
        Verdict::Defer { pause: true, .. }
            | Verdict::Defer { hold: Some(_), .. }
            | Verdict::Defer {
                fewer_connections: true,
                ..
            }
    )
}

/// Turns a step error into a verdict with the text shown to the sender and the log.
fn failure(e: &StepError, retried_auth: bool) -> Failure {
    match e {
        StepError::Reply { step, code, text } => {
            let reply = UpstreamReply::from_parts(*code, text);
            Failure {
                verdict: classify_reply(*step, &reply, retried_auth),
                text: format!("{code} {text}"),
                step: Some(*step),
                reply,
            }
        }
        StepError::Broken {
            problem,
            what,
            step,
        } => Failure {
            verdict: Verdict::Defer {
                pause: problem.is_some(),
                problem: problem.clone(),
                hold: None,
                fewer_connections: false,
            },
            text: format!("4.4.2 {what} (at {})", step.name()),
            step: Some(*step),
            reply: format!("4.4.2 {what} (at {})", step.name()).into(),
        },
    }
}

/// Reads the header section (through the empty line) and whatever was read past it.
fn read_head(r: &mut impl std::io::Read, limit: usize) -> std::io::Result<(Vec<u8>, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(i + 4);
            return Ok((buf, rest));
        }
        if buf.starts_with(b"\r\n") {
            let rest = buf.split_off(2);
            return Ok((buf, rest));
        }
        if buf.len() >= limit {
            // No end of headers within the limit: rewrite what we have up to the last
            // complete line and send the rest unchanged.
            let cut = buf
                .windows(2)
                .rposition(|w| w == b"\r\n")
                .map(|i| i + 2)
                .unwrap_or(0);
            let rest = buf.split_off(cut);
            return Ok((buf, rest));
        }
        let n = r.read(&mut chunk)?;
        if n == 0 {
            return Ok((buf, Vec::new()));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

impl Upstream for Exchange {
    fn name(&self) -> &str {
        &self.name
    }

    fn sender_address(&self) -> Option<&str> {
        Some(&self.cfg.mailbox)
    }

    fn deliver(&self, attempt: Attempt) -> BoxFuture<'_, Report> {
        Box::pin(self.deliver_all(attempt))
    }

    fn status(&self) -> crate::ops::model::UpstreamStatus {
        let st = Exchange::status(self);
        let token = self.tokens.facts();
        crate::ops::model::UpstreamStatus {
            name: self.name.clone(),
            kind: "exchange-online".into(),
            state: st.state.into(),
            since_ms: st.since_ms,
            problem: st.problem,
            meaning: st.meaning,
            remedy: st.remedy,
            reply: st.reply,
            next_probe_ms: st.next_ms,
            token: Some(crate::ops::model::TokenStatus {
                expires_ms: token.expires_ms,
                last_error: token.last_error,
                last_error_ms: token.last_error_ms,
            }),
            connections_in_use: Some(self.mb.conns.active() as u64),
            connections_max: Some(self.cfg.limits.connections as u64),
            messages_this_minute: Some(self.mb.pacer.this_minute()),
            messages_per_minute: Some(self.cfg.limits.messages_per_minute as u64),
            recipients_day: Some(self.mb.daily.count(std::time::SystemTime::now())),
            recipients_per_day: Some(self.cfg.limits.recipients_per_day),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reload that changes a mailbox's limits: the new mailbox counts in the old one's
    /// rolling counter (one count, one file), each against its own limit.
    #[test]
    fn a_mailbox_with_new_limits_shares_the_old_ones_recipient_count() {
        use crate::config::exchange::ExchangeLimits;
        let dir = tempfile::tempdir().unwrap();
        let limits = |per_day| ExchangeLimits {
            connections: 3,
            messages_per_minute: 30,
            recipients_per_day: per_day,
            recipients_per_message: 500,
        };
        let old = Mailbox::new(&limits(100), dir.path().join("counter.json"));
        let now = SystemTime::now();
        old.daily
            .reserve_within(5, old.recipients_per_day, now)
            .unwrap();
        let new = Mailbox::with_counter_of(&limits(6), &old);
        assert!(Arc::ptr_eq(&old.daily, &new.daily));
        assert_eq!(new.recipients_day(), 5);
        // The new limit applies to the new mailbox: 5 + 2 > 6.
        assert!(
            new.daily
                .reserve_within(2, new.recipients_per_day, now)
                .is_err()
        );
        new.daily
            .reserve_within(1, new.recipients_per_day, now)
            .unwrap();
        // An attempt still finishing on the old mailbox counts in the same place.
        old.daily
            .reserve_within(1, old.recipients_per_day, now)
            .unwrap();
        assert_eq!(new.recipients_day(), 7);
        assert_eq!(old.recipients_day(), 7);
    }

    /// An upstream pointing at nothing (nothing here connects).
    fn idle_upstream(dir: &std::path::Path) -> Arc<Exchange> {
        use crate::config::exchange::ExchangeLimits;
        let limits = ExchangeLimits {
            connections: 3,
            messages_per_minute: 30,
            recipients_per_day: 10_000,
            recipients_per_message: 500,
        };
        let creds = crate::token::ClientCredentials {
            token_url: "http://127.0.0.1:9/token".into(),
            client_id: "app".into(),
            scope: "s".into(),
            secret: crate::token::ClientSecret::Secret(crate::secret::Secret::new("x")),
        };
        let cfg = ExchangeConfig {
            mailbox: "relay@contoso.com".into(),
            tenant_id: "contoso.com".into(),
            host: "localhost".into(),
            port: 9,
            ca_file: None,
            helo_name: "relay.test".into(),
            sender_rewrite: SenderRewrite::None,
            limits: limits.clone(),
            credentials: creds.clone(),
            credential_source: "client_secret".into(),
        };
        let tokens = TokenHandle::new(crate::token::http_client().unwrap(), creds);
        let mb = Mailbox::new(&limits, dir.join("counter.json"));
        Exchange::start(
            "contoso",
            cfg,
            tokens,
            mb,
            vec![Duration::from_secs(60)],
            None,
            CancellationToken::new(),
            CancellationToken::new(),
        )
        .unwrap()
    }

    /// A panic while the state was locked (a bug) must not turn every later delivery
    /// through this upstream into a panic as well.
    #[tokio::test]
    async fn a_panic_under_the_state_lock_does_not_break_the_upstream() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let x = idle_upstream(dir.path());
        x.pause(Problem::AuthRejected, "535 5.7.3");
        let poisoned = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _state = x.state.lock().unwrap();
            let _noted = x.noted.lock().unwrap();
            let _pool = x.mb.pool.lock().unwrap();
            panic!("bug while holding the locks (test)");
        }));
        assert!(poisoned.is_err());
        assert!(x.state.is_poisoned());
        assert_eq!(x.status().state, "paused");
        assert!(x.gate().await.is_err(), "still paused, deferred");
        x.note_once(&Problem::SendAsDenied, "a@x.example");
        x.reap(true).await;
        x.end_probe();
    }

    #[test]
    fn the_warn_once_memory_is_bounded() {
        let mut n = Noted::default();
        assert!(n.first("send_as_denied", "a@x.example"));
        assert!(!n.first("send_as_denied", "a@x.example"));
        assert!(n.first("not_authenticated", "a@x.example"));
        // Every new sender or reply text is a new pair: the memory stays at its cap.
        for i in 0..20 * NOTED_MAX {
            assert!(n.first("send_as_denied", &format!("sender{i}@x.example")));
            assert!(n.len() <= NOTED_MAX);
        }
        assert_eq!(n.len(), NOTED_MAX);
        // The newest are still remembered; the oldest were forgotten first.
        let last = format!("sender{}@x.example", 20 * NOTED_MAX - 1);
        assert!(!n.first("send_as_denied", &last));
        assert!(n.first("send_as_denied", "a@x.example"));
        // A long detail costs no more than a short one (only its hash is kept).
        assert!(n.first("send_as_denied", &"x".repeat(1 << 20)));
        n.clear();
        assert_eq!(n.len(), 0);
        assert!(n.first("send_as_denied", &last));
    }
}
