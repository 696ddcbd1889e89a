//! Delivery workers: claim one message, record the next attempt time, hand it to the
//! upstream the message is routed to, and write the per-recipient outcomes back through the
//! spool. When a message ends with failed recipients it stays in `failed/`, and a DSN
//! (RFC 3464) goes to its sender (or to `queue.postmaster` for a null sender) through the
//! same upstream, as a new queued message.
//!
//! The next attempt time (and an in-flight mark) is written *before* the upstream is called,
//! so a crash during an attempt can never turn into a hot retry loop; an attempt found
//! in flight at start-up is logged as a possible duplicate (behaviour.md A4).

use std::sync::{Arc, OnceLock};

use crate::config::QueueConfig;
use crate::outcome::{Diagnosis, Outcome, UpstreamReply, Verdict};
use crate::scheduler::SchedulerHandle;
use crate::spool::{Envelope, RcptStatus, Recipient, Spool, SpoolError, Stored, new_id, now_ms};
use crate::upstream::{Attempt, Upstream};

/// Picks the upstream (index) for a message: routes, the user's upstream, else the first.
pub type Router = Arc<dyn Fn(&Envelope) -> usize + Send + Sync>;

/// What a configuration reload swaps in one piece: the upstreams, the router over them, the
/// queue settings and the host name. An attempt takes one snapshot when it starts and keeps
/// it to the end; the next attempt sees the new one.
pub struct Routing {
    pub upstreams: Vec<Arc<dyn Upstream>>,
    pub router: Router,
    pub queue: QueueConfig,
    pub hostname: String,
}

pub struct Delivery {
    spool: Spool,
    routing: arc_swap::ArcSwap<Routing>,
    scheduler: OnceLock<SchedulerHandle>,
    ops: Arc<crate::ops::Ops>,
    /// Messages whose report is queued but which could not leave the queue yet (see
    /// `finish`): tried again without a second report (until a restart).
    reported: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// Runs blocking spool work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SpoolError> + Send + 'static,
) -> Result<T, SpoolError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or(Err(SpoolError::WriterGone))
}

/// The largest part of the original message's header section copied into a DSN.
const DSN_HEADERS_MAX: usize = 64 * 1024;

impl Delivery {
    /// Everything through one upstream.
    pub fn new(spool: Spool, upstream: Arc<dyn Upstream>, queue: QueueConfig) -> Delivery {
        Delivery::with_upstreams(spool, vec![upstream], Arc::new(|_| 0), queue, "localhost")
    }

    pub fn with_upstreams(
        spool: Spool,
        upstreams: Vec<Arc<dyn Upstream>>,
        router: Router,
        queue: QueueConfig,
        hostname: &str,
    ) -> Delivery {
        assert!(!upstreams.is_empty(), "at least one upstream");
        Delivery {
            spool,
            routing: arc_swap::ArcSwap::from_pointee(Routing {
                upstreams,
                router,
                queue,
                hostname: hostname.to_string(),
            }),
            scheduler: OnceLock::new(),
            ops: Arc::new(crate::ops::Ops::default()),
            reported: Default::default(),
        }
    }

    /// Reports outcomes to `ops` (metrics, recent outcomes) instead of a private hub.
    pub fn with_ops(mut self, ops: Arc<crate::ops::Ops>) -> Delivery {
        self.ops = ops;
        self
    }

    pub fn ops(&self) -> &Arc<crate::ops::Ops> {
        &self.ops
    }

    /// The upstreams, in configuration order (of the current configuration).
    pub fn upstreams(&self) -> Vec<Arc<dyn Upstream>> {
        self.routing.load().upstreams.clone()
    }

    /// The current routing snapshot.
    pub fn routing(&self) -> Arc<Routing> {
        self.routing.load_full()
    }

    /// Swaps in a reloaded configuration's upstreams, routes and queue settings. Attempts
    /// already running finish with the snapshot they started with.
    pub fn set_routing(&self, routing: Routing) {
        assert!(!routing.upstreams.is_empty(), "at least one upstream");
        self.routing.store(Arc::new(routing));
    }

    /// Where reports (DSNs, alerts) are announced once queued.
    pub fn set_scheduler(&self, handle: SchedulerHandle) {
        let _ = self.scheduler.set(handle);
    }

    /// The upstream for `env`: the one it is pinned to (reports), else the router's choice.
    /// A message pinned to an upstream that a reload removed is not lost: it goes through
    /// the router (routes, the user's upstream, else the first upstream), with a warning.
    fn upstream_for<'r>(r: &'r Routing, env: &Envelope) -> &'r Arc<dyn Upstream> {
        if let Some(name) = &env.upstream {
            if let Some(u) = r.upstreams.iter().find(|u| u.name() == name) {
                return u;
            }
            tracing::warn!(queue_id = %env.id, upstream = %name, "the message is pinned to an upstream that is no longer configured (removed by a reload): sending it through the routes instead");
        }
        let i = (r.router)(env);
        &r.upstreams[i.min(r.upstreams.len() - 1)]
    }

    /// One attempt for message `id`. Returns when the next attempt is due, or `None` when the
    /// message left the queue (delivered, failed or unreadable).
    pub async fn attempt(&self, id: &str) -> Option<u64> {
        let r = self.routing.load_full();
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
                return Some(now_ms() + r.queue.retry_after(1).as_millis() as u64);
            }
        };
        let pending: Vec<usize> = stored.state.pending().collect();
        if pending.is_empty() {
            return self.finish(stored).await;
        }

        let now = now_ms();
        // A message requeued by an operator gets a new `queue.max_age` from then.
        let age_ms = now.saturating_sub(
            (stored.envelope.arrival_ms).max(stored.state.requeued_ms.unwrap_or(0)),
        );
        if age_ms > r.queue.max_age.as_millis() as u64 {
            let last = stored.state.last_error.clone().unwrap_or_default();
            let reason = format!(
                "4.4.7 delivery time expired after {} in the queue ({} attempts); last error: {last}",
                humantime::format_duration(std::time::Duration::from_secs(age_ms / 1000)),
                stored.state.attempts
            );
            // The last upstream's diagnosis still explains why it never went out.
            let last_problem = stored.state.last_outcome().and_then(|o| o.problem.clone());
            let expired = Outcome {
                at_ms: now,
                attempt: stored.state.attempts,
                ..Outcome::bounced(UpstreamReply::parse(&reason)).with_problem(Some(
                    last_problem.unwrap_or_else(|| Diagnosis {
                        key: "expired".into(),
                        meaning: "the message could not be delivered within queue.max_age".into(),
                        remedy: "see the relay's log for the queue ID; raise queue.max_age only if the upstream is down for longer on purpose".into(),
                    }),
                ))
            };
            for &i in &pending {
                delivery_log(&stored.envelope, i, &expired);
                self.ops.delivery(&stored.envelope, i, &expired);
                stored.state.recipients[i].status = RcptStatus::Failed;
                stored.state.recipients[i].reply = Some(reason.clone());
                stored.state.set_outcome(i, expired.clone());
            }
            stored.state.last_error = Some(reason);
            stored.state.set_last_outcome(expired.clone());
            stored.state.push_history(expired);
            return self.finish(stored).await;
        }

        // Record the next attempt before trying (no hot loop after a crash).
        stored.state.attempts += 1;
        let next = now + r.queue.retry_after(stored.state.attempts).as_millis() as u64;
        stored.state.next_attempt_ms = next;
        stored.state.in_flight = true;
        let spool = self.spool.clone();
        let (sid, state) = (id.to_string(), stored.state.clone());
        if let Err(e) = blocking(move || spool.begin_attempt(&sid, &state)).await {
            tracing::error!(queue_id = %id, error = %e, "cannot record the attempt in the spool; deferring");
            return Some(next);
        }

        let stored = Arc::new(stored);
        let upstream = Self::upstream_for(&r, &stored.envelope).clone();
        let report = upstream
            .deliver(Attempt {
                spool: self.spool.clone(),
                stored: stored.clone(),
                recipients: pending.clone(),
            })
            .await;
        let outcomes = report.outcomes;
        let mut stored = Arc::unwrap_or_clone(stored);
        stored.state.in_flight = false;
        // The upstream knows better when it can take the message again (paused, held,
        // pacing): its hint replaces the schedule for this deferral.
        let next = match report.retry_in {
            Some(d) => now_ms() + d.as_millis() as u64,
            None => next,
        };
        stored.state.next_attempt_ms = next;

        let upstream = upstream.name();
        let ended = now_ms();
        let (mut delivered, mut failed, mut deferred) = (0, 0, 0);
        let (mut last_failed, mut last_deferred) = (None, None);
        for (k, &i) in pending.iter().enumerate() {
            let mut outcome = outcomes.get(k).cloned().unwrap_or_else(|| {
                Outcome::deferred("upstream returned no result for this recipient".into())
            });
            outcome.verdict = outcome.verdict.until(next);
            outcome.upstream = upstream.to_string();
            outcome.at_ms = ended;
            outcome.attempt = stored.state.attempts;
            delivery_log(&stored.envelope, i, &outcome);
            self.ops.delivery(&stored.envelope, i, &outcome);
            let r = &mut stored.state.recipients[i];
            // The reply string stays for files read by an older mailbridge.
            let reply = outcome.reply.to_string();
            r.reply = Some(reply.clone());
            match outcome.verdict {
                Verdict::Delivered => {
                    r.status = RcptStatus::Delivered;
                    delivered += 1;
                }
                Verdict::Bounced => {
                    r.status = RcptStatus::Failed;
                    stored.state.last_error = Some(reply);
                    stored.state.set_last_outcome(outcome.clone());
                    failed += 1;
                    last_failed = Some(k);
                }
                Verdict::Deferred { .. } | Verdict::Paused { .. } | Verdict::Held { .. } => {
                    stored.state.last_error = Some(reply);
                    stored.state.set_last_outcome(outcome.clone());
                    deferred += 1;
                    last_deferred = Some(k);
                }
            }
            stored.state.set_outcome(i, outcome);
        }
        let of = |k: Option<usize>| k.and_then(|k| stored.state.outcome_of(pending[k]).cloned());
        let (failed_o, deferred_o) = (of(last_failed), of(last_deferred));
        let first_o = pending
            .first()
            .and_then(|&i| stored.state.outcome_of(i).cloned());
        // The attempt's entry in the history: what kept the message (the last deferral,
        // else the last failure), or what delivered it.
        if let Some(o) = deferred_o.clone().or(failed_o.clone()).or(first_o) {
            stored.state.push_history(o);
        }
        if delivered > 0 {
            tracing::info!(queue_id = %id, upstream, recipients = delivered, attempt = stored.state.attempts, "delivered");
        }
        if let Some(o) = failed_o {
            tracing::warn!(
                queue_id = %id,
                upstream,
                recipients = failed,
                verdict = o.verdict.name(),
                step = o.step.map(|s| s.name()),
                code = o.reply.code,
                enhanced = o.reply.enhanced.as_deref(),
                problem = o.problem_key(),
                error = stored.state.last_error.as_deref().unwrap_or(""),
                "delivery failed permanently"
            );
        }
        if let Some(o) = deferred_o {
            tracing::warn!(
                queue_id = %id,
                upstream,
                recipients = deferred,
                attempt = stored.state.attempts,
                retry_in = %humantime::format_duration(std::time::Duration::from_secs(next.saturating_sub(now_ms()) / 1000)),
                verdict = o.verdict.name(),
                step = o.step.map(|s| s.name()),
                code = o.reply.code,
                enhanced = o.reply.enhanced.as_deref(),
                problem = o.problem_key(),
                error = stored.state.last_error.as_deref().unwrap_or(""),
                "delivery deferred"
            );
            if let Err(e) = self.save(&stored).await {
                tracing::error!(queue_id = %id, error = %e, "cannot record delivery outcomes; the attempt will be repeated");
            }
            return Some(next);
        }
        self.finish(stored).await
    }

    /// After an attempt crashed (panicked): when to try the message again. The attempt
    /// recorded its next time before calling the upstream; a crash before that point gets
    /// the schedule's interval for its attempt count, so a message that always crashes
    /// backs off like any other instead of looping. `None` if it left the queue.
    pub async fn after_crash(&self, id: &str) -> Option<u64> {
        let r = self.routing.load_full();
        let spool = self.spool.clone();
        let owned_id = id.to_string();
        let earliest =
            |attempts: u32| now_ms() + r.queue.retry_after(attempts.max(1)).as_millis() as u64;
        match blocking(move || spool.load(&owned_id)).await {
            Ok(stored) => Some(
                stored
                    .state
                    .next_attempt_ms
                    .max(earliest(stored.state.attempts)),
            ),
            Err(SpoolError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                None
            }
            Err(_) => Some(earliest(1)),
        }
    }

    async fn save(&self, stored: &Stored) -> Result<(), SpoolError> {
        let spool = self.spool.clone();
        let id = stored.envelope.id.clone();
        let state = stored.state.clone();
        blocking(move || spool.save_state(&id, &state)).await
    }

    fn reported(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        self.reported.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every recipient is final: remove the message, or keep it in `failed/` if any failed.
    /// `None` once it left the queue; if the spool could not be changed, the message is
    /// still queued and must stay scheduled: when to try again (its report is not queued
    /// again, except after a restart: a duplicate rather than a message stuck).
    async fn finish(&self, stored: Stored) -> Option<u64> {
        let spool = self.spool.clone();
        let id = stored.envelope.id.clone();
        let any_failed = stored
            .state
            .recipients
            .iter()
            .any(|r| r.status == RcptStatus::Failed);
        // The report is queued before the message leaves the queue: a crash in between
        // repeats the report (a duplicate) rather than losing it.
        let report_queued = if any_failed && !self.reported().contains(&stored.envelope.id) {
            self.bounce(&stored).await
        } else {
            true
        };
        let state = stored.state.clone();
        let res = if any_failed {
            let reason = state.last_error.clone().unwrap_or_default();
            tracing::warn!(queue_id = %id, reason, "message moved to failed/");
            blocking(move || spool.move_to_failed(&id, &state)).await
        } else {
            blocking(move || spool.remove(&id)).await
        };
        if res.is_ok() {
            self.reported().remove(&stored.envelope.id);
        } else if any_failed && report_queued {
            self.reported().insert(stored.envelope.id.clone());
        }
        match res {
            Ok(()) => None,
            // Gone already (deleted meanwhile): nothing left to schedule.
            Err(SpoolError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound
                    && !self
                        .spool
                        .root()
                        .join("queue")
                        .join(format!("{}.msg", stored.envelope.id))
                        .exists() =>
            {
                None
            }
            Err(e) => {
                let retry = self
                    .routing
                    .load()
                    .queue
                    .retry_after(stored.state.attempts.max(1));
                tracing::error!(queue_id = %stored.envelope.id, error = %e, "cannot update the spool after delivery; the message stays queued and this step is tried again");
                // The final outcomes are kept with it, so the next try only finishes it
                // instead of sending it again.
                let mut stored = stored;
                stored.state.next_attempt_ms = now_ms() + retry.as_millis() as u64;
                stored.state.in_flight = false;
                if let Err(e) = self.save(&stored).await {
                    tracing::error!(queue_id = %stored.envelope.id, error = %e, "cannot record delivery outcomes; the attempt will be repeated");
                }
                Some(stored.state.next_attempt_ms)
            }
        }
    }

    /// Queues a DSN for the failed recipients of `stored` (still in `queue/`): to the
    /// envelope sender, or to `queue.postmaster` for a null sender; never for a report.
    /// `false` only if a report was due and could not be queued.
    async fn bounce(&self, stored: &Stored) -> bool {
        let r = self.routing.load_full();
        let env = &stored.envelope;
        if !r.queue.bounce || env.report {
            return true;
        }
        let to = if env.sender.is_empty() {
            match &r.queue.postmaster {
                Some(p) => p.clone(),
                None => {
                    tracing::warn!(queue_id = %env.id, "failed message had a null sender and queue.postmaster is not set: no report sent");
                    return true;
                }
            }
        } else {
            env.sender.clone()
        };
        let upstream = Self::upstream_for(&r, env).clone();
        let from = upstream
            .sender_address()
            .map(str::to_string)
            .unwrap_or_else(|| format!("MAILER-DAEMON@{}", r.hostname));
        let recipients: Vec<(crate::dsn::DsnRecipient, Option<Diagnosis>)> = env
            .recipients
            .iter()
            .zip(&stored.state.recipients)
            .enumerate()
            .filter(|(_, (_, r))| r.status == RcptStatus::Failed)
            .map(|(i, (a, r))| {
                let outcome = stored.state.outcome_of(i).cloned().unwrap_or_else(|| {
                    // A file written before outcomes were stored: its reply string.
                    Outcome::bounced(UpstreamReply::parse(
                        r.reply.as_deref().unwrap_or("5.0.0 delivery failed"),
                    ))
                });
                (
                    crate::dsn::DsnRecipient {
                        address: a.address.clone(),
                        action: crate::dsn::Action::Failed,
                        reply: outcome.reply.clone(),
                        remote_mta: None,
                    },
                    outcome.problem,
                )
            })
            .collect();
        let explanation = explain(recipients.iter().filter_map(|(_, p)| p.as_ref()));
        let recipients = recipients.into_iter().map(|(r, _)| r).collect();
        let spool = self.spool.clone();
        let owned = stored.clone();
        let headers = tokio::task::spawn_blocking(move || {
            let mut f = spool.open_content(&owned).map_err(std::io::Error::other)?;
            crate::dsn::read_header_section(&mut f, DSN_HEADERS_MAX)
        })
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
        let message_id = format!("<{}.dsn@{}>", new_id(), r.hostname);
        let content = crate::dsn::build(&crate::dsn::Dsn {
            reporting_mta: &r.hostname,
            from: &from,
            to: &to,
            queue_id: &env.id,
            original_sender: &env.sender,
            arrival_ms: env.arrival_ms,
            now_ms: now_ms(),
            will_retry_until_ms: None,
            recipients,
            explanation: &explanation,
            original_headers: &headers,
            message_id: &message_id,
        });
        match self.queue_report(&to, upstream.name(), &content).await {
            Ok(id) => {
                tracing::info!(queue_id = %env.id, report_id = %id, to = %to, "delivery status notification queued");
                true
            }
            Err(e) => {
                tracing::error!(queue_id = %env.id, error = %e, "cannot queue the delivery status notification");
                false
            }
        }
    }

    /// Queues an alert for `queue.postmaster` (plain text), through `via` if that upstream
    /// is not the one the alert is about, else through the first other upstream.
    pub async fn alert(&self, about: &str, subject: &str, body: &str) {
        let r = self.routing.load_full();
        let Some(to) = r.queue.postmaster.clone() else {
            return;
        };
        let via = r
            .upstreams
            .iter()
            .find(|u| u.name() != about)
            .unwrap_or(&r.upstreams[0])
            .clone();
        let from = via
            .sender_address()
            .map(str::to_string)
            .unwrap_or_else(|| format!("MAILER-DAEMON@{}", r.hostname));
        let date = crate::smtp::headers::rfc5322_date(std::time::SystemTime::now());
        let subject: String = subject.chars().filter(|c| !c.is_control()).collect();
        let mut content = format!(
            "From: mailbridge <{from}>\r\nTo: <{to}>\r\nSubject: {subject}\r\nDate: {date}\r\nMessage-ID: <{}.alert@{}>\r\nAuto-Submitted: auto-generated\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n",
            new_id(),
            r.hostname
        );
        for line in body.lines() {
            let line = line.trim_end_matches('\r');
            // Stored unstuffed, like every queued message: the upstream dot-stuffs.
            content.push_str(line);
            content.push_str("\r\n");
        }
        match self.queue_report(&to, via.name(), content.as_bytes()).await {
            Ok(id) => {
                tracing::info!(report_id = %id, to = %to, upstream = %about, "alert queued for the postmaster")
            }
            Err(e) => tracing::error!(error = %e, "cannot queue an alert for the postmaster"),
        }
    }

    /// Stores a report as a new message (null sender, pinned to `upstream`) and announces it.
    async fn queue_report(
        &self,
        to: &str,
        upstream: &str,
        content: &[u8],
    ) -> Result<String, SpoolError> {
        let hostname = self.routing.load().hostname.clone();
        let env = Envelope {
            id: new_id(),
            sender: String::new(),
            recipients: vec![Recipient {
                address: to.to_string(),
            }],
            client_ip: std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            helo: hostname,
            auth_user: None,
            arrival_ms: now_ms(),
            body: Some("8BITMIME".into()),
            smtputf8: false,
            upstream: Some(upstream.to_string()),
            report: true,
        };
        let mut inc = self.spool.begin(&env);
        inc.write(content).await;
        let q = inc.commit().await?;
        let id = q.id.clone();
        if let Some(h) = self.scheduler.get() {
            h.queued(q);
        }
        Ok(id)
    }
}

/// The human part of a DSN: the cause and remedy of the first diagnosed problem, as the
/// upstream that produced the outcome diagnosed it (the generic code knows no phrases).
fn explain<'a>(mut problems: impl Iterator<Item = &'a Diagnosis>) -> String {
    match problems.next() {
        Some(p) => format!(
            "Cause: {}.\nFor the mail administrator: {}\n",
            p.meaning, p.remedy
        ),
        None => String::new(),
    }
}

/// The delivery log: one line per recipient and attempt, with everything needed to answer
/// "did the scan of 10:42 go out?" from the journal (`journalctl -u mailbridge | grep
/// 'recipient=a@example.com'`) without opening the spool. Fields are documented in
/// docs/ARCHITECTURE.md (Logging). Text fields are recorded with Display so the text format
/// prints `recipient=a@example.com`, unquoted, for grep. Addresses come from the envelope; the reply text is the
/// upstream's, which never holds a secret of ours.
fn delivery_log(env: &Envelope, i: usize, o: &Outcome) {
    let recipient = env.recipients.get(i).map_or("", |r| r.address.as_str());
    let delay_s = o.at_ms.saturating_sub(env.arrival_ms) as f64 / 1000.0;
    let next_attempt = match o.verdict {
        Verdict::Deferred { until_ms }
        | Verdict::Paused { until_ms }
        | Verdict::Held { until_ms } => Some(httpdate::fmt_http_date(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(until_ms),
        )),
        Verdict::Delivered | Verdict::Bounced => None,
    };
    tracing::info!(
        queue_id = %env.id,
        client = %env.client_ip,
        auth_user = %env.auth_user.as_deref().unwrap_or(""),
        sender = %env.sender,
        recipient = %recipient,
        upstream = %o.upstream,
        verdict = %o.verdict.name(),
        step = %o.step.map(|s| s.name()).unwrap_or(""),
        code = o.reply.code,
        enhanced = %o.reply.enhanced.as_deref().unwrap_or(""),
        reply = %o.reply.text,
        problem = %o.problem_key(),
        attempt = o.attempt,
        delay_s,
        next_attempt,
        "delivery"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::Scheduler;
    use crate::spool::{Envelope, Recipient, new_id};
    use crate::upstream::RcptOutcome;
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
        fn deliver(&self, attempt: Attempt) -> BoxFuture<'_, crate::upstream::Report> {
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
                    vec![RcptOutcome::delivered("250 ok".into()); attempt.recipients.len()].into()
                } else {
                    s.remove(0).into()
                }
            })
        }
    }

    fn queue_cfg(retry: &[u64], max_age: Duration, workers: usize) -> QueueConfig {
        QueueConfig {
            retry: retry.iter().map(|&s| Duration::from_secs(s)).collect(),
            max_age,
            workers,
            bounce: false,
            postmaster: None,
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
            upstream: None,
            report: false,
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
            RcptOutcome::delivered("250 ok".into()),
            RcptOutcome::bounced("550 5.1.1 no such user".into()),
            RcptOutcome::deferred("451 4.3.0 try later".into()),
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

    /// The typed outcome of an attempt is journalled with the message and read back after
    /// a restart (a new Spool on the same directory): verdict with its due time, step,
    /// reply fields, problem, upstream and attempt number.
    #[tokio::test(flavor = "multi_thread")]
    async fn stored_outcome_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let problem = Diagnosis {
            key: "smtp_auth_disabled".into(),
            meaning: "SMTP AUTH is not enabled for this mailbox".into(),
            remedy: "Set-CASMailbox -SmtpClientAuthenticationDisabled $false".into(),
        };
        let (id, next) = {
            let spool = Spool::open(dir.path()).unwrap();
            let up = Scripted::new(vec![vec![
                RcptOutcome::delivered("250 2.0.0 OK".into()).at(crate::outcome::Step::Dot),
                RcptOutcome::new(
                    Verdict::Paused { until_ms: 0 },
                    "535 5.7.139 Authentication unsuccessful".into(),
                )
                .at(crate::outcome::Step::Auth)
                .with_problem(Some(problem.clone())),
            ]]);
            let d = Delivery::new(
                spool.clone(),
                up,
                queue_cfg(&[60], Duration::from_secs(3600), 1),
            );
            let q = enqueue(&spool, &["a@x", "b@x"], now_ms()).await;
            let next = d.attempt(&q.id).await.expect("b@x stays queued");
            (q.id, next)
        };
        let spool = Spool::open(dir.path()).unwrap();
        let rec = spool.recover().unwrap();
        assert_eq!(rec.queued.len(), 1);
        let st = spool.load(&id).unwrap().state;
        let a = st.outcome_of(0).cloned().expect("a@x outcome");
        assert_eq!(a.verdict, Verdict::Delivered);
        assert_eq!(a.reply.code, Some(250));
        let b = st.outcome_of(1).cloned().expect("b@x outcome");
        assert_eq!(b.verdict, Verdict::Paused { until_ms: next });
        assert_eq!(b.step, Some(crate::outcome::Step::Auth));
        assert_eq!(b.reply.code, Some(535));
        assert_eq!(b.reply.enhanced.as_deref(), Some("5.7.139"));
        assert_eq!(b.reply.text, "Authentication unsuccessful");
        assert_eq!(b.problem, Some(problem));
        assert_eq!(b.upstream, "scripted");
        assert_eq!(b.attempt, 1);
        assert!(b.at_ms > 0);
        assert_eq!(st.last_outcome(), Some(&b));
        assert_eq!(st.history().collect::<Vec<_>>(), vec![&b]);
        // The reply strings stay for older readers.
        assert_eq!(
            st.recipients[1].reply.as_deref(),
            Some("535 5.7.139 Authentication unsuccessful")
        );
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

    fn queued_ids(dir: &std::path::Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir.join("queue"))
            .unwrap()
            .filter_map(|e| {
                let n = e.ok()?.file_name().to_string_lossy().into_owned();
                n.strip_suffix(".msg").map(str::to_string)
            })
            .collect();
        v.sort();
        v
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn failures_are_reported_to_the_sender_or_postmaster_never_for_a_report() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        // Every attempt for a@x fails permanently; everything else is delivered.
        let up = Scripted::new(vec![
            vec![
                RcptOutcome::bounced(
                    "550 5.7.60 SMTP; Client does not have permissions to send as this sender"
                        .into()
                )
                .at(crate::outcome::Step::Dot)
                .with_problem(Some(Diagnosis {
                    key: "send_as_denied".into(),
                    meaning: "the mailbox may not send as this message's sender".into(),
                    remedy:
                        "`Add-RecipientPermission -Identity <sender address> -AccessRights SendAs`"
                            .into(),
                }))
            ];
            3
        ]);
        let mut q = queue_cfg(&[60], Duration::from_secs(3600), 1);
        q.bounce = true;
        q.postmaster = Some("postmaster@contoso.com".into());
        let d = Delivery::new(spool.clone(), up.clone(), q);

        // 1. A normal sender gets a DSN, queued before the message leaves the queue.
        let m = enqueue(&spool, &["a@x"], now_ms()).await;
        assert_eq!(d.attempt(&m.id).await, None);
        let ids = queued_ids(dir.path());
        assert_eq!(ids.len(), 1, "one report queued");
        let report = spool.load(&ids[0]).unwrap();
        assert_eq!(report.envelope.sender, "", "reports have a null sender");
        assert_eq!(report.envelope.recipients[0].address, "s@example.com");
        assert!(report.envelope.report);
        assert_eq!(report.envelope.upstream.as_deref(), Some("scripted"));
        let mut text = String::new();
        use std::io::Read;
        spool
            .open_content(&report)
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        assert!(text.contains("Final-Recipient: rfc822; a@x"), "{text}");
        assert!(text.contains("Status: 5.7.60"), "{text}");
        assert!(text.contains("Subject: t"), "original headers: {text}");
        assert!(text.contains("Add-RecipientPermission"), "remedy: {text}");
        // The report itself is delivered (to s@example.com, not scripted to fail).
        assert_eq!(d.attempt(&ids[0]).await, None);
        assert!(queued_ids(dir.path()).is_empty());

        // 2. A null-sender message's failure goes to the postmaster.
        let env = Envelope::for_test(&new_id(), "", &["a@x"]);
        let mut inc = spool.begin(&env);
        inc.write(b"Subject: n\r\n\r\nx\r\n").await;
        let n = inc.commit().await.unwrap();
        assert_eq!(d.attempt(&n.id).await, None);
        let ids = queued_ids(dir.path());
        assert_eq!(ids.len(), 1);
        let r = spool.load(&ids[0]).unwrap();
        assert_eq!(r.envelope.recipients[0].address, "postmaster@contoso.com");

        // 3. A report that fails is not answered with another report.
        let mut env = env.clone();
        env.id = new_id();
        env.report = true;
        let mut inc = spool.begin(&env);
        inc.write(b"Subject: r\r\n\r\nx\r\n").await;
        let rr = inc.commit().await.unwrap();
        assert_eq!(d.attempt(&rr.id).await, None);
        assert_eq!(queued_ids(dir.path()), ids, "no new report");
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

    /// A message whose final move fails (failed/ unusable) stays queued and is tried
    /// again: `None` would drop it from the scheduler's index, never attempted again
    /// until a restart.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_message_that_cannot_leave_the_queue_is_tried_again() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let up = Scripted::new(vec![vec![RcptOutcome::bounced(
            "550 5.1.1 no such user".into(),
        )]]);
        let mut queue = queue_cfg(&[60], Duration::from_secs(3600), 1);
        queue.bounce = true;
        let d = Delivery::new(spool.clone(), up.clone(), queue);
        let q = enqueue(&spool, &["a@x"], now_ms()).await;
        std::fs::remove_dir(dir.path().join("failed")).unwrap();
        std::fs::write(dir.path().join("failed"), b"").unwrap();
        for _ in 0..2 {
            assert!(
                d.attempt(&q.id).await.is_some(),
                "still in queue/: must stay scheduled"
            );
            assert!(dir.path().join(format!("queue/{}.msg", q.id)).exists());
        }
        // One report to the sender, not one per try.
        assert_eq!(
            queued_ids(dir.path()).len(),
            2,
            "the message and one report"
        );
        // failed/ usable again: the next attempt moves it.
        std::fs::remove_file(dir.path().join("failed")).unwrap();
        std::fs::create_dir(dir.path().join("failed")).unwrap();
        assert_eq!(d.attempt(&q.id).await, None);
        assert!(dir.path().join(format!("failed/{}.msg", q.id)).exists());
        assert_eq!(up.calls.lock().unwrap().len(), 1, "not sent again");
    }

    #[test]
    fn any_reply_text_can_be_parsed_without_a_panic() {
        for reply in [
            "",
            "5",
            "0 é",
            "5é0 x",
            "€€€",
            "550",
            "550 5.7.60 x",
            "550-é\n550 é",
        ] {
            let r = UpstreamReply::parse(reply);
            let _ = crate::dsn::status_code(&r, crate::dsn::Action::Failed);
            let _ = r.to_string();
        }
        assert_eq!(explain(std::iter::empty()), "");
    }

    /// An upstream with a bug: the first `panics` attempts panic, later ones deliver.
    struct Panicky {
        panics: AtomicUsize,
        calls: AtomicUsize,
    }

    impl Upstream for Panicky {
        fn name(&self) -> &str {
            "panicky"
        }
        fn deliver(&self, attempt: Attempt) -> BoxFuture<'_, crate::upstream::Report> {
            Box::pin(async move {
                self.calls.fetch_add(1, Ordering::SeqCst);
                let left = self.panics.load(Ordering::SeqCst);
                if left > 0 && attempt.stored.envelope.recipients[0].address == "a@x" {
                    self.panics.store(left - 1, Ordering::SeqCst);
                    panic!("injected upstream panic (test)");
                }
                vec![RcptOutcome::delivered("250 ok".into()); attempt.recipients.len()].into()
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_attempt_frees_its_slot_and_the_message_is_retried() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let up = Arc::new(Panicky {
            panics: AtomicUsize::new(2),
            calls: AtomicUsize::new(0),
        });
        let d = Arc::new(Delivery::new(
            spool.clone(),
            up.clone(),
            queue_cfg(&[10, 30], Duration::from_secs(86400), 1),
        ));
        // One worker slot: if the panicking attempt kept it, nothing else would ever go out.
        let (sched, handle) = Scheduler::new(d, 1, Duration::from_secs(30));
        let stop = CancellationToken::new();
        let workers = TaskTracker::new();
        let task = tokio::spawn(sched.run(stop.clone(), workers.clone()));
        let start = Instant::now();
        let a = enqueue(&spool, &["a@x"], now_ms()).await;
        let a_id = a.id.clone();
        handle.queued(a);
        handle.queued(enqueue(&spool, &["b@x"], now_ms()).await);
        for _ in 0..1000 {
            if files(dir.path(), "queue") == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        assert_eq!(files(dir.path(), "queue"), 0, "both delivered in the end");
        assert_eq!(files(dir.path(), "failed"), 0);
        // a@x: two crashed attempts, then delivered; b@x: one attempt.
        assert_eq!(up.calls.load(Ordering::SeqCst), 4);
        // The crashed attempts followed the retry schedule (10 s, then 30 s), no hot loop.
        assert!(Instant::now() - start >= Duration::from_secs(40));
        assert!(!dir.path().join(format!("queue/{a_id}.msg")).exists());
        stop.cancel();
        task.await.unwrap();
        workers.close();
        workers.wait().await;
    }

    #[tokio::test(start_paused = true)]
    async fn scheduler_follows_retry_intervals_and_worker_limit() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let deferred = |n: usize| vec![RcptOutcome::deferred("421 4.3.0 busy".into()); n];
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

    /// A reload's routing applies from the next attempt on; a message pinned to an
    /// upstream the reload removed (a report) is not lost: it goes through the router.
    #[tokio::test(flavor = "multi_thread")]
    async fn new_routing_applies_to_the_next_attempt_and_pinned_to_removed_is_routed() {
        use crate::upstream::outbox::Outbox;
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(&dir.path().join("spool")).unwrap();
        let outbox = |name: &str| -> Arc<dyn Upstream> {
            Arc::new(Outbox::new(name, &dir.path().join(name)).unwrap())
        };
        let d = Delivery::new(
            spool.clone(),
            outbox("a"),
            queue_cfg(&[60], Duration::from_secs(3600), 1),
        );
        let q = enqueue(&spool, &["x@y"], now_ms()).await;
        assert_eq!(d.attempt(&q.id).await, None);
        assert!(dir.path().join(format!("a/{}.eml", q.id)).exists());

        // Reload: "a" is gone; routes send everything to the second upstream, "c".
        d.set_routing(Routing {
            upstreams: vec![outbox("b"), outbox("c")],
            router: Arc::new(|_| 1),
            queue: queue_cfg(&[60], Duration::from_secs(3600), 1),
            hostname: "relay.test".into(),
        });
        assert_eq!(d.upstreams().len(), 2);
        let q = enqueue(&spool, &["x@y"], now_ms()).await;
        assert_eq!(d.attempt(&q.id).await, None);
        assert!(dir.path().join(format!("c/{}.eml", q.id)).exists());

        let env = Envelope {
            upstream: Some("a".into()),
            report: true,
            ..Envelope::for_test(&new_id(), "", &["postmaster@y"])
        };
        let mut inc = spool.begin(&env);
        inc.write(b"Subject: report\r\n\r\nx\r\n").await;
        let q = inc.commit().await.unwrap();
        assert_eq!(d.attempt(&q.id).await, None, "delivered, not stuck");
        assert!(dir.path().join(format!("c/{}.eml", q.id)).exists());
    }
}
