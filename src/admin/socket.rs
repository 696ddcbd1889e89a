//! The admin socket's server: a unix socket (mode 0660: root and the daemon's group) that
//! takes one JSON request per line and answers one JSON line ([`super::proto`]), dispatching
//! to [`Control`]. Bounded: a few connections at once, a line limit and a read timeout, so a
//! stuck or hostile client cannot hold the daemon.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::proto::{Request, Response};
use crate::ops::control::Control;

/// Connections served at once; more are told to try again.
pub const MAX_CONNECTIONS: usize = 4;
/// The longest request line.
pub const MAX_REQUEST: usize = 64 * 1024;
/// How long a client may take to send its request, and to read the answer.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds the socket at `path`, replacing a stale one (a socket file nothing answers on).
/// On failure logs one warning with the remedy and returns `None`: the daemon runs on
/// without its admin socket.
pub fn bind(path: &Path) -> Option<UnixListener> {
    match try_bind(path) {
        Ok(l) => {
            tracing::info!(socket = %path.display(), "admin socket ready");
            Some(l)
        }
        Err(e) => {
            let parent = path
                .parent()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            tracing::warn!(
                socket = %path.display(),
                error = %e,
                "cannot open the admin socket, running without it: `mailbridge queue`, `status`, `senders` and `reload` will not reach this daemon (create the directory {parent} writable by the mailbridge user, as systemd's RuntimeDirectory=mailbridge does, or set admin.socket to another path, or \"\" to turn it off)"
            );
            None
        }
    }
}

fn try_bind(path: &Path) -> io::Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way; remove it",
            ));
        }
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another mailbridge daemon answers on it",
                ));
            }
            // Nothing listens: a socket left by a daemon that was killed.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => std::fs::remove_file(path)?,
            // Not allowed to connect (another user's socket?): not ours to remove.
            Err(e) => return Err(e),
        }
    }
    // Bound in a private (0700) directory beside it, given mode 0660 there, then renamed into
    // place: at `path` the socket never has the umask's mode (with umask 000 it would be
    // world-connectable until the chmod, and a connection made then stays open).
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the path has no file name"))?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let private = parent.join(format!(".admin-sock-{}-{nanos}", std::process::id()));
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    }
    let bound = private.join(name);
    let result = (|| {
        let listener = UnixListener::bind(&bound)?;
        #[cfg(test)]
        tests::after_bind(&bound);
        std::fs::set_permissions(&bound, std::fs::Permissions::from_mode(0o660))?;
        std::fs::rename(&bound, path)?;
        Ok(listener)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&bound);
    }
    let _ = std::fs::remove_dir(&private);
    result
}

/// Serves `listener` until `stop` is cancelled, then removes the socket file.
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    control: Arc<Control>,
    stop: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "admin socket: accept failed");
                    // Out of descriptors: do not spin.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tokio::spawn(async move {
                let mut s = stream;
                let _ = reply(
                    &mut s,
                    &Response::error("the daemon is busy with other admin commands; try again"),
                )
                .await;
            });
            continue;
        };
        let control = control.clone();
        tokio::spawn(async move {
            handle(stream, &control).await;
            drop(permit);
        });
    }
    drop(listener);
    let _ = std::fs::remove_file(&path);
}

async fn reply(stream: &mut UnixStream, resp: &Response) -> io::Result<()> {
    let mut line = serde_json::to_vec(resp).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
    line.push(b'\n');
    tokio::time::timeout(IO_TIMEOUT, stream.write_all(&line))
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))?
}

async fn handle(mut stream: UnixStream, control: &Control) {
    let mut buf = Vec::new();
    let read = {
        let mut r = BufReader::new((&mut stream).take(MAX_REQUEST as u64 + 1));
        tokio::time::timeout(IO_TIMEOUT, r.read_until(b'\n', &mut buf)).await
    };
    let resp = match read {
        Err(_) => Response::error("no request within 10 s"),
        Ok(Err(e)) => Response::error(format!("cannot read the request: {e}")),
        Ok(Ok(_)) if buf.len() > MAX_REQUEST => Response::error("request too long"),
        Ok(Ok(0)) => return,
        Ok(Ok(_)) => match serde_json::from_slice::<Request>(&buf) {
            Ok(req) => dispatch(control, req).await,
            Err(e) => Response::error(format!(
                "unknown request ({e}); is this mailbridge CLI the same version as the daemon?"
            )),
        },
    };
    let _ = reply(&mut stream, &resp).await;
}

fn result<T: serde::Serialize>(r: Result<T, String>) -> Response {
    match r {
        Ok(v) => Response::ok(v),
        Err(e) => Response::error(e),
    }
}

/// One request against the running daemon.
pub async fn dispatch(control: &Control, req: Request) -> Response {
    match req {
        Request::Status => Response::ok(control.status().await),
        Request::QueueList => result(control.queue_list().await),
        Request::QueueShow { id } => result(control.queue_show(&id).await),
        Request::QueueRetry { id } => result(
            control
                .queue_retry(id.as_deref())
                .await
                .map(|n| serde_json::json!({ "retried": n })),
        ),
        Request::QueueHold { id } => result(control.queue_hold(&id).await),
        Request::QueueRelease { id } => result(control.queue_release(&id).await),
        Request::QueueDelete { id } => result(control.queue_delete(&id).await),
        Request::QueueFailed => result(control.queue_failed().await),
        Request::QueueRequeue { id } => result(control.queue_requeue(&id).await),
        Request::Senders => Response::ok(control.ops.senders.list()),
        Request::Recent => Response::ok(control.ops.recent()),
        Request::Reload => match control.reload().await {
            Ok(applied) => Response::ok(serde_json::json!({ "applied": applied })),
            Err(errors) => Response::error(errors.join("\n")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    thread_local! {
        /// What the test saw at the moment the socket was bound (listening) but not yet
        /// given its mode: the mode bits of the directory it was bound in.
        static SEEN: RefCell<Option<u32>> = const { RefCell::new(None) };
    }

    pub(super) fn after_bind(bound: &Path) {
        let dir = bound.parent().unwrap();
        let mode = std::fs::metadata(dir).unwrap().permissions().mode() & 0o777;
        SEEN.with(|s| *s.borrow_mut() = Some(mode));
    }

    #[tokio::test]
    async fn socket_is_never_reachable_with_the_umask_mode() {
        let dir = tempfile::tempdir().unwrap();
        // A runtime directory others may enter (as /run/mailbridge with mode 0755).
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.path().join("admin.sock");
        let _listener = try_bind(&path).unwrap();
        let seen = SEEN.with(|s| s.borrow_mut().take()).expect("bound");
        assert_eq!(
            seen & 0o077,
            0,
            "the socket was listening in a directory with mode {seen:o}, before its chmod"
        );
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o660);
        std::os::unix::net::UnixStream::connect(&path).expect("connectable at its path");
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("admin.sock")]);
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced_and_a_live_one_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let live = try_bind(&path).expect("stale socket replaced");
        let e = try_bind(&path).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        drop(live);
        assert!(std::fs::symlink_metadata(&path).is_ok());
    }

    #[tokio::test]
    async fn a_symlink_or_file_in_the_way_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        let link = dir.path().join("admin.sock");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        assert!(try_bind(&link).is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());
        assert!(try_bind(&victim).is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
    }
}
