//! The one integration test binary (ripgrep's habit): a module per area.

mod auth;
mod auth_cli;
mod common;
mod daemon;
mod durability;
mod interop;
mod interop_auth;
mod interop_tls;
mod session;
mod tls;
