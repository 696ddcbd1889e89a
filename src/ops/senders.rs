//! The sender inventory: every client that sent through mailbridge, kept across restarts in
//! `state_dir`. (Skeleton: records nothing yet.)

use std::path::PathBuf;

use super::ClientInfo;
use super::model::SenderRecord;

#[derive(Debug, Default)]
pub struct Inventory {
    _path: Option<PathBuf>,
}

impl Inventory {
    /// `state_dir`: `None` keeps it in memory only.
    pub fn open(state_dir: Option<PathBuf>) -> Inventory {
        Inventory {
            _path: state_dir.map(|d| d.join("senders.json")),
        }
    }

    pub fn record(&self, _client: &ClientInfo<'_>, _now_ms: u64) {}

    pub fn list(&self) -> Vec<SenderRecord> {
        Vec::new()
    }
}
