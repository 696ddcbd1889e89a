//! Prometheus metrics (`/metrics`), through the `prometheus-client` crate.
//!
//! Counters and the accept-time histogram are updated by the data-path hooks (an atomic add,
//! or a short uncontended lock for the histogram; no allocation on the accept path). The
//! gauges describe the queue and the upstreams: they are set from [`Control::status`] when a
//! scrape comes ([`Metrics::set_status`]), so nothing keeps them up to date in between.
//!
//! Label values are bounded: `reason` is one of [`REJECT_REASONS`], `upstream` a configured
//! upstream name, `verdict` a [`Verdict`](crate::outcome::Verdict) name, `class` the reply's
//! class (`2xx`, `4xx`, `5xx`) or `local` when no reply came, `result` `ok` or `error`.
//!
//! [`Control::status`]: crate::ops::control::Control::status

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::ops::model::StatusReport;
use crate::outcome::Outcome;

/// Every `reason` label of `mailbridge_messages_rejected_total`: created at zero so that
/// `rate()` and alerts see them before the first refusal.
pub const REJECT_REASONS: &[&str] = &[
    // The connection: a network in neither allow_networks nor auth_networks.
    "network_denied",
    // Connection limits (total, per client).
    "too_many_connections",
    // MAIL from a client that must authenticate first (relay permission, require_auth).
    "auth_required",
    // MAIL FROM outside the client's allowed senders.
    "sender_not_allowed",
    // An address this relay cannot forward (syntax, quoting, UTF-8 without SMTPUTF8).
    "address",
    // RCPT over limits.max_recipients.
    "too_many_recipients",
    // Over limits.max_message_size (SIZE= or the data itself).
    "size",
    "binarymime",
    // The header From (not allowed, several, no mailbox).
    "header_from",
    "header_size",
    "nul",
    "long_line",
    "bare_lf",
    // The spool's file system is full, or writing failed.
    "storage_full",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeliveryLabels {
    upstream: String,
    verdict: &'static str,
    class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    upstream: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    upstream: String,
}

pub struct Metrics {
    registry: Registry,
    sessions: Counter,
    accepted: Counter,
    rejected: Family<ReasonLabels, Counter>,
    deliveries: Family<DeliveryLabels, Counter>,
    token_requests: Family<TokenLabels, Counter>,
    accept_duration: Histogram,
    queue_messages: Gauge,
    queue_oldest_age: Gauge,
    token_expiry: Family<UpstreamLabels, Gauge>,
    upstream_paused: Family<UpstreamLabels, Gauge>,
    upstream_recipients_day: Family<UpstreamLabels, Gauge>,
    /// One scrape at a time sets the gauges and encodes (consistent output).
    scrape: std::sync::Mutex<()>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

/// The reply class label of an outcome.
fn class(o: &Outcome) -> &'static str {
    match o.reply.code {
        Some(200..=299) => "2xx",
        Some(300..=399) => "3xx",
        Some(400..=499) => "4xx",
        Some(500..=599) => "5xx",
        _ => "local",
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("mailbridge");
        let sessions = Counter::default();
        let accepted = Counter::default();
        let rejected = Family::<ReasonLabels, Counter>::default();
        let deliveries = Family::<DeliveryLabels, Counter>::default();
        let token_requests = Family::<TokenLabels, Counter>::default();
        // 0.5 ms .. ~8 s: the fsyncs before the 250 take a few ms on a disk, more on a slow one.
        let accept_duration = Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.0005, 2.0, 15),
        );
        let queue_messages = Gauge::default();
        let queue_oldest_age = Gauge::default();
        let token_expiry = Family::<UpstreamLabels, Gauge>::default();
        let upstream_paused = Family::<UpstreamLabels, Gauge>::default();
        let upstream_recipients_day = Family::<UpstreamLabels, Gauge>::default();
        // Counter names get their `_total` from the encoder.
        registry.register(
            "sessions",
            "LAN connections accepted (after the network allowlist and connection limits)",
            sessions.clone(),
        );
        registry.register(
            "messages_accepted",
            "Messages committed to the spool and answered 250",
            accepted.clone(),
        );
        registry.register(
            "messages_rejected",
            "Connections, transactions or messages refused, by reason",
            rejected.clone(),
        );
        registry.register(
            "deliveries",
            "Recipient outcomes of delivery attempts, by upstream, verdict and reply class",
            deliveries.clone(),
        );
        registry.register(
            "token_requests",
            "OAuth token requests of the shared refresher, by the upstreams it serves and result",
            token_requests.clone(),
        );
        registry.register(
            "accept_duration_seconds",
            "Time from the final dot of DATA to the 250 reply (spool commit)",
            accept_duration.clone(),
        );
        registry.register(
            "queue_messages",
            "Messages in the queue (all states)",
            queue_messages.clone(),
        );
        registry.register(
            "queue_oldest_age_seconds",
            "Age of the oldest queued message (0 when the queue is empty)",
            queue_oldest_age.clone(),
        );
        registry.register(
            "token_expiry_seconds",
            "Seconds until the upstream's OAuth token expires (negative: expired; absent: no token yet)",
            token_expiry.clone(),
        );
        registry.register(
            "upstream_paused",
            "1 when the upstream is paused by a configuration problem (see mailbridge status), else 0",
            upstream_paused.clone(),
        );
        registry.register(
            "upstream_recipients_day",
            "Recipients sent through the upstream's mailbox in the rolling day",
            upstream_recipients_day.clone(),
        );
        for reason in REJECT_REASONS {
            let _ = rejected.get_or_create(&ReasonLabels { reason });
        }
        Metrics {
            registry,
            sessions,
            accepted,
            rejected,
            deliveries,
            token_requests,
            accept_duration,
            queue_messages,
            queue_oldest_age,
            token_expiry,
            upstream_paused,
            upstream_recipients_day,
            scrape: std::sync::Mutex::new(()),
        }
    }

    pub fn session_opened(&self) {
        self.sessions.inc();
    }

    pub fn message_accepted(&self, dot_to_reply: Duration) {
        self.accepted.inc();
        self.accept_duration.observe(dot_to_reply.as_secs_f64());
    }

    /// `reason` should be one of [`REJECT_REASONS`] (others are counted too, under their
    /// own label, and flagged in debug builds).
    pub fn message_rejected(&self, reason: &'static str) {
        debug_assert!(REJECT_REASONS.contains(&reason), "unknown reason {reason}");
        self.rejected.get_or_create(&ReasonLabels { reason }).inc();
    }

    pub fn delivery(&self, o: &Outcome) {
        let labels = DeliveryLabels {
            upstream: o.upstream.clone(),
            verdict: o.verdict.name(),
            class: class(o),
        };
        self.deliveries.get_or_create(&labels).inc();
    }

    /// The `(ok, error)` counters of one token refresher; `upstream` names the upstreams it
    /// serves. Cloned counters share their value: the refresher's hook adds to them without
    /// a lookup.
    pub fn token_request_counters(&self, upstream: &str) -> (Counter, Counter) {
        let get = |result| {
            self.token_requests.get_or_create_owned(&TokenLabels {
                upstream: upstream.to_string(),
                result,
            })
        };
        (get("ok"), get("error"))
    }

    /// Sets the gauges from the daemon's status (at scrape time).
    fn set_status(&self, status: &StatusReport, now_ms: u64) {
        self.queue_messages
            .set(i64::try_from(status.queue.messages).unwrap_or(i64::MAX));
        self.queue_oldest_age.set(
            status
                .queue
                .oldest_age_s
                .map_or(0, |s| i64::try_from(s).unwrap_or(i64::MAX)),
        );
        // Upstreams can come and go with a reload: start from scratch.
        self.token_expiry.clear();
        self.upstream_paused.clear();
        self.upstream_recipients_day.clear();
        for u in &status.upstreams {
            let labels = UpstreamLabels {
                upstream: u.name.clone(),
            };
            self.upstream_paused
                .get_or_create(&labels)
                .set(i64::from(u.state == "paused"));
            if let Some(n) = u.recipients_day {
                self.upstream_recipients_day
                    .get_or_create(&labels)
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
            if let Some(expires) = u.token.as_ref().and_then(|t| t.expires_ms) {
                let left = (expires as i128 - now_ms as i128) / 1000;
                self.token_expiry
                    .get_or_create(&labels)
                    .set(left.clamp(i64::MIN as i128, i64::MAX as i128) as i64);
            }
        }
    }

    /// The text exposition (OpenMetrics text format, which Prometheus reads; see
    /// [`CONTENT_TYPE`]), with the gauges taken from `status`.
    pub fn render(&self, status: &StatusReport, now_ms: u64) -> String {
        let _one = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        self.set_status(status, now_ms);
        let mut out = String::with_capacity(8 * 1024);
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::model::{QueueSummary, TokenStatus, UpstreamStatus};
    use crate::outcome::{UpstreamReply, Verdict};

    fn sample(text: &str, name_and_labels: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' '))
            .map(|v| v.trim().parse().unwrap())
    }

    #[test]
    fn counters_gauges_and_histogram_are_exposed_with_their_names() {
        let m = Metrics::new();
        m.session_opened();
        m.session_opened();
        m.message_accepted(Duration::from_millis(3));
        m.message_rejected("bare_lf");
        let mut o = Outcome {
            verdict: Verdict::Delivered,
            step: None,
            reply: UpstreamReply {
                code: Some(250),
                enhanced: Some("2.0.0".into()),
                text: "OK".into(),
            },
            problem: None,
            upstream: "contoso".into(),
            at_ms: 0,
            attempt: 1,
        };
        m.delivery(&o);
        o.verdict = Verdict::Deferred { until_ms: 5 };
        o.reply = UpstreamReply::default();
        m.delivery(&o);
        let (ok, err) = m.token_request_counters("contoso");
        ok.inc();
        ok.inc();
        err.inc();
        let status = StatusReport {
            upstreams: vec![UpstreamStatus {
                name: "contoso".into(),
                state: "paused".into(),
                recipients_day: Some(12),
                token: Some(TokenStatus {
                    expires_ms: Some(1_000_000 + 600_000),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            queue: QueueSummary {
                messages: 4,
                oldest_age_s: Some(90),
                ..Default::default()
            },
            ..Default::default()
        };
        let text = m.render(&status, 1_000_000);
        assert_eq!(sample(&text, "mailbridge_sessions_total"), Some(2.0));
        assert_eq!(
            sample(&text, "mailbridge_messages_accepted_total"),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                "mailbridge_messages_rejected_total{reason=\"bare_lf\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, "mailbridge_messages_rejected_total{reason=\"size\"}"),
            Some(0.0)
        );
        assert_eq!(
            sample(
                &text,
                "mailbridge_deliveries_total{upstream=\"contoso\",verdict=\"delivered\",class=\"2xx\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                "mailbridge_deliveries_total{upstream=\"contoso\",verdict=\"deferred\",class=\"local\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                "mailbridge_token_requests_total{upstream=\"contoso\",result=\"ok\"}"
            ),
            Some(2.0)
        );
        assert_eq!(
            sample(
                &text,
                "mailbridge_token_requests_total{upstream=\"contoso\",result=\"error\"}"
            ),
            Some(1.0)
        );
        assert_eq!(sample(&text, "mailbridge_queue_messages"), Some(4.0));
        assert_eq!(
            sample(&text, "mailbridge_queue_oldest_age_seconds"),
            Some(90.0)
        );
        assert_eq!(
            sample(
                &text,
                "mailbridge_token_expiry_seconds{upstream=\"contoso\"}"
            ),
            Some(600.0)
        );
        assert_eq!(
            sample(&text, "mailbridge_upstream_paused{upstream=\"contoso\"}"),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                "mailbridge_upstream_recipients_day{upstream=\"contoso\"}"
            ),
            Some(12.0)
        );
        assert_eq!(
            sample(&text, "mailbridge_accept_duration_seconds_count"),
            Some(1.0)
        );
        assert!(text.contains("# TYPE mailbridge_accept_duration_seconds histogram"));
        // An upstream gone after a reload disappears from the gauges.
        let text = m.render(&StatusReport::default(), 1_000_000);
        assert!(!text.contains("mailbridge_upstream_paused{"), "{text}");
    }
}
