//! Group commit: one thread makes incoming messages durable, many at a time.
//!
//! Each session writes its finished message to `tmp/`, hands the file over and waits. The
//! thread takes every file that arrived meanwhile as one batch: syncs them, renames each into
//! `queue/`, fsyncs `queue/` once, then wakes the sessions, which may now send 250. A batch of
//! N costs about as much as one message alone, which is how one disk sync (~0.6 ms here)
//! stops bounding the accept rate.
//!
//! For batches of [`SYNCFS_MIN_BATCH`] or more the data is synced with one `syncfs(2)` on the
//! spool's file system instead of one `fdatasync(2)` per file: one journal commit covers the
//! whole batch. `syncfs` reports write-back errors since Linux 5.8.

use std::fs::{self, File};
use std::io;
use std::path::PathBuf;
use std::sync::mpsc;

use tokio::sync::oneshot;

/// From this batch size on, one `syncfs` replaces the per-file syncs.
pub const SYNCFS_MIN_BATCH: usize = 3;
/// Upper bound of one batch, so the first session in it never waits for too long.
const MAX_BATCH: usize = 256;

pub struct Job {
    pub id: String,
    /// The complete file in `tmp/`, trailer included, not yet synced.
    pub file: File,
    pub tmp_path: PathBuf,
}

struct Request {
    job: Job,
    reply: oneshot::Sender<io::Result<()>>,
}

pub struct Committer {
    tx: mpsc::Sender<Request>,
}

impl Committer {
    pub fn start(queue: PathBuf) -> Committer {
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("spool-commit".into())
            .spawn(move || run(rx, queue))
            .expect("spawn the spool commit thread");
        Committer { tx }
    }

    pub async fn commit(&self, job: Job) -> io::Result<()> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request { job, reply })
            .map_err(|_| io::Error::other("spool commit thread stopped"))?;
        rx.await
            .map_err(|_| io::Error::other("spool commit thread stopped"))?
    }
}

struct Pending {
    id: String,
    file: File,
    tmp_path: PathBuf,
    reply: oneshot::Sender<io::Result<()>>,
}

fn run(rx: mpsc::Receiver<Request>, queue: PathBuf) {
    // Ends when every sender (the spool) is gone.
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let n = batch.len();
        let started = std::time::Instant::now();
        commit_batch(batch, &queue);
        tracing::trace!(
            batch = n,
            elapsed_us = started.elapsed().as_micros() as u64,
            "group commit"
        );
    }
}

fn commit_batch(batch: Vec<Request>, queue: &std::path::Path) {
    let written: Vec<Pending> = batch
        .into_iter()
        .map(|Request { job, reply }| Pending {
            tmp_path: job.tmp_path,
            id: job.id,
            file: job.file,
            reply,
        })
        .collect();

    // 2. Make the data durable.
    let synced = if written.len() >= SYNCFS_MIN_BATCH {
        rustix::fs::syncfs(&written[0].file).map_err(io::Error::from)
    } else {
        written.iter().try_for_each(|p| p.file.sync_data())
    };
    if let Err(e) = synced {
        fail_all(written, &e, &[]);
        return;
    }

    // 3. Rename into the queue, then make the renames durable.
    let mut renamed = Vec::with_capacity(written.len());
    for p in written {
        let dest = queue.join(format!("{}.msg", p.id));
        match fs::rename(&p.tmp_path, &dest) {
            Ok(()) => renamed.push((p, dest)),
            Err(e) => {
                let _ = fs::remove_file(&p.tmp_path);
                let _ = p.reply.send(Err(e));
            }
        }
    }
    if let Err(e) = super::sync_dir(queue) {
        // Not durable: refuse them all (452) and take them back out of the queue, so the
        // client's retry does not produce a second copy.
        let dests: Vec<PathBuf> = renamed.iter().map(|(_, d)| d.clone()).collect();
        fail_all(renamed.into_iter().map(|(p, _)| p).collect(), &e, &dests);
        return;
    }
    for (p, _) in renamed {
        let _ = p.reply.send(Ok(()));
    }
}

fn fail_all(pending: Vec<Pending>, e: &io::Error, also_remove: &[PathBuf]) {
    for p in pending {
        let _ = fs::remove_file(&p.tmp_path);
        let _ = p.reply.send(Err(io::Error::new(e.kind(), e.to_string())));
    }
    for d in also_remove {
        let _ = fs::remove_file(d);
    }
}
