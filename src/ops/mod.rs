//! Operations: what the running daemon tells its operators. One [`Ops`] hub per daemon,
//! shared by sessions, delivery workers, the admin socket and the HTTP endpoint:
//! - hooks the data path calls (a session opened, a message accepted or refused, a recipient
//!   outcome), which feed the metrics, the sender inventory and the recent outcomes;
//! - the facts the commands and the status page read ([`model`]).
//!
//! Hooks are cheap (atomics, one short lock) and never fail: the data path must not slow
//! down or stop because of them.

pub mod control;
pub mod metrics;
pub mod model;
pub mod senders;

use std::collections::VecDeque;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use crate::outcome::Outcome;
use crate::spool::{Envelope, now_ms};

/// How many recipient outcomes the status page shows.
pub const RECENT_MAX: usize = 50;

/// What a session knows about its client when a message is accepted (sender inventory).
#[derive(Debug, Clone)]
pub struct ClientInfo<'a> {
    pub ip: IpAddr,
    pub helo: &'a str,
    pub auth_user: Option<&'a str>,
    pub auth_mechanism: Option<&'a str>,
    /// `(version, cipher)` when the session is TLS.
    pub tls: Option<(&'a str, &'a str)>,
    pub sender: &'a str,
}

/// Re-reads the configuration and swaps it in; `Ok` lists what was applied or needs a
/// restart, `Err` every error found (the old configuration stays).
pub type ReloadHook = Arc<
    dyn Fn() -> crate::upstream::BoxFuture<'static, Result<Vec<String>, Vec<String>>> + Send + Sync,
>;

pub struct Ops {
    pub started: SystemTime,
    pub metrics: metrics::Metrics,
    pub senders: senders::Inventory,
    recent: Mutex<VecDeque<model::DeliveryRecord>>,
    /// Set by the daemon once everything runs.
    reload: OnceLock<ReloadHook>,
}

impl std::fmt::Debug for Ops {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ops").finish_non_exhaustive()
    }
}

impl Default for Ops {
    fn default() -> Ops {
        Ops::new(None)
    }
}

impl Ops {
    /// `state_dir`: where the sender inventory is kept across restarts (`None`: in memory).
    pub fn new(state_dir: Option<PathBuf>) -> Ops {
        Ops {
            started: SystemTime::now(),
            metrics: metrics::Metrics::new(),
            senders: senders::Inventory::open(state_dir),
            recent: Mutex::new(VecDeque::with_capacity(RECENT_MAX)),
            reload: OnceLock::new(),
        }
    }

    // ---- hooks (data path) ----

    /// A LAN connection was accepted (after the allowlist).
    pub fn session_opened(&self) {
        self.metrics.session_opened();
    }

    /// A message was committed and answered 250; `dot_to_reply` is the time from the final
    /// dot to the reply.
    pub fn message_accepted(&self, client: &ClientInfo<'_>, dot_to_reply: Duration) {
        self.metrics.message_accepted(dot_to_reply);
        self.senders.record(client, now_ms());
    }

    /// A message (or its transaction) was refused; `reason` is a short stable label.
    pub fn message_rejected(&self, reason: &'static str) {
        self.metrics.message_rejected(reason);
    }

    /// One recipient's outcome of one attempt (the same fact as the delivery log line).
    pub fn delivery(&self, env: &Envelope, i: usize, o: &Outcome) {
        self.metrics.delivery(o);
        let record = model::DeliveryRecord {
            at_ms: o.at_ms,
            queue_id: env.id.clone(),
            sender: env.sender.clone(),
            recipient: env
                .recipients
                .get(i)
                .map(|r| r.address.clone())
                .unwrap_or_default(),
            upstream: o.upstream.clone(),
            verdict: o.verdict.name().into(),
            code: o.reply.code,
            enhanced: o.reply.enhanced.clone(),
            reply: o.reply.text.clone(),
            problem: o.problem.as_ref().map(|p| p.key.clone()),
            attempt: o.attempt,
        };
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if recent.len() == RECENT_MAX {
            recent.pop_front();
        }
        recent.push_back(record);
    }

    // ---- facts (commands, page) ----

    /// The last [`RECENT_MAX`] recipient outcomes, newest first.
    pub fn recent(&self) -> Vec<model::DeliveryRecord> {
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent.iter().rev().cloned().collect()
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed().unwrap_or_default()
    }

    pub fn set_reload(&self, hook: ReloadHook) {
        let _ = self.reload.set(hook);
    }

    pub fn reload_hook(&self) -> Option<ReloadHook> {
        self.reload.get().cloned()
    }
}
