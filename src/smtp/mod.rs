//! SMTP vocabulary without I/O: named replies, the DATA decoder, header helpers.
//! Everything here parses or produces bytes; nothing here touches a socket or the disk.

pub mod command;
pub mod data;
pub mod headers;
pub mod reply;

pub use reply::Reply;
