//! The operator's side of a running daemon: the admin socket (JSON lines, [`proto`]) that the
//! CLI commands talk to, and its client; the HTTP endpoint ([`http`]: metrics, health, the
//! status [`page`]).

pub mod cli;
pub mod client;
pub mod http;
pub mod page;
pub mod proto;
pub mod socket;
