//! The real `mailbridge` binary as a process, over real TCP on loopback: crash safety
//! (behaviour.md A2-A4), disk full (A6), SIGTERM, `check-config`, connection limits and the
//! allowlist (C30, C31).
//!
//! The first half of this file is a small toolkit shared with `interop.rs`: [`RelayConfig`]
//! starts the binary with a generated configuration and learns its ports from the JSON log,
//! [`Smtp`] is a blocking raw-TCP client, and [`parse_eml`] takes an outbox file apart.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_mailbridge");
/// `hostname:` in every generated configuration (it appears in Received and Message-ID).
pub const HOSTNAME: &str = "relay.test";
/// Upper bound for anything that should take well under a second.
pub const SHORT: Duration = Duration::from_secs(20);
/// Upper bound for a queue to drain or a batch to be delivered.
pub const LONG: Duration = Duration::from_secs(90);

const EPERM: i32 = 1;

/// True when running in CI (`CI` set to anything but empty, `0` or `false`): missing tools
/// are then a failure, not a reason to skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
}

/// Polls `cond` every 10 ms until it holds (true) or `timeout` passes (false).
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// File names in `dir`, sorted (empty if the directory does not exist).
/// Names of the files in `dir`, sorted. Empty `spare-*` files (delivered queue files the
/// spool keeps for reuse) are not listed: they hold no message.
pub fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| e.unwrap())
            .filter(|e| {
                let spare = e.file_name().to_string_lossy().starts_with("spare-");
                !(spare && e.metadata().is_ok_and(|m| m.len() == 0))
            })
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

/// A `mailbridge` command with nothing from the environment that would change its
/// configuration (`MAILBRIDGE*` overrides, `RUST_LOG`, `CREDENTIALS_DIRECTORY`) or make it talk
/// to a service manager the test suite itself runs under (`NOTIFY_SOCKET`, `WATCHDOG_*`).
pub fn mailbridge_cmd() -> Command {
    let mut c = Command::new(BIN);
    for (k, _) in std::env::vars_os() {
        if let Some(k) = k.to_str()
            && (k.starts_with("MAILBRIDGE") || k == "RUST_LOG")
        {
            c.env_remove(k);
        }
    }
    for k in [
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
        "CREDENTIALS_DIRECTORY",
    ] {
        c.env_remove(k);
    }
    c.stdin(Stdio::null());
    c
}

/// What a finished short-lived command printed.
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cmd` to completion with its output in files under `dir` (no pipe can fill up), and
/// kills it if it takes longer than `timeout`.
pub fn run_with_timeout(cmd: &mut Command, dir: &Path, name: &str, timeout: Duration) -> Finished {
    let out_path = dir.join(format!("{name}.stdout"));
    let err_path = dir.join(format!("{name}.stderr"));
    cmd.stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {name}: {e}"));
    let mut status = None;
    wait_until(timeout, || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    let read =
        |p: &Path| String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned();
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "{name} did not finish within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
            read(&out_path),
            read(&err_path)
        );
    };
    Finished {
        status,
        stdout: read(&out_path),
        stderr: read(&err_path),
    }
}

/// Lines a child process printed, collected by a reader thread.
#[derive(Default)]
pub struct Captured {
    state: Mutex<(Vec<String>, bool)>,
    changed: Condvar,
}

impl Captured {
    fn spawn_reader(r: impl Read + Send + 'static) -> Arc<Captured> {
        let c = Arc::new(Captured::default());
        let c2 = c.clone();
        std::thread::spawn(move || {
            let mut r = BufReader::new(r);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf).trim_end().to_string();
                        c2.state.lock().unwrap().0.push(line);
                        c2.changed.notify_all();
                    }
                }
            }
            c2.state.lock().unwrap().1 = true;
            c2.changed.notify_all();
        });
        c
    }

    pub fn lines(&self) -> Vec<String> {
        self.state.lock().unwrap().0.clone()
    }

    fn closed(&self) -> bool {
        self.state.lock().unwrap().1
    }

    /// Waits (at most `timeout`) until there are more than `seen` lines or the stream ends.
    fn wait_change(&self, seen: usize, timeout: Duration) {
        let g = self.state.lock().unwrap();
        let _ = self
            .changed
            .wait_timeout_while(g, timeout, |(lines, closed)| {
                lines.len() <= seen && !*closed
            })
            .unwrap();
    }
}

/// A configuration for one daemon, written to `<dir>/relay.yaml`. Start it again with the
/// same value to restart on the same spool.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    pub dir: PathBuf,
    pub listeners: Vec<String>,
    pub spool: PathBuf,
    pub outbox: PathBuf,
    pub workers: usize,
    /// More top-level YAML sections (`access:`, `limits:`), appended as they are.
    pub extra: String,
    /// `tls:` mode per listener (same order as `listeners`); missing entries mean none.
    pub listener_tls: Vec<&'static str>,
    /// `log.level` (`info` unless a test needs more).
    pub log_level: &'static str,
    /// Replaces the `upstreams:` list (YAML list items, indented by two); default: one
    /// outbox named `local`.
    pub upstreams: Option<String>,
    /// `queue.retry` (default `[1s]`).
    pub retry: &'static str,
    /// More keys under `queue:` (indented by two).
    pub queue_extra: String,
}

impl RelayConfig {
    pub fn new(dir: &Path) -> RelayConfig {
        RelayConfig {
            dir: dir.to_path_buf(),
            listeners: vec!["127.0.0.1:0".into()],
            spool: dir.join("spool"),
            outbox: dir.join("outbox"),
            workers: 4,
            extra: String::new(),
            listener_tls: Vec::new(),
            log_level: "info",
            upstreams: None,
            retry: "[1s]",
            queue_extra: String::new(),
        }
    }

    pub fn yaml(&self) -> String {
        let q = |p: &Path| format!("{:?}", p.display().to_string());
        let mut y = format!(
            "hostname: {HOSTNAME}\nstate_dir: {}\nlisteners:\n",
            q(&self.dir.join("state"))
        );
        for (i, l) in self.listeners.iter().enumerate() {
            y.push_str(&format!("  - address: {l:?}\n"));
            if let Some(mode) = self.listener_tls.get(i) {
                y.push_str(&format!("    tls: {mode}\n"));
            }
        }
        let upstreams = self.upstreams.clone().unwrap_or_else(|| {
            format!(
                "  - name: local\n    type: outbox\n    path: {}\n",
                q(&self.outbox)
            )
        });
        y.push_str(&format!(
            "spool:\n  path: {}\nupstreams:\n{upstreams}\
             queue:\n  retry: {}\n  workers: {}\n{}log:\n  level: {}\n  format: json\n{}",
            q(&self.spool),
            self.retry,
            self.workers,
            self.queue_extra,
            self.log_level,
            self.extra
        ));
        y
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join("relay.yaml")
    }

    /// Writes the file with mode 640, as deploy/install.sh installs it: mailbridge refuses
    /// inline secrets (`users[].password_hash`) in a file every local user can read.
    pub fn write(&self) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(self.path(), self.yaml()).unwrap();
        std::fs::set_permissions(self.path(), std::fs::Permissions::from_mode(0o640)).unwrap();
    }

    /// Starts `mailbridge serve` and returns once every listener is bound.
    pub fn start(&self) -> Relay {
        self.write();
        let mut child = mailbridge_cmd()
            .arg("serve")
            .arg("-c")
            .arg(self.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start mailbridge");
        let stdout = Captured::spawn_reader(child.stdout.take().unwrap());
        let stderr = Captured::spawn_reader(child.stderr.take().unwrap());
        let mut relay = Relay {
            child,
            status: None,
            addrs: Vec::new(),
            spool: self.spool.clone(),
            outbox: self.outbox.clone(),
            stdout,
            stderr,
        };
        let deadline = Instant::now() + SHORT;
        loop {
            let lines = relay.stdout.lines();
            let addrs: Vec<SocketAddr> = lines
                .iter()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .filter(|v| v["message"] == "listening")
                .filter_map(|v| v["address"].as_str()?.parse().ok())
                .collect();
            if addrs.len() >= self.listeners.len() {
                relay.addrs = addrs;
                return relay;
            }
            if relay.stdout.closed() || relay.child.try_wait().unwrap().is_some() {
                let _ = relay.wait_exit(SHORT);
                panic!(
                    "mailbridge exited during start-up ({:?}):\n{}",
                    relay.status,
                    relay.transcript()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "mailbridge did not report its listeners:\n{}",
                    relay.transcript()
                );
            }
            relay
                .stdout
                .wait_change(lines.len(), Duration::from_millis(200));
        }
    }
}

/// A running `mailbridge serve`; killed (SIGKILL) when dropped.
pub struct Relay {
    child: Child,
    status: Option<ExitStatus>,
    /// Bound addresses, in the order of `listeners`.
    pub addrs: Vec<SocketAddr>,
    pub spool: PathBuf,
    pub outbox: PathBuf,
    stdout: Arc<Captured>,
    stderr: Arc<Captured>,
}

impl Relay {
    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    /// `kill -9`, then reaps the process.
    pub fn kill9(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            self.status = Some(self.child.wait().unwrap());
        }
    }

    /// `kill -HUP`: reload the configuration (issue 9 §5).
    pub fn sighup(&self) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).expect("a child pid");
        rustix::process::kill_process(pid, rustix::process::Signal::HUP)
            .unwrap_or_else(|e| panic!("kill -HUP: {e}"));
    }

    pub fn sigterm(&self) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).expect("a child pid");
        rustix::process::kill_process(pid, rustix::process::Signal::TERM)
            .unwrap_or_else(|e| panic!("kill -TERM: {e}"));
    }

    /// Waits for the process to exit; `None` if it is still running after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.status.is_none() {
            wait_until(timeout, || {
                self.status = self.child.try_wait().unwrap();
                self.status.is_some()
            });
        }
        self.status
    }

    /// The JSON log lines so far.
    pub fn logs(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The first log line with this message, waiting for it up to `timeout`.
    pub fn wait_log(&self, message: &str, timeout: Duration) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = self.stdout.lines().len();
            if let Some(v) = self.logs().into_iter().find(|v| v["message"] == message) {
                return Some(v);
            }
            let now = Instant::now();
            if now >= deadline || self.stdout.closed() {
                return None;
            }
            self.stdout.wait_change(seen, deadline - now);
        }
    }

    /// stdout and stderr so far, for failure messages.
    pub fn transcript(&self) -> String {
        format!(
            "--- stdout\n{}\n--- stderr\n{}",
            self.stdout.lines().join("\n"),
            self.stderr.lines().join("\n")
        )
    }

    pub fn queue_dir(&self) -> PathBuf {
        self.spool.join("queue")
    }

    pub fn tmp_dir(&self) -> PathBuf {
        self.spool.join("tmp")
    }

    /// Waits until `outbox/<id>.eml` exists and returns its bytes.
    pub fn wait_delivered(&self, id: &str) -> Vec<u8> {
        let p = self.outbox.join(format!("{id}.eml"));
        assert!(
            wait_until(LONG, || p.exists()),
            "{id} was not delivered to the outbox\n{}",
            self.transcript()
        );
        std::fs::read(&p).unwrap()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// One SMTP reply: every line, codes included, without line ends.
#[derive(Debug, Clone)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Reply {
    pub fn last(&self) -> &str {
        self.lines.last().map(String::as_str).unwrap_or("")
    }

    /// The queue id of a `250 2.0.0 Ok: queued as <id>` reply.
    pub fn queue_id(&self) -> Option<String> {
        let id = self.last().strip_prefix("250 2.0.0 Ok: queued as ")?;
        (!id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric())).then(|| id.to_string())
    }
}

/// A blocking SMTP client over raw TCP, with timeouts on every read and write.
pub struct Smtp {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Smtp {
    pub fn new(stream: TcpStream) -> io::Result<Smtp> {
        stream.set_read_timeout(Some(SHORT))?;
        stream.set_write_timeout(Some(SHORT))?;
        Ok(Smtp {
            stream,
            buf: Vec::new(),
        })
    }

    pub fn connect(addr: SocketAddr) -> io::Result<Smtp> {
        Smtp::new(TcpStream::connect_timeout(&addr, SHORT)?)
    }

    /// Connects, expects the 220 greeting and says EHLO.
    pub fn greet_ehlo(addr: SocketAddr) -> io::Result<Smtp> {
        let mut c = Smtp::connect(addr)?;
        c.expect_reply(220)?;
        c.expect("EHLO client.test", 250)?;
        Ok(c)
    }

    pub fn read_reply(&mut self) -> io::Result<Reply> {
        let mut lines = Vec::new();
        loop {
            while let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
                let raw: Vec<u8> = self.buf.drain(..=nl).collect();
                let line = String::from_utf8_lossy(&raw).trim_end().to_string();
                let more = line.as_bytes().get(3) == Some(&b'-');
                lines.push(line);
                if !more {
                    let code = lines.last().unwrap().get(..3).and_then(|c| c.parse().ok());
                    return match code {
                        Some(code) => Ok(Reply { code, lines }),
                        None => Err(io::Error::other(format!("not an SMTP reply: {lines:?}"))),
                    };
                }
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "server closed the connection (partial reply {lines:?} {:?})",
                        String::from_utf8_lossy(&self.buf)
                    ),
                ));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    pub fn expect_reply(&mut self, code: u16) -> io::Result<Reply> {
        let r = self.read_reply()?;
        if r.code != code {
            return Err(io::Error::other(format!(
                "expected {code}, got {:?}",
                r.lines
            )));
        }
        Ok(r)
    }

    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    pub fn cmd(&mut self, line: &str) -> io::Result<Reply> {
        self.send(format!("{line}\r\n").as_bytes())?;
        self.read_reply()
    }

    pub fn expect(&mut self, line: &str, code: u16) -> io::Result<Reply> {
        self.send(format!("{line}\r\n").as_bytes())?;
        self.expect_reply(code)
            .map_err(|e| io::Error::new(e.kind(), format!("{line}: {e}")))
    }

    /// MAIL, RCPT..., DATA, the dot-stuffed content and the final dot; returns the reply to
    /// the final dot. An unexpected reply before that is an error.
    pub fn send_message(
        &mut self,
        from: &str,
        rcpts: &[&str],
        content: &[u8],
    ) -> io::Result<Reply> {
        self.expect(&format!("MAIL FROM:<{from}>"), 250)?;
        for r in rcpts {
            self.expect(&format!("RCPT TO:<{r}>"), 250)?;
        }
        self.expect("DATA", 354)?;
        let mut wire = dot_stuff(content);
        wire.extend_from_slice(b".\r\n");
        self.send(&wire)?;
        self.read_reply()
    }

    /// Everything the server sends until it closes or stops talking (reset and timeout end
    /// it too); for "no 250 was ever sent" checks.
    pub fn read_rest(&mut self) -> String {
        let _ = self.stream.set_read_timeout(Some(Duration::from_secs(5)));
        let mut out = std::mem::take(&mut self.buf);
        let mut chunk = [0u8; 4096];
        while let Ok(n) = self.stream.read(&mut chunk) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&chunk[..n]);
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// SMTP transparency (RFC 5321 §4.5.2) for CRLF content that ends with CRLF.
pub fn dot_stuff(content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + 16);
    let mut line_start = true;
    for &b in content {
        if line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        line_start = b == b'\n';
    }
    out
}

/// Whether the header section of `content` has a field called `name` (case-insensitive).
pub fn has_header(content: &[u8], name: &str) -> bool {
    for line in content.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            return false;
        }
        if line[0] == b' ' || line[0] == b'\t' {
            continue;
        }
        match line.iter().position(|&b| b == b':') {
            Some(colon)
                if line[..colon]
                    .trim_ascii()
                    .eq_ignore_ascii_case(name.as_bytes()) =>
            {
                return true;
            }
            Some(_) => {}
            None => return false,
        }
    }
    false
}

/// An outbox file taken apart.
#[derive(Debug)]
pub struct Eml {
    pub return_path: String,
    pub delivered_to: Vec<String>,
    /// The Received header, continuation lines joined with `\n`.
    pub received: String,
    pub added_date: Option<String>,
    pub added_message_id: Option<String>,
    /// What follows our headers: must be exactly what the client sent.
    pub content: Vec<u8>,
}

/// Splits an outbox file into the delivery headers, our headers and the client's content.
/// `date`/`message_id`: whether the client's message had those fields (then we added none).
pub fn parse_eml(bytes: &[u8], date: bool, message_id: bool) -> Result<Eml, String> {
    let mut pos = 0;
    let take = |pos: &mut usize| -> Result<String, String> {
        let rest = &bytes[*pos..];
        let end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| format!("no CRLF after byte {pos}"))?;
        *pos += end + 2;
        Ok(String::from_utf8_lossy(&rest[..end]).into_owned())
    };
    let peek = |pos: usize, prefix: &[u8]| bytes[pos..].starts_with(prefix);
    let first = take(&mut pos)?;
    let return_path = first
        .strip_prefix("Return-Path: <")
        .and_then(|s| s.strip_suffix('>'))
        .ok_or_else(|| format!("first line is not Return-Path: {first:?}"))?
        .to_string();
    let mut delivered_to = Vec::new();
    while peek(pos, b"Delivered-To: ") {
        delivered_to.push(take(&mut pos)?["Delivered-To: ".len()..].to_string());
    }
    let mut received = take(&mut pos)?;
    if !received.starts_with("Received: from ") {
        return Err(format!("expected our Received header, got {received:?}"));
    }
    while peek(pos, b"\t") {
        received.push('\n');
        received.push_str(&take(&mut pos)?);
    }
    let mut added_date = None;
    if !date {
        let l = take(&mut pos)?;
        if !l.starts_with("Date: ") {
            return Err(format!("expected our Date header, got {l:?}"));
        }
        added_date = Some(l);
    }
    let mut added_message_id = None;
    if !message_id {
        let l = take(&mut pos)?;
        if !l.starts_with("Message-ID: <") {
            return Err(format!("expected our Message-ID header, got {l:?}"));
        }
        added_message_id = Some(l);
    }
    Ok(Eml {
        return_path,
        delivered_to,
        received,
        added_date,
        added_message_id,
        content: bytes[pos..].to_vec(),
    })
}

/// Checks one delivered file against what the client sent: envelope, our headers (Date and
/// Message-ID only when the client's message lacked them), then the content byte for byte.
pub fn check_delivery(
    eml: &[u8],
    id: &str,
    from: &str,
    rcpts: &[&str],
    sent: &[u8],
) -> Result<Eml, String> {
    let date = has_header(sent, "date");
    let mid = has_header(sent, "message-id");
    let e = parse_eml(eml, date, mid)?;
    let mut problems = Vec::new();
    if e.return_path != from {
        problems.push(format!(
            "Return-Path {:?}, sender was {from:?}",
            e.return_path
        ));
    }
    if e.delivered_to != rcpts {
        problems.push(format!(
            "Delivered-To {:?}, recipients were {rcpts:?}",
            e.delivered_to
        ));
    }
    if !e
        .received
        .contains(&format!("by {HOSTNAME} (mailbridge) with "))
        || !e.received.contains(&format!(" id {id}"))
    {
        problems.push(format!(
            "Received header does not name us and queue id {id}: {:?}",
            e.received
        ));
    }
    if let Some(d) = &e.added_date
        && !(d.ends_with(" +0000") && d.len() == "Date: Thu, 01 Jan 1970 00:00:00 +0000".len())
    {
        problems.push(format!("added Date is not RFC 5322 UTC: {d:?}"));
    }
    if let Some(m) = &e.added_message_id
        && *m != format!("Message-ID: <{id}@{HOSTNAME}>")
    {
        problems.push(format!("added Message-ID is not <{id}@{HOSTNAME}>: {m:?}"));
    }
    if e.content != sent {
        problems.push(format!(
            "content differs from what the client sent:\n--- sent ({} bytes)\n{:?}\n--- delivered ({} bytes)\n{:?}",
            sent.len(),
            String::from_utf8_lossy(&sent[..sent.len().min(2000)]),
            e.content.len(),
            String::from_utf8_lossy(&e.content[..e.content.len().min(2000)]),
        ));
    }
    if problems.is_empty() {
        Ok(e)
    } else {
        Err(problems.join("\n"))
    }
}

// ------------------------------------------------------------------------------------------
// Crash safety (behaviour.md A2, A3, A4)
// ------------------------------------------------------------------------------------------

const CRASH_RCPT: &str = "ops@corp.test";

/// One message of a crash batch and what became of its submission.
struct Sent {
    key: String,
    from: String,
    content: Vec<u8>,
    /// The queue id from the 250 reply, if one came.
    id: Option<String>,
    error: Option<String>,
}

fn crash_message(batch: &str, i: usize) -> (String, Vec<u8>) {
    let from = format!("device{i}@{batch}.lan.test");
    let mut m = format!(
        "From: <{from}>\r\nTo: <{CRASH_RCPT}>\r\nSubject: {batch} message {i}\r\n\
         Date: Thu, 27 Nov 2025 10:00:00 +0000\r\nMessage-ID: <{batch}-{i}@client.test>\r\n\r\n"
    );
    for k in 0..150 {
        m.push_str(&format!(
            "{batch}/{i} line {k}: the quick brown fox jumps over the lazy dog\r\n"
        ));
    }
    m.push_str(".a line that starts with a dot\r\n.\r\nlast line\r\n");
    (from, m.into_bytes())
}

/// Sends `n` messages over `clients` concurrent connections. A connection that fails (the
/// daemon was killed) leaves the rest of its messages unsent.
fn submit_batch(
    addr: SocketAddr,
    batch: &str,
    n: usize,
    clients: usize,
    acked: &AtomicUsize,
) -> Vec<Sent> {
    let mut sent: Vec<Sent> = (0..n)
        .map(|i| {
            let (from, content) = crash_message(batch, i);
            Sent {
                key: format!("{batch}-{i}"),
                from,
                content,
                id: None,
                error: None,
            }
        })
        .collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|t| {
                let mine: Vec<(usize, String, Vec<u8>)> = (t..n)
                    .step_by(clients)
                    .map(|i| (i, sent[i].from.clone(), sent[i].content.clone()))
                    .collect();
                s.spawn(move || {
                    let mut results = Vec::new();
                    let mut conn = Smtp::greet_ehlo(addr).map_err(|e| e.to_string());
                    for (i, from, content) in mine {
                        let c = match conn.as_mut() {
                            Ok(c) => c,
                            Err(e) => {
                                results.push((i, Err(format!("no connection: {e}"))));
                                continue;
                            }
                        };
                        match c.send_message(&from, &[CRASH_RCPT], &content) {
                            Ok(r) => match r.queue_id() {
                                Some(id) => {
                                    acked.fetch_add(1, Ordering::SeqCst);
                                    results.push((i, Ok(id)));
                                }
                                None => results.push((i, Err(format!("refused: {:?}", r.lines)))),
                            },
                            Err(e) => {
                                results.push((i, Err(e.to_string())));
                                conn = Err(e.to_string());
                            }
                        }
                    }
                    if let Ok(c) = conn.as_mut() {
                        let _ = c.cmd("QUIT");
                    }
                    results
                })
            })
            .collect();
        for h in handles {
            for (i, r) in h.join().unwrap() {
                match r {
                    Ok(id) => sent[i].id = Some(id),
                    Err(e) => sent[i].error = Some(e),
                }
            }
        }
    });
    sent
}

/// Right after a kill: every acknowledged message is on disk, in the queue or delivered.
fn assert_acked_on_disk(cfg: &RelayConfig, sent: &[Sent], when: &str) {
    for s in sent {
        if let Some(id) = &s.id {
            let queued = cfg.spool.join(format!("queue/{id}.msg")).exists();
            let delivered = cfg.outbox.join(format!("{id}.eml")).exists();
            assert!(
                queued || delivered,
                "{when}: {} got 250 (queue id {id}) but is neither in spool/queue nor in the outbox",
                s.key
            );
        }
    }
}

fn count_ext(dir: &Path, ext: &str) -> usize {
    files(dir).iter().filter(|f| f.ends_with(ext)).count()
}

#[test]
fn crash_kill9_after_250_and_during_deliveries_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = RelayConfig::new(dir.path());
    // One worker: deliveries lag behind five concurrent submitters, so a backlog exists
    // when the daemon is killed.
    cfg.workers = 1;
    let queue = cfg.spool.join("queue");

    // Round 1: 50 messages over 5 connections, kill -9 the moment the last 250 arrived.
    let mut relay = cfg.start();
    let acked = AtomicUsize::new(0);
    let mut all = submit_batch(relay.addr(), "r1", 50, 5, &acked);
    relay.kill9();
    for s in &all {
        assert!(
            s.id.is_some(),
            "{} was not accepted before any crash: {:?}\n{}",
            s.key,
            s.error,
            relay.transcript()
        );
    }
    assert_acked_on_disk(&cfg, &all, "after kill -9 right after the 250s");
    eprintln!(
        "round 1: killed right after 50 x 250: {} delivered, {} still queued",
        count_ext(&cfg.outbox, ".eml"),
        count_ext(&queue, ".msg")
    );
    drop(relay);

    // Round 2: restart; the backlog is delivered while 50 more messages arrive; kill -9 in
    // the middle of both.
    let mut relay = cfg.start();
    let before = count_ext(&cfg.outbox, ".eml");
    let acked2 = AtomicUsize::new(0);
    let (batch2, killed_mid) = std::thread::scope(|s| {
        let addr = relay.addr();
        let acked2 = &acked2;
        let h = s.spawn(move || submit_batch(addr, "r2", 50, 5, acked2));
        let mid = wait_until(LONG, || {
            h.is_finished()
                || (acked2.load(Ordering::SeqCst) >= 10
                    && count_ext(&cfg.outbox, ".eml") >= before + 5)
        });
        let mid = mid && !h.is_finished();
        relay.kill9();
        (h.join().unwrap(), mid)
    });
    eprintln!(
        "round 2: killed {} ({} of 50 new messages acknowledged, {} delivered in this run, {} still queued)",
        if killed_mid {
            "during submissions and deliveries"
        } else {
            "after the submissions had finished"
        },
        batch2.iter().filter(|s| s.id.is_some()).count(),
        count_ext(&cfg.outbox, ".eml") - before,
        count_ext(&queue, ".msg")
    );
    all.extend(batch2);
    assert_acked_on_disk(&cfg, &all, "after kill -9 during deliveries");
    drop(relay);

    // Round 3: restart and let the queue drain.
    let relay = cfg.start();
    let drained = wait_until(LONG, || {
        count_ext(&queue, ".msg") == 0
            && all
                .iter()
                .filter_map(|s| s.id.as_ref())
                .all(|id| cfg.outbox.join(format!("{id}.eml")).exists())
    });
    assert!(
        drained,
        "queue did not drain after restart:\nqueue: {:?}\n{}",
        files(&queue),
        relay.transcript()
    );
    for line in relay.logs().iter().filter(|v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("possible duplicate"))
    }) {
        eprintln!("round 3 log: {line}");
    }

    // Every file in the outbox is one of our messages, byte for byte, at most once; every
    // acknowledged message is there under its queue id.
    let by_content: HashMap<&[u8], usize> = all
        .iter()
        .enumerate()
        .map(|(i, s)| (s.content.as_slice(), i))
        .collect();
    let mut copies = vec![0usize; all.len()];
    for name in files(&cfg.outbox) {
        let Some(id) = name.strip_suffix(".eml").filter(|_| !name.starts_with('.')) else {
            panic!("unexpected file left in the outbox: {name}");
        };
        let bytes = std::fs::read(cfg.outbox.join(&name)).unwrap();
        let e = parse_eml(&bytes, true, true).unwrap_or_else(|e| panic!("{name}: {e}"));
        let Some(&i) = by_content.get(e.content.as_slice()) else {
            panic!(
                "{name} holds content that no client sent:\n{}",
                String::from_utf8_lossy(&bytes)
            );
        };
        let s = &all[i];
        copies[i] += 1;
        check_delivery(&bytes, id, &s.from, &[CRASH_RCPT], &s.content)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        if let Some(acked_id) = &s.id {
            assert_eq!(
                acked_id, id,
                "{} was acknowledged as {acked_id} but delivered as {id}",
                s.key
            );
        }
    }
    for (s, n) in all.iter().zip(&copies) {
        match &s.id {
            Some(id) => assert_eq!(*n, 1, "{} (queue id {id}) delivered {n} times", s.key),
            None => assert!(
                *n <= 1,
                "{} (never acknowledged) delivered {n} times",
                s.key
            ),
        }
    }
    for sub in ["queue", "tmp", "failed", "corrupt"] {
        assert_eq!(
            files(&cfg.spool.join(sub)),
            Vec::<String>::new(),
            "spool/{sub} after the queue drained"
        );
    }
    eprintln!(
        "crash test: {} acknowledged, all delivered exactly once; {} unacknowledged, {} of them delivered",
        all.iter().filter(|s| s.id.is_some()).count(),
        all.iter().filter(|s| s.id.is_none()).count(),
        all.iter()
            .zip(&copies)
            .filter(|(s, n)| s.id.is_none() && **n == 1)
            .count()
    );
}

#[test]
fn crash_kill9_mid_data_sends_no_250_and_delivers_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = RelayConfig::new(dir.path());
    let mut relay = cfg.start();
    let head = b"From: <scanner@lan.test>\r\nSubject: never finished\r\n\r\n";
    // A: a small message still in memory. B: over the 256 KiB spill threshold, so a partial
    // file sits in spool/tmp.
    let mut clients = Vec::new();
    for size in [2_000usize, 700_000] {
        let mut c = Smtp::greet_ehlo(relay.addr()).unwrap();
        c.expect("MAIL FROM:<scanner@lan.test>", 250).unwrap();
        c.expect("RCPT TO:<user@corp.test>", 250).unwrap();
        c.expect("DATA", 354).unwrap();
        c.send(head).unwrap();
        let line = b"0123456789 partial body line that never reaches its final dot 0123456789\r\n";
        let mut body = Vec::new();
        while body.len() < size {
            body.extend_from_slice(line);
        }
        c.send(&body).unwrap();
        clients.push(c);
    }
    assert!(
        wait_until(SHORT, || !files(&relay.tmp_dir()).is_empty()),
        "the large message never spilled to spool/tmp\n{}",
        relay.transcript()
    );
    relay.kill9();
    for mut c in clients {
        let rest = c.read_rest();
        assert!(
            !rest.contains("250"),
            "a reply came after 354 although DATA never ended: {rest:?}"
        );
    }
    assert_eq!(
        files(&relay.queue_dir()),
        Vec::<String>::new(),
        "nothing may be queued"
    );
    drop(relay);

    let relay = cfg.start();
    let rec = relay
        .wait_log("spool recovered", SHORT)
        .expect("spool recovered log line");
    assert_eq!(rec["queued"], 0, "recovery found queued messages: {rec}");
    assert!(
        rec["partial_removed"].as_u64().unwrap_or(0) >= 1,
        "the partial file was not removed: {rec}"
    );
    assert_eq!(
        files(&relay.tmp_dir()),
        Vec::<String>::new(),
        "spool/tmp after restart"
    );
    assert_eq!(
        files(&relay.queue_dir()),
        Vec::<String>::new(),
        "spool/queue after restart"
    );

    // The relay works, and the message sent now is the only one ever delivered.
    let mut c = Smtp::greet_ehlo(relay.addr()).unwrap();
    let content = b"Subject: after the crash\r\n\r\nhello\r\n";
    let r = c
        .send_message("scanner@lan.test", &["user@corp.test"], content)
        .unwrap();
    let id = r.queue_id().unwrap_or_else(|| panic!("not queued: {r:?}"));
    let eml = relay.wait_delivered(&id);
    check_delivery(&eml, &id, "scanner@lan.test", &["user@corp.test"], content).unwrap();
    assert_eq!(files(&cfg.outbox), vec![format!("{id}.eml")]);
}

// ------------------------------------------------------------------------------------------
// SIGTERM
// ------------------------------------------------------------------------------------------

#[test]
fn sigterm_421_to_idle_clients_finishes_data_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = RelayConfig::new(dir.path());
    let mut relay = cfg.start();
    let addr = relay.addr();

    let mut idle = Smtp::greet_ehlo(addr).unwrap();
    let mut greeted = Smtp::connect(addr).unwrap();
    greeted.expect_reply(220).unwrap();
    let mut in_data = Smtp::greet_ehlo(addr).unwrap();
    in_data.expect("MAIL FROM:<erp@lan.test>", 250).unwrap();
    in_data.expect("RCPT TO:<billing@corp.test>", 250).unwrap();
    in_data.expect("DATA", 354).unwrap();
    let content = b"Subject: invoice run\r\n\r\nfirst half\r\nsecond half\r\n";
    in_data.send(&content[..30]).unwrap();

    relay.sigterm();
    let t0 = Instant::now();
    for (name, c) in [
        ("idle after EHLO", &mut idle),
        ("idle after greeting", &mut greeted),
    ] {
        let r = c
            .read_reply()
            .unwrap_or_else(|e| panic!("{name}: {e}\n{}", relay.transcript()));
        assert!(
            r.last().starts_with("421 4.3.2"),
            "{name}: got {:?}",
            r.lines
        );
        let rest = c.read_rest();
        assert!(rest.is_empty(), "{name}: more after 421: {rest:?}");
    }

    // A session in DATA may finish its message: 250, then 421.
    in_data.send(&content[30..]).unwrap();
    in_data.send(b".\r\n").unwrap();
    let r = in_data.read_reply().unwrap();
    let id = r
        .queue_id()
        .unwrap_or_else(|| panic!("message in DATA at SIGTERM not accepted: {:?}", r.lines));
    let r = in_data.read_reply().unwrap();
    assert!(
        r.last().starts_with("421 4.3.2"),
        "after the 250: {:?}",
        r.lines
    );

    let status = relay.wait_exit(Duration::from_secs(10));
    assert_eq!(
        status.map(|s| s.code()),
        Some(Some(0)),
        "exit after SIGTERM (signal: {:?})\n{}",
        status.and_then(|s| s.signal()),
        relay.transcript()
    );
    eprintln!("SIGTERM to exit: {:?}", t0.elapsed());
    assert!(
        relay.wait_log("stopped", SHORT).is_some(),
        "no 'stopped' log line\n{}",
        relay.transcript()
    );
    let queued = cfg.spool.join(format!("queue/{id}.msg")).exists();
    let delivered = cfg.outbox.join(format!("{id}.eml")).exists();
    assert!(
        queued || delivered,
        "{id} was acknowledged during shutdown but is gone"
    );
    drop(relay);

    let relay = cfg.start();
    let eml = relay.wait_delivered(&id);
    check_delivery(&eml, &id, "erp@lan.test", &["billing@corp.test"], content).unwrap();
}

// ------------------------------------------------------------------------------------------
// check-config
// ------------------------------------------------------------------------------------------

#[test]
fn check_config_prints_every_error_with_key_paths_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        r#"listeners:
  - address: "0.0.0.0:99999"
  - address: "127.0.0.1:25"
    tls: bogus
access:
  allow_networks: ["10.0.0.0/8", "10.0.0.0/33"]
limits:
  max_message_size: 12 parsecs
  max_connections_per_ip: 0
  data_timeout: soon
upstreams: []
queue:
  retry: [1m, never]
log:
  level: loud
  format: xml
"#,
    )
    .unwrap();
    let out = run_with_timeout(
        mailbridge_cmd().arg("check-config").arg("-c").arg(&bad),
        dir.path(),
        "check-bad",
        SHORT,
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "stdout: {}\nstderr: {}",
        out.stdout,
        out.stderr
    );
    let wanted = [
        "listeners[0].address: invalid socket address \"0.0.0.0:99999\"",
        "listeners[1].tls: unknown value \"bogus\"",
        "access.allow_networks[1]: invalid network \"10.0.0.0/33\"",
        "limits.max_message_size: invalid size \"12 parsecs\"",
        "limits.max_connections_per_ip: must be at least 1",
        "limits.data_timeout: invalid duration \"soon\"",
        "upstreams: at least one upstream is required",
        "queue.retry[1]: invalid duration \"never\"",
        "log.level: unknown level \"loud\"",
        "log.format: unknown format \"xml\"",
    ];
    let all = format!("{}{}", out.stdout, out.stderr);
    for w in wanted {
        assert!(all.contains(w), "missing {w:?} in:\n{all}");
    }
    // One error per line.
    assert!(all.lines().count() >= wanted.len(), "{all}");
    assert!(!out.stdout.lines().any(|l| l.trim() == "ok"), "{all}");

    // `serve` refuses the same file with exit 1 and the same list.
    let out = run_with_timeout(
        mailbridge_cmd().arg("serve").arg("-c").arg(&bad),
        dir.path(),
        "serve-bad",
        SHORT,
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "serve with a bad file: {}{}",
        out.stdout,
        out.stderr
    );
    assert!(
        out.stderr.contains(wanted[0]) && out.stderr.contains(wanted[9]),
        "{}",
        out.stderr
    );

    let good = RelayConfig::new(dir.path());
    std::fs::write(good.path(), good.yaml()).unwrap();
    let out = run_with_timeout(
        mailbridge_cmd()
            .arg("check-config")
            .arg("-c")
            .arg(good.path()),
        dir.path(),
        "check-good",
        SHORT,
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {}\nstderr: {}",
        out.stdout,
        out.stderr
    );
    assert_eq!(out.stdout.trim(), "ok");

    let missing = dir.path().join("missing.yaml");
    let out = run_with_timeout(
        mailbridge_cmd().arg("check-config").arg("-c").arg(&missing),
        dir.path(),
        "check-missing",
        SHORT,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        out.stderr.contains(&missing.display().to_string()),
        "{}",
        out.stderr
    );

    let out = run_with_timeout(
        mailbridge_cmd().arg("check-config").arg("--bogus"),
        dir.path(),
        "check-usage",
        SHORT,
    );
    assert_eq!(out.status.code(), Some(2), "usage error: {}", out.stderr);
}

// ------------------------------------------------------------------------------------------
// Connection limits and the allowlist over real TCP (behaviour.md C30, C31)
// ------------------------------------------------------------------------------------------

/// Connects from a chosen local address (any 127.0.0.0/8 address works on Linux loopback).
fn connect_from(src: IpAddr, dst: SocketAddr) -> io::Result<Smtp> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let s = rt.block_on(async {
        let sock = tokio::net::TcpSocket::new_v4()?;
        sock.bind(SocketAddr::new(src, 0))?;
        tokio::time::timeout(SHORT, sock.connect(dst))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect"))?
    })?;
    let s = s.into_std()?;
    s.set_nonblocking(false)?;
    Smtp::new(s)
}

/// The first reply of a connection, and whether the server then closed it.
fn first_reply_and_close(c: &mut Smtp) -> (Reply, bool) {
    let r = c.read_reply().unwrap();
    let rest = c.read_rest();
    (r, rest.is_empty())
}

#[test]
fn connection_limits_per_ip_and_global_give_421() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = RelayConfig::new(dir.path());
    cfg.extra = "limits:\n  max_connections: 3\n  max_connections_per_ip: 2\n".into();
    let relay = cfg.start();
    let addr = relay.addr();
    let lo1: IpAddr = "127.0.0.1".parse().unwrap();

    let mut a = connect_from(lo1, addr).unwrap();
    a.expect_reply(220).unwrap();
    let mut b = connect_from(lo1, addr).unwrap();
    b.expect_reply(220).unwrap();
    let mut third = connect_from(lo1, addr).unwrap();
    let (r, closed) = first_reply_and_close(&mut third);
    assert!(
        r.last().starts_with("421 4.7.0"),
        "third connection from one address: {:?}",
        r.lines
    );
    assert!(closed, "the refused connection stays open");
    // The two admitted sessions still work.
    a.expect("EHLO a.test", 250).unwrap();
    b.expect("NOOP", 250).unwrap();

    // Global limit: a third address fits (3 in total), a fourth does not.
    match connect_from("127.0.0.2".parse().unwrap(), addr) {
        Ok(mut c) => {
            c.expect_reply(220).unwrap();
            let mut d = connect_from("127.0.0.3".parse().unwrap(), addr).unwrap();
            let (r, closed) = first_reply_and_close(&mut d);
            assert!(
                r.last().starts_with("421 4.7.0"),
                "connection over max_connections: {:?}",
                r.lines
            );
            assert!(closed);
            c.expect("QUIT", 221).unwrap();
        }
        Err(e) => eprintln!("skipping the global-limit part: cannot connect from 127.0.0.2 ({e})"),
    }

    // A slot is released when its session ends.
    a.expect("QUIT", 221).unwrap();
    let mut got = Vec::new();
    let ok = wait_until(SHORT, || {
        let Ok(mut c) = connect_from(lo1, addr) else {
            return false;
        };
        match c.read_reply() {
            Ok(r) if r.code == 220 => true,
            Ok(r) => {
                got = r.lines;
                false
            }
            Err(_) => false,
        }
    });
    assert!(ok, "no slot after a session ended; last reply {got:?}");
}

#[test]
fn client_outside_allow_networks_gets_554() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = RelayConfig::new(dir.path());
    cfg.extra = "access:\n  allow_networks: [\"10.0.0.0/8\"]\n  auth_networks: []\n".into();
    let relay = cfg.start();
    let mut c = Smtp::connect(relay.addr()).unwrap();
    let (r, closed) = first_reply_and_close(&mut c);
    assert!(r.last().starts_with("554 5.7.1"), "{:?}", r.lines);
    assert!(closed, "a refused client must be disconnected");
    assert!(
        relay
            .wait_log(
                "connection from a network in neither access.allow_networks nor access.auth_networks refused",
                SHORT
            )
            .is_some(),
        "{}",
        relay.transcript()
    );
    assert_eq!(files(&relay.queue_dir()), Vec::<String>::new());
}

/// Whether this host can bind `addr` (IPv6 may be disabled in containers).
fn can_bind(addr: &str) -> Result<(), io::Error> {
    std::net::TcpListener::bind(addr).map(drop)
}

fn greeting(addr: SocketAddr) -> Reply {
    let mut c = Smtp::connect(addr).unwrap();
    let r = c.read_reply().unwrap();
    if r.code == 220 {
        // The client address the session sees is the canonical one.
        let ehlo = c.expect("EHLO client.test", 250).unwrap();
        let want = format!("Hello [{}]", addr.ip());
        assert!(ehlo.lines[0].contains(&want), "{:?}", ehlo.lines);
        let _ = c.cmd("QUIT");
    }
    r
}

#[test]
fn allowlist_matches_v4_mapped_and_ipv6_clients() {
    // An IPv6 socket bound to ::ffff:127.0.0.1 sees IPv4 clients as ::ffff:127.0.0.1, as a
    // dual-stack [::] listener does, while staying on loopback.
    let mapped = "[::ffff:127.0.0.1]:0";
    let v6 = "[::1]:0";
    let mapped_ok = can_bind(mapped);
    let v6_ok = can_bind(v6);
    if let Err(e) = &mapped_ok {
        eprintln!("skipping the ::ffff:127.0.0.1 part: cannot bind {mapped} ({e})");
    }
    if let Err(e) = &v6_ok {
        eprintln!("skipping the IPv6 loopback part: cannot bind {v6} ({e})");
    }
    let v4_via = |a: SocketAddr| SocketAddr::new("127.0.0.1".parse().unwrap(), a.port());

    // A network written as ::ffff:a.b.c.d/n matches plain IPv4 clients.
    {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = RelayConfig::new(dir.path());
        cfg.extra = "access:\n  allow_networks: [\"::ffff:127.0.0.0/104\"]\n".into();
        let relay = cfg.start();
        let r = greeting(relay.addr());
        assert_eq!(
            r.code, 220,
            "IPv4 client vs ::ffff:127.0.0.0/104: {:?}",
            r.lines
        );
    }

    let mut listeners = Vec::new();
    if mapped_ok.is_ok() {
        listeners.push(mapped.to_string());
    }
    if v6_ok.is_ok() {
        listeners.push(v6.to_string());
    }
    if listeners.is_empty() {
        return;
    }
    for (allow, v4_allowed, v6_allowed) in [
        ("127.0.0.0/8", true, false),
        ("::1/128", false, true),
        ("10.0.0.0/8", false, false),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = RelayConfig::new(dir.path());
        cfg.listeners = listeners.clone();
        cfg.extra = format!("access:\n  allow_networks: [\"{allow}\"]\n  auth_networks: []\n");
        let relay = cfg.start();
        let mut addrs = relay.addrs.iter();
        if mapped_ok.is_ok() {
            let a = *addrs.next().unwrap();
            let r = greeting(v4_via(a));
            let want = if v4_allowed { 220 } else { 554 };
            assert_eq!(
                r.code, want,
                "IPv4 client on {a} (seen as ::ffff:127.0.0.1), allow {allow}: {:?}",
                r.lines
            );
            if !v4_allowed {
                assert!(r.last().starts_with("554 5.7.1"), "{:?}", r.lines);
            }
        }
        if v6_ok.is_ok() {
            let a = *addrs.next().unwrap();
            let r = greeting(a);
            let want = if v6_allowed { 220 } else { 554 };
            assert_eq!(r.code, want, "::1 client, allow {allow}: {:?}", r.lines);
        }
    }
}

// ------------------------------------------------------------------------------------------
// Disk full (behaviour.md A6)
// ------------------------------------------------------------------------------------------

/// A tmpfs mounted for the life of the value.
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    fn mount(dir: &Path, options: &str) -> io::Result<Tmpfs> {
        let data = std::ffi::CString::new(options).expect("mount options without NUL");
        rustix::mount::mount(
            "tmpfs",
            dir,
            "tmpfs",
            rustix::mount::MountFlags::empty(),
            data.as_c_str(),
        )?;
        Ok(Tmpfs {
            path: dir.to_path_buf(),
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        use rustix::mount::{UnmountFlags, unmount};
        if unmount(&self.path, UnmountFlags::empty()).is_err() {
            let _ = unmount(&self.path, UnmountFlags::DETACH);
        }
    }
}

/// Fills the file system holding `file` until a write fails, then frees `leave` bytes.
fn fill_leaving(file: &Path, leave: u64) {
    let mut f = std::fs::File::create(file).unwrap();
    let chunk = vec![0x5au8; 64 * 1024];
    let mut written = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
            Err(e) => panic!("filling {}: {e}", file.display()),
        }
        assert!(
            written < 64 * 1024 * 1024,
            "the file system did not fill up"
        );
    }
    f.set_len(written.saturating_sub(leave)).unwrap();
    f.sync_all().unwrap();
}

#[test]
fn disk_full_gives_452_never_250_and_no_partial_file() {
    let dir = tempfile::tempdir().unwrap();
    let fs_dir = dir.path().join("spoolfs");
    std::fs::create_dir(&fs_dir).unwrap();
    let _mount = match Tmpfs::mount(&fs_dir, "size=2m,mode=0700") {
        Ok(m) => m,
        Err(e) if e.raw_os_error() == Some(EPERM) => {
            eprintln!(
                "skipping: mounting a tmpfs is not permitted here ({e}); run as root with CAP_SYS_ADMIN for the disk-full test"
            );
            return;
        }
        Err(e) if in_ci() => panic!("cannot mount a tmpfs for the disk-full test: {e}"),
        Err(e) => {
            eprintln!("skipping: cannot mount a tmpfs for the disk-full test ({e})");
            return;
        }
    };
    let mut cfg = RelayConfig::new(dir.path());
    cfg.spool = fs_dir.join("spool");
    let relay = cfg.start();
    let filler = fs_dir.join("filler");
    let mut problems: Vec<String> = Vec::new();

    let check_clean = |case: &str, problems: &mut Vec<String>| {
        for sub in ["queue", "tmp"] {
            let left = files(&cfg.spool.join(sub));
            if !left.is_empty() {
                problems.push(format!("{case}: files left in spool/{sub}: {left:?}"));
                for f in left {
                    let _ = std::fs::remove_file(cfg.spool.join(sub).join(f));
                }
            }
        }
    };
    let body = |size: usize| {
        let mut m = b"From: <scanner@lan.test>\r\nSubject: big scan\r\n\r\n".to_vec();
        while m.len() < size {
            m.extend_from_slice(b"JVBERi0xLjQKJcfsj6IKNSAwIG9iago8PC9MZW5ndGggNiAwIFIvRmlsdGVyIC9GbGF0ZURlY29kZT4+CnN0cmVhbQp4\r\n");
        }
        m
    };
    let mut c = Smtp::greet_ehlo(relay.addr()).unwrap();

    // 1. A 3 MiB message on a 2 MiB file system: the spill to spool/tmp fails mid-DATA.
    match c.send_message(
        "scanner@lan.test",
        &["user@corp.test"],
        &body(3 * 1024 * 1024),
    ) {
        Ok(r) if r.last().starts_with("452 4.3.1") => {}
        Ok(r) => problems.push(format!("3 MiB message on a 2 MiB spool: {:?}", r.lines)),
        Err(e) => problems.push(format!("3 MiB message on a 2 MiB spool: {e}")),
    }
    check_clean("message larger than the disk (spilled)", &mut problems);

    // 2. ~160 KiB free, a 200 KiB message (kept in memory, written at commit).
    fill_leaving(&filler, 160 * 1024);
    let mut c = Smtp::greet_ehlo(relay.addr()).unwrap();
    match c.send_message("scanner@lan.test", &["user@corp.test"], &body(200 * 1024)) {
        Ok(r) if r.last().starts_with("452 4.3.1") => {}
        Ok(r) => problems.push(format!("200 KiB message with 160 KiB free: {:?}", r.lines)),
        Err(e) => problems.push(format!("200 KiB message with 160 KiB free: {e}")),
    }
    check_clean("message larger than the free space (commit)", &mut problems);

    // 3. SIZE larger than the free space, and a full disk: refused at MAIL.
    let r = c.cmd("MAIL FROM:<scanner@lan.test> SIZE=1000000").unwrap();
    if !r.last().starts_with("452 4.3.1") {
        problems.push(format!(
            "MAIL with SIZE above the free space: {:?}",
            r.lines
        ));
        let _ = c.cmd("RSET");
    }
    fill_leaving(&filler, 0);
    let r = c.cmd("MAIL FROM:<scanner@lan.test>").unwrap();
    if !r.last().starts_with("452 4.3.1") {
        problems.push(format!("MAIL on a full disk: {:?}", r.lines));
        let _ = c.cmd("RSET");
    }
    check_clean("full disk at MAIL", &mut problems);

    // 4. Space again: mail flows.
    std::fs::remove_file(&filler).unwrap();
    let content = body(50 * 1024);
    let r = c
        .send_message("scanner@lan.test", &["user@corp.test"], &content)
        .unwrap();
    match r.queue_id() {
        Some(id) => {
            let eml = relay.wait_delivered(&id);
            check_delivery(&eml, &id, "scanner@lan.test", &["user@corp.test"], &content).unwrap();
            assert_eq!(
                files(&cfg.outbox),
                vec![format!("{id}.eml")],
                "only the last message may be delivered"
            );
        }
        None => problems.push(format!("after the disk was freed: {:?}", r.lines)),
    }
    drop(c);
    drop(relay);
    assert!(
        problems.is_empty(),
        "disk-full problems:\n{}",
        problems.join("\n")
    );
}

// ------------------------------------------------------------------------------------------
// Damaged queue files at start-up (behaviour.md A7)
// ------------------------------------------------------------------------------------------

#[test]
fn damaged_queue_files_go_to_corrupt_and_the_daemon_still_starts_a7() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = RelayConfig::new(dir.path());
    let queue = cfg.spool.join("queue");
    std::fs::create_dir_all(&queue).unwrap();
    // A truncated queue file and one with garbage, as a crash on a bad disk could leave.
    std::fs::write(queue.join("truncated.msg"), b"MAILBRIDGE-QUEUE 1\nSTATE a=").unwrap();
    std::fs::write(queue.join("garbage.msg"), vec![0xffu8; 4096]).unwrap();

    let relay = cfg.start();
    let log = relay
        .wait_log("spool recovered", SHORT)
        .expect("recovery summary logged");
    assert_eq!(log["corrupt"], 2, "{log}");
    for name in ["truncated.msg", "garbage.msg"] {
        assert!(cfg.spool.join("corrupt").join(name).exists(), "{name}");
        assert!(!queue.join(name).exists(), "{name}");
    }
    // It still accepts and delivers mail.
    new_mail_is_accepted_and_delivered(&relay);
}

/// After a recovery that set entries aside, the daemon still takes and delivers new mail.
fn new_mail_is_accepted_and_delivered(relay: &Relay) {
    let mut c = Smtp::greet_ehlo(relay.addr()).unwrap();
    let id = c
        .send_message(
            "a@example.com",
            &["b@example.com"],
            b"Subject: after\r\n\r\nok\r\n",
        )
        .unwrap()
        .queue_id()
        .expect("queued after recovery");
    relay.wait_delivered(&id);
}

/// Issue 8 §3.9: a `.msg` entry that is a directory, a FIFO or a dangling symlink, or whose
/// `.state` cannot be read, used to fail recovery, and systemd restarted the daemon every 5 s
/// for ever. Each is set aside in `corrupt/`; the daemon starts and delivers the good message.
#[test]
fn unreadable_queue_entries_go_to_corrupt_and_the_daemon_starts() {
    use mailbridge::spool::{Envelope, Recipient, Spool};
    let dir = tempfile::tempdir().unwrap();
    let cfg = RelayConfig::new(dir.path());
    let queue = cfg.spool.join("queue");
    let good = mailbridge::spool::new_id();
    let bad_state = mailbridge::spool::new_id();
    {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let spool = Spool::open(&cfg.spool).unwrap();
        for id in [&good, &bad_state] {
            let envelope = Envelope {
                id: id.clone(),
                sender: "a@example.com".into(),
                recipients: vec![Recipient {
                    address: "b@example.com".into(),
                }],
                client_ip: "127.0.0.1".parse().unwrap(),
                helo: "printer".into(),
                auth_user: None,
                arrival_ms: mailbridge::spool::now_ms(),
                body: None,
                smtputf8: false,
                upstream: None,
                report: false,
            };
            rt.block_on(async {
                let mut inc = spool.begin(&envelope);
                inc.write(b"Subject: queued before the start\r\n\r\nok\r\n")
                    .await;
                inc.commit().await.unwrap();
            });
        }
    }
    std::fs::create_dir(queue.join("adir.msg")).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        queue.join("afifo.msg"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    std::os::unix::fs::symlink(dir.path().join("nowhere"), queue.join("alink.msg")).unwrap();
    let st = queue.join(format!("{bad_state}.state"));
    let _ = std::fs::remove_file(&st);
    std::fs::create_dir(&st).unwrap();

    let relay = cfg.start();
    let log = relay
        .wait_log("spool recovered", SHORT)
        .expect("recovery summary logged");
    assert_eq!(log["corrupt"], 4, "{log}");
    let corrupt = cfg.spool.join("corrupt");
    for name in [
        "adir.msg".to_string(),
        "afifo.msg".into(),
        "alink.msg".into(),
        format!("{bad_state}.msg"),
        format!("{bad_state}.state"),
    ] {
        assert!(
            std::fs::symlink_metadata(corrupt.join(&name)).is_ok(),
            "{name} not in corrupt/"
        );
        assert!(
            std::fs::symlink_metadata(queue.join(&name)).is_err(),
            "{name} still in queue/"
        );
    }
    // The log names the remedy.
    let logs = relay.logs();
    assert!(
        logs.iter().any(|v| v["message"].as_str().is_some_and(|m| m
            .contains("cannot be read, moved to corrupt/")
            && m.contains("mode 600"))),
        "{}",
        relay.transcript()
    );
    // The good message queued before the start is delivered, and new mail too.
    relay.wait_delivered(&good);
    new_mail_is_accepted_and_delivered(&relay);
}

/// Issue 8 §3.8: an inline `password_hash` or `client_secret` in a configuration file that
/// every local user can read stops `check-config` and `serve`, naming the file, the key and
/// the fix; mode 640 (root:mailbridge, as installed) is accepted.
#[test]
fn inline_secrets_in_a_world_readable_config_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let hash =
        mailbridge::inbound::auth::hash_password(&mailbridge::secret::Secret::new("pw")).unwrap();
    let mut cfg = RelayConfig::new(dir.path());
    cfg.extra = format!(
        "users:\n  - username: scanner01\n    password_hash: {hash:?}\n    allowed_senders: [\"*\"]\n"
    );
    cfg.write();
    let path = cfg.path();
    let check = |name: &str| {
        run_with_timeout(
            mailbridge_cmd().arg("check-config").arg("-c").arg(&path),
            dir.path(),
            name,
            SHORT,
        )
    };
    let out = check("check-640");
    assert_eq!(out.status.code(), Some(0), "{}{}", out.stdout, out.stderr);

    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = check("check-644");
    assert_eq!(out.status.code(), Some(1), "{}{}", out.stdout, out.stderr);
    let all = format!("{}{}", out.stdout, out.stderr);
    for want in [
        "users[0].password_hash:",
        &path.display().to_string(),
        "readable by every local user",
        "chmod 640",
        "password_hash_file",
    ] {
        assert!(all.contains(want), "missing {want:?} in:\n{all}");
    }
    assert!(!all.contains(&hash), "the hash leaked: {all}");

    let out = run_with_timeout(
        mailbridge_cmd().arg("serve").arg("-c").arg(&path),
        dir.path(),
        "serve-644",
        SHORT,
    );
    assert_eq!(out.status.code(), Some(1), "{}{}", out.stdout, out.stderr);
    assert!(
        out.stderr.contains("users[0].password_hash:"),
        "{}",
        out.stderr
    );
}

/// Issue 8 §3.3: clients only in `auth_networks` may not take the slots
/// `limits.reserved_connections` keeps for `allow_networks`, so hosts that never
/// authenticate cannot lock the printers out.
#[test]
fn reserved_connections_are_kept_for_allow_networks() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = RelayConfig::new(dir.path());
    cfg.extra = "access:\n  allow_networks: [\"127.0.0.1/32\"]\n  auth_networks: [\"127.0.0.0/8\"]\n\
                 limits:\n  max_connections: 4\n  max_connections_per_ip: 10\n  reserved_connections: 2\n"
        .into();
    let relay = cfg.start();
    let addr = relay.addr();
    let printer: IpAddr = "127.0.0.1".parse().unwrap();
    let lan: IpAddr = "127.0.0.2".parse().unwrap();
    let other_lan: IpAddr = "127.0.0.3".parse().unwrap();
    if connect_from(lan, addr).is_err() {
        eprintln!("skipping: cannot connect from {lan}");
        return;
    }
    // That probe's slot is released when its session ends; wait for it.
    let mut held = Vec::new();
    assert!(wait_until(SHORT, || {
        let Ok(mut c) = connect_from(lan, addr) else {
            return false;
        };
        match c.read_reply() {
            Ok(r) if r.code == 220 => {
                held.push(c);
                held.len() == 2
            }
            _ => false,
        }
    }));
    // Two auth_networks clients hold the unreserved slots: a third is refused...
    let mut c = connect_from(other_lan, addr).unwrap();
    let (r, closed) = first_reply_and_close(&mut c);
    assert!(r.last().starts_with("421 4.7.0"), "{:?}", r.lines);
    assert!(closed);
    // ... while the printer gets both reserved slots...
    let mut p1 = connect_from(printer, addr).unwrap();
    p1.expect_reply(220).unwrap();
    let mut p2 = connect_from(printer, addr).unwrap();
    p2.expect_reply(220).unwrap();
    // ... and max_connections still bounds the total.
    let mut p3 = connect_from(printer, addr).unwrap();
    let (r, _) = first_reply_and_close(&mut p3);
    assert!(r.last().starts_with("421 4.7.0"), "{:?}", r.lines);
    // The printers' sessions work.
    p1.expect("EHLO printer.test", 250).unwrap();
    p2.expect("NOOP", 250).unwrap();
    // The log is read from the daemon's stdout by another thread: wait for the line.
    assert!(
        wait_until(SHORT, || relay.logs().iter().any(|v| v["message"]
            .as_str()
            .is_some_and(|m| m.contains("limits.reserved_connections")))),
        "{}",
        relay.transcript()
    );
}

#[test]
fn reserved_connections_must_be_below_max_connections() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = RelayConfig::new(dir.path());
    cfg.extra = "limits:\n  max_connections: 8\n  reserved_connections: 8\n".into();
    cfg.write();
    let out = run_with_timeout(
        mailbridge_cmd()
            .arg("check-config")
            .arg("-c")
            .arg(cfg.path()),
        dir.path(),
        "check-reserved",
        SHORT,
    );
    assert_eq!(out.status.code(), Some(1), "{}{}", out.stdout, out.stderr);
    assert!(
        out.stderr
            .contains("limits.reserved_connections: must be less than limits.max_connections (8)"),
        "{}",
        out.stderr
    );
}

/// Issue 8 §3.3: without `users` nobody can authenticate, so `access.auth_networks`
/// defaults to empty: a LAN host outside `allow_networks` gets `554 5.7.1` instead of a
/// session (and a slot) it can do nothing with. With users the default stays the private
/// ranges.
#[test]
fn auth_networks_default_is_empty_without_users() {
    let lan: IpAddr = "127.0.0.2".parse().unwrap();
    for with_users in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = RelayConfig::new(dir.path());
        cfg.extra = "access:\n  allow_networks: [\"127.0.0.1/32\"]\n".into();
        if with_users {
            let hash =
                mailbridge::inbound::auth::hash_password(&mailbridge::secret::Secret::new("pw"))
                    .unwrap();
            cfg.extra.push_str(&format!(
                "users:\n  - username: scanner01\n    password_hash: {hash:?}\n    allowed_senders: [\"*\"]\n"
            ));
        }
        let relay = cfg.start();
        let Ok(mut c) = connect_from(lan, relay.addr()) else {
            eprintln!("skipping: cannot connect from {lan}");
            return;
        };
        let r = c.read_reply().unwrap();
        if with_users {
            assert_eq!(r.code, 220, "{:?}", r.lines);
        } else {
            assert!(r.last().starts_with("554 5.7.1"), "{:?}", r.lines);
        }
    }
}
