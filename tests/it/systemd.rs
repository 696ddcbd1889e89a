//! systemd integration of the real binary (issue 9 §5): `Type=notify` messages through a
//! notify socket the test binds (READY=1, STOPPING=1, WATCHDOG=1), and secrets read through
//! `${CREDENTIALS_DIRECTORY}` as `LoadCredential=` provides them. Loopback and temp dirs only.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use crate::daemon::{RelayConfig, SHORT, Smtp, mailbridge_cmd};

/// A notify socket as systemd provides it: a datagram socket whose path is `NOTIFY_SOCKET`.
struct NotifySocket {
    sock: UnixDatagram,
    path: std::path::PathBuf,
    /// Every datagram so far, in order.
    seen: Vec<String>,
}

impl NotifySocket {
    fn bind(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).expect("bind the notify socket");
        NotifySocket {
            sock,
            path,
            seen: Vec::new(),
        }
    }

    /// The next datagram that holds `line` as one of its lines, waiting up to `timeout`.
    /// Panics (with everything received so far) if none comes.
    fn wait_for(&mut self, line: &str, timeout: Duration, child: &mut Child) -> String {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 4096];
        loop {
            let now = Instant::now();
            if now >= deadline {
                panic!("no {line} within {timeout:?}; received: {:?}", self.seen);
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "mailbridge exited ({status}) before {line}; received: {:?}",
                    self.seen
                );
            }
            // Short reads so that an exited daemon is noticed.
            let wait = (deadline - now).min(Duration::from_millis(200));
            self.sock.set_read_timeout(Some(wait)).unwrap();
            match self.sock.recv(&mut buf) {
                Ok(n) => {
                    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                    self.seen.push(msg.clone());
                    if msg.lines().any(|l| l == line) {
                        return msg;
                    }
                }
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(e) => panic!("notify socket: {e}"),
            }
        }
    }
}

/// Starts `mailbridge serve` for `cfg` with `env` set, output into files in the config's
/// directory (read them on failure).
fn spawn(cfg: &RelayConfig, env: &[(&str, &std::ffi::OsStr)]) -> Child {
    cfg.write();
    let mut cmd = mailbridge_cmd();
    cmd.arg("serve")
        .arg("-c")
        .arg(cfg.path())
        .stdout(std::fs::File::create(cfg.dir.join("serve.stdout")).unwrap())
        .stderr(std::fs::File::create(cfg.dir.join("serve.stderr")).unwrap());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().expect("start mailbridge")
}

/// Kills the child when the test ends, whatever happened.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sigterm(child: &Child) {
    let pid = rustix::process::Pid::from_raw(child.id() as i32).expect("a child pid");
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("kill -TERM");
}

/// READY=1 comes once the spool is recovered (a partial file left in tmp/ by a crash is gone)
/// and the listener answers; its STATUS names the address. SIGTERM gives STOPPING=1, and
/// the daemon still exits 0.
#[test]
fn notify_ready_after_recovery_and_listeners_then_stopping_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = RelayConfig::new(dir.path());
    let leftover = cfg.spool.join("tmp").join("crashed-mid-data.msg");
    std::fs::create_dir_all(leftover.parent().unwrap()).unwrap();
    std::fs::write(&leftover, b"partial message from a crash").unwrap();
    let mut notify = NotifySocket::bind(dir.path());

    let mut child = Reap(spawn(&cfg, &[("NOTIFY_SOCKET", notify.path.as_os_str())]));
    let ready = notify.wait_for("READY=1", SHORT, &mut child.0);

    // Checked right at READY=1: recovery is done and the listener accepts.
    assert!(
        !leftover.exists(),
        "READY=1 before the spool was recovered (tmp/ still holds the partial file)"
    );
    let addr = ready
        .lines()
        .find_map(|l| l.strip_prefix("STATUS=listening on "))
        .unwrap_or_else(|| panic!("READY=1 without the listening STATUS: {ready:?}"));
    let addr: std::net::SocketAddr = addr.parse().expect("one listener address");
    assert!(addr.ip().is_loopback());
    let mut smtp = Smtp::connect(addr).expect("connect right after READY=1");
    let greeting = smtp.read_reply().expect("a greeting");
    assert_eq!(greeting.code, 220, "{greeting:?}");
    drop(smtp);

    sigterm(&child.0);
    notify.wait_for("STOPPING=1", SHORT, &mut child.0);
    let deadline = Instant::now() + SHORT;
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit after SIGTERM: {status}");
    // STOPPING=1 came after READY=1, and nothing reported readiness twice.
    assert_eq!(
        notify.seen.iter().filter(|m| m.contains("READY=1")).count(),
        1,
        "{:?}",
        notify.seen
    );
}

/// With `WatchdogSec=` systemd sets WATCHDOG_USEC; the daemon then sends WATCHDOG=1 at half
/// that interval, after READY=1.
#[test]
fn notify_watchdog_pings_when_watchdog_usec_is_set() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = RelayConfig::new(dir.path());
    let mut notify = NotifySocket::bind(dir.path());
    let usec = std::ffi::OsString::from("400000");
    let mut child = Reap(spawn(
        &cfg,
        &[
            ("NOTIFY_SOCKET", notify.path.as_os_str()),
            ("WATCHDOG_USEC", usec.as_os_str()),
        ],
    ));
    notify.wait_for("READY=1", SHORT, &mut child.0);
    let t0 = Instant::now();
    notify.wait_for("WATCHDOG=1", SHORT, &mut child.0);
    notify.wait_for("WATCHDOG=1", SHORT, &mut child.0);
    // Two pings at 200 ms: well inside one 400 ms watchdog period plus scheduling slack.
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "two pings took {:?}",
        t0.elapsed()
    );
    sigterm(&child.0);
    notify.wait_for("STOPPING=1", SHORT, &mut child.0);
}
