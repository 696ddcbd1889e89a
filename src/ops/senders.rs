//! The sender inventory: every client that sent through mailbridge (IP, AUTH user, HELO,
//! TLS version or plaintext, AUTH mechanism), with the envelope senders it used, kept across
//! restarts in `state_dir/senders.json`. It is the migration checklist: which devices still
//! send without TLS, or as which addresses.
//!
//! Bounded: [`MAX_CLIENTS`] entries (the least recently seen go first) and
//! [`MAX_SENDERS`] envelope senders per entry. [`Inventory::record`] is on the accept path:
//! one short lock, no I/O. The file is written off that path ([`Inventory::run_flusher`]:
//! when something changed, every [`FLUSH_EVERY`], and at shutdown), atomically.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::ClientInfo;
use super::model::SenderRecord;

/// Clients kept; beyond it the least recently seen is forgotten.
pub const MAX_CLIENTS: usize = 1000;
/// Envelope senders kept per client (the most recent).
pub const MAX_SENDERS: usize = 20;
/// How often a changed inventory is written.
pub const FLUSH_EVERY: Duration = Duration::from_secs(30);

/// (ip, auth user, helo, tls version, auth mechanism)
type Key = (
    String,
    Option<String>,
    String,
    Option<String>,
    Option<String>,
);

fn key_of(r: &SenderRecord) -> Key {
    (
        r.ip.clone(),
        r.auth_user.clone(),
        r.helo.clone(),
        r.tls_version.clone(),
        r.auth_mechanism.clone(),
    )
}

#[derive(Debug, Default)]
pub struct Inventory {
    path: Option<PathBuf>,
    entries: Mutex<HashMap<Key, SenderRecord>>,
    dirty: AtomicBool,
}

impl Inventory {
    /// `state_dir`: `None` keeps it in memory only. A file that cannot be read is logged
    /// and ignored (the inventory starts empty; the next flush replaces it).
    pub fn open(state_dir: Option<PathBuf>) -> Inventory {
        let path = state_dir.map(|d| d.join("senders.json"));
        let mut entries = HashMap::new();
        if let Some(p) = &path {
            match std::fs::read(p) {
                Ok(bytes) => match serde_json::from_slice::<Vec<SenderRecord>>(&bytes) {
                    Ok(list) => {
                        for r in list {
                            entries.insert(key_of(&r), r);
                        }
                        evict(&mut entries);
                    }
                    Err(e) => {
                        tracing::warn!(file = %p.display(), error = %e, "sender inventory file is damaged; starting a new inventory (the old file is replaced at the next save)");
                    }
                },
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(file = %p.display(), error = %e, "cannot read the sender inventory; starting a new one (check the state directory's owner and mode)");
                }
            }
        }
        Inventory {
            path,
            entries: Mutex::new(entries),
            dirty: AtomicBool::new(false),
        }
    }

    /// A message from `client` was accepted. One short lock, no I/O.
    pub fn record(&self, client: &ClientInfo<'_>, now_ms: u64) {
        let key: Key = (
            client.ip.to_string(),
            client.auth_user.map(str::to_string),
            client.helo.to_string(),
            client.tls.map(|(v, _)| v.to_string()),
            client.auth_mechanism.map(str::to_string),
        );
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let new = !entries.contains_key(&key);
        let e = entries.entry(key).or_insert_with_key(|k| SenderRecord {
            ip: k.0.clone(),
            auth_user: k.1.clone(),
            helo: k.2.clone(),
            tls_version: k.3.clone(),
            tls_cipher: None,
            auth_mechanism: k.4.clone(),
            senders: Vec::new(),
            messages: 0,
            first_seen_ms: now_ms,
            last_seen_ms: now_ms,
        });
        e.messages += 1;
        e.last_seen_ms = e.last_seen_ms.max(now_ms);
        if let Some((_, cipher)) = client.tls
            && e.tls_cipher.as_deref() != Some(cipher)
        {
            e.tls_cipher = Some(cipher.to_string());
        }
        match e.senders.iter().position(|s| s == client.sender) {
            // Most recent last.
            Some(i) if i + 1 == e.senders.len() => {}
            Some(i) => {
                let s = e.senders.remove(i);
                e.senders.push(s);
            }
            None => {
                if e.senders.len() >= MAX_SENDERS {
                    e.senders.remove(0);
                }
                e.senders.push(client.sender.to_string());
            }
        }
        if new {
            evict(&mut entries);
        }
        drop(entries);
        self.dirty.store(true, Ordering::Relaxed);
    }

    /// Every client, most recently seen first.
    pub fn list(&self) -> Vec<SenderRecord> {
        let mut list: Vec<SenderRecord> = self
            .entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        list.sort_by(|a, b| {
            b.last_seen_ms
                .cmp(&a.last_seen_ms)
                .then_with(|| a.ip.cmp(&b.ip))
        });
        list
    }

    /// Writes the inventory if it changed since the last write (tmp file, fsync, rename,
    /// directory fsync). Blocking.
    pub fn flush(&self) -> std::io::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        if !self.dirty.swap(false, Ordering::Relaxed) {
            return Ok(());
        }
        let bytes = serde_json::to_vec(&self.list()).map_err(std::io::Error::other)?;
        write_atomic(path, &bytes).inspect_err(|_| {
            // Try again next time.
            self.dirty.store(true, Ordering::Relaxed);
        })
    }
}

/// Writes `ops`' inventory every [`FLUSH_EVERY`] when it changed, and once more when `stop`
/// is cancelled.
pub async fn run_flusher(ops: std::sync::Arc<super::Ops>, stop: CancellationToken) {
    loop {
        let stopping = tokio::select! {
            _ = stop.cancelled() => true,
            _ = tokio::time::sleep(FLUSH_EVERY) => false,
        };
        let o = ops.clone();
        let res = tokio::task::spawn_blocking(move || o.senders.flush()).await;
        if let Ok(Err(e)) = res
            && let Some(p) = &ops.senders.path
        {
            tracing::warn!(file = %p.display(), error = %e, "cannot save the sender inventory (check that the state directory is writable); retrying later");
        }
        if stopping {
            return;
        }
    }
}

/// Forgets the least recently seen entries beyond [`MAX_CLIENTS`].
fn evict(entries: &mut HashMap<Key, SenderRecord>) {
    while entries.len() > MAX_CLIENTS {
        let oldest = entries
            .iter()
            .min_by_key(|(_, r)| r.last_seen_ms)
            .map(|(k, _)| k.clone());
        match oldest {
            Some(k) => {
                entries.remove(&k);
            }
            None => break,
        }
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(".senders.json.tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client<'a>(ip: &str, sender: &'a str, tls: Option<(&'a str, &'a str)>) -> ClientInfo<'a> {
        ClientInfo {
            ip: ip.parse().unwrap(),
            helo: "printer",
            auth_user: None,
            auth_mechanism: None,
            tls,
            sender,
        }
    }

    #[test]
    fn one_entry_per_client_with_bounded_senders() {
        let inv = Inventory::open(None);
        for i in 0..(MAX_SENDERS + 5) {
            let s = format!("s{i}@example.com");
            inv.record(&client("10.0.0.1", &s, None), 1000 + i as u64);
        }
        inv.record(
            &client("10.0.0.1", "x@example.com", Some(("TLSv1.2", "AES"))),
            5000,
        );
        let list = inv.list();
        assert_eq!(list.len(), 2, "plaintext and TLS are separate entries");
        assert_eq!(list[0].tls_version.as_deref(), Some("TLSv1.2"));
        assert_eq!(list[0].tls_cipher.as_deref(), Some("AES"));
        let plain = &list[1];
        assert_eq!(plain.messages, (MAX_SENDERS + 5) as u64);
        assert_eq!(plain.senders.len(), MAX_SENDERS);
        assert_eq!(plain.senders.last().unwrap(), "s24@example.com");
        assert!(!plain.senders.contains(&"s0@example.com".to_string()));
        assert_eq!(plain.first_seen_ms, 1000);
        assert_eq!(plain.last_seen_ms, 1000 + (MAX_SENDERS + 4) as u64);
    }

    #[test]
    fn bounded_the_least_recently_seen_go_first() {
        let inv = Inventory::open(None);
        for i in 0..MAX_CLIENTS {
            let ip = format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256);
            inv.record(&client(&ip, "a@example.com", None), 1000 + i as u64);
        }
        // The first client is seen again: now the second is the oldest.
        inv.record(&client("10.0.0.0", "a@example.com", None), 10_000);
        inv.record(&client("192.168.1.1", "a@example.com", None), 10_001);
        let list = inv.list();
        assert_eq!(list.len(), MAX_CLIENTS);
        let ips: Vec<&str> = list.iter().map(|r| r.ip.as_str()).collect();
        assert!(ips.contains(&"10.0.0.0"));
        assert!(ips.contains(&"192.168.1.1"));
        assert!(!ips.contains(&"10.0.0.1"), "least recently seen evicted");
    }

    #[test]
    fn kept_across_restarts_and_a_damaged_file_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let inv = Inventory::open(Some(dir.path().into()));
        inv.record(&client("10.0.0.9", "a@example.com", None), 1000);
        inv.flush().unwrap();
        let again = Inventory::open(Some(dir.path().into()));
        assert_eq!(again.list().len(), 1);
        assert_eq!(again.list()[0].ip, "10.0.0.9");
        std::fs::write(dir.path().join("senders.json"), b"{not json").unwrap();
        let fresh = Inventory::open(Some(dir.path().into()));
        assert!(fresh.list().is_empty());
        fresh.record(&client("10.0.0.8", "b@example.com", None), 2000);
        fresh.flush().unwrap();
        assert_eq!(
            Inventory::open(Some(dir.path().into())).list()[0].ip,
            "10.0.0.8"
        );
    }
}
