//! The one integration test binary (ripgrep's habit): a module per area.

mod admin_cli;
mod auth;
mod auth_cli;
mod common;
mod daemon;
mod docs;
mod doctor;
mod durability;
mod exchange;
#[path = "../support/fake_exchange.rs"]
pub mod fake_exchange;
#[path = "../support/fake_token.rs"]
pub mod fake_token;
mod fakes;
mod http;
mod interop;
mod interop_auth;
mod interop_tls;
mod ops_docs;
mod reload;
mod senders;
mod session;
mod systemd;
mod tls;
mod tls_matrix;
