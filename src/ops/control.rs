//! The running daemon as operators steer it: one [`Control`] per daemon, used by the admin
//! socket (CLI commands) and the HTTP endpoint (status page, health). It reads and changes
//! the queue only through the spool and the scheduler, never by touching files itself.
//! (Skeleton: the queue facts and commands are filled in with the admin socket.)

use std::sync::Arc;

use crate::delivery::Delivery;
use crate::ops::Ops;
use crate::ops::model::{ListenerStatus, QueueDetail, QueueEntry, QueueSummary, StatusReport};
use crate::scheduler::SchedulerHandle;
use crate::spool::{Spool, now_ms};

/// Whether the parts that must run as long as the daemon does still run (see
/// `Daemon::health`).
pub type HealthFn = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

pub struct Control {
    pub ops: Arc<Ops>,
    pub spool: Spool,
    pub scheduler: SchedulerHandle,
    pub delivery: Arc<Delivery>,
    pub listeners: Vec<ListenerStatus>,
    pub health: HealthFn,
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
            listeners: self.listeners.clone(),
            upstreams,
            queue: self.queue_summary().await,
            attention,
        }
    }

    pub async fn queue_summary(&self) -> QueueSummary {
        QueueSummary::default()
    }

    /// Queued messages, oldest first.
    pub async fn queue_list(&self) -> Result<Vec<QueueEntry>, String> {
        Ok(Vec::new())
    }

    pub async fn queue_show(&self, id: &str) -> Result<QueueDetail, String> {
        Err(format!("no message {id} in the queue"))
    }

    /// The dead letters in failed/, oldest first.
    pub async fn queue_failed(&self) -> Result<Vec<QueueEntry>, String> {
        Ok(Vec::new())
    }

    /// Makes `id` (or every queued message) due now; returns how many.
    pub async fn queue_retry(&self, _id: Option<&str>) -> Result<u64, String> {
        Err("not implemented yet".into())
    }

    pub async fn queue_hold(&self, _id: &str) -> Result<(), String> {
        Err("not implemented yet".into())
    }

    pub async fn queue_release(&self, _id: &str) -> Result<(), String> {
        Err("not implemented yet".into())
    }

    /// Removes a message without a bounce.
    pub async fn queue_delete(&self, _id: &str) -> Result<(), String> {
        Err("not implemented yet".into())
    }

    /// failed/ -> queue/.
    pub async fn queue_requeue(&self, _id: &str) -> Result<(), String> {
        Err("not implemented yet".into())
    }

    /// Re-reads the configuration (SIGHUP, `mailbridge reload`).
    pub async fn reload(&self) -> Result<Vec<String>, Vec<String>> {
        match self.ops.reload_hook() {
            Some(hook) => hook().await,
            None => Err(vec!["this daemon cannot reload its configuration".into()]),
        }
    }
}
