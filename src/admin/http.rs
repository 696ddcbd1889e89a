//! The HTTP endpoint on `admin.http_address` (off by default): `/metrics` (Prometheus),
//! `/healthz` and the status page `/` ([`super::page`]). Served by axum; read-only.
//!
//! Peers outside loopback and `admin.http_allow_networks` are recognised when their connection
//! is accepted: they get 403 and the connection closes (logged once a minute per peer). The
//! connections are bounded ([`HttpLimits`]: a cap for allowed peers, a small separate one for
//! refused peers, a header-read and keep-alive idle timeout), so the endpoint cannot use up
//! the file descriptors the SMTP listeners need. Nothing here blocks the runtime: the spool check runs on a blocking thread under a timeout, and a check that hangs
//! (a dead disk) is not started again until it has returned.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::page::{self, PageModel};
use crate::ops::control::Control;
use crate::spool::now_ms;

/// How long the spool check may take before `/healthz` says the spool hangs.
pub const SPOOL_PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// A successful spool check is reused for this long: a busy status page or monitoring does
/// not add an fsync per request to the spool's disk.
pub const SPOOL_PROBE_REUSE: Duration = Duration::from_secs(5);

/// How long open HTTP connections get to finish at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// The log line for connections from refused peers (at most one per peer per minute).
pub const REFUSED_LOG: &str = "HTTP connection from a client outside loopback and admin.http_allow_networks refused with 403 (logged at most once a minute per client)";

/// How often a refused peer, or the connection limit, is logged at most.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// Refused peers remembered for the log's rate limit; beyond them, one line a minute counts
/// the connections of all the others.
const REFUSED_PEERS_TRACKED: usize = 256;

/// Who may use the endpoint (loopback and `admin.http_allow_networks`).
pub type AllowFn = Arc<dyn Fn(IpAddr) -> bool + Send + Sync>;

/// Bounds on the endpoint's connections: the HTTP endpoint must never take the file
/// descriptors the SMTP listeners need.
#[derive(Clone, Debug)]
pub struct HttpLimits {
    /// Connections from allowed peers open at once; a new one beyond it is closed at once.
    pub max_connections: usize,
    /// Connections from refused peers open at once (each gets a 403, then is closed); a new
    /// one beyond it is closed at once.
    pub max_refused_connections: usize,
    /// How long a connection may take to send a request's headers; also how long a
    /// keep-alive connection may sit idle between requests.
    pub header_read_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_connections: 32,
            max_refused_connections: 4,
            header_read_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Clone)]
struct AppState {
    control: Arc<Control>,
    probe: Arc<SpoolProbe>,
    /// Bound to a loopback address: only `Host` addresses and `localhost` are served.
    loopback: bool,
}

/// A running endpoint.
pub struct HttpServer {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl HttpServer {
    /// Binds `addr` and serves until `stop` is cancelled. A bind error is a start-up error.
    pub async fn start(
        addr: SocketAddr,
        allow: AllowFn,
        control: Arc<Control>,
        stop: CancellationToken,
    ) -> anyhow::Result<HttpServer> {
        Self::start_with_limits(addr, allow, control, stop, HttpLimits::default()).await
    }

    /// [`HttpServer::start`] with other connection limits (tests).
    pub async fn start_with_limits(
        addr: SocketAddr,
        allow: AllowFn,
        control: Arc<Control>,
        stop: CancellationToken,
        limits: HttpLimits,
    ) -> anyhow::Result<HttpServer> {
        use anyhow::Context;
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
            format!("admin.http_address: cannot listen on {addr} (in use by another program?)")
        })?;
        let addr = listener.local_addr()?;
        let state = AppState {
            probe: Arc::new(SpoolProbe::new(control.spool.root().to_path_buf())),
            control,
            loopback: addr.ip().is_loopback(),
        };
        let app = router(state);
        let task = tokio::spawn(accept_loop(listener, app, allow, limits, stop));
        tracing::info!(address = %addr, "HTTP endpoint listening (/metrics, /healthz, status page /)");
        Ok(HttpServer { addr, task })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Waits until the server has stopped (after `stop` was cancelled).
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// Accepts connections until `stop`; checks the peer at once. Allowed peers and refused
/// ones each have their own cap, so refused peers cannot crowd out the admin.
async fn accept_loop(
    listener: tokio::net::TcpListener,
    app: Router,
    allow: AllowFn,
    limits: HttpLimits,
    stop: CancellationToken,
) {
    let conns = TaskTracker::new();
    let allowed_slots = Arc::new(Semaphore::new(limits.max_connections));
    let refused_slots = Arc::new(Semaphore::new(limits.max_refused_connections));
    let mut refusals = RefusalLog::default();
    let mut full_log = Every::default();
    let mut accept_error_log = Every::default();
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok(v) => v,
                Err(e) => {
                    // Out of file descriptors, most likely: wait rather than spin.
                    if let Some(more) = accept_error_log.due(Instant::now()) {
                        tracing::warn!(error = %e, more, "HTTP endpoint cannot accept connections");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            }
        };
        let now = Instant::now();
        if allow(peer.ip()) {
            let Ok(permit) = allowed_slots.clone().try_acquire_owned() else {
                drop(stream);
                if let Some(more) = full_log.due(now) {
                    tracing::warn!(
                        client = %peer.ip(),
                        limit = limits.max_connections,
                        more,
                        "HTTP connection closed at once: the endpoint has its limit of connections open (logged at most once a minute)"
                    );
                }
                continue;
            };
            let svc = TowerToHyperService::new(app.clone());
            conns.spawn(serve_conn(
                stream,
                svc,
                true,
                limits.clone(),
                stop.clone(),
                permit,
            ));
        } else {
            match refusals.note(peer.ip(), now) {
                Note::Quiet => {}
                Note::Peer { suppressed } => {
                    tracing::warn!(client = %peer.ip(), suppressed, "{REFUSED_LOG}");
                }
                Note::Others { connections } => {
                    tracing::warn!(
                        connections,
                        "HTTP connections from many more clients outside loopback and admin.http_allow_networks refused with 403 (logged at most once a minute)"
                    );
                }
            }
            let Ok(permit) = refused_slots.clone().try_acquire_owned() else {
                drop(stream);
                continue;
            };
            let svc = hyper::service::service_fn(|_req: hyper::Request<Incoming>| async {
                Ok::<_, Infallible>(forbidden())
            });
            conns.spawn(serve_conn(
                stream,
                svc,
                false,
                limits.clone(),
                stop.clone(),
                permit,
            ));
        }
    }
    conns.close();
    // Keep-alive connections (a browser tab) get a moment to finish.
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, conns.wait()).await;
}

/// Serves one connection (HTTP/1.1) under the header-read timeout, holding its slot.
async fn serve_conn<S>(
    stream: TcpStream,
    svc: S,
    keep_alive: bool,
    limits: HttpLimits,
    stop: CancellationToken,
    _slot: OwnedSemaphorePermit,
) where
    S: hyper::service::Service<hyper::Request<Incoming>, Response = Response<Body>>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(keep_alive)
        .serve_connection(TokioIo::new(stream), svc);
    let mut conn = std::pin::pin!(conn);
    let r = tokio::select! {
        r = conn.as_mut() => r,
        _ = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            match tokio::time::timeout(SHUTDOWN_GRACE, conn.as_mut()).await {
                Ok(r) => r,
                Err(_) => return,
            }
        }
    };
    if let Err(e) = r {
        // A client that sent nothing in time, or went away: nothing the admin must act on.
        tracing::debug!(error = %e, "HTTP connection ended");
    }
}

/// The answer to every request of a refused peer; the connection closes after it.
fn forbidden() -> Response {
    (
        StatusCode::FORBIDDEN,
        [
            (header::CONNECTION, "close"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        "forbidden: this address is not in admin.http_allow_networks\n",
    )
        .into_response()
}

/// At most one event a minute; counts the ones in between.
#[derive(Default)]
struct Every {
    last: Option<Instant>,
    skipped: u64,
}

impl Every {
    /// `Some(events skipped since the last one)` when this one is to be logged.
    fn due(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(at) if now.saturating_duration_since(at) < LOG_EVERY => {
                self.skipped += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.skipped))
            }
        }
    }
}

/// What to log for a refused connection.
#[derive(Debug, PartialEq, Eq)]
enum Note {
    Quiet,
    /// A line for this peer; `suppressed` connections from it went unlogged since its last.
    Peer {
        suppressed: u64,
    },
    /// Too many peers to track: a line counting the others' connections since the last.
    Others {
        connections: u64,
    },
}

/// The rate limit of the refused-peer log: one line per peer per minute, for a bounded
/// number of peers; all others share one line a minute.
#[derive(Default)]
struct RefusalLog {
    peers: HashMap<IpAddr, Every>,
    others: Every,
}

impl RefusalLog {
    fn note(&mut self, ip: IpAddr, now: Instant) -> Note {
        if !self.peers.contains_key(&ip) && self.peers.len() >= REFUSED_PEERS_TRACKED {
            // Peers not seen for a minute would be logged again anyway.
            self.peers.retain(|_, e| {
                e.last
                    .is_some_and(|at| now.saturating_duration_since(at) < LOG_EVERY)
            });
        }
        if !self.peers.contains_key(&ip) && self.peers.len() >= REFUSED_PEERS_TRACKED {
            return match self.others.due(now) {
                Some(skipped) => Note::Others {
                    connections: skipped + 1,
                },
                None => Note::Quiet,
            };
        }
        match self.peers.entry(ip).or_default().due(now) {
            Some(suppressed) => Note::Peer { suppressed },
            None => Note::Quiet,
        }
    }
}

fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(status_page))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

/// For a loopback endpoint, 403 to foreign `Host` names; security headers on every answer.
/// (Peers outside loopback and `admin.http_allow_networks` never get here: they are
/// answered 403 at accept time.)
async fn guard(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if state.loopback && !loopback_host(req.headers()) {
        tracing::warn!(path = %req.uri().path(), "HTTP request with a Host name that is not loopback refused (a web page using DNS rebinding?)");
        return (
            StatusCode::FORBIDDEN,
            [(header::CACHE_CONTROL, "no-store")],
            "forbidden: this endpoint listens on loopback; open it as http://127.0.0.1:PORT/ or http://localhost:PORT/\n",
        )
            .into_response();
    }
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    h.insert(header::CACHE_CONTROL, "no-store".parse().expect("valid"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        "nosniff".parse().expect("valid"),
    );
    res
}

/// Whether the request's `Host` is an address (`127.0.0.1`, `[::1]`) or `localhost`, or is
/// absent. A browser that reached a loopback endpoint under another name was sent there by
/// DNS rebinding: a web page would read the status page through the admin's browser (or an
/// SSH tunnel to this port).
fn loopback_host(headers: &axum::http::HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST) else {
        return true;
    };
    let Ok(host) = host.to_str() else {
        return false;
    };
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    // An address (a port forwarded to it) cannot be rebound; only names can.
    name.parse::<IpAddr>().is_ok() || name == "localhost" || name.ends_with(".localhost")
}

async fn metrics(State(state): State<AppState>) -> Response {
    let status = state.control.status().await;
    let body = state.control.ops.metrics.render(&status, now_ms());
    (
        [(header::CONTENT_TYPE, crate::ops::metrics::CONTENT_TYPE)],
        body,
    )
        .into_response()
}

/// The daemon's health: its own checks (listeners, scheduler), then the spool.
async fn health(state: &AppState) -> Result<(), String> {
    (state.control.health)()?;
    state.probe.check().await
}

async fn healthz(State(state): State<AppState>) -> Response {
    let (code, body) = match health(&state).await {
        Ok(()) => (StatusCode::OK, "ok\n".to_string()),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
    };
    (
        code,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

async fn status_page(State(state): State<AppState>) -> Response {
    let c = &state.control;
    let status = c.status().await;
    let oldest = c.queue_oldest(page::OLDEST_MAX).await;
    let model = PageModel {
        now_ms: now_ms(),
        health: health(&state).await,
        status,
        oldest,
        recent: c.ops.recent(),
        senders: c.ops.senders.list(),
    };
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; style-src 'unsafe-inline'",
            ),
        ],
        page::render(&model),
    )
        .into_response()
}

/// Writes, fsyncs and removes a small file in the spool's `tmp/`: the steps a message
/// takes before its `250`.
struct SpoolProbe {
    root: PathBuf,
    /// A probe is still running (possibly hung in the kernel).
    running: Arc<AtomicBool>,
    /// One probe at a time; when the last one succeeded.
    one: tokio::sync::Mutex<Option<tokio::time::Instant>>,
}

impl SpoolProbe {
    fn new(root: PathBuf) -> SpoolProbe {
        SpoolProbe {
            root,
            running: Arc::new(AtomicBool::new(false)),
            one: tokio::sync::Mutex::new(None),
        }
    }

    async fn check(&self) -> Result<(), String> {
        let mut last_ok = self.one.lock().await;
        if last_ok.is_some_and(|at| at.elapsed() < SPOOL_PROBE_REUSE) {
            return Ok(());
        }
        if self.running.load(Ordering::Acquire) {
            return Err(format!(
                "the spool at {} does not answer: an earlier write and fsync has not returned (disk or network file system hanging?)",
                self.root.display()
            ));
        }
        self.running.store(true, Ordering::Release);
        let running = self.running.clone();
        let root = self.root.clone();
        let task = tokio::task::spawn_blocking(move || {
            let r = probe(&root);
            running.store(false, Ordering::Release);
            r
        });
        let started = tokio::time::Instant::now();
        *last_ok = None;
        match tokio::time::timeout(SPOOL_PROBE_TIMEOUT, task).await {
            Ok(Ok(r)) => {
                if r.is_ok() {
                    *last_ok = Some(started);
                }
                r
            }
            Ok(Err(e)) => Err(format!("the spool check failed: {e}")),
            Err(_) => Err(format!(
                "the spool at {} did not complete a write and fsync within {} s (disk or network file system hanging?)",
                self.root.display(),
                SPOOL_PROBE_TIMEOUT.as_secs()
            )),
        }
    }
}

fn probe(root: &std::path::Path) -> Result<(), String> {
    use std::io::Write;
    let tmp = root.join("tmp");
    let path = tmp.join(format!("healthz-{}.probe", std::process::id()));
    let r = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        f.write_all(b"mailbridge health probe\n")?;
        f.sync_all()?;
        drop(f);
        std::fs::remove_file(&path)
    })();
    r.map_err(|e| {
        let _ = std::fs::remove_file(&path);
        format!(
            "the spool at {} is not writable: writing and fsyncing {} failed: {e} (check the file system, its free space and the spool's ownership and mode)",
            root.display(),
            path.display()
        )
    })?;
    match rustix::fs::statvfs(root) {
        Ok(s) if s.f_bavail.saturating_mul(s.f_frsize) < 64 * 1024 => Err(format!(
            "the spool's file system at {} is full: new mail is refused with 452",
            root.display()
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_fails_when_the_spool_tmp_is_not_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("tmp")).unwrap();
        assert_eq!(probe(dir.path()), Ok(()));
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
        std::fs::remove_dir(dir.path().join("tmp")).unwrap();
        std::fs::write(dir.path().join("tmp"), b"").unwrap();
        let e = probe(dir.path()).unwrap_err();
        assert!(e.contains("is not writable"), "{e}");
    }

    #[test]
    fn a_refused_peer_is_logged_once_a_minute_with_the_count_in_between() {
        let mut log = RefusalLog::default();
        let t0 = Instant::now();
        let a: IpAddr = "192.0.2.7".parse().unwrap();
        let b: IpAddr = "192.0.2.8".parse().unwrap();
        assert_eq!(log.note(a, t0), Note::Peer { suppressed: 0 });
        for i in 1..=5 {
            assert_eq!(log.note(a, t0 + Duration::from_secs(i)), Note::Quiet);
        }
        // Another peer has its own line.
        assert_eq!(
            log.note(b, t0 + Duration::from_secs(2)),
            Note::Peer { suppressed: 0 }
        );
        assert_eq!(log.note(a, t0 + Duration::from_secs(59)), Note::Quiet);
        assert_eq!(
            log.note(a, t0 + Duration::from_secs(60)),
            Note::Peer { suppressed: 6 }
        );
        assert_eq!(log.note(a, t0 + Duration::from_secs(61)), Note::Quiet);
    }

    #[test]
    fn the_refused_peer_log_is_bounded_and_counts_the_others_in_one_line_a_minute() {
        let mut log = RefusalLog::default();
        let t0 = Instant::now();
        let peer = |i: usize| IpAddr::from([10, 0, (i / 256) as u8, (i % 256) as u8]);
        for i in 0..REFUSED_PEERS_TRACKED {
            assert_eq!(log.note(peer(i), t0), Note::Peer { suppressed: 0 });
        }
        let extra = REFUSED_PEERS_TRACKED;
        assert_eq!(log.note(peer(extra), t0), Note::Others { connections: 1 });
        for i in 1..=100 {
            assert_eq!(log.note(peer(extra + i), t0), Note::Quiet);
        }
        assert_eq!(log.peers.len(), REFUSED_PEERS_TRACKED);
        // After a minute the old entries make room.
        let later = t0 + LOG_EVERY;
        assert_eq!(
            log.note(peer(extra + 1), later),
            Note::Peer { suppressed: 0 }
        );
        assert!(log.peers.len() <= REFUSED_PEERS_TRACKED);
        assert_eq!(
            log.note(peer(5), later + Duration::from_secs(1)),
            Note::Peer { suppressed: 0 }
        );
    }

    #[test]
    fn only_loopback_and_listed_networks_are_allowed() {
        let mut admin = crate::config::AdminConfig::default();
        assert!(admin.http_allows("127.0.0.1".parse().unwrap()));
        assert!(admin.http_allows("::1".parse().unwrap()));
        assert!(admin.http_allows("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!admin.http_allows("192.0.2.7".parse().unwrap()));
        admin.http_allow_networks = vec!["192.0.2.0/24".parse().unwrap()];
        assert!(admin.http_allows("192.0.2.7".parse().unwrap()));
        assert!(!admin.http_allows("198.51.100.1".parse().unwrap()));
    }
}
