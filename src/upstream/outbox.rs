//! The `outbox` upstream: writes each delivered message as `<queue-id>.eml` into a directory,
//! atomically (temporary name, fsync, rename, directory fsync). For the demo, tests,
//! benchmarks, and for sites that hand mail on to another program by directory.
//!
//! The file is the stored content with two delivery headers in front, as a local delivery
//! agent adds them: `Return-Path: <sender>` and one `Delivered-To:` per recipient. Writing the
//! same queue id twice replaces the file, so a repeated attempt after a crash leaves one copy.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::{Attempt, BoxFuture, RcptOutcome, Report, Upstream};

pub struct Outbox {
    name: String,
    path: PathBuf,
}

impl Outbox {
    /// Creates the directory if needed, so a bad path is reported at start-up.
    pub fn new(name: &str, path: &Path) -> io::Result<Outbox> {
        fs::create_dir_all(path)?;
        Ok(Outbox {
            name: name.to_string(),
            path: path.to_path_buf(),
        })
    }

    fn write(path: &Path, attempt: &Attempt) -> io::Result<PathBuf> {
        let env = &attempt.stored.envelope;
        let id = &env.id;
        let tmp = path.join(format!(".{id}.eml.tmp"));
        let dest = path.join(format!("{id}.eml"));
        let mut content = attempt
            .spool
            .open_content(&attempt.stored)
            .map_err(io::Error::other)?;
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o640)
            .open(&tmp)?;
        let mut head = format!("Return-Path: <{}>\r\n", env.sender);
        for &i in &attempt.recipients {
            head.push_str(&format!("Delivered-To: {}\r\n", env.recipients[i].address));
        }
        let res = (|| {
            f.write_all(head.as_bytes())?;
            let n = io::copy(&mut content, &mut f)?;
            if n != attempt.stored.content_len {
                return Err(io::Error::other("queue file shorter than its end record"));
            }
            f.sync_data()?;
            fs::rename(&tmp, &dest)?;
            crate::spool::sync_dir(path)
        })();
        if res.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        res.map(|()| dest)
    }
}

impl Upstream for Outbox {
    fn name(&self) -> &str {
        &self.name
    }

    fn status(&self) -> crate::ops::model::UpstreamStatus {
        crate::ops::model::UpstreamStatus {
            name: self.name.clone(),
            kind: "outbox".into(),
            state: "ok".into(),
            ..Default::default()
        }
    }

    fn deliver(&self, attempt: Attempt) -> BoxFuture<'_, Report> {
        Box::pin(async move {
            let n = attempt.recipients.len();
            let path = self.path.clone();
            let res = tokio::task::spawn_blocking(move || Outbox::write(&path, &attempt))
                .await
                .unwrap_or_else(|e| Err(io::Error::other(e)));
            let outcome = match res {
                Ok(dest) => RcptOutcome::delivered(format!("written to {}", dest.display()).into()),
                Err(e) => RcptOutcome::deferred(
                    format!(
                        "outbox {}: cannot write to {}: {e}",
                        self.name,
                        self.path.display()
                    )
                    .into(),
                ),
            };
            vec![outcome; n].into()
        })
    }
}
