//! The one integration test binary (ripgrep's habit): a module per area.

mod common;
mod daemon;
mod interop;
mod session;
