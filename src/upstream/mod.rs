//! Upstreams: where delivery hands a message. One trait, one implementation per kind
//! (`outbox` here; Exchange Online comes next). An upstream reports a result per recipient and
//! never touches the queue: the delivery worker records outcomes through the spool.

pub mod outbox;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::spool::{Spool, Stored};

/// What happened to one recipient in one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptOutcome {
    /// Accepted by the upstream; the text is its reply.
    Delivered(String),
    /// Try again later (4xx, connection or local errors).
    Deferred(String),
    /// Permanent failure (5xx): the recipient will not be retried.
    Failed(String),
}

/// One delivery attempt's input: the stored message and which recipients are still pending.
#[derive(Clone)]
pub struct Attempt {
    pub spool: Spool,
    pub stored: Arc<Stored>,
    /// Indices into `stored.envelope.recipients`.
    pub recipients: Vec<usize>,
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

pub trait Upstream: Send + Sync {
    fn name(&self) -> &str;

    /// Tries to deliver; returns one outcome per entry of `attempt.recipients`, in order.
    fn deliver(&self, attempt: Attempt) -> BoxFuture<'_, Vec<RcptOutcome>>;
}
