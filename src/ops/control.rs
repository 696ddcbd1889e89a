//! The running daemon as operators steer it: one [`Control`] per daemon, used by the admin
//! socket (CLI commands) and the HTTP endpoint (status page, health). It reads and changes
//! the queue only through the spool and the scheduler, never by touching files itself.
//! (Skeleton: the queue facts and commands are filled in with the admin socket.)

use std::sync::Arc;
use std::time::Duration;

use crate::delivery::Delivery;
use crate::ops::Ops;
use crate::ops::model::{
    ListenerStatus, QueueDetail, QueueEntry, QueueSummary, RecipientDetail, StatusReport,
};
use crate::outcome::Diagnosis;
use crate::scheduler::SchedulerHandle;
use crate::spool::{RcptStatus, Spool, SpoolError, Stored, now_ms};

/// How long `hold` and `release` wait for an attempt that runs now to end.
const CLAIM_WAIT: Duration = Duration::from_secs(30);

/// Runs blocking spool work off the async threads; errors as the operator reads them.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SpoolError> + Send + 'static,
) -> Result<T, String> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(SpoolError::Io { source, .. })) if source.kind() == std::io::ErrorKind::NotFound => {
            Err("not found".into())
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(format!("internal error: {e}")),
    }
}

/// Refuses anything that is not a queue id (never a path).
fn check_id(id: &str) -> Result<(), String> {
    if crate::spool::valid_id(id) {
        Ok(())
    } else {
        Err(format!(
            "{id:?} is not a queue id (ids look like 019ad3c2e4f07c3a8b1e2d4f5a6b7c8d; see `mailbridge queue list`)"
        ))
    }
}

/// Whether the parts that must run as long as the daemon does still run (see
/// `Daemon::health`).
pub type HealthFn = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

pub struct Control {
    pub ops: Arc<Ops>,
    pub spool: Spool,
    pub scheduler: SchedulerHandle,
    pub delivery: Arc<Delivery>,
    /// Each bound listener's address and its current session context (swapped by a reload).
    pub listeners: Vec<(std::net::SocketAddr, ListenerCtx)>,
    pub health: HealthFn,
}

/// A listener's swappable session context.
pub type ListenerCtx = Arc<arc_swap::ArcSwap<crate::inbound::SessionCtx>>;

/// What `status` shows of a listener, from the settings in force now.
fn listener_status(addr: std::net::SocketAddr, l: &crate::config::Listener) -> ListenerStatus {
    use crate::config::TlsMode;
    ListenerStatus {
        address: addr.to_string(),
        tls: match l.tls {
            TlsMode::None => "none",
            TlsMode::StartTls => "starttls",
            TlsMode::Implicit => "implicit",
        }
        .into(),
        tls_profile: (l.tls != TlsMode::None).then(|| l.tls_profile.name().to_string()),
        require_auth: l.require_auth,
    }
}

impl Control {
    /// `mailbridge status`.
    pub async fn status(&self) -> StatusReport {
        let upstreams: Vec<_> = self
            .delivery
            .upstreams()
            .iter()
            .map(|u| u.status())
            .collect();
        let mut attention = Vec::new();
        if let Err(e) = (self.health)() {
            attention.push(e);
        }
        for u in &upstreams {
            if u.state != "ok" {
                attention.push(format!(
                    "upstream {} is {}: {}",
                    u.name,
                    u.state,
                    u.meaning.as_deref().unwrap_or("")
                ));
            }
            if let Some(e) = u.token.as_ref().and_then(|t| t.last_error.as_deref()) {
                attention.push(format!(
                    "upstream {}: the last token request failed: {e}",
                    u.name
                ));
            }
        }
        let queue = self.queue_summary().await;
        if queue.failed > 0 {
            attention.push(format!(
                "{} message{} in failed/ (dead letters): see `mailbridge queue failed`, then `mailbridge queue requeue ID` or `mailbridge queue delete ID`",
                queue.failed,
                if queue.failed == 1 { "" } else { "s" }
            ));
        }
        StatusReport {
            version: env!("CARGO_PKG_VERSION").into(),
            started_ms: self
                .ops
                .started
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or_else(|_| now_ms()),
            uptime_s: self.ops.uptime().as_secs(),
            listeners: self
                .listeners
                .iter()
                .map(|(addr, ctx)| listener_status(*addr, &ctx.load().listener))
                .collect(),
            upstreams,
            queue,
            attention,
        }
    }

    /// Depth, deferred, held (from the scheduler's in-memory index), failed (a directory
    /// listing) and the oldest message's age. Cheap: the metrics scrape it.
    pub async fn queue_summary(&self) -> QueueSummary {
        let s = self.scheduler.summary();
        let spool = self.spool.clone();
        let failed = tokio::task::spawn_blocking(move || spool.failed_count())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or(0);
        QueueSummary {
            messages: s.messages,
            deferred: s.deferred,
            held: s.held,
            failed,
            oldest_age_s: s
                .oldest_arrival_ms
                .map(|a| now_ms().saturating_sub(a) / 1000),
        }
    }

    /// Queued messages, oldest first.
    pub async fn queue_list(&self) -> Result<Vec<QueueEntry>, String> {
        self.entries(false, usize::MAX).await
    }

    /// The `n` oldest queued messages (the status page): only their files are read.
    pub async fn queue_oldest(&self, n: usize) -> Result<Vec<QueueEntry>, String> {
        self.entries(false, n).await
    }

    /// Up to `n` list lines of queue/ (or failed/), oldest first (ids sort by arrival).
    async fn entries(&self, failed: bool, n: usize) -> Result<Vec<QueueEntry>, String> {
        let spool = self.spool.clone();
        let loaded = blocking(move || {
            let ids = if failed {
                spool.failed_ids()?
            } else {
                spool.queue_ids()?
            };
            Ok(ids
                .into_iter()
                .filter_map(|id| spool.peek(&id, failed).ok())
                .take(n)
                .collect::<Vec<_>>())
        })
        .await?;
        let paused = if failed {
            Vec::new()
        } else {
            self.paused_upstreams()
        };
        Ok(loaded
            .iter()
            .map(|s| self.entry(s, &paused, failed))
            .collect())
    }

    pub async fn queue_show(&self, id: &str) -> Result<QueueDetail, String> {
        check_id(id)?;
        let spool = self.spool.clone();
        let owned = id.to_string();
        let (stored, failed) = blocking(move || match spool.peek(&owned, false) {
            Ok(s) => Ok((s, false)),
            Err(SpoolError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                spool.peek(&owned, true).map(|s| (s, true))
            }
            Err(e) => Err(e),
        })
        .await
        .map_err(|e| {
            if e.starts_with("not found") {
                format!(
                    "no message {id} in the queue or in failed/ (see `mailbridge queue list` and `mailbridge queue failed`)"
                )
            } else {
                e
            }
        })?;
        let paused = self.paused_upstreams();
        let entry = self.entry(&stored, &paused, failed);
        let env = &stored.envelope;
        let st = &stored.state;
        let recipients = env
            .recipients
            .iter()
            .enumerate()
            .map(|(i, r)| RecipientDetail {
                address: r.address.clone(),
                status: match st.recipients.get(i).map(|r| r.status) {
                    Some(RcptStatus::Delivered) => "delivered",
                    Some(RcptStatus::Failed) => "failed",
                    _ => "pending",
                }
                .into(),
                outcome: st.outcome_of(i).cloned(),
            })
            .collect();
        let diagnosis = st
            .last_outcome()
            .and_then(|o| o.problem.clone())
            .or_else(|| {
                st.last_error.as_ref().map(|e| Diagnosis {
                    key: "unknown".into(),
                    meaning: e.clone(),
                    remedy: if failed {
                        format!(
                            "see the attempts above and `journalctl -u mailbridge | grep {id}`; once the cause is fixed, `mailbridge queue requeue {id}` sends it again"
                        )
                    } else {
                        format!(
                            "see the attempts above and `journalctl -u mailbridge | grep {id}`; it is retried on schedule, `mailbridge queue retry {id}` tries now"
                        )
                    },
                })
            });
        Ok(QueueDetail {
            entry,
            client_ip: env.client_ip.to_string(),
            helo: env.helo.clone(),
            auth_user: env.auth_user.clone(),
            recipients,
            attempts: st.history().cloned().collect(),
            diagnosis,
        })
    }

    /// The dead letters in failed/, oldest first.
    pub async fn queue_failed(&self) -> Result<Vec<QueueEntry>, String> {
        self.entries(true, usize::MAX).await
    }

    /// Makes `id` (or every queued message that is not held) due now; returns how many.
    pub async fn queue_retry(&self, id: Option<&str>) -> Result<u64, String> {
        match id {
            Some(id) => {
                check_id(id)?;
                self.scheduler.retry(id)?;
                tracing::info!(queue_id = %id, "operator: retry now");
                Ok(1)
            }
            None => {
                let n = self.scheduler.retry_all();
                tracing::info!(messages = n, "operator: retry every queued message now");
                Ok(n)
            }
        }
    }

    /// Holds a message: never attempted until released, also after a restart. Waits a
    /// little for an attempt that runs now to end.
    pub async fn queue_hold(&self, id: &str) -> Result<(), String> {
        check_id(id)?;
        let claim = self
            .scheduler
            .claim(id, CLAIM_WAIT)
            .await
            .map_err(|e| e.to_string())?;
        let spool = self.spool.clone();
        let owned = id.to_string();
        let state = blocking(move || spool.set_held(&owned, true, None)).await?;
        claim.kept(true, state.next_attempt_ms);
        tracing::info!(queue_id = %id, "operator: message held");
        Ok(())
    }

    /// Releases a held message: due now.
    pub async fn queue_release(&self, id: &str) -> Result<(), String> {
        check_id(id)?;
        let claim = self
            .scheduler
            .claim(id, CLAIM_WAIT)
            .await
            .map_err(|e| e.to_string())?;
        let spool = self.spool.clone();
        let owned = id.to_string();
        let state = blocking(move || spool.set_held(&owned, false, Some(now_ms()))).await?;
        claim.kept(false, state.next_attempt_ms);
        tracing::info!(queue_id = %id, "operator: message released");
        Ok(())
    }

    /// Removes a message (queued, or a dead letter in failed/) without a bounce. Refused
    /// while an attempt for it runs.
    pub async fn queue_delete(&self, id: &str) -> Result<(), String> {
        check_id(id)?;
        if self.scheduler.entry(id).is_none() {
            let spool = self.spool.clone();
            let owned = id.to_string();
            let deleted = blocking(move || spool.delete_failed(&owned)).await;
            match deleted {
                Ok(()) => {
                    tracing::warn!(queue_id = %id, "operator: dead letter deleted from failed/");
                    return Ok(());
                }
                Err(e) if e == "not found" => {}
                Err(e) => return Err(e),
            }
        }
        let claim = self
            .scheduler
            .claim(id, Duration::ZERO)
            .await
            .map_err(|e| e.to_string())?;
        let spool = self.spool.clone();
        let owned = id.to_string();
        blocking(move || spool.delete(&owned)).await?;
        claim.removed();
        tracing::warn!(queue_id = %id, "operator: message deleted from the queue (no report sent)");
        Ok(())
    }

    /// failed/ -> queue/: failed recipients pending again, due now.
    pub async fn queue_requeue(&self, id: &str) -> Result<(), String> {
        check_id(id)?;
        let spool = self.spool.clone();
        let owned = id.to_string();
        let queued = blocking(move || spool.requeue(&owned)).await.map_err(|e| {
            if e.starts_with("not found") {
                format!("no message {id} in failed/ (see `mailbridge queue failed`)")
            } else {
                e
            }
        })?;
        self.scheduler.queued(queued);
        tracing::info!(queue_id = %id, "operator: message moved from failed/ back into the queue");
        Ok(())
    }

    /// The upstreams that are paused or held now.
    fn paused_upstreams(&self) -> Vec<String> {
        self.delivery
            .upstreams()
            .iter()
            .filter_map(|u| {
                let st = u.status();
                (st.state != "ok").then_some(st.name)
            })
            .collect()
    }

    /// One list line for a stored message.
    fn entry(&self, s: &Stored, paused: &[String], failed: bool) -> QueueEntry {
        let env = &s.envelope;
        let st = &s.state;
        let last = st.last_outcome();
        let upstream = last
            .map(|o| o.upstream.clone())
            .filter(|u| !u.is_empty())
            .or_else(|| env.upstream.clone())
            .or_else(|| match &self.delivery.upstreams()[..] {
                [only] => Some(only.name().to_string()),
                _ => None,
            });
        let index = self.scheduler.entry(&env.id);
        let held = index.as_ref().map_or(st.held, |e| e.held);
        let state = if failed {
            "failed"
        } else if held {
            "held"
        } else if index.as_ref().is_some_and(|e| e.in_flight) {
            "sending"
        } else if upstream.as_ref().is_some_and(|u| paused.contains(u)) && st.attempts > 0 {
            "paused"
        } else if st.attempts == 0 {
            "queued"
        } else {
            "deferred"
        };
        let next_attempt_ms = if failed || held {
            None
        } else {
            Some(
                index
                    .as_ref()
                    .map_or(st.next_attempt_ms, |e| e.next_attempt_ms),
            )
        };
        QueueEntry {
            id: env.id.clone(),
            arrival_ms: env.arrival_ms,
            size: s.content_len,
            sender: env.sender.clone(),
            recipients_total: env.recipients.len() as u64,
            recipients_pending: st.pending().count() as u64,
            state: state.into(),
            attempts: st.attempts.max(index.map_or(0, |e| e.attempts)),
            next_attempt_ms,
            upstream,
            last_problem: last
                .map(|o| o.problem_key().to_string())
                .filter(|k| !k.is_empty()),
        }
    }

    /// Re-reads the configuration (SIGHUP, `mailbridge reload`).
    pub async fn reload(&self) -> Result<Vec<String>, Vec<String>> {
        match self.ops.reload_hook() {
            Some(hook) => hook().await,
            None => Err(vec!["this daemon cannot reload its configuration".into()]),
        }
    }
}
