//! What operators see: the facts the admin socket, the status page, metrics and `doctor`
//! share. Plain data (serde), no behaviour; times are milliseconds since the Unix epoch.
//! Nothing here may hold a secret, a token or message content.

use serde::{Deserialize, Serialize};

use crate::outcome::{Diagnosis, Outcome};

/// `mailbridge status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StatusReport {
    pub version: String,
    pub started_ms: u64,
    pub uptime_s: u64,
    pub listeners: Vec<ListenerStatus>,
    pub upstreams: Vec<UpstreamStatus>,
    pub queue: QueueSummary,
    /// What needs attention, one sentence each; empty when all is well (exit code 0).
    pub attention: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ListenerStatus {
    pub address: String,
    /// `none`, `starttls` or `implicit`.
    pub tls: String,
    pub tls_profile: Option<String>,
    pub require_auth: bool,
}

/// One upstream's state and counters.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UpstreamStatus {
    pub name: String,
    /// `exchange-online`, `outbox`, ...
    pub kind: String,
    /// `ok`, `paused` or `held`.
    pub state: String,
    /// When the current state began.
    pub since_ms: Option<u64>,
    /// The problem key (`auth_disabled`, `quota`, ...), its meaning and remedy.
    pub problem: Option<String>,
    pub meaning: Option<String>,
    pub remedy: Option<String>,
    /// The upstream's reply that caused the state, if any.
    pub reply: Option<String>,
    /// Paused: when the next probe may run. Held: when sending resumes.
    pub next_probe_ms: Option<u64>,
    pub token: Option<TokenStatus>,
    pub connections_in_use: Option<u64>,
    pub connections_max: Option<u64>,
    pub messages_this_minute: Option<u64>,
    pub messages_per_minute: Option<u64>,
    pub recipients_day: Option<u64>,
    pub recipients_per_day: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TokenStatus {
    /// When the token in hand expires (`None`: none yet).
    pub expires_ms: Option<u64>,
    /// The last refresh error (explained), and when it happened.
    pub last_error: Option<String>,
    pub last_error_ms: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct QueueSummary {
    /// Messages in queue/ (all states).
    pub messages: u64,
    pub deferred: u64,
    pub held: u64,
    /// Messages in failed/ (dead letters).
    pub failed: u64,
    pub oldest_age_s: Option<u64>,
}

/// One line of `mailbridge queue list` (and `queue failed`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct QueueEntry {
    pub id: String,
    pub arrival_ms: u64,
    pub size: u64,
    /// Empty for the null sender.
    pub sender: String,
    pub recipients_total: u64,
    pub recipients_pending: u64,
    /// `queued` (never tried), `deferred`, `held` (by an operator), `paused` (its upstream is
    /// paused or held), `sending` (an attempt runs now) or `failed` (in failed/).
    pub state: String,
    pub attempts: u32,
    pub next_attempt_ms: Option<u64>,
    pub upstream: Option<String>,
    /// The last problem key.
    pub last_problem: Option<String>,
}

/// `mailbridge queue show ID`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct QueueDetail {
    pub entry: QueueEntry,
    pub client_ip: String,
    pub helo: String,
    pub auth_user: Option<String>,
    pub recipients: Vec<RecipientDetail>,
    /// Every attempt recorded (oldest first, the last 20).
    pub attempts: Vec<Outcome>,
    /// What is wrong and how to fix it, from the last outcome.
    pub diagnosis: Option<Diagnosis>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RecipientDetail {
    pub address: String,
    /// `pending`, `delivered` or `failed`.
    pub status: String,
    pub outcome: Option<Outcome>,
}

/// One client in the sender inventory (`mailbridge senders`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SenderRecord {
    pub ip: String,
    pub auth_user: Option<String>,
    pub helo: String,
    /// `None`: plaintext.
    pub tls_version: Option<String>,
    pub tls_cipher: Option<String>,
    pub auth_mechanism: Option<String>,
    /// Envelope senders used (bounded).
    pub senders: Vec<String>,
    pub messages: u64,
    pub first_seen_ms: u64,
    pub last_seen_ms: u64,
}

/// One recipient outcome, as the delivery log line has it (the status page's last 50).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DeliveryRecord {
    pub at_ms: u64,
    pub queue_id: String,
    pub sender: String,
    pub recipient: String,
    pub upstream: String,
    /// `delivered`, `deferred`, `bounced`, `paused` or `held`.
    pub verdict: String,
    pub code: Option<u16>,
    pub enhanced: Option<String>,
    pub reply: String,
    pub problem: Option<String>,
    pub attempt: u32,
}
