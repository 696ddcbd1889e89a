//! Operator commands on the spool (`mailbridge queue ...`): listing queue/ and failed/,
//! holding, releasing, deleting and requeueing. Every change is durable before it returns
//! (files and directories fsynced): an operator's "done" survives a power cut.
//!
//! The caller (the scheduler's claim, see `ops::control`) makes sure no delivery attempt for
//! the same message runs meanwhile.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use super::format::{self, RcptStatus, State};
use super::{Queued, Spool, SpoolError, Stored, io_err, now_ms, read_err, sync_dir};

/// Whether `id` may name a spool file: what [`super::new_id`] makes (and test ids), never a
/// path.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Writes `bytes` to `dest` atomically and durably: a temporary file in `tmp_dir`, fsynced,
/// renamed over `dest`, and `dest`'s directory fsynced.
fn write_durable(tmp_dir: &Path, dest: &Path, bytes: &[u8]) -> io::Result<()> {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = tmp_dir.join(format!("admin-{name}"));
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, dest)?;
    if let Some(dir) = dest.parent() {
        sync_dir(dir)?;
    }
    Ok(())
}

fn list_ids(dir: &Path) -> Result<Vec<String>, SpoolError> {
    let mut ids = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name();
        if let Some(id) = name.to_string_lossy().strip_suffix(".msg") {
            ids.push(id.to_string());
        }
    }
    // UUIDv7 ids in hex sort by arrival time.
    ids.sort();
    Ok(ids)
}

fn not_found(path: &Path) -> SpoolError {
    SpoolError::Io {
        path: path.to_path_buf(),
        source: io::Error::from(io::ErrorKind::NotFound),
    }
}

impl Spool {
    /// The ids in `queue/`, oldest first. Blocking.
    pub fn queue_ids(&self) -> Result<Vec<String>, SpoolError> {
        list_ids(&self.inner.queue)
    }

    /// The ids in `failed/` (the dead letters), oldest first. Blocking.
    pub fn failed_ids(&self) -> Result<Vec<String>, SpoolError> {
        list_ids(&self.inner.failed)
    }

    /// How many messages `failed/` holds (a directory listing, no file is opened). Blocking.
    pub fn failed_count(&self) -> Result<u64, SpoolError> {
        let dir = &self.inner.failed;
        let mut n = 0;
        for entry in fs::read_dir(dir).map_err(io_err(dir))? {
            let entry = entry.map_err(io_err(dir))?;
            if entry.file_name().to_string_lossy().ends_with(".msg") {
                n += 1;
            }
        }
        Ok(n)
    }

    /// A queued message (or with `failed`, a dead letter) and its state for a listing: the
    /// envelope, slot and state are read, the content is not (nor its checksum verified).
    /// Nothing is moved, whatever is found. Blocking.
    pub fn peek(&self, id: &str, failed: bool) -> Result<Stored, SpoolError> {
        let dir = if failed {
            &self.inner.failed
        } else {
            &self.inner.queue
        };
        let path = dir.join(format!("{id}.msg"));
        if !valid_id(id) {
            return Err(not_found(&path));
        }
        let file = File::open(&path).map_err(io_err(&path))?;
        let (envelope, slot, range) = format::read_queue_head(file).map_err(read_err(&path))?;
        let mut state = fs::read(dir.join(format!("{id}.state")))
            .ok()
            .and_then(|b| format::decode_state(&b, envelope.recipients.len()).ok())
            .unwrap_or_else(|| State::initial(&envelope));
        if let Some(slot) = slot
            && slot.attempts >= state.attempts
        {
            state.attempts = slot.attempts;
            state.next_attempt_ms = slot.next_attempt_ms;
            state.in_flight = slot.in_flight && !failed;
        }
        Ok(Stored {
            envelope,
            state,
            content_offset: range.start,
            content_len: range.end - range.start,
        })
    }

    /// Reads and validates a message in `failed/` with its final state. Blocking.
    pub fn load_failed(&self, id: &str) -> Result<Stored, SpoolError> {
        if !valid_id(id) {
            return Err(not_found(&self.inner.failed.join(id)));
        }
        let path = self.inner.failed.join(format!("{id}.msg"));
        let file = File::open(&path).map_err(io_err(&path))?;
        let (envelope, slot, range) = format::read_queue_file(file).map_err(read_err(&path))?;
        let state_path = self.inner.failed.join(format!("{id}.state"));
        let mut state = match fs::read(&state_path) {
            Ok(b) => match format::decode_state(&b, envelope.recipients.len()) {
                Ok(s) => s,
                // The message itself is intact: every recipient is pending again (a
                // possible duplicate) rather than a dead letter nobody can requeue.
                Err(reason) => {
                    tracing::warn!(queue_id = %id, %reason, file = %state_path.display(), "state of a dead letter is invalid: every recipient counts as not delivered (possible duplicates if it is requeued)");
                    State::initial(&envelope)
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => State::initial(&envelope),
            Err(e) => return Err(io_err(&state_path)(e)),
        };
        if let Some(slot) = slot
            && slot.attempts > state.attempts
        {
            state.attempts = slot.attempts;
        }
        state.in_flight = false;
        Ok(Stored {
            envelope,
            state,
            content_offset: range.start,
            content_len: range.end - range.start,
        })
    }

    /// Holds or releases a queued message, durably (its state file). `next_attempt_ms`, if
    /// given, becomes its next attempt time. Returns the new state. Blocking.
    pub fn set_held(
        &self,
        id: &str,
        held: bool,
        next_attempt_ms: Option<u64>,
    ) -> Result<State, SpoolError> {
        if !valid_id(id) {
            return Err(not_found(&self.queue_path(id, "msg")));
        }
        let mut state = self.load(id)?.state;
        state.held = held;
        if let Some(ms) = next_attempt_ms {
            state.next_attempt_ms = ms;
        }
        // The loaded state is not in flight (the caller claimed the message); a slot found
        // in flight means an attempt was cut off by a crash: keep that mark.
        let dest = self.queue_path(id, "state");
        write_durable(&self.inner.tmp, &dest, &format::encode_state(&state))
            .map_err(io_err(&dest))?;
        self.write_slot(id, &state)?;
        Ok(state)
    }

    /// Removes a queued message and its state for good, without a report. Durable. Blocking.
    pub fn delete(&self, id: &str) -> Result<(), SpoolError> {
        let msg = self.queue_path(id, "msg");
        if !valid_id(id) {
            return Err(not_found(&msg));
        }
        // The message first: a crash in between leaves an orphan state, which start-up
        // removes; never a message without its hold mark.
        fs::remove_file(&msg).map_err(io_err(&msg))?;
        let st = self.queue_path(id, "state");
        match fs::remove_file(&st) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&st)(e)),
        }
        sync_dir(&self.inner.queue).map_err(io_err(&self.inner.queue))
    }

    /// Removes a dead letter from `failed/` for good, with its state. Durable. Blocking.
    pub fn delete_failed(&self, id: &str) -> Result<(), SpoolError> {
        let failed = &self.inner.failed;
        let msg = failed.join(format!("{id}.msg"));
        if !valid_id(id) {
            return Err(not_found(&msg));
        }
        fs::remove_file(&msg).map_err(io_err(&msg))?;
        let _ = fs::remove_file(failed.join(format!("{id}.state")));
        sync_dir(failed).map_err(io_err(failed))
    }

    /// Moves a message from `failed/` back into `queue/`: failed recipients become pending
    /// again, due now. Durable (files and both directories fsynced). Returns what the
    /// scheduler needs. Blocking.
    pub fn requeue(&self, id: &str) -> Result<Queued, SpoolError> {
        let mut stored = self.load_failed(id)?;
        let failed = &self.inner.failed;
        let queue = &self.inner.queue;
        let dest_msg = self.queue_path(id, "msg");
        if fs::symlink_metadata(&dest_msg).is_ok() {
            return Err(SpoolError::Invalid {
                path: dest_msg,
                reason: "a message with this id is already queued".into(),
            });
        }
        let now = now_ms();
        let state = &mut stored.state;
        for r in &mut state.recipients {
            if r.status == RcptStatus::Failed {
                r.status = RcptStatus::Pending;
            }
        }
        state.next_attempt_ms = now;
        state.in_flight = false;
        state.held = false;
        state.requeued_ms = Some(now);
        // 1. The new state in queue/ (alone it is an orphan that start-up removes).
        let dest_state = self.queue_path(id, "state");
        write_durable(&self.inner.tmp, &dest_state, &format::encode_state(state))
            .map_err(io_err(&dest_state))?;
        // 2. The slot (attempts, due now), synced, while the file is still in failed/.
        let src_msg = failed.join(format!("{id}.msg"));
        let slot = format::Slot {
            attempts: state.attempts,
            next_attempt_ms: now,
            in_flight: false,
        };
        OpenOptions::new()
            .write(true)
            .open(&src_msg)
            .and_then(|f| {
                f.write_all_at(&slot.encode(), format::SLOT_OFFSET)?;
                f.sync_all()
            })
            .map_err(io_err(&src_msg))?;
        // 3. The message into queue/, durable.
        fs::rename(&src_msg, &dest_msg).map_err(io_err(&src_msg))?;
        sync_dir(queue).map_err(io_err(queue))?;
        // 4. Its old state out of failed/.
        let _ = fs::remove_file(failed.join(format!("{id}.state")));
        sync_dir(failed).map_err(io_err(failed))?;
        Ok(Queued {
            id: id.to_string(),
            arrival_ms: stored.envelope.arrival_ms,
            next_attempt_ms: now,
            attempts: stored.state.attempts,
            held: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::{Envelope, new_id};

    async fn queued(spool: &Spool) -> String {
        let id = new_id();
        let env = Envelope::for_test(&id, "s@example.com", &["a@example.com", "b@example.com"]);
        let mut inc = spool.begin(&env);
        inc.write(b"Subject: t\r\n\r\nhi\r\n").await;
        inc.commit().await.unwrap();
        id
    }

    #[tokio::test]
    async fn held_flag_is_stored_and_survives_recovery() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let id = queued(&spool).await;
        spool.set_held(&id, true, None).unwrap();
        assert!(spool.load(&id).unwrap().state.held);
        let r = spool.recover().unwrap();
        assert!(r.queued[0].held);
        let st = spool.set_held(&id, false, Some(42)).unwrap();
        assert!(!st.held);
        let loaded = spool.load(&id).unwrap().state;
        assert!(!loaded.held);
        assert_eq!(
            loaded.next_attempt_ms, 42,
            "the slot carries the new time too"
        );
        assert!(spool.set_held("../x", true, None).is_err());
    }

    #[tokio::test]
    async fn requeue_brings_failed_recipients_back_and_delete_removes_everything() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let id = queued(&spool).await;
        let mut st = spool.load(&id).unwrap().state;
        st.attempts = 7;
        st.recipients[0].status = RcptStatus::Delivered;
        st.recipients[1].status = RcptStatus::Failed;
        st.held = true;
        spool.move_to_failed(&id, &st).unwrap();
        assert_eq!(spool.failed_ids().unwrap(), vec![id.clone()]);
        assert_eq!(spool.failed_count().unwrap(), 1);
        let peeked = spool.peek(&id, true).unwrap();
        assert_eq!(peeked.state.recipients[1].status, RcptStatus::Failed);

        let q = spool.requeue(&id).unwrap();
        assert_eq!(q.attempts, 7);
        assert!(!q.held);
        assert!(spool.failed_ids().unwrap().is_empty());
        assert!(!dir.path().join(format!("failed/{id}.state")).exists());
        let back = spool.load(&id).unwrap().state;
        assert_eq!(back.recipients[0].status, RcptStatus::Delivered);
        assert_eq!(back.recipients[1].status, RcptStatus::Pending);
        assert_eq!(back.attempts, 7);
        assert!(!back.held && !back.in_flight);
        assert!(back.requeued_ms.is_some());
        assert!(back.next_attempt_ms <= now_ms());
        assert_eq!(spool.recover().unwrap().queued.len(), 1);
        assert!(spool.requeue(&id).is_err(), "no longer in failed/");

        spool.delete(&id).unwrap();
        assert!(spool.queue_ids().unwrap().is_empty());
        assert_eq!(fs::read_dir(dir.path().join("queue")).unwrap().count(), 0);
        assert!(spool.delete(&id).is_err());
    }

    /// A dead letter whose state file is damaged (move_to_failed's state write cut short
    /// by a power cut) can still be requeued: every recipient is sent again (a possible
    /// duplicate), rather than the operator being unable to send it at all.
    #[tokio::test]
    async fn a_dead_letter_with_a_damaged_state_can_be_requeued() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let id = queued(&spool).await;
        let mut st = spool.load(&id).unwrap().state;
        st.recipients[0].status = RcptStatus::Delivered;
        st.recipients[1].status = RcptStatus::Failed;
        spool.move_to_failed(&id, &st).unwrap();
        fs::write(dir.path().join(format!("failed/{id}.state")), b"").unwrap();
        assert_eq!(spool.peek(&id, true).unwrap().state.pending().count(), 2);
        spool.requeue(&id).unwrap();
        let back = spool.load(&id).unwrap().state;
        assert_eq!(back.pending().count(), 2);
        assert!(spool.failed_ids().unwrap().is_empty());
    }

    /// An id that is a path never reaches a file: a queued message named through
    /// `../queue/` from failed/ (or the other way) stays where it is.
    #[tokio::test]
    async fn ids_that_are_paths_touch_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let id = queued(&spool).await;
        let mut st = spool.load(&id).unwrap().state;
        st.recipients[0].status = RcptStatus::Failed;
        let dead = queued(&spool).await;
        spool.move_to_failed(&dead, &st).unwrap();
        let via_queue = format!("../queue/{id}");
        let via_failed = format!("../failed/{dead}");
        assert!(spool.requeue(&via_queue).is_err());
        assert!(spool.delete_failed(&via_queue).is_err());
        assert!(spool.delete(&via_failed).is_err());
        assert!(spool.set_held(&via_failed, true, None).is_err());
        assert!(spool.peek(&via_failed, false).is_err());
        assert!(spool.load_failed(&via_queue).is_err());
        assert!(spool.requeue(&"0".repeat(100_000)).is_err());
        assert_eq!(spool.queue_ids().unwrap(), vec![id.clone()]);
        assert_eq!(spool.failed_ids().unwrap(), vec![dead.clone()]);
        assert!(!spool.load(&id).unwrap().state.held);
        assert!(dir.path().join(format!("queue/{id}.msg")).exists());
        assert!(dir.path().join(format!("failed/{dead}.state")).exists());
    }

    #[tokio::test]
    async fn peek_moves_nothing_even_when_the_state_is_damaged() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let id = queued(&spool).await;
        let st_path = dir.path().join(format!("queue/{id}.state"));
        fs::write(&st_path, b"MAILBRIDGE-STATE 1 00000000\n{}\n").unwrap();
        let p = spool.peek(&id, false).unwrap();
        assert_eq!(p.state.pending().count(), 2);
        assert!(st_path.exists(), "left for the delivery to deal with");
        assert_eq!(fs::read_dir(dir.path().join("corrupt")).unwrap().count(), 0);
    }
}
