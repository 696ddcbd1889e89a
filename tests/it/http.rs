//! The HTTP endpoint (`admin.http_address`): `/metrics` before and after traffic, `/healthz`
//! with a broken spool, 403 for peers outside the allowed networks, the config check, and the
//! status page in a real browser (headless Chromium's `--dump-dom`), both from a running
//! daemon with a paused upstream and from a constructed model.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mailbridge::admin::page::{self, PageModel};
use mailbridge::ops::model::{
    DeliveryRecord, ListenerStatus, QueueEntry, QueueSummary, SenderRecord, StatusReport,
    TokenStatus, UpstreamStatus,
};

use crate::daemon::{LONG, RelayConfig, SHORT, Smtp, in_ci, mailbridge_cmd, run_with_timeout};
use crate::fake_exchange::{FakeExchange, Rule, Stage};
use crate::fake_token::FakeToken;

// ---- helpers ----

async fn get(url: &str) -> (u16, Option<String>, String) {
    let r = reqwest::get(url)
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = r.status().as_u16();
    let ctype = r
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_string());
    (status, ctype, r.text().await.unwrap())
}

/// A sample's value in the text exposition (0 when absent: a counter not yet created).
fn sample(text: &str, key: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

async fn scrape(addr: SocketAddr) -> String {
    let (status, ctype, body) = get(&format!("http://{addr}/metrics")).await;
    assert_eq!(status, 200, "{body}");
    let ctype = ctype.unwrap();
    assert!(
        ctype.starts_with("application/openmetrics-text") || ctype.starts_with("text/plain"),
        "{ctype}"
    );
    body
}

/// The HTTP endpoint's address, from the daemon's log line.
fn http_addr(relay: &crate::daemon::Relay) -> SocketAddr {
    let v = relay
        .wait_log(
            "HTTP endpoint listening (/metrics, /healthz, status page /)",
            SHORT,
        )
        .unwrap_or_else(|| panic!("no HTTP endpoint\n{}", relay.transcript()));
    v["address"].as_str().unwrap().parse().unwrap()
}

fn relay_config(dir: &std::path::Path) -> RelayConfig {
    let mut rc = RelayConfig::new(dir);
    rc.extra = format!(
        "admin:\n  socket: {:?}\n  http_address: 127.0.0.1:0\nlimits:\n  max_message_size: 1000000\n",
        dir.join("admin.sock").display().to_string()
    );
    rc
}

fn message(subject: &str) -> Vec<u8> {
    format!("From: <scanner@example.com>\r\nTo: <you@example.com>\r\nSubject: {subject}\r\nDate: Sat, 28 Nov 2026 01:00:00 +0000\r\nMessage-ID: <{subject}@test>\r\n\r\nhello\r\n").into_bytes()
}

/// Sends one message; returns the reply (blocking client on a blocking thread).
async fn send(addr: SocketAddr, subject: &str) -> crate::daemon::Reply {
    let content = message(subject);
    tokio::task::spawn_blocking(move || {
        let mut c = Smtp::greet_ehlo(addr).unwrap();
        let r = c
            .send_message("scanner@example.com", &["you@example.com"], &content)
            .unwrap();
        let _ = c.cmd("QUIT");
        r
    })
    .await
    .unwrap()
}

/// Chromium, or `None` (skip) outside CI; in CI a missing browser is a failure.
fn chromium() -> Option<PathBuf> {
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
            let p = dir.join(name);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    assert!(
        !in_ci(),
        "chromium is missing: install Debian's chromium package (.ci/run does)"
    );
    eprintln!("skipped: chromium is not installed");
    None
}

/// The DOM after Chromium loaded `url` (headless, own profile directory, bounded time).
async fn dump_dom(browser: PathBuf, url: String) -> String {
    tokio::task::spawn_blocking(move || {
        let dir = tempfile::tempdir().unwrap();
        let profile = dir.path().join("profile");
        let done = run_with_timeout(
            Command::new(&browser)
                .arg("--headless")
                .arg("--no-sandbox")
                .arg("--disable-gpu")
                .arg("--disable-dev-shm-usage")
                .arg("--no-first-run")
                .arg(format!("--user-data-dir={}", profile.display()))
                .arg("--dump-dom")
                .arg(&url),
            dir.path(),
            "chromium",
            Duration::from_secs(120),
        );
        assert!(
            done.status.success(),
            "chromium failed: {:?}\n{}",
            done.status,
            done.stderr
        );
        done.stdout
    })
    .await
    .unwrap()
}

/// The element that starts with `open` (e.g. `<tr data-upstream="contoso"`), up to its
/// closing `</tag>` (no nesting of the same tag inside: rows and cells).
fn element<'a>(dom: &'a str, open: &str) -> Option<&'a str> {
    let start = dom.find(open)?;
    let tag = open[1..].split([' ', '>']).next()?;
    let end = dom[start..].find(&format!("</{tag}>"))?;
    Some(&dom[start..start + end])
}

/// The attribute `name` of the element starting with `open`.
fn attr(dom: &str, open: &str, name: &str) -> Option<String> {
    let start = dom.find(open)?;
    let tag_end = dom[start..].find('>')? + start;
    let tag = &dom[start..tag_end];
    let at = tag.find(&format!(" {name}=\""))? + name.len() + 3;
    let rest = &tag[at..];
    Some(rest[..rest.find('"')?].to_string())
}

// ---- metrics ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_sessions_messages_rejections_and_deliveries() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay_config(dir.path()).start();
    let http = http_addr(&relay);
    let before = scrape(http).await;
    for key in [
        "mailbridge_sessions_total",
        "mailbridge_messages_accepted_total",
        "mailbridge_messages_rejected_total{reason=\"size\"}",
        "mailbridge_queue_messages",
        "mailbridge_queue_oldest_age_seconds",
        "mailbridge_accept_duration_seconds_count",
    ] {
        assert!(
            before.contains(&format!("\n{key} ")),
            "{key} missing:\n{before}"
        );
    }
    assert!(before.contains("mailbridge_upstream_paused{upstream=\"local\"} 0"));

    for i in 0..3 {
        let r = send(relay.addr(), &format!("m{i}")).await;
        assert_eq!(r.code, 250, "{:?}", r.lines);
    }
    // One refusal: over limits.max_message_size (552 at MAIL).
    let addr = relay.addr();
    tokio::task::spawn_blocking(move || {
        let mut c = Smtp::greet_ehlo(addr).unwrap();
        c.expect("MAIL FROM:<scanner@example.com> SIZE=5000000", 552)
            .unwrap();
        let _ = c.cmd("QUIT");
    })
    .await
    .unwrap();

    let delivered =
        "mailbridge_deliveries_total{upstream=\"local\",verdict=\"delivered\",class=\"local\"}";
    let deadline = Instant::now() + LONG;
    let after = loop {
        let m = scrape(http).await;
        if sample(&m, delivered) - sample(&before, delivered) >= 3.0 || Instant::now() > deadline {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let delta = |key: &str| sample(&after, key) - sample(&before, key);
    assert_eq!(delta(delivered), 3.0, "{after}");
    assert_eq!(delta("mailbridge_sessions_total"), 4.0, "{after}");
    assert_eq!(delta("mailbridge_messages_accepted_total"), 3.0, "{after}");
    assert_eq!(
        delta("mailbridge_messages_rejected_total{reason=\"size\"}"),
        1.0,
        "{after}"
    );
    assert_eq!(
        delta("mailbridge_messages_rejected_total{reason=\"bare_lf\"}"),
        0.0
    );
    assert_eq!(
        delta("mailbridge_accept_duration_seconds_count"),
        3.0,
        "{after}"
    );
    assert!(delta("mailbridge_accept_duration_seconds_sum") > 0.0);
    // Nothing else was attempted.
    let deliveries: f64 = after
        .lines()
        .filter(|l| l.starts_with("mailbridge_deliveries_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(deliveries, 3.0, "{after}");
}

// ---- /healthz ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_is_ok_and_503_with_the_reason_when_the_spool_is_broken() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay_config(dir.path()).start();
    let http = http_addr(&relay);
    let url = format!("http://{http}/healthz");
    let (status, _, body) = get(&url).await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));

    // Break the spool as root can feel it too: its tmp/ is no longer a directory.
    let tmp = relay.tmp_dir();
    let aside = relay.spool.join("tmp.aside");
    std::fs::rename(&tmp, &aside).unwrap();
    std::fs::write(&tmp, b"not a directory").unwrap();
    // A good check is reused for up to 5 s: wait for the next one.
    let deadline = Instant::now() + SHORT;
    let (status, ctype, body) = loop {
        let r = get(&url).await;
        if r.0 != 200 || Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status, 503, "{body}");
    assert!(ctype.unwrap().starts_with("text/plain"));
    assert!(body.contains("the spool at"), "{body}");
    assert!(body.contains("is not writable"), "{body}");
    // The status page says so too, in red.
    let (status, _, html) = get(&format!("http://{http}/")).await;
    assert_eq!(status, 200);
    assert_eq!(
        attr(&html, "<div id=\"health\"", "data-health").as_deref(),
        Some("bad")
    );

    std::fs::remove_file(&tmp).unwrap();
    std::fs::rename(&aside, &tmp).unwrap();
    let (status, _, body) = get(&url).await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
}

// ---- access ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_outside_the_allowed_networks_get_403() {
    let dir = tempfile::tempdir().unwrap();
    let config = crate::common::config_yaml(
        dir.path(),
        &format!(
            "listeners:\n  - address: 127.0.0.1:0\nadmin:\n  socket: {:?}\n",
            dir.path().join("admin.sock").display().to_string()
        ),
    );
    let daemon = mailbridge::daemon::Daemon::start(config).await.unwrap();
    assert_eq!(daemon.http_addr, None, "off by default");
    let stop = tokio_util::sync::CancellationToken::new();
    // The endpoint as a peer outside the allowed networks meets it: the real check is
    // unit-tested (AdminConfig::http_allows); here, that a refusal is a 403 on every page.
    let denied: mailbridge::admin::http::AllowFn = Arc::new(|_| false);
    let server = mailbridge::admin::http::HttpServer::start(
        "127.0.0.1:0".parse().unwrap(),
        denied,
        daemon.control().clone(),
        stop.clone(),
    )
    .await
    .unwrap();
    for path in ["/", "/metrics", "/healthz"] {
        let (status, _, body) = get(&format!("http://{}{path}", server.local_addr())).await;
        assert_eq!(status, 403, "{path}: {body}");
        assert!(body.contains("admin.http_allow_networks"), "{body}");
        assert!(!body.contains("mailbridge_"), "{body}");
    }
    stop.cancel();
    tokio::time::timeout(SHORT, server.wait()).await.unwrap();
    daemon.shutdown().await;
}

// ---- connection limits ----

/// A daemon (no HTTP endpoint of its own) and an endpoint on loopback with `limits`.
async fn endpoint(
    dir: &std::path::Path,
    allow: mailbridge::admin::http::AllowFn,
    limits: mailbridge::admin::http::HttpLimits,
) -> (
    mailbridge::daemon::Daemon,
    mailbridge::admin::http::HttpServer,
    tokio_util::sync::CancellationToken,
) {
    let config = crate::common::config_yaml(
        dir,
        &format!(
            "listeners:\n  - address: 127.0.0.1:0\nadmin:\n  socket: {:?}\n",
            dir.join("admin.sock").display().to_string()
        ),
    );
    let daemon = mailbridge::daemon::Daemon::start(config).await.unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let server = mailbridge::admin::http::HttpServer::start_with_limits(
        "127.0.0.1:0".parse().unwrap(),
        allow,
        daemon.control().clone(),
        stop.clone(),
        limits,
    )
    .await
    .unwrap();
    (daemon, server, stop)
}

/// Reads until the server closes the connection (EOF or reset); panics after `within`.
async fn read_until_closed(c: &mut tokio::net::TcpStream, within: Duration) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let r = tokio::time::timeout(within, async {
        let mut buf = [0u8; 4096];
        loop {
            match c.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        r.is_ok(),
        "the server kept the connection open; got {:?}",
        String::from_utf8_lossy(&got)
    );
    got
}

/// A GET on a new connection (no pooling): the status, or the error.
async fn get_fresh(url: &str) -> Result<u16, reqwest::Error> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    Ok(client.get(url).send().await?.status().as_u16())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_are_closed_at_once_and_a_freed_slot_serves_again() {
    let dir = tempfile::tempdir().unwrap();
    let limits = mailbridge::admin::http::HttpLimits {
        max_connections: 2,
        max_refused_connections: 1,
        // Longer than the test: the idle connections stay until the test closes them.
        header_read_timeout: LONG * 2,
    };
    let (daemon, server, stop) = endpoint(dir.path(), Arc::new(|_| true), limits).await;
    let addr = server.local_addr();
    let url = format!("http://{addr}/healthz");

    // Two idle connections take both slots (accepted in order: the kernel's queue is FIFO).
    // No request comes first: its connection would hold a slot until the server saw it
    // close, and under load that is after the idle ones arrive.
    let idle1 = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut idle2 = tokio::net::TcpStream::connect(addr).await.unwrap();
    // The third is closed at once, without an answer.
    let mut extra = tokio::net::TcpStream::connect(addr).await.unwrap();
    let got = read_until_closed(&mut extra, SHORT).await;
    assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
    // So is a real request while both are held.
    assert!(get_fresh(&url).await.is_err());

    // One idle connection goes away: its slot serves again.
    drop(idle1);
    let deadline = Instant::now() + SHORT;
    loop {
        match get_fresh(&url).await {
            Ok(status) => {
                assert_eq!(status, 200);
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "no slot came free: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The other idle connection was not disturbed: it still gets an answer.
    {
        use tokio::io::AsyncWriteExt;
        idle2
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let got = read_until_closed(&mut idle2, SHORT).await;
        let got = String::from_utf8_lossy(&got);
        assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    }
    stop.cancel();
    tokio::time::timeout(SHORT, server.wait()).await.unwrap();
    daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_no_headers_or_idles_is_closed_after_the_header_timeout() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let limits = mailbridge::admin::http::HttpLimits {
        header_read_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let (daemon, server, stop) = endpoint(dir.path(), Arc::new(|_| true), limits).await;
    let addr = server.local_addr();

    // Nothing at all.
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let started = Instant::now();
    read_until_closed(&mut silent, SHORT).await;
    assert!(started.elapsed() >= Duration::from_millis(250));
    // Half a request (slowloris).
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .await
        .unwrap();
    let got = read_until_closed(&mut slow, SHORT).await;
    assert!(
        !String::from_utf8_lossy(&got).contains("200 OK"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    // A keep-alive connection is answered, then closed once idle.
    let mut kept = tokio::net::TcpStream::connect(addr).await.unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let got = read_until_closed(&mut kept, SHORT).await;
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(got.ends_with("ok\n"), "{got}");

    stop.cancel();
    tokio::time::timeout(SHORT, server.wait()).await.unwrap();
    daemon.shutdown().await;
}

/// A `MakeWriter` target that keeps everything written.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A refused peer's requests are all answered 403 (connection closed after each) and logged
/// once, not once per request; a silent refused peer holds only the refused peers' slots, so
/// allowed peers are still served.
#[tokio::test(flavor = "current_thread")]
async fn a_refused_peer_is_logged_once_not_per_request_and_cannot_take_the_admins_slots() {
    let log = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_ansi(false)
        .with_writer({
            let log = log.clone();
            move || log.clone()
        })
        .finish();
    let capture = tracing::Dispatch::new(subscriber);
    // See auth.rs (c35): a second live dispatcher keeps callsites first reached on other
    // tests' threads from being cached as "never".
    let _second = tracing::Dispatch::new(tracing::subscriber::NoSubscriber::new());
    let _guard = tracing::dispatcher::set_default(&capture);

    let dir = tempfile::tempdir().unwrap();
    let limits = mailbridge::admin::http::HttpLimits {
        max_connections: 2,
        max_refused_connections: 2,
        header_read_timeout: LONG * 2,
    };
    // 127.0.0.1 is refused, 127.0.0.2 is the admin (both loopback: the test's own addresses).
    let allow: mailbridge::admin::http::AllowFn =
        Arc::new(|ip| ip == std::net::IpAddr::from([127, 0, 0, 2]));
    let (daemon, server, stop) = endpoint(dir.path(), allow, limits).await;
    let addr = server.local_addr();
    for i in 0..6 {
        let path = ["/", "/metrics", "/healthz"][i % 3];
        let (status, _, body) = get(&format!("http://{addr}{path}")).await;
        assert_eq!(status, 403, "{path}: {body}");
        assert!(body.contains("admin.http_allow_networks"), "{body}");
    }
    // Silent refused peers fill their own slots; more are closed at once... (A 403'd
    // connection above frees its slot only when the server's task for it ends, which under
    // load can be after the next connections arrive: then the third one below got that slot
    // and stays open. Try again until the two held ones have both slots.)
    let deadline = Instant::now() + LONG;
    let _held = loop {
        let held: Vec<_> = connect_n(addr, 2).await;
        let mut extra = tokio::net::TcpStream::connect(addr).await.unwrap();
        let closed = tokio::time::timeout(Duration::from_secs(1), async {
            use tokio::io::AsyncReadExt;
            let mut buf = [0u8; 64];
            matches!(extra.read(&mut buf).await, Ok(0) | Err(_))
        })
        .await;
        if closed == Ok(true) {
            break held;
        }
        assert!(
            Instant::now() < deadline,
            "a connection beyond the refused peers' cap was kept open"
        );
    };
    // ...and the admin is still served.
    let admin = tokio::net::TcpSocket::new_v4().unwrap();
    admin.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut admin = admin.connect(addr).await.unwrap();
    {
        use tokio::io::AsyncWriteExt;
        admin
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
    }
    let got = read_until_closed(&mut admin, SHORT).await;
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");

    stop.cancel();
    tokio::time::timeout(SHORT, server.wait()).await.unwrap();
    daemon.shutdown().await;
    let log = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    let lines = log
        .lines()
        .filter(|l| l.contains(mailbridge::admin::http::REFUSED_LOG))
        .count();
    assert_eq!(lines, 1, "{log}");
    assert!(log.contains("client=127.0.0.1"), "{log}");
}

async fn connect_n(addr: SocketAddr, n: usize) -> Vec<tokio::net::TcpStream> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    v
}

/// DNS rebinding: a web page whose name now points to 127.0.0.1 must not read the page
/// through the admin's browser (or an SSH tunnel to the port).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loopback_endpoint_refuses_foreign_host_names() {
    let dir = tempfile::tempdir().unwrap();
    let config = crate::common::config_yaml(
        dir.path(),
        &format!(
            "listeners:\n  - address: 127.0.0.1:0\nadmin:\n  socket: {:?}\n",
            dir.path().join("admin.sock").display().to_string()
        ),
    );
    let daemon = mailbridge::daemon::Daemon::start(config).await.unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let server = mailbridge::admin::http::HttpServer::start(
        "127.0.0.1:0".parse().unwrap(),
        Arc::new(|_| true),
        daemon.control().clone(),
        stop.clone(),
    )
    .await
    .unwrap();
    let addr = server.local_addr();
    let client = reqwest::Client::new();
    let status = |host: String, path: &'static str| {
        let req = client
            .get(format!("http://{addr}{path}"))
            .header(reqwest::header::HOST, host);
        async move {
            let r = req.send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    for path in ["/", "/metrics", "/healthz"] {
        let (code, body) = status(format!("evil.example:{}", addr.port()), path).await;
        assert_eq!(code, 403, "{path}: {body}");
        assert!(
            !body.contains("mailbridge_") && !body.contains("<html"),
            "{body}"
        );
    }
    for host in [
        format!("127.0.0.1:{}", addr.port()),
        format!("localhost:{}", addr.port()),
        format!("[::1]:{}", addr.port()),
        "localhost".to_string(),
    ] {
        let (code, body) = status(host.clone(), "/healthz").await;
        assert_eq!(code, 200, "{host}: {body}");
    }
    stop.cancel();
    tokio::time::timeout(SHORT, server.wait()).await.unwrap();
    daemon.shutdown().await;
}

#[test]
fn a_non_loopback_http_address_needs_http_allow_networks() {
    let dir = tempfile::tempdir().unwrap();
    let mut rc = RelayConfig::new(dir.path());
    rc.extra = "admin:\n  http_address: 0.0.0.0:9925\n".into();
    rc.write();
    let done = run_with_timeout(
        mailbridge_cmd()
            .arg("check-config")
            .arg("-c")
            .arg(rc.path()),
        dir.path(),
        "check-config",
        SHORT,
    );
    assert_eq!(done.status.code(), Some(1), "{}", done.stdout);
    let out = format!("{}{}", done.stdout, done.stderr);
    assert!(out.contains("admin.http_allow_networks"), "{out}");

    rc.extra =
        "admin:\n  http_address: 0.0.0.0:9925\n  http_allow_networks: [192.0.2.0/24]\n".into();
    rc.write();
    let done = run_with_timeout(
        mailbridge_cmd()
            .arg("check-config")
            .arg("-c")
            .arg(rc.path()),
        dir.path(),
        "check-config-ok",
        SHORT,
    );
    assert_eq!(
        done.status.code(),
        Some(0),
        "{}{}",
        done.stdout,
        done.stderr
    );
}

// ---- the status page in Chromium ----

const MAILBOX: &str = "relay@contoso.com";
const CLIENT_ID: &str = "11111111-1111-1111-1111-111111111111";

/// A daemon relaying to the fake Exchange, which refuses AUTH with 535 5.7.139 (SMTP AUTH
/// disabled): the upstream pauses and the message stays queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_in_chromium_shows_the_paused_upstream_and_the_queued_message() {
    let Some(browser) = chromium() else { return };
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let token = FakeToken::start(Duration::from_secs(3600)).await;
    let ex = FakeExchange::start(token.issued(), MAILBOX).await;
    ex.write_ca(dir.path());
    ex.add_rule(Rule::reply(
        Stage::Auth,
        "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant.",
    ));
    let secret = dir.path().join("client.secret");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(&secret, "fake-secret-value\n").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let yaml = format!(
        "hostname: relay.test\nstate_dir: {d:?}\nlisteners:\n  - address: 127.0.0.1:0\nspool:\n  path: {s:?}\n\
upstreams:\n  - name: contoso\n    type: exchange-online\n    mailbox: {MAILBOX}\n    tenant_id: contoso.com\n    client_id: {CLIENT_ID}\n    client_secret_file: {secret:?}\n    host: localhost\n    port: {port}\n    token_url: {url:?}\n    ca_file: {ca:?}\n\
queue:\n  retry: [1h]\n  postmaster: postmaster@contoso.com\n\
admin:\n  socket: {sock:?}\n  http_address: 127.0.0.1:0\n",
        d = dir.path().join("state").display().to_string(),
        s = dir.path().join("spool").display().to_string(),
        secret = secret.display().to_string(),
        port = ex.addr().port(),
        url = token.url(),
        ca = dir.path().join("ca.pem").display().to_string(),
        sock = dir.path().join("admin.sock").display().to_string(),
    );
    let config = mailbridge::config::from_yaml_str(&yaml).unwrap();
    let daemon = mailbridge::daemon::Daemon::start(config).await.unwrap();
    let http = daemon.http_addr.expect("http_address is set");
    let r = send(daemon.addrs[0], "paused").await;
    assert_eq!(r.code, 250, "{:?}", r.lines);
    let id = r.queue_id().unwrap();
    let deadline = Instant::now() + LONG;
    // Paused, and the attempt that paused it over (the message no longer `sending`); the
    // next probe is an hour away (queue.retry), so nothing changes while the browser renders.
    loop {
        let s = daemon.control().status().await;
        let list = daemon.control().queue_list().await.unwrap();
        if s.upstreams[0].state == "paused"
            && list.iter().any(|e| e.id == id && e.state == "paused")
        {
            break;
        }
        assert!(Instant::now() < deadline, "the upstream did not pause");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let dom = dump_dom(browser, format!("http://{http}/")).await;
    assert_eq!(
        attr(&dom, "<div id=\"health\"", "data-health").as_deref(),
        Some("bad"),
        "{dom}"
    );
    let row = element(&dom, "<tr data-upstream=\"contoso\"").unwrap_or_else(|| panic!("{dom}"));
    assert!(row.contains("data-state=\"paused\""), "{row}");
    let remedy = element(row, "<div class=\"remedy\"").unwrap_or_else(|| panic!("{row}"));
    assert!(
        remedy.contains(
            "Set-CASMailbox -Identity relay@contoso.com -SmtpClientAuthenticationDisabled $false"
        ),
        "{remedy}"
    );
    assert!(row.contains("smtp_auth_disabled"), "{row}");
    // Never a secret or a token.
    assert!(!dom.contains("fake-secret-value"));
    for t in token.issued().0.lock().unwrap().keys() {
        assert!(!dom.contains(t.as_str()));
    }
    // The queued message in the oldest-messages table, marked as waiting for the paused
    // upstream.
    let oldest = element(&dom, "<table id=\"oldest\"").unwrap_or_else(|| panic!("{dom}"));
    let row = element(oldest, &format!("<tr data-id=\"{id}\""))
        .unwrap_or_else(|| panic!("{id} not in {oldest}"));
    assert!(row.contains("scanner@example.com"), "{row}");
    assert!(row.contains("data-state=\"paused\""), "{row}");
    assert_ne!(
        attr(&dom, "<section id=\"queue\"", "data-messages").as_deref(),
        Some("0")
    );
    // The sender inventory marks this plaintext client.
    let client = element(&dom, "<tr data-tls=\"plaintext\"").unwrap_or_else(|| panic!("{dom}"));
    assert!(
        client.contains("127.0.0.1") && client.contains("scanner@example.com"),
        "{client}"
    );

    // The metrics agree: the token refresher asked once and got a token, the upstream is
    // paused.
    let m = scrape(http).await;
    assert!(
        sample(
            &m,
            "mailbridge_token_requests_total{upstream=\"contoso\",result=\"ok\"}"
        ) >= 1.0,
        "{m}"
    );
    assert_eq!(
        sample(&m, "mailbridge_upstream_paused{upstream=\"contoso\"}"),
        1.0,
        "{m}"
    );
    assert!(sample(&m, "mailbridge_queue_messages") >= 1.0, "{m}");
    let expiry = sample(&m, "mailbridge_token_expiry_seconds{upstream=\"contoso\"}");
    assert!(expiry > 3000.0 && expiry <= 3600.0, "{m}");
    daemon.shutdown().await;
}

/// A model with every kind of row, for the renderer on its own.
pub fn demo_model(now_ms: u64) -> PageModel {
    PageModel {
        now_ms,
        status: StatusReport {
            version: "0.1.0".into(),
            started_ms: now_ms - 3 * 3600 * 1000,
            uptime_s: 3 * 3600 + 720,
            listeners: vec![ListenerStatus {
                address: "0.0.0.0:25".into(),
                tls: "starttls".into(),
                tls_profile: Some("modern".into()),
                require_auth: false,
            }],
            upstreams: vec![
                UpstreamStatus {
                    name: "contoso".into(),
                    kind: "exchange-online".into(),
                    state: "paused".into(),
                    since_ms: Some(now_ms - 25 * 60 * 1000),
                    problem: Some("smtp_auth_disabled".into()),
                    meaning: Some("SMTP AUTH is disabled for the mailbox relay@contoso.com".into()),
                    remedy: Some("Run Set-CASMailbox -Identity relay@contoso.com -SmtpClientAuthenticationDisabled $false, wait up to an hour".into()),
                    reply: Some("535 5.7.139 Authentication unsuccessful".into()),
                    next_probe_ms: Some(now_ms + 4 * 60 * 1000),
                    token: Some(TokenStatus {
                        expires_ms: Some(now_ms + 52 * 60 * 1000),
                        last_error: None,
                        last_error_ms: None,
                    }),
                    connections_in_use: Some(0),
                    connections_max: Some(3),
                    messages_this_minute: Some(0),
                    messages_per_minute: Some(30),
                    recipients_day: Some(412),
                    recipients_per_day: Some(10000),
                },
                UpstreamStatus {
                    name: "fabrikam".into(),
                    kind: "exchange-online".into(),
                    state: "ok".into(),
                    ..Default::default()
                },
            ],
            queue: QueueSummary {
                messages: 2,
                deferred: 1,
                held: 0,
                failed: 0,
                oldest_age_s: Some(25 * 60),
            },
            attention: vec![],
        },
        health: Ok(()),
        oldest: Ok(vec![
            QueueEntry {
                id: "0193a1b2c3d4e5f6".into(),
                arrival_ms: now_ms - 25 * 60 * 1000,
                size: 48213,
                sender: "scanner@contoso.com".into(),
                recipients_total: 2,
                recipients_pending: 2,
                state: "paused".into(),
                attempts: 3,
                next_attempt_ms: Some(now_ms + 4 * 60 * 1000),
                upstream: Some("contoso".into()),
                last_problem: Some("smtp_auth_disabled".into()),
            },
            QueueEntry {
                id: "0193a1b2c3d4e5f7".into(),
                arrival_ms: now_ms - 60 * 1000,
                size: 1210,
                sender: String::new(),
                recipients_total: 1,
                recipients_pending: 1,
                state: "queued".into(),
                ..Default::default()
            },
        ]),
        recent: vec![DeliveryRecord {
            at_ms: now_ms - 90 * 1000,
            queue_id: "0193a1b2c3d4e5f0".into(),
            sender: "erp@contoso.com".into(),
            recipient: "accounts@fabrikam.com".into(),
            upstream: "fabrikam".into(),
            verdict: "delivered".into(),
            code: Some(250),
            enhanced: Some("2.0.0".into()),
            reply: "OK <queued>".into(),
            problem: None,
            attempt: 1,
        }],
        senders: vec![
            SenderRecord {
                ip: "192.168.10.21".into(),
                helo: "<script>alert('helo')</script>".into(),
                senders: vec!["scanner@contoso.com".into()],
                messages: 120,
                first_seen_ms: now_ms - 86_400_000,
                last_seen_ms: now_ms - 60_000,
                ..Default::default()
            },
            SenderRecord {
                ip: "192.168.10.40".into(),
                helo: "mfp-2nd-floor".into(),
                tls_version: Some("TLSv1".into()),
                tls_cipher: Some("ECDHE-RSA-AES128-SHA".into()),
                senders: vec!["mfp@contoso.com".into()],
                messages: 7,
                first_seen_ms: now_ms - 86_400_000,
                last_seen_ms: now_ms - 3_600_000,
                ..Default::default()
            },
            SenderRecord {
                ip: "10.0.0.5".into(),
                helo: "erp.contoso.com".into(),
                auth_user: Some("erp".into()),
                auth_mechanism: Some("PLAIN".into()),
                tls_version: Some("TLSv1.3".into()),
                tls_cipher: Some("TLS_AES_256_GCM_SHA384".into()),
                senders: vec!["erp@contoso.com".into()],
                messages: 3000,
                first_seen_ms: now_ms - 86_400_000,
                last_seen_ms: now_ms - 90_000,
            },
        ],
    }
}

/// Serves `html` at `/` on loopback until the returned token is cancelled.
async fn serve_html(html: String) -> (SocketAddr, tokio_util::sync::CancellationToken) {
    let app = axum::Router::new().route(
        "/",
        axum::routing::get(move || {
            let html = html.clone();
            async move { axum::response::Html(html) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { s.cancelled().await })
            .await
            .unwrap();
    });
    (addr, stop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_renderer_in_chromium_marks_paused_upstreams_queue_and_insecure_senders() {
    let Some(browser) = chromium() else { return };
    let model = demo_model(mailbridge::spool::now_ms());
    let (addr, stop) = serve_html(page::render(&model)).await;
    let dom = dump_dom(browser, format!("http://{addr}/")).await;
    stop.cancel();

    assert_eq!(
        attr(&dom, "<div id=\"health\"", "data-health").as_deref(),
        Some("bad")
    );
    let paused = element(&dom, "<tr data-upstream=\"contoso\"").unwrap_or_else(|| panic!("{dom}"));
    assert!(paused.contains("data-state=\"paused\""));
    assert!(
        element(paused, "<div class=\"remedy\"")
            .unwrap()
            .contains("Set-CASMailbox -Identity relay@contoso.com")
    );
    let ok = element(&dom, "<tr data-upstream=\"fabrikam\"").unwrap();
    assert!(ok.contains("data-state=\"ok\""));
    assert_eq!(
        attr(&dom, "<section id=\"queue\"", "data-messages").as_deref(),
        Some("2")
    );
    let row = element(&dom, "<tr data-id=\"0193a1b2c3d4e5f6\"").unwrap_or_else(|| panic!("{dom}"));
    assert!(row.contains("scanner@contoso.com") && row.contains("smtp_auth_disabled"));
    // The null sender shows as <>.
    assert!(
        element(&dom, "<tr data-id=\"0193a1b2c3d4e5f7\"")
            .unwrap()
            .contains("&lt;&gt;")
    );
    assert!(element(&dom, "<tr data-verdict=\"delivered\"").is_some());
    // The plaintext client and the TLS 1.0 one are marked; TLS 1.3 is not.
    let plain = element(&dom, "<tr data-tls=\"plaintext\"").unwrap();
    assert!(plain.contains("192.168.10.21") && plain.contains("insecure"));
    let legacy = element(&dom, "<tr data-tls=\"legacy\"").unwrap();
    assert!(legacy.contains("192.168.10.40"));
    let fine = element(&dom, "<tr data-tls=\"ok\"").unwrap();
    assert!(fine.contains("10.0.0.5") && !fine.contains("insecure"));
    // The HELO's markup stayed text: the browser built no script element from it.
    assert!(!dom.contains("<script"), "{dom}");
    assert!(plain.contains("&lt;script&gt;"), "{plain}");
    // It reloads itself and loads nothing from elsewhere.
    assert!(dom.contains("<meta http-equiv=\"refresh\" content=\"10\">"));
    assert!(!dom.contains("src=\"http") && !dom.contains("href=\"http"));
}
