//! Prometheus metrics (`/metrics`), through the `prometheus-client` crate.
//! (Skeleton: the hooks exist; the registry comes with the HTTP endpoint.)

use std::time::Duration;

use crate::outcome::Outcome;

#[derive(Debug, Default)]
pub struct Metrics {}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics {}
    }

    pub fn session_opened(&self) {}

    pub fn message_accepted(&self, _dot_to_reply: Duration) {}

    pub fn message_rejected(&self, _reason: &'static str) {}

    pub fn delivery(&self, _o: &Outcome) {}
}
