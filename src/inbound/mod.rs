//! The LAN side: listeners accept connections from printers, scanners and applications,
//! apply connection limits and the network allowlist, and run one SMTP session per
//! connection. Parses untrusted bytes; hands finished messages to the spool.

pub mod auth;
pub mod listener;
pub mod session;
pub mod tls;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::{Config, Listener};
use crate::scheduler::SchedulerHandle;
use crate::spool::Spool;

/// What a session needs from the rest of the daemon.
pub struct SessionCtx {
    pub config: Arc<Config>,
    pub listener: Listener,
    pub spool: Spool,
    pub scheduler: SchedulerHandle,
    /// Cancelled at shutdown: idle sessions answer `421 4.3.2` and close.
    pub stop: CancellationToken,
    /// Cancelled when the shutdown grace period is over: DATA in progress is cut off
    /// (no 250 was sent, so the client keeps its copy).
    pub hard_stop: CancellationToken,
    /// For `starttls` and `implicit` listeners.
    pub tls: Option<tls::Acceptor>,
    /// Checks AUTH credentials against `users` (shared by all listeners).
    pub auth: Arc<auth::Authenticator>,
    /// Slows down and blocks addresses that keep failing AUTH (shared by all listeners).
    pub auth_failures: Arc<auth::FailureLimiter>,
    /// Metrics, sender inventory (shared by all listeners and the delivery workers).
    pub ops: Arc<crate::ops::Ops>,
}
