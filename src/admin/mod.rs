//! The operator's side of a running daemon: the admin socket (JSON lines, [`proto`]) that the
//! CLI commands talk to, and its client.

pub mod cli;
pub mod client;
pub mod proto;
pub mod socket;
