//! The HTTP endpoint on `admin.http_address` (off by default): `/metrics` (Prometheus),
//! `/healthz` and the status page `/` ([`super::page`]). Served by axum; read-only.
//!
//! Peers outside loopback and `admin.http_allow_networks` get 403. Nothing here blocks the
//! runtime: the spool check runs on a blocking thread under a timeout, and a check that hangs
//! (a dead disk) is not started again until it has returned.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio_util::sync::CancellationToken;

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

/// Who may use the endpoint (loopback and `admin.http_allow_networks`).
pub type AllowFn = Arc<dyn Fn(IpAddr) -> bool + Send + Sync>;

#[derive(Clone)]
struct AppState {
    control: Arc<Control>,
    allow: AllowFn,
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
        use anyhow::Context;
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
            format!("admin.http_address: cannot listen on {addr} (in use by another program?)")
        })?;
        let addr = listener.local_addr()?;
        let state = AppState {
            probe: Arc::new(SpoolProbe::new(control.spool.root().to_path_buf())),
            control,
            allow,
            loopback: addr.ip().is_loopback(),
        };
        let app = router(state);
        let graceful = stop.clone();
        let task = tokio::spawn(async move {
            let serve = axum::serve(
                listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(async move { graceful.cancelled().await });
            // Keep-alive connections (a browser tab) may hold a graceful shutdown open.
            let mut serve = std::pin::pin!(serve.into_future());
            tokio::select! {
                r = &mut serve => {
                    if let Err(e) = r {
                        tracing::error!(error = %e, "HTTP endpoint stopped");
                    }
                }
                _ = async { stop.cancelled().await; tokio::time::sleep(SHUTDOWN_GRACE).await } => {}
            }
        });
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

fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(status_page))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

/// 403 for peers outside loopback and `admin.http_allow_networks`.
async fn guard(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    if !(state.allow)(peer.ip()) {
        tracing::warn!(client = %peer.ip(), path = %req.uri().path(), "HTTP request from a client outside loopback and admin.http_allow_networks refused");
        return (
            StatusCode::FORBIDDEN,
            "forbidden: this address is not in admin.http_allow_networks\n",
        )
            .into_response();
    }
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
