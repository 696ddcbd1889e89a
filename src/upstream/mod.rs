//! Upstreams: where delivery hands a message. One trait, one implementation per kind
//! (`outbox` for tests and demos, `exchange` for Exchange Online). An upstream reports a
//! result per recipient and never touches the queue: the delivery worker records outcomes
//! through the spool.

pub mod exchange;
pub mod limits;
pub mod outbox;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::spool::{Spool, Stored};

/// What happened to one recipient in one attempt: the typed outcome (reply, step, verdict,
/// problem). An upstream sets the verdict and leaves due times, upstream name and attempt
/// number to the delivery worker.
pub use crate::outcome::Outcome as RcptOutcome;

/// One delivery attempt's input: the stored message and which recipients are still pending.
#[derive(Clone)]
pub struct Attempt {
    pub spool: Spool,
    pub stored: Arc<Stored>,
    /// Indices into `stored.envelope.recipients`.
    pub recipients: Vec<usize>,
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What an attempt produced.
#[derive(Debug, Clone)]
pub struct Report {
    /// One outcome per entry of `attempt.recipients`, in order.
    pub outcomes: Vec<RcptOutcome>,
    /// For deferrals: when the upstream can take the message again (a paused or held
    /// upstream, a pacing slot), overriding the retry schedule.
    pub retry_in: Option<std::time::Duration>,
}

impl From<Vec<RcptOutcome>> for Report {
    fn from(outcomes: Vec<RcptOutcome>) -> Report {
        Report {
            outcomes,
            retry_in: None,
        }
    }
}

pub trait Upstream: Send + Sync {
    fn name(&self) -> &str;

    /// The address reports (DSNs, alerts) are sent from through this upstream, if it has
    /// one (Exchange: the mailbox, which may always send as itself).
    fn sender_address(&self) -> Option<&str> {
        None
    }

    /// Tries to deliver; returns one outcome per entry of `attempt.recipients`, in order.
    fn deliver(&self, attempt: Attempt) -> BoxFuture<'_, Report>;

    /// State and counters for `mailbridge status`, metrics and the status page.
    fn status(&self) -> crate::ops::model::UpstreamStatus {
        crate::ops::model::UpstreamStatus {
            name: self.name().to_string(),
            kind: "unknown".into(),
            state: "ok".into(),
            ..Default::default()
        }
    }
}
