//! mailbridge: an SMTP relay that accepts mail from legacy LAN senders (printers, scanners,
//! ERP systems, scripts), keeps it durably on disk, and delivers it upstream.
//!
//! # Layout
//! The modules follow the data path:
//!
//! ```text
//!  LAN client ──SMTP──▶ inbound::listener ──▶ inbound::session ──▶ spool (tmp/ → queue/)
//!                       limits, allowlist     smtp:: parse, DATA      group commit, fsync
//!                                                    │ 250 only after commit
//!                                                    ▼
//!                       scheduler (owns "when") ──▶ delivery (workers) ──▶ upstream::*
//!                       heap of due times            claim, record, classify   outbox, ...
//! ```
//!
//! - [`config`]: YAML file + environment overrides, validated into [`config::Config`].
//! - [`smtp`]: protocol vocabulary without I/O: replies, the DATA decoder, headers.
//! - [`inbound`]: listeners and sessions (untrusted input), LAN-side TLS (`inbound::tls`),
//!   AUTH PLAIN/LOGIN for local users (`inbound::auth`).
//! - [`spool`]: the only code that touches spool files.
//! - [`scheduler`]: due times, worker slots.
//! - [`delivery`]: one attempt: spool → upstream → per-recipient outcomes → spool.
//! - [`outcome`]: the typed outcome of an attempt (reply, step, verdict, problem), the one
//!   upstream reply parser and the named upstream reply codes.
//! - [`dsn`]: bounces (RFC 3464 delivery status notifications).
//! - [`upstream`]: the `Upstream` trait and its implementations (outbox, Exchange Online).
//! - [`token`]: OAuth client-credentials tokens for Exchange Online, renewed in the
//!   background.
//! - [`secret`]: the redacting type every password, hash and token lives in.
//! - [`ops`]: what operators see: the hooks the data path calls, metrics, the sender
//!   inventory, and [`ops::control`], the queue commands and status.
//! - [`admin`]: the admin socket (`mailbridge queue|status|senders|reload`) and the HTTP
//!   endpoint (metrics, health, the status page).
//! - [`reload`]: live reload (SIGHUP, `mailbridge reload`), swapping snapshots through
//!   arc-swap.
//! - [`daemon`]: wiring, signals, ordered shutdown. [`systemd`]: READY/RELOADING/STOPPING/
//!   WATCHDOG. [`logging`]: text or JSON log lines. [`cli`]: commands and exit codes.
//!   [`doctor`]: `mailbridge doctor`, the step-by-step check.

pub mod admin;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod delivery;
pub mod doctor;
pub mod dsn;
pub mod inbound;
pub mod logging;
pub mod ops;
pub mod outcome;
pub mod reload;
pub mod scheduler;
pub mod secret;
pub mod smtp;
pub mod spool;
pub mod systemd;
pub mod token;
pub mod upstream;
