//! Real SMTP clients against the real binary on loopback: swaks, curl, Python smtplib and
//! Postfix's smtp-source (behaviour.md, "Real programs to test against").
//!
//! Every conversation goes through a small recording TCP proxy, so the test knows exactly
//! what the client put on the wire: the envelope, the DATA section (dot-unstuffed here) and
//! the queue id in our 250 reply. Each message must then appear in the outbox under that
//! queue id, byte for byte behind the delivery headers and our Received (and Date/Message-ID
//! only when the client's message lacked them). For clients fed a file we also check that
//! the wire carried the file unchanged.
//!
//! A missing program is a skip with a message, or a failure when `CI` is set (`.ci/run`
//! installs them all).

use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::daemon::{
    Eml, LONG, Relay, RelayConfig, SHORT, check_delivery, files, in_ci, run_with_timeout,
    wait_until,
};

/// Finds a program on PATH or in the sbin directories (smtp-source lives in /usr/sbin).
pub fn find_program(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from));
    dirs.into_iter().map(|d| d.join(name)).find(|p| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// The program's path; `None` (skip) when it is missing outside CI; a failure in CI.
pub fn require(name: &str, package: &str) -> Option<PathBuf> {
    match find_program(name) {
        Some(p) => Some(p),
        None if in_ci() => panic!(
            "{name} is not installed and CI is set: .ci/run must install the Debian package {package}"
        ),
        None => {
            eprintln!("skipping: {name} not installed (Debian package {package})");
            None
        }
    }
}

/// Both directions of one proxied connection.
#[derive(Default)]
struct Recording {
    c2s: Mutex<Vec<u8>>,
    s2c: Mutex<Vec<u8>>,
    /// Directions still copying (2 at the start).
    open: AtomicUsize,
}

/// A TCP proxy on 127.0.0.1 that forwards to the relay and records every byte.
struct Proxy {
    addr: SocketAddr,
    conns: Arc<Mutex<Vec<Arc<Recording>>>>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let conns: Arc<Mutex<Vec<Arc<Recording>>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (conns2, stop2) = (conns.clone(), stop.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                let server = match TcpStream::connect_timeout(&upstream, SHORT) {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!("proxy: cannot reach the relay: {e}");
                        continue;
                    }
                };
                let rec = Arc::new(Recording {
                    open: AtomicUsize::new(2),
                    ..Recording::default()
                });
                conns2.lock().unwrap().push(rec.clone());
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                pipe(client, server, rec.clone(), true);
                pipe(s2, c2, rec, false);
            }
        });
        Proxy { addr, conns, stop }
    }

    /// Waits until every proxied connection has closed both ways; returns the recordings.
    fn finished(&self, relay: &Relay) -> Vec<Arc<Recording>> {
        let done = wait_until(LONG, || {
            self.conns
                .lock()
                .unwrap()
                .iter()
                .all(|r| r.open.load(Ordering::SeqCst) == 0)
        });
        assert!(
            done,
            "client connections did not close\n{}",
            relay.transcript()
        );
        self.conns.lock().unwrap().clone()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream, rec: Arc<Recording>, client_to_server: bool) {
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        let _ = from.set_read_timeout(Some(LONG));
        let mut buf = [0u8; 16 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let log = if client_to_server { &rec.c2s } else { &rec.s2c };
                    log.lock().unwrap().extend_from_slice(&buf[..n]);
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Write);
        rec.open.fetch_sub(1, Ordering::SeqCst);
    });
}

/// One mail transaction as the client sent it, with the queue id we gave it.
#[derive(Debug)]
struct Tx {
    from: String,
    rcpts: Vec<String>,
    /// The DATA section, dot-unstuffed, without the final `.` line.
    data: Vec<u8>,
    id: String,
}

fn angle_addr(line: &[u8]) -> String {
    let s = String::from_utf8_lossy(line);
    match (s.find('<'), s.find('>')) {
        (Some(a), Some(b)) if a < b => s[a + 1..b].to_string(),
        // `MAIL FROM:user@domain`, as old senders write it (issue 8 section 2).
        _ => s
            .split_once(':')
            .map(|(_, rest)| rest.split_whitespace().next().unwrap_or("").to_string())
            .unwrap_or_default(),
    }
}

/// Splits a recorded conversation into transactions. Commands are lines; after `DATA` the
/// data runs to the line holding a single dot.
fn transactions(rec: &Recording) -> Result<Vec<Tx>, String> {
    let c2s = rec.c2s.lock().unwrap().clone();
    let s2c = rec.s2c.lock().unwrap().clone();
    let transcript = || {
        format!(
            "--- client\n{}\n--- server\n{}",
            String::from_utf8_lossy(&c2s[..c2s.len().min(4000)]),
            String::from_utf8_lossy(&s2c)
        )
    };
    let mut sent = Vec::new();
    let (mut from, mut rcpts) = (String::new(), Vec::new());
    let mut pos = 0;
    while let Some(nl) = c2s[pos..].iter().position(|&b| b == b'\n') {
        let line = &c2s[pos..pos + nl];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        pos += nl + 1;
        let upper = String::from_utf8_lossy(line).to_ascii_uppercase();
        if upper.starts_with("MAIL FROM:") {
            from = angle_addr(line);
            rcpts.clear();
        } else if upper.starts_with("RCPT TO:") {
            rcpts.push(angle_addr(line));
        } else if upper == "RSET" {
            from.clear();
            rcpts.clear();
        } else if upper == "DATA" {
            let mut data = Vec::new();
            loop {
                let Some(end) = c2s[pos..].windows(2).position(|w| w == b"\r\n") else {
                    return Err(format!("DATA without a final dot\n{}", transcript()));
                };
                let l = &c2s[pos..pos + end];
                pos += end + 2;
                if l == b"." {
                    break;
                }
                data.extend_from_slice(l.strip_prefix(b".").unwrap_or(l));
                data.extend_from_slice(b"\r\n");
            }
            sent.push((std::mem::take(&mut from), std::mem::take(&mut rcpts), data));
        }
    }
    let ids: Vec<String> = String::from_utf8_lossy(&s2c)
        .lines()
        .filter_map(|l| l.trim_end().strip_prefix("250 2.0.0 Ok: queued as "))
        .map(str::to_string)
        .collect();
    if ids.len() != sent.len() {
        return Err(format!(
            "{} messages sent but {} queued\n{}",
            sent.len(),
            ids.len(),
            transcript()
        ));
    }
    Ok(sent
        .into_iter()
        .zip(ids)
        .map(|((from, rcpts, data), id)| Tx {
            from,
            rcpts,
            data,
            id,
        })
        .collect())
}

/// Checks that exactly `count` messages went through the proxy and that each one is in the
/// outbox as sent. Returns them with their parsed outbox files.
fn verify(relay: &Relay, proxy: &Proxy, count: usize) -> Vec<(Tx, Eml)> {
    let mut txs = Vec::new();
    for rec in proxy.finished(relay) {
        txs.extend(transactions(&rec).unwrap_or_else(|e| panic!("{e}")));
    }
    assert_eq!(txs.len(), count, "transactions on the wire");
    let mut out = Vec::new();
    for tx in txs {
        let eml = relay.wait_delivered(&tx.id);
        let rcpts: Vec<&str> = tx.rcpts.iter().map(String::as_str).collect();
        let e = check_delivery(&eml, &tx.id, &tx.from, &rcpts, &tx.data)
            .unwrap_or_else(|e| panic!("{}.eml: {e}", tx.id));
        out.push((tx, e));
    }
    assert_eq!(
        files(&relay.outbox).len(),
        count,
        "outbox: {:?}",
        files(&relay.outbox)
    );
    assert!(
        wait_until(LONG, || files(&relay.queue_dir()).is_empty()),
        "queue did not drain: {:?}",
        files(&relay.queue_dir())
    );
    out
}

/// A message as a scanner might send it, with Date and Message-ID, dot lines and 8-bit text.
const FULL_MESSAGE: &[u8] = b"Date: Thu, 27 Nov 2025 10:00:00 +0100\r\n\
Message-ID: <scan-0001@scanner.lan.test>\r\n\
From: Scanner <scanner@lan.test>\r\n\
To: <user@corp.test>\r\n\
Subject: Scan to mail\r\n\
MIME-Version: 1.0\r\n\
Content-Type: text/plain; charset=utf-8\r\n\
Content-Transfer-Encoding: 8bit\r\n\
X-Folded: first part\r\n\
\tsecond part\r\n\
\r\n\
Your scan is ready. Caf\xc3\xa9 cr\xc3\xa8me.\r\n\
.\r\n\
..\r\n\
.leading dot\r\n\
trailing dot.\r\n\
\x20leading space\r\n\
\r\n\
Date: this line is in the body\r\n\
last line\r\n";

/// A message as many printers send it: no Date, no Message-ID.
const BARE_MESSAGE: &[u8] = b"From: <printer@lan.test>\r\n\
To: <user@corp.test>\r\n\
Subject: Toner low\r\n\
\r\n\
Printer 3 toner at 5%.\r\n\
.\r\n\
end\r\n";

fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// What swaks puts on the wire for a `--data @file` whose lines end in CRLF: the file, then
/// an empty line, because swaks always appends `\r\n.` after the data (swaks 20201014,
/// `$n{data} .= "\r\n."`). The relay must deliver that, empty line included.
fn swaks_wire(file: &[u8]) -> Vec<u8> {
    let mut v = file.to_vec();
    v.extend_from_slice(b"\r\n");
    v
}

fn swaks(swaks: &Path, dir: &Path, proxy: &Proxy, name: &str, data: &Path) {
    let out = run_with_timeout(
        Command::new(swaks)
            .arg("--server")
            .arg(proxy.addr.to_string())
            .args(["--from", "scanner@lan.test", "--to", "user@corp.test"])
            .args(["--helo", "scanner.lan.test", "--timeout", "30"])
            .arg("--data")
            .arg(format!("@{}", data.display())),
        dir,
        name,
        LONG,
    );
    assert!(
        out.status.success(),
        "swaks failed ({:?}):\n{}\n{}",
        out.status,
        out.stdout,
        out.stderr
    );
    assert!(out.stdout.contains("queued as"), "{}", out.stdout);
}

#[test]
fn swaks_message_with_date_and_message_id_is_delivered_byte_exact() {
    let Some(prog) = require("swaks", "swaks") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayConfig::new(dir.path()).start();
    let proxy = Proxy::start(relay.addr());
    let data = write_file(dir.path(), "full.eml", FULL_MESSAGE);
    swaks(&prog, dir.path(), &proxy, "swaks-full", &data);
    let got = verify(&relay, &proxy, 1);
    let (tx, eml) = &got[0];
    assert_eq!(
        String::from_utf8_lossy(&tx.data),
        String::from_utf8_lossy(&swaks_wire(FULL_MESSAGE)),
        "swaks sent something other than the file"
    );
    assert_eq!(tx.from, "scanner@lan.test");
    assert!(eml.added_date.is_none() && eml.added_message_id.is_none());
    assert!(
        eml.received.contains("from scanner.lan.test ([127.0.0.1])")
            && eml.received.contains("with ESMTP id")
            && eml.received.contains("for <user@corp.test>"),
        "{}",
        eml.received
    );
}

#[test]
fn swaks_message_without_date_and_message_id_gets_ours() {
    let Some(prog) = require("swaks", "swaks") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayConfig::new(dir.path()).start();
    let proxy = Proxy::start(relay.addr());
    let data = write_file(dir.path(), "bare.eml", BARE_MESSAGE);
    swaks(&prog, dir.path(), &proxy, "swaks-bare", &data);
    let got = verify(&relay, &proxy, 1);
    let (tx, eml) = &got[0];
    assert_eq!(
        tx.data,
        swaks_wire(BARE_MESSAGE),
        "swaks sent something other than the file"
    );
    // check_delivery already matched them to the queue id and RFC 5322 form.
    assert!(eml.added_date.is_some(), "no Date added");
    assert_eq!(
        eml.added_message_id.as_deref(),
        Some(format!("Message-ID: <{}@relay.test>", tx.id).as_str())
    );
}

#[test]
fn curl_upload_is_delivered_byte_exact() {
    let Some(curl) = require("curl", "curl") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayConfig::new(dir.path()).start();
    let proxy = Proxy::start(relay.addr());
    let data = write_file(dir.path(), "full.eml", FULL_MESSAGE);
    let out = run_with_timeout(
        Command::new(curl)
            .args(["-sS", "--max-time", "60"])
            .arg(format!("smtp://{}", proxy.addr))
            .args([
                "--mail-from",
                "erp@lan.test",
                "--mail-rcpt",
                "user@corp.test",
            ])
            .arg("-T")
            .arg(&data),
        dir.path(),
        "curl",
        LONG,
    );
    assert!(
        out.status.success(),
        "curl failed ({:?}):\n{}\n{}",
        out.status,
        out.stdout,
        out.stderr
    );
    let got = verify(&relay, &proxy, 1);
    let (tx, eml) = &got[0];
    assert_eq!(
        String::from_utf8_lossy(&tx.data),
        String::from_utf8_lossy(FULL_MESSAGE),
        "curl changed the message on the wire"
    );
    assert_eq!(eml.return_path, "erp@lan.test");
}

const SMTPLIB_SCRIPT: &str = r#"
import smtplib, sys
port, path = int(sys.argv[1]), sys.argv[2]
data = open(path, "rb").read()
with smtplib.SMTP("127.0.0.1", port, local_hostname="app.lan.test", timeout=30) as s:
    refused = s.sendmail("app@lan.test", ["one@corp.test", "two@corp.test"], data)
    if refused:
        sys.exit("refused: %r" % (refused,))
print("sent")
"#;

#[test]
fn python_smtplib_two_recipients_byte_exact() {
    let Some(python) = require("python3", "python3") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayConfig::new(dir.path()).start();
    let proxy = Proxy::start(relay.addr());
    let data = write_file(dir.path(), "bare.eml", BARE_MESSAGE);
    let out = run_with_timeout(
        Command::new(python)
            .arg("-c")
            .arg(SMTPLIB_SCRIPT)
            .arg(proxy.addr.port().to_string())
            .arg(&data),
        dir.path(),
        "smtplib",
        LONG,
    );
    assert!(
        out.status.success() && out.stdout.contains("sent"),
        "smtplib failed ({:?}):\n{}\n{}",
        out.status,
        out.stdout,
        out.stderr
    );
    let got = verify(&relay, &proxy, 1);
    let (tx, eml) = &got[0];
    assert_eq!(
        tx.data, BARE_MESSAGE,
        "smtplib changed the message on the wire"
    );
    assert_eq!(eml.delivered_to, ["one@corp.test", "two@corp.test"]);
    assert!(
        !eml.received.contains("for <"),
        "two recipients: no 'for' clause: {}",
        eml.received
    );
    assert!(eml.added_date.is_some() && eml.added_message_id.is_some());
}

/// smtplib's raw `docmd`, as an embedded stack writes its envelope: no angle brackets.
const SMTPLIB_BARE_PATHS_SCRIPT: &str = r#"
import smtplib, sys
port, path = int(sys.argv[1]), sys.argv[2]
data = open(path, "rb").read()
with smtplib.SMTP("127.0.0.1", port, local_hostname="printer.lan.test", timeout=30) as s:
    s.ehlo()
    for cmd in ("MAIL FROM:printer@lan.test SIZE=%d" % len(data), "RCPT TO:user@corp.test"):
        code, msg = s.docmd(cmd)
        if code != 250:
            sys.exit("%s: %d %r" % (cmd, code, msg))
    code, msg = s.data(data)
    if code != 250:
        sys.exit("DATA: %d %r" % (code, msg))
print("sent")
"#;

#[test]
fn python_smtplib_envelope_without_angle_brackets_is_delivered() {
    let Some(python) = require("python3", "python3") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayConfig::new(dir.path()).start();
    let proxy = Proxy::start(relay.addr());
    let data = write_file(dir.path(), "bare.eml", BARE_MESSAGE);
    let out = run_with_timeout(
        Command::new(python)
            .arg("-c")
            .arg(SMTPLIB_BARE_PATHS_SCRIPT)
            .arg(proxy.addr.port().to_string())
            .arg(&data),
        dir.path(),
        "smtplib",
        LONG,
    );
    assert!(
        out.status.success() && out.stdout.contains("sent"),
        "smtplib failed ({:?}):\n{}\n{}",
        out.status,
        out.stdout,
        out.stderr
    );
    let got = verify(&relay, &proxy, 1);
    let (tx, eml) = &got[0];
    assert_eq!(tx.from, "printer@lan.test");
    assert_eq!(eml.return_path, "printer@lan.test");
    assert_eq!(eml.delivered_to, ["user@corp.test"]);
}

#[test]
fn postfix_smtp_source_20_messages_over_5_sessions() {
    let Some(prog) = require("smtp-source", "postfix") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayConfig::new(dir.path()).start();
    let proxy = Proxy::start(relay.addr());
    let out = run_with_timeout(
        Command::new(prog)
            .args(["-s", "5", "-m", "20", "-c", "-f", "a@x", "-t", "b@y"])
            .arg(proxy.addr.to_string()),
        dir.path(),
        "smtp-source",
        LONG,
    );
    assert!(
        out.status.success(),
        "smtp-source failed ({:?}):\n{}\n{}",
        out.status,
        out.stdout,
        out.stderr
    );
    let got = verify(&relay, &proxy, 20);
    for (tx, eml) in &got {
        assert_eq!(tx.from, "a@x");
        assert_eq!(eml.delivered_to, ["b@y"]);
        // smtp-source says HELO, and sends `Message-Id:` (that spelling) and Date: we add
        // neither header.
        assert!(eml.received.contains("with SMTP id"), "{}", eml.received);
        assert!(eml.added_date.is_none() && eml.added_message_id.is_none());
    }
}
