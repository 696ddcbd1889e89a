//! The CLI's side of the admin socket: one connection, one request, one response.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::proto::{MAX_LINE, Request, Response};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The daemon is not running, or the socket is elsewhere or not ours to use.
    #[error("cannot reach the mailbridge daemon at {path}: {reason}")]
    Connect { path: String, reason: String },
    #[error("the daemon's admin socket at {path} failed: {reason}")]
    Io { path: String, reason: String },
    /// The daemon answered with an error.
    #[error("{0}")]
    Refused(String),
}

/// Sends `req` and returns the response's `data`.
pub fn call(
    socket: &Path,
    req: &Request,
    timeout: Duration,
) -> Result<serde_json::Value, ClientError> {
    let path = socket.display().to_string();
    let stream = UnixStream::connect(socket).map_err(|e| ClientError::Connect {
        path: path.clone(),
        reason: match e.kind() {
            std::io::ErrorKind::NotFound => {
                "no such socket (is mailbridge running? is admin.socket set to another path?)"
                    .into()
            }
            std::io::ErrorKind::ConnectionRefused => {
                "connection refused (mailbridge is not running)".into()
            }
            std::io::ErrorKind::PermissionDenied => {
                "permission denied (run as root or as a member of the mailbridge group)".into()
            }
            _ => e.to_string(),
        },
    })?;
    let io = |e: std::io::Error| ClientError::Io {
        path: path.clone(),
        reason: e.to_string(),
    };
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut line = serde_json::to_vec(req).map_err(|e| io(e.into()))?;
    line.push(b'\n');
    // A daemon with no free slot answers "busy" and closes without reading: the write may
    // then fail (EPIPE) while the answer waits to be read.
    let written = (&stream).write_all(&line);
    let mut reader = BufReader::new(&stream).take(MAX_LINE as u64);
    let mut buf = Vec::new();
    let read = reader.read_until(b'\n', &mut buf);
    if buf.is_empty() {
        written.map_err(io)?;
        read.map_err(io)?;
        return Err(ClientError::Io {
            path,
            reason: "the daemon closed the connection without answering".into(),
        });
    }
    let resp: Response = serde_json::from_slice(&buf).map_err(|e| ClientError::Io {
        path: path.clone(),
        reason: format!("unreadable response: {e}"),
    })?;
    if resp.ok {
        Ok(resp.data)
    } else {
        Err(ClientError::Refused(
            resp.error.unwrap_or_else(|| "request refused".into()),
        ))
    }
}
