//! behaviour.md A1: under strace, the message file's sync, its rename into queue/ and the
//! fsync of queue/ all complete before "250" is written to the client's socket.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn have(program: &str) -> bool {
    Command::new(program)
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

#[test]
fn sync_rename_and_dir_fsync_precede_250_a1() {
    if !have("strace") {
        assert!(
            std::env::var_os("CI").is_none(),
            "strace is missing in CI: .ci/run must install it"
        );
        eprintln!("skipping: strace not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("relay.yaml");
    std::fs::write(
        &cfg,
        format!(
            "listeners:\n  - address: \"127.0.0.1:0\"\nspool:\n  path: {d}/spool\nupstreams:\n  - name: o\n    type: outbox\n    path: {d}/outbox\nlog:\n  format: json\n",
            d = dir.path().display()
        ),
    )
    .unwrap();
    let trace = dir.path().join("strace.txt");
    let mut child = Command::new("strace")
        .args(["-f", "-y", "-s", "120", "-o"])
        .arg(&trace)
        .args([
            "-e",
            "trace=fdatasync,fsync,syncfs,rename,renameat,renameat2,write,writev,sendto,sendmsg",
        ])
        .arg(env!("CARGO_BIN_EXE_mailbridge"))
        .args(["serve", "-c"])
        .arg(&cfg)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Learn the port from the "listening" log line.
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let deadline = Instant::now() + Duration::from_secs(30);
    let addr = loop {
        assert!(Instant::now() < deadline, "daemon did not report listening");
        let line = lines.next().expect("daemon exited").unwrap();
        if line.contains("\"listening\"") {
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            break v["address"].as_str().unwrap().to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});

    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"EHLO t\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("354 ") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    s.write_all(b"Subject: a1\r\n\r\nbody\r\n.\r\n").unwrap();
    got.clear();
    while !String::from_utf8_lossy(&got).contains("\r\n") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    let reply = String::from_utf8_lossy(&got).to_string();
    let id = reply
        .strip_prefix("250 2.0.0 Ok: queued as ")
        .unwrap_or_else(|| panic!("unexpected reply {reply:?}"))
        .trim()
        .to_string();
    s.write_all(b"QUIT\r\n").unwrap();
    let _ = s.read(&mut buf);
    // Killing strace would leave the traced daemon running: kill the daemon (strace's child).
    let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", child.id()))
        .unwrap_or_default();
    for pid in children
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
    {
        if let Some(pid) = rustix::process::Pid::from_raw(pid) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
    }
    let _ = child.kill();
    let _ = child.wait();

    let text = std::fs::read_to_string(&trace).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    // The index of the line where the call that starts at or after `from` and matches `pred`
    // completes (an "<unfinished ...>" call completes at its "resumed" line, same pid).
    let completes = |from: usize, pred: &dyn Fn(&str) -> bool, what: &str| -> usize {
        let start = (from..lines.len())
            .find(|&i| pred(lines[i]))
            .unwrap_or_else(|| panic!("no {what} in the trace:\n{text}"));
        if !lines[start].contains("<unfinished") {
            return start;
        }
        let pid = lines[start].split_whitespace().next().unwrap();
        (start + 1..lines.len())
            .find(|&i| lines[i].starts_with(pid) && lines[i].contains("resumed>"))
            .unwrap_or_else(|| panic!("{what} never completed:\n{text}"))
    };
    let tmp_name = format!("tmp/{id}.msg");
    let queue_name = format!("queue/{id}.msg");
    let is_sync =
        |l: &str| l.contains("fdatasync(") || l.contains("fsync(") || l.contains("syncfs(");
    let data_sync = completes(
        0,
        &|l| is_sync(l) && l.contains(&tmp_name),
        "sync of the message file",
    );
    let rename = completes(
        0,
        &|l| l.contains("rename") && l.contains(&tmp_name) && l.contains(&queue_name),
        "rename into queue/",
    );
    let dir_sync = completes(
        rename,
        &|l| l.contains("fsync(") && l.contains("/queue>"),
        "fsync of queue/ after the rename",
    );
    let reply_250 = completes(
        0,
        &|l| l.contains(&format!("250 2.0.0 Ok: queued as {id}")),
        "the 250 reply",
    );
    assert!(data_sync < rename, "data sync after rename:\n{text}");
    assert!(
        dir_sync < reply_250,
        "250 sent before the spool was durable:\n{text}"
    );
}

/// Copies the spool written by the format before typed outcomes (tests/support/spool-v1:
/// a queued message with a state journal of replies only, and a failed/ entry) into `dst`.
fn old_spool(dst: &std::path::Path) {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/spool-v1");
    for sub in ["queue", "failed"] {
        std::fs::create_dir_all(dst.join(sub)).unwrap();
        for e in std::fs::read_dir(src.join(sub)).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), dst.join(sub).join(e.file_name())).unwrap();
        }
    }
}

/// Principle 1 across an upgrade: a spool written by the previous format loads in place,
/// keeps its per-recipient journal (the delivered recipient is not sent again) and delivers
/// the rest.
#[tokio::test(flavor = "multi_thread")]
async fn spool_written_before_typed_outcomes_still_delivers() {
    use mailbridge::config::QueueConfig;
    use mailbridge::delivery::Delivery;
    use mailbridge::spool::{RcptStatus, Spool};
    use mailbridge::upstream::outbox::Outbox;
    use std::sync::Arc;

    const QUEUED: &str = "01a234389637766eb09d6a34932d1931";
    const FAILED: &str = "01a23438963f779fa3f3754f8cc19824";
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("spool");
    old_spool(&root);
    let spool = Spool::open(&root).unwrap();
    let rec = spool.recover().unwrap();
    assert_eq!(rec.corrupt, 0, "nothing of the old spool is set aside");
    assert_eq!(rec.queued.len(), 1);
    assert_eq!(rec.queued[0].id, QUEUED);
    let stored = spool.load(QUEUED).unwrap();
    assert_eq!(stored.state.attempts, 1);
    assert_eq!(
        stored
            .state
            .recipients
            .iter()
            .map(|r| r.status)
            .collect::<Vec<_>>(),
        vec![
            RcptStatus::Delivered,
            RcptStatus::Pending,
            RcptStatus::Pending
        ]
    );
    // The failed/ entry's journal still reads.
    let failed = std::fs::read(root.join(format!("failed/{FAILED}.state"))).unwrap();
    let failed = mailbridge::spool::format::decode_state(&failed, 1).unwrap();
    assert_eq!(failed.recipients[0].status, RcptStatus::Failed);
    assert!(failed.outcome_of(0).is_none());

    let outbox = dir.path().join("outbox");
    std::fs::create_dir_all(&outbox).unwrap();
    let up = Arc::new(Outbox::new("o", &outbox).unwrap());
    let d = Delivery::new(
        spool.clone(),
        up,
        QueueConfig {
            retry: vec![Duration::from_secs(60)],
            max_age: Duration::from_secs(10 * 365 * 86400),
            workers: 1,
            bounce: false,
            postmaster: None,
        },
    );
    assert_eq!(d.attempt(QUEUED).await, None, "delivered and removed");
    assert!(!root.join(format!("queue/{QUEUED}.msg")).exists());
    let files: Vec<_> = std::fs::read_dir(&outbox)
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    let all = files.concat();
    assert!(all.contains("Subject: scan 10:42"), "{all}");
    assert!(
        all.contains("b@example.com") && all.contains("c@example.com"),
        "{all}"
    );
    assert!(
        !all.contains("a@example.com"),
        "the recipient journalled as delivered is not sent again: {all}"
    );
}
