//! The spool: the only code that touches spool files. Trust boundary: everything written here
//! was already parsed and cleaned by `inbound`; everything read back is validated (checksums,
//! end records) before use.
//!
//! Layout under `spool.path` (the state of a message is where its file sits, as in Postfix):
//! - `tmp/`     files being written, and emptied spare files kept for reuse; emptied at start
//! - `queue/`   committed messages (`<id>.msg`) and their state (`<id>.state`)
//! - `failed/`  messages that reached a permanent failure or `queue.max_age`, with their state
//! - `corrupt/` files that failed validation, kept for inspection
//!
//! Durability (behaviour.md A1): a message is acknowledged only after its file is fsynced,
//! renamed into `queue/` and `queue/` itself is fsynced. Commits are grouped: each session
//! writes its own file, and one thread syncs and renames the files of every session that
//! finished DATA meanwhile, so the cost of a sync is shared (see `commit.rs`).

mod admin;
mod commit;
pub mod format;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

pub use admin::valid_id;
pub use format::{Envelope, RcptState, RcptStatus, Recipient, State};

/// Content up to this size stays in memory until commit; beyond it is written to `tmp/` as it
/// arrives, so a 100 MB message costs about this much memory, not 100 MB.
pub const SPILL_THRESHOLD: usize = 256 * 1024;

/// Delivered queue files kept (emptied) for reuse instead of being deleted. Creating and
/// deleting thousands of files a second is costly for some file systems (ext4 without a
/// journal scans recently deleted inodes on every allocation); reusing them is not.
const MAX_SPARES: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool I/O error on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("spool {0} is locked by another mailbridge process (only one daemon may use a spool)")]
    Locked(PathBuf),
    #[error("queue file {path} is invalid: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("the spool writer has stopped")]
    WriterGone,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A queue file that could not be read or did not validate, as a spool error about `path`.
fn read_err(path: &Path) -> impl FnOnce(format::ReadError) -> SpoolError + '_ {
    move |e| match e {
        format::ReadError::Io(source) => SpoolError::Io {
            path: path.to_path_buf(),
            source,
        },
        format::ReadError::Invalid(reason) => SpoolError::Invalid {
            path: path.to_path_buf(),
            reason,
        },
    }
}

/// True for errors that say nothing about one file: the process ran out of descriptors or
/// memory.
fn process_wide(e: &io::Error) -> bool {
    use rustix::io::Errno;
    matches!(
        Errno::from_io_error(e),
        Some(Errno::MFILE | Errno::NFILE | Errno::NOMEM)
    )
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A new queue id: a UUIDv7 in hex, so ids sort by arrival time.
pub fn new_id() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

/// What the scheduler needs to know about a queued message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    pub id: String,
    pub arrival_ms: u64,
    pub next_attempt_ms: u64,
    /// Attempts made so far.
    pub attempts: u32,
    /// Held by an operator: not attempted until released.
    pub held: bool,
}

/// A message loaded for delivery.
#[derive(Debug, Clone)]
pub struct Stored {
    pub envelope: Envelope,
    pub state: State,
    pub content_offset: u64,
    pub content_len: u64,
}

/// What start-up recovery found.
#[derive(Debug, Default)]
pub struct Recovered {
    pub queued: Vec<Queued>,
    pub corrupt: usize,
    pub tmp_removed: usize,
    /// Messages whose last attempt was cut off: they may reach the upstream twice.
    pub interrupted: Vec<String>,
}

#[derive(Clone)]
pub struct Spool {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    tmp: PathBuf,
    queue: PathBuf,
    failed: PathBuf,
    corrupt: PathBuf,
    committer: commit::Committer,
    /// Empty files in `tmp/` ready to be reused for incoming messages.
    spares: std::sync::Mutex<Vec<PathBuf>>,
    spare_seq: std::sync::atomic::AtomicU64,
    _lock: File,
}

impl Inner {
    /// A file in `tmp/` for a new message: a spare one if there is one, else a new one.
    fn open_tmp(&self, id: &str) -> io::Result<(File, PathBuf)> {
        let spare = self.spares.lock().unwrap_or_else(|e| e.into_inner()).pop();
        if let Some(path) = spare
            && let Ok(f) = OpenOptions::new().write(true).truncate(true).open(&path)
        {
            return Ok((f, path));
        }
        let path = self.tmp.join(format!("{id}.msg"));
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        Ok((f, path))
    }
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool")
            .field("root", &self.inner.root)
            .finish()
    }
}

impl Spool {
    /// Opens (creating if needed) the spool at `root` and takes its lock.
    pub fn open(root: &Path) -> Result<Spool, SpoolError> {
        let mut b = fs::DirBuilder::new();
        b.recursive(true).mode(0o700);
        let dirs = ["tmp", "queue", "failed", "corrupt"].map(|d| root.join(d));
        for d in &dirs {
            b.create(d).map_err(io_err(d))?;
        }
        let lock_path = root.join(".lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Err(SpoolError::Locked(root.into())),
            Err(fs::TryLockError::Error(e)) => return Err(io_err(&lock_path)(e)),
        }
        let [tmp, queue, failed, corrupt] = dirs;
        let committer = commit::Committer::start(queue.clone());
        Ok(Spool {
            inner: Arc::new(Inner {
                root: root.to_path_buf(),
                tmp,
                queue,
                failed,
                corrupt,
                committer,
                spares: std::sync::Mutex::new(Vec::new()),
                spare_seq: std::sync::atomic::AtomicU64::new(0),
                _lock: lock,
            }),
        })
    }

    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// True if the spool's file system has `need` bytes free for a new message (A6: refuse
    /// with 452 at MAIL rather than fail in the middle of DATA when we can tell early).
    pub fn has_room(&self, need: u64) -> bool {
        match rustix::fs::statvfs(&self.inner.queue) {
            Ok(s) => s.f_bavail.saturating_mul(s.f_frsize) >= need.saturating_add(64 * 1024),
            Err(_) => true, // cannot tell: the write itself will report the error
        }
    }

    /// Starts a new incoming message. Nothing is on disk until it grows past
    /// [`SPILL_THRESHOLD`] or is committed.
    pub fn begin(&self, envelope: &Envelope) -> Incoming {
        let (header, hasher) = format::encode_header(envelope);
        Incoming {
            spool: self.clone(),
            id: envelope.id.clone(),
            buf: header,
            file: None,
            hasher,
            content_len: 0,
            queued: Queued {
                id: envelope.id.clone(),
                arrival_ms: envelope.arrival_ms,
                next_attempt_ms: envelope.arrival_ms,
                attempts: 0,
                held: false,
            },
            error: None,
            committed: false,
            tmp_path: None,
        }
    }

    fn queue_path(&self, id: &str, ext: &str) -> PathBuf {
        self.inner.queue.join(format!("{id}.{ext}"))
    }

    /// Start-up recovery (behaviour.md A3, A7): empties `tmp/`, validates every queue file,
    /// moves the invalid ones to `corrupt/`, and returns what is left to deliver.
    /// Blocking: call before serving, or from a blocking thread.
    pub fn recover(&self) -> Result<Recovered, SpoolError> {
        let mut out = Recovered::default();
        let tmp = &self.inner.tmp;
        for entry in fs::read_dir(tmp).map_err(io_err(tmp))? {
            let entry = entry.map_err(io_err(tmp))?;
            // Only `<id>.msg` is a partial message; spares, state files being written and
            // the health and doctor probes are not worth a word in the log.
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let partial = name.ends_with(".msg") && !name.starts_with("spare-");
            if fs::remove_file(entry.path()).is_ok() && partial {
                out.tmp_removed += 1;
            }
        }
        let queue = &self.inner.queue;
        let mut ids = Vec::new();
        let mut states = std::collections::HashSet::new();
        for entry in fs::read_dir(queue).map_err(io_err(queue))? {
            let entry = entry.map_err(io_err(queue))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if let Some(id) = name.strip_suffix(".msg") {
                // Only a regular file can be a queue file. Opening a FIFO would block start-up
                // for ever, a directory fails on read: set such an entry aside (issue 8 §3.9).
                // `file_type` does not follow symlinks; the spool never makes any.
                match entry.file_type() {
                    Ok(t) if t.is_file() => ids.push(id.to_string()),
                    Ok(t) => {
                        let kind = if t.is_dir() {
                            "a directory"
                        } else if t.is_symlink() {
                            "a symbolic link"
                        } else {
                            "not a regular file"
                        };
                        tracing::error!(file = %entry.path().display(), kind, "queue entry is not a regular file, moved to corrupt/ (alert: mailbridge never creates one; inspect it, and to deliver it, stop mailbridge, put a regular file back in queue/ owned by the mailbridge user, mode 600, and start it)");
                        self.quarantine_message(id);
                        out.corrupt += 1;
                    }
                    Err(e) => {
                        self.unreadable_entry(id, &entry.path(), &e);
                        out.corrupt += 1;
                    }
                }
            } else if let Some(id) = name.strip_suffix(".state") {
                states.insert(id.to_string());
            } else {
                tracing::warn!(file = %entry.path().display(), "unexpected file in the queue directory, moving it to corrupt/");
                self.quarantine(&entry.path());
                out.corrupt += 1;
            }
        }
        ids.sort();
        for id in ids {
            states.remove(&id);
            match self.load(&id) {
                Ok(stored) => {
                    if stored.state.in_flight {
                        out.interrupted.push(id.clone());
                    }
                    out.queued.push(Queued {
                        id,
                        arrival_ms: stored.envelope.arrival_ms,
                        next_attempt_ms: stored.state.next_attempt_ms,
                        attempts: stored.state.attempts,
                        held: stored.state.held,
                    });
                }
                // Out of file descriptors or memory: a problem of the process, not of this
                // entry. Stop rather than move a whole queue aside.
                Err(SpoolError::Io { path, source }) if process_wide(&source) => {
                    return Err(SpoolError::Io { path, source });
                }
                // This entry alone cannot be read (permissions, I/O error): set it aside and
                // start, or systemd restarts a daemon that fails the same way every 5 s for
                // ever (issue 8 §3.9). Listing `queue/` itself failing still stops start-up
                // (above).
                Err(SpoolError::Io { path, source }) => {
                    self.unreadable_entry(&id, &path, &source);
                    out.corrupt += 1;
                }
                Err(e) => {
                    tracing::error!(queue_id = %id, error = %e, "queue file failed validation, moved to corrupt/ (alert: inspect it with a text editor; it was not delivered)");
                    self.quarantine(&self.queue_path(&id, "msg"));
                    let st = self.queue_path(&id, "state");
                    if st.exists() {
                        self.quarantine(&st);
                    }
                    out.corrupt += 1;
                }
            }
        }
        for orphan in states {
            let p = self.queue_path(&orphan, "state");
            // Gone already (moved with its message), or removed now; anything that cannot be
            // removed (a directory) is set aside rather than met again at every start.
            if fs::remove_file(&p).is_err() && fs::symlink_metadata(&p).is_ok() {
                tracing::warn!(file = %p.display(), "state entry without a message could not be removed, moving it to corrupt/");
                self.quarantine(&p);
                out.corrupt += 1;
            }
        }
        sync_dir(queue).map_err(io_err(queue))?;
        Ok(out)
    }

    /// Moves a queued message (and its state) that no longer validates to `corrupt/`.
    /// Blocking.
    pub fn quarantine_message(&self, id: &str) {
        for ext in ["msg", "state"] {
            let p = self.queue_path(id, ext);
            // `symlink_metadata`: a dangling symlink exists too, and must move.
            if fs::symlink_metadata(&p).is_ok() {
                self.quarantine(&p);
            }
        }
    }

    /// A queued message that cannot be read: moved to `corrupt/` with its state, with the
    /// remedy in the log.
    fn unreadable_entry(&self, id: &str, path: &Path, e: &io::Error) {
        tracing::error!(queue_id = %id, file = %path.display(), error = %e, "queue entry cannot be read, moved to corrupt/ (alert: it was not delivered; fix its owner or mode (the mailbridge user must read it, mode 600), then stop mailbridge, move the .msg and .state back to queue/ and start it)");
        self.quarantine_message(id);
    }

    fn quarantine(&self, path: &Path) {
        if let Some(name) = path.file_name() {
            let dest = self.inner.corrupt.join(name);
            if let Err(e) = fs::rename(path, &dest) {
                tracing::error!(file = %path.display(), error = %e, "could not move to corrupt/");
            }
        }
    }

    /// Reads and validates a queued message and its state. Blocking.
    pub fn load(&self, id: &str) -> Result<Stored, SpoolError> {
        let path = self.queue_path(id, "msg");
        let file = File::open(&path).map_err(io_err(&path))?;
        let (envelope, slot, range) = format::read_queue_file(file).map_err(read_err(&path))?;
        if envelope.id != id {
            return Err(SpoolError::Invalid {
                path,
                reason: format!("envelope id {} does not match the file name", envelope.id),
            });
        }
        let state_path = self.queue_path(id, "state");
        let mut state_damaged = false;
        let mut state = match fs::read(&state_path) {
            Ok(b) => match format::decode_state(&b, envelope.recipients.len()) {
                Ok(s) => s,
                Err(reason) => {
                    // The message itself is intact: deliver it again rather than lose it.
                    tracing::warn!(queue_id = %id, %reason, "state file invalid, moved to corrupt/; all recipients are retried (possible duplicate)");
                    self.quarantine(&state_path);
                    state_damaged = true;
                    State::initial(&envelope)
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => State::initial(&envelope),
            Err(e) => return Err(io_err(&state_path)(e)),
        };
        // The slot is written last and is the authority on attempts; a damaged one means
        // we cannot tell whether an attempt was running.
        match slot {
            Some(slot) if slot.attempts >= state.attempts => {
                state.attempts = slot.attempts;
                state.next_attempt_ms = slot.next_attempt_ms;
                state.in_flight = slot.in_flight;
            }
            Some(_) => {}
            None => state.in_flight = true,
        }
        state.in_flight |= state_damaged;
        Ok(Stored {
            envelope,
            state,
            content_offset: range.start,
            content_len: range.end - range.start,
        })
    }

    /// Opens the content of a loaded message for reading. Blocking.
    pub fn open_content(&self, stored: &Stored) -> Result<io::Take<File>, SpoolError> {
        let path = self.queue_path(&stored.envelope.id, "msg");
        let mut f = File::open(&path).map_err(io_err(&path))?;
        f.seek(SeekFrom::Start(stored.content_offset))
            .map_err(io_err(&path))?;
        Ok(f.take(stored.content_len))
    }

    /// Records that an attempt starts: attempts, next attempt time and the in-flight mark go
    /// into the queue file's slot, in place. Not fsynced: a process crash keeps it; a power
    /// cut may lose it, which only repeats an attempt (a duplicate, never a loss). Blocking.
    pub fn begin_attempt(&self, id: &str, state: &State) -> Result<(), SpoolError> {
        self.write_slot(id, state)
    }

    fn write_slot(&self, id: &str, state: &State) -> Result<(), SpoolError> {
        use std::os::unix::fs::FileExt;
        let path = self.queue_path(id, "msg");
        let slot = format::Slot {
            attempts: state.attempts,
            next_attempt_ms: state.next_attempt_ms,
            in_flight: state.in_flight,
        };
        OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|f| f.write_all_at(&slot.encode(), format::SLOT_OFFSET))
            .map_err(io_err(&path))
    }

    /// Records the outcome of an attempt that leaves the message queued: the state file
    /// (per-recipient status, replies; write to tmp/, rename), then the slot. Not fsynced,
    /// for the same reason as [`Spool::begin_attempt`]. Blocking.
    pub fn save_state(&self, id: &str, state: &State) -> Result<(), SpoolError> {
        let tmp = self.inner.tmp.join(format!("{id}.state"));
        write_new(&tmp, &format::encode_state(state)).map_err(io_err(&tmp))?;
        let dest = self.queue_path(id, "state");
        fs::rename(&tmp, &dest).map_err(io_err(&dest))?;
        self.write_slot(id, state)
    }

    /// Removes a message that needs no more delivery: its file is emptied and kept in `tmp/`
    /// for reuse (up to a limit), or deleted. Blocking.
    pub fn remove(&self, id: &str) -> Result<(), SpoolError> {
        let st = self.queue_path(id, "state");
        match fs::remove_file(&st) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&st)(e)),
        }
        let msg = self.queue_path(id, "msg");
        let inner = &self.inner;
        let keep = inner.spares.lock().unwrap_or_else(|e| e.into_inner()).len() < MAX_SPARES;
        if keep {
            let n = inner
                .spare_seq
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let spare = inner.tmp.join(format!("spare-{n}"));
            // Out of the queue first (a crash right after leaves a spare in tmp/, which
            // start-up removes), then emptied so the content does not linger on disk.
            if fs::rename(&msg, &spare).is_ok() {
                match OpenOptions::new().write(true).truncate(true).open(&spare) {
                    Ok(_) => inner
                        .spares
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(spare),
                    Err(_) => {
                        let _ = fs::remove_file(&spare);
                    }
                }
                return Ok(());
            }
        }
        fs::remove_file(&msg).map_err(io_err(&msg))
    }

    /// Moves a message with its final state to `failed/`. Blocking.
    pub fn move_to_failed(&self, id: &str, state: &State) -> Result<(), SpoolError> {
        let failed = &self.inner.failed;
        let st = failed.join(format!("{id}.state"));
        // Synced before the message moves: a dead letter's state is what `queue requeue`
        // goes by (which recipients were delivered already).
        write_new(&st, &format::encode_state(state))
            .and_then(|()| File::open(&st)?.sync_all())
            .map_err(io_err(&st))?;
        let msg = self.queue_path(id, "msg");
        fs::rename(&msg, failed.join(format!("{id}.msg"))).map_err(io_err(&msg))?;
        let _ = fs::remove_file(self.queue_path(id, "state"));
        sync_dir(failed).map_err(io_err(failed))
    }
}

/// Writes a new file (0600), replacing any old one.
fn write_new(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)
}

/// fsync on a directory makes the renames and unlinks inside it durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// A message being received. Dropping it without [`Incoming::commit`] removes any partial
/// file (behaviour.md A3: no partial entry is ever left in `queue/`).
pub struct Incoming {
    spool: Spool,
    id: String,
    buf: Vec<u8>,
    file: Option<File>,
    hasher: crc32fast::Hasher,
    content_len: u64,
    queued: Queued,
    error: Option<io::Error>,
    committed: bool,
    /// Where the message is being written in `tmp/`, once it has a file.
    tmp_path: Option<PathBuf>,
}

impl Incoming {
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn content_len(&self) -> u64 {
        self.content_len
    }

    /// Appends content. Errors are kept and reported by `commit`, so the session can read
    /// the rest of DATA before replying.
    pub async fn write(&mut self, bytes: &[u8]) {
        if self.error.is_some() {
            return;
        }
        self.hasher.update(bytes);
        self.content_len += bytes.len() as u64;
        self.buf.extend_from_slice(bytes);
        if self.buf.len() >= SPILL_THRESHOLD {
            self.spill().await;
        }
    }

    async fn spill(&mut self) {
        let inner = self.spool.inner.clone();
        let id = self.id.clone();
        let file = self.file.take().zip(self.tmp_path.clone());
        let buf = std::mem::take(&mut self.buf);
        let res = tokio::task::spawn_blocking(move || {
            let (mut f, path) = match file {
                Some(fp) => fp,
                None => inner.open_tmp(&id)?,
            };
            f.write_all(&buf)?;
            Ok::<_, io::Error>((f, path, buf))
        })
        .await;
        match res {
            Ok(Ok((f, path, mut buf))) => {
                buf.clear();
                self.buf = buf;
                self.file = Some(f);
                self.tmp_path = Some(path);
            }
            Ok(Err(e)) => self.error = Some(e),
            Err(e) => self.error = Some(io::Error::other(e)),
        }
    }

    /// Makes the message durable: returns only once it is fsynced, renamed into `queue/` and
    /// the directory fsynced. The caller may send 250 after `Ok` and never before.
    pub async fn commit(mut self) -> Result<Queued, SpoolError> {
        let named = self.spool.inner.tmp.join(format!("{}.msg", self.id));
        if let Some(e) = self.error.take() {
            // A failed spill (disk full) may have left part of the message in tmp/.
            self.committed = true;
            self.file = None;
            if let Some(p) = self.tmp_path.take() {
                let _ = fs::remove_file(p);
            }
            return Err(io_err(&named)(e));
        }
        let crc = self.hasher.clone().finalize();
        let mut bytes = std::mem::take(&mut self.buf);
        bytes.extend_from_slice(&format::encode_trailer(self.content_len, crc));
        // Create and write the file here, on a blocking thread per session: creating a file
        // can wait for the file system, and these waits overlap across sessions instead of
        // queueing up in the commit thread.
        let file = self.file.take().zip(self.tmp_path.take());
        let inner = self.spool.inner.clone();
        let id = self.id.clone();
        let written = tokio::task::spawn_blocking(move || {
            let (mut f, path) = match file {
                Some(fp) => fp,
                None => inner.open_tmp(&id)?,
            };
            match f.write_all(&bytes) {
                Ok(()) => Ok((f, path)),
                Err(e) => {
                    let _ = fs::remove_file(&path);
                    Err(e)
                }
            }
        })
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e)));
        // From here on this function cleans up itself: nothing for Drop to remove.
        self.committed = true;
        let (file, tmp_path) = written.map_err(io_err(&named))?;
        let job = commit::Job {
            id: self.id.clone(),
            file,
            tmp_path,
        };
        self.spool
            .inner
            .committer
            .commit(job)
            .await
            .map_err(io_err(&named))?;
        Ok(self.queued.clone())
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if !self.committed {
            self.file = None;
            if let Some(p) = self.tmp_path.take() {
                let _ = fs::remove_file(p);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(id: &str) -> Envelope {
        Envelope::for_test(id, "s@example.com", &["a@example.com", "b@example.com"])
    }

    #[tokio::test]
    async fn commit_then_load_round_trip_small_and_spilled() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        for size in [10usize, SPILL_THRESHOLD * 3 + 17] {
            let id = new_id();
            let mut inc = spool.begin(&envelope(&id));
            let content: Vec<u8> = (0..size).map(|i| b'a' + (i % 26) as u8).collect();
            for chunk in content.chunks(7000) {
                inc.write(chunk).await;
            }
            let q = inc.commit().await.unwrap();
            assert_eq!(q.id, id);
            assert!(dir.path().join(format!("queue/{id}.msg")).exists());
            assert!(!dir.path().join(format!("tmp/{id}.msg")).exists());
            let stored = spool.load(&id).unwrap();
            let mut got = Vec::new();
            spool
                .open_content(&stored)
                .unwrap()
                .read_to_end(&mut got)
                .unwrap();
            assert_eq!(got, content);
            assert_eq!(stored.state.pending().count(), 2);
        }
    }

    #[tokio::test]
    async fn delivered_files_are_emptied_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let first = new_id();
        let mut inc = spool.begin(&envelope(&first));
        inc.write(b"Subject: one\r\n\r\nsecret content\r\n").await;
        inc.commit().await.unwrap();
        spool.remove(&first).unwrap();
        let tmp: Vec<_> = fs::read_dir(dir.path().join("tmp")).unwrap().collect();
        assert_eq!(tmp.len(), 1);
        let spare = tmp[0].as_ref().unwrap().path();
        assert_eq!(fs::metadata(&spare).unwrap().len(), 0, "emptied at once");
        assert!(!dir.path().join(format!("queue/{first}.msg")).exists());

        let second = new_id();
        let mut inc = spool.begin(&envelope(&second));
        inc.write(b"Subject: two\r\n\r\nx\r\n").await;
        inc.commit().await.unwrap();
        assert!(!spare.exists(), "the spare became the new queue file");
        let stored = spool.load(&second).unwrap();
        let mut got = Vec::new();
        spool
            .open_content(&stored)
            .unwrap()
            .read_to_end(&mut got)
            .unwrap();
        assert_eq!(got, b"Subject: two\r\n\r\nx\r\n");
    }

    #[tokio::test]
    async fn dropped_incoming_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let id = new_id();
        let mut inc = spool.begin(&envelope(&id));
        inc.write(&vec![b'x'; SPILL_THRESHOLD * 2]).await;
        assert!(dir.path().join(format!("tmp/{id}.msg")).exists());
        drop(inc);
        assert!(!dir.path().join(format!("tmp/{id}.msg")).exists());
        assert_eq!(fs::read_dir(dir.path().join("queue")).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn second_open_is_refused_while_locked() {
        let dir = tempfile::tempdir().unwrap();
        let _a = Spool::open(dir.path()).unwrap();
        assert!(matches!(
            Spool::open(dir.path()),
            Err(SpoolError::Locked(_))
        ));
    }

    #[tokio::test]
    async fn recovery_moves_corrupt_and_cleans_tmp() {
        let dir = tempfile::tempdir().unwrap();
        let good = new_id();
        {
            let spool = Spool::open(dir.path()).unwrap();
            let mut inc = spool.begin(&envelope(&good));
            inc.write(b"Subject: ok\r\n\r\nhi\r\n").await;
            inc.commit().await.unwrap();
            let mut inc = spool.begin(&envelope("bad"));
            inc.write(b"Subject: bad\r\n\r\nhi\r\n").await;
            inc.commit().await.unwrap();
        }
        // Truncate one queue file, leave a partial tmp file behind.
        let bad = dir.path().join("queue/bad.msg");
        let len = fs::metadata(&bad).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&bad)
            .unwrap()
            .set_len(len - 5)
            .unwrap();
        fs::write(dir.path().join("tmp/partial.msg"), b"MAILBRIDGE-QUEUE 1\n").unwrap();
        // Not messages: the health and doctor probes, state files being written.
        for other in [
            "healthz-7.probe",
            ".doctor-7-1.probe",
            "admin-x.state",
            "x.state",
        ] {
            fs::write(dir.path().join("tmp").join(other), b"x").unwrap();
        }

        let spool = Spool::open(dir.path()).unwrap();
        let r = spool.recover().unwrap();
        assert_eq!(r.queued.len(), 1);
        assert_eq!(r.queued[0].id, good);
        assert_eq!(r.corrupt, 1);
        assert_eq!(r.tmp_removed, 1, "only the partial message counts");
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        assert!(dir.path().join("corrupt/bad.msg").exists());
    }

    #[tokio::test]
    async fn recovery_sets_aside_entries_it_cannot_read_and_starts() {
        // Issue 8 §3.9: tests run as root, so "cannot be read" is a directory, a FIFO (which
        // would block the open), a dangling symlink, and a `.state` that is a directory.
        let dir = tempfile::tempdir().unwrap();
        let good = new_id();
        let state_dir = new_id();
        {
            let spool = Spool::open(dir.path()).unwrap();
            for id in [&good, &state_dir] {
                let mut inc = spool.begin(&envelope(id));
                inc.write(b"Subject: ok\r\n\r\nhi\r\n").await;
                inc.commit().await.unwrap();
            }
        }
        let queue = dir.path().join("queue");
        fs::create_dir(queue.join("adir.msg")).unwrap();
        fs::write(queue.join("adir.msg/inside"), b"x").unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            queue.join("afifo.msg"),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        std::os::unix::fs::symlink(dir.path().join("nowhere"), queue.join("alink.msg")).unwrap();
        let st = queue.join(format!("{state_dir}.state"));
        let _ = fs::remove_file(&st);
        fs::create_dir(&st).unwrap();

        let spool = Spool::open(dir.path()).unwrap();
        let r = spool.recover().unwrap();
        assert_eq!(
            r.queued.iter().map(|q| q.id.as_str()).collect::<Vec<_>>(),
            [good.as_str()]
        );
        assert_eq!(r.corrupt, 4);
        let corrupt = dir.path().join("corrupt");
        for name in [
            "adir.msg".to_string(),
            "afifo.msg".into(),
            "alink.msg".into(),
            format!("{state_dir}.msg"),
            format!("{state_dir}.state"),
        ] {
            assert!(fs::symlink_metadata(corrupt.join(&name)).is_ok(), "{name}");
            assert!(fs::symlink_metadata(queue.join(&name)).is_err(), "{name}");
        }
        assert!(corrupt.join("adir.msg/inside").exists());
        // The good message is intact and loads.
        assert!(spool.load(&good).is_ok());
    }

    #[test]
    fn an_orphan_state_that_cannot_be_removed_goes_to_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        fs::create_dir(dir.path().join("queue/lost.state")).unwrap();
        fs::write(dir.path().join("queue/gone.state"), b"x").unwrap();
        let r = spool.recover().unwrap();
        assert_eq!(r.corrupt, 1);
        assert!(dir.path().join("corrupt/lost.state").is_dir());
        assert!(!dir.path().join("queue/gone.state").exists());
        assert!(!dir.path().join("corrupt/gone.state").exists());
    }

    #[test]
    fn recovery_stops_when_the_queue_cannot_be_listed() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        // `queue` replaced by a file: listing it fails, which is not one bad entry.
        fs::remove_dir(dir.path().join("queue")).unwrap();
        fs::write(dir.path().join("queue"), b"").unwrap();
        let e = spool.recover().unwrap_err();
        assert!(matches!(e, SpoolError::Io { .. }), "{e}");
        assert!(e.to_string().contains("queue"), "{e}");
    }

    #[tokio::test]
    async fn state_updates_and_failed_move() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let id = new_id();
        let mut inc = spool.begin(&envelope(&id));
        inc.write(b"x\r\n").await;
        inc.commit().await.unwrap();
        let mut st = spool.load(&id).unwrap().state;
        st.attempts = 3;
        st.recipients[0].status = RcptStatus::Delivered;
        st.in_flight = true;
        spool.save_state(&id, &st).unwrap();
        let loaded = spool.load(&id).unwrap().state;
        assert_eq!(loaded, st);
        let r = spool.recover().unwrap();
        assert_eq!(r.interrupted, vec![id.clone()]);
        spool.move_to_failed(&id, &st).unwrap();
        assert!(dir.path().join(format!("failed/{id}.msg")).exists());
        assert!(dir.path().join(format!("failed/{id}.state")).exists());
        assert!(!dir.path().join(format!("queue/{id}.state")).exists());
    }
}
