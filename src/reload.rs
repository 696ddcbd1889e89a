//! Live reload (issue 9 §5): SIGHUP and `mailbridge reload` re-read the configuration file
//! the daemon was started with, and the certificates, validate them the way start-up does
//! (the config, the LAN TLS certificate, upstream `ca_file`s, secret files), and swap them
//! in through arc-swap:
//! - each listener's [`SessionCtx`] (users, access, limits, TLS profiles and certificate):
//!   a new connection takes the current one, a running session keeps the one it started
//!   with;
//! - the delivery [`Routing`] (upstreams, routes, queue settings): an attempt keeps the
//!   snapshot it started with.
//!
//! An upstream whose settings are unchanged keeps its object (pause state, connections,
//! counters, token). A changed one is rebuilt; a removed or replaced one stops its background
//! tasks once no attempt uses it any more. A message pinned to a removed upstream goes
//! through the routes (see `Delivery`). An invalid configuration changes nothing: every
//! error is logged and returned. Changes that need a restart are logged as such and the
//! running values stay (see [`crate::config::diff`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::config::{Config, TlsMode, UpstreamKind, diff};
use crate::delivery::{Delivery, Router, Routing};
use crate::inbound::SessionCtx;
use crate::upstream::exchange::{Alert, Mailbox};
use crate::upstream::{Upstream, outbox::Outbox};

/// A token refresher shared by the upstreams with the same credentials: cancelled when the
/// last upstream holding it is gone.
#[derive(Clone)]
struct SharedRefresher {
    /// Token URL, client id and scope: upstreams built together share one refresher per key
    /// (the first one's secret and `ca_file` apply).
    key: (String, String, String),
    /// [`diff::credentials_fingerprint`] of the upstream that created it: a reload reuses
    /// it only for the very same credentials.
    fingerprint: [u8; 32],
    handle: crate::token::TokenHandle,
    _stop: Arc<DropGuard>,
}

/// A sending mailbox's connections and limits, shared by the upstreams sending as it.
#[derive(Clone)]
struct SharedMailbox {
    /// Host, port and mailbox (lower case).
    key: (String, u16, String),
    /// The `limits` it was built with.
    limits: String,
    mailbox: Arc<Mailbox>,
    /// The upstream that created it (for the log).
    first: String,
}

/// One running upstream and what it was built from.
pub struct UpstreamEntry {
    name: String,
    fingerprint: [u8; 32],
    upstream: Arc<dyn Upstream>,
    /// The upstream's own background tasks (idle-connection reaper).
    stop: CancellationToken,
    refresher: Option<SharedRefresher>,
    mailbox: Option<SharedMailbox>,
}

/// What upstreams are built with.
pub struct UpstreamDeps {
    /// Parent of every upstream's and refresher's own token; cancelled last at shutdown.
    pub background: CancellationToken,
    /// Cancelled when the queue stops.
    pub draining: CancellationToken,
    pub alerts: UnboundedSender<Alert>,
    /// Token refreshers count their requests in its metrics.
    pub ops: Arc<crate::ops::Ops>,
}

/// Builds the upstreams of `config`, reusing from `previous` every upstream whose settings
/// are unchanged (same object), and the token refreshers and mailboxes that still fit.
/// Every error is returned (each starting with the upstream's name); on error, whatever was
/// newly started is stopped again.
pub fn build_upstreams(
    config: &Config,
    previous: &[UpstreamEntry],
    deps: &UpstreamDeps,
) -> Result<Vec<UpstreamEntry>, Vec<String>> {
    let mut out: Vec<UpstreamEntry> = Vec::new();
    let mut errors = Vec::new();
    for up in &config.upstreams {
        let fingerprint = diff::upstream_fingerprint(up, &config.queue.retry);
        if let Some(old) = previous
            .iter()
            .find(|e| e.name == up.name && e.fingerprint == fingerprint)
        {
            out.push(UpstreamEntry {
                name: old.name.clone(),
                fingerprint,
                upstream: old.upstream.clone(),
                stop: old.stop.clone(),
                refresher: old.refresher.clone(),
                mailbox: old.mailbox.clone(),
            });
            continue;
        }
        match build_one(config, up, fingerprint, &out, previous, deps) {
            Ok(e) => out.push(e),
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        discard_new(out, previous);
        Err(errors)
    }
}

/// Stops the upstreams in `built` that are not in `previous` (a reload that failed).
fn discard_new(built: Vec<UpstreamEntry>, previous: &[UpstreamEntry]) {
    for e in built {
        if !previous
            .iter()
            .any(|p| Arc::ptr_eq(&p.upstream, &e.upstream))
        {
            e.stop.cancel();
        }
    }
}

fn build_one(
    config: &Config,
    up: &crate::config::UpstreamConfig,
    fingerprint: [u8; 32],
    built: &[UpstreamEntry],
    previous: &[UpstreamEntry],
    deps: &UpstreamDeps,
) -> Result<UpstreamEntry, String> {
    let stop = deps.background.child_token();
    match &up.kind {
        UpstreamKind::Outbox { path } => {
            let o = Outbox::new(&up.name, path).map_err(|e| {
                format!(
                    "upstream {}: cannot create outbox directory {}: {e}",
                    up.name,
                    path.display()
                )
            })?;
            Ok(UpstreamEntry {
                name: up.name.clone(),
                fingerprint,
                upstream: Arc::new(o),
                stop,
                refresher: None,
                mailbox: None,
            })
        }
        UpstreamKind::ExchangeOnline(x) => {
            let c = &x.credentials;
            let creds_fp = diff::credentials_fingerprint(c, x.ca_file.as_deref());
            let key = (c.token_url.clone(), c.client_id.clone(), c.scope.clone());
            let shared = built
                .iter()
                .filter_map(|e| e.refresher.as_ref())
                .find(|r| r.key == key)
                .or_else(|| {
                    previous
                        .iter()
                        .filter_map(|e| e.refresher.as_ref())
                        .find(|r| r.fingerprint == creds_fp)
                });
            let refresher = match shared {
                Some(r) => r.clone(),
                None => {
                    let ca = match &x.ca_file {
                        Some(f) => Some(std::fs::read(f).map_err(|e| {
                            format!(
                                "upstream {}: cannot read ca_file {}: {e}",
                                up.name,
                                f.display()
                            )
                        })?),
                        None => None,
                    };
                    let http = crate::token::http_client_with_roots(ca.as_deref())
                        .map_err(|e| format!("upstream {}: {e}", up.name))?;
                    let token = deps.background.child_token();
                    // `mailbridge_token_requests_total{upstream}`: the upstreams of this
                    // configuration that share the refresher.
                    let served: Vec<&str> = config
                        .upstreams
                        .iter()
                        .filter(|u| match &u.kind {
                            UpstreamKind::ExchangeOnline(o) => {
                                let oc = &o.credentials;
                                (&oc.token_url, &oc.client_id, &oc.scope)
                                    == (&c.token_url, &c.client_id, &c.scope)
                            }
                            _ => false,
                        })
                        .map(|u| u.name.as_str())
                        .collect();
                    let (ok, error) = deps.ops.metrics.token_request_counters(&served.join(","));
                    let hook: crate::token::RequestHook = Arc::new(move |good| {
                        if good {
                            ok.inc();
                        } else {
                            error.inc();
                        }
                    });
                    let handle = crate::token::Refresher::spawn_observed(
                        http,
                        c.clone(),
                        token.clone(),
                        hook,
                    );
                    SharedRefresher {
                        key,
                        fingerprint: creds_fp,
                        handle,
                        _stop: Arc::new(token.drop_guard()),
                    }
                }
            };
            // Exchange limits connections, rate and recipients per mailbox: upstreams that
            // send as the same mailbox on the same server share them (the first one's
            // `limits` and counter file apply).
            let key = (
                x.host.to_ascii_lowercase(),
                x.port,
                x.mailbox.to_ascii_lowercase(),
            );
            let limits = format!("{:?}", x.limits);
            let mailbox = if let Some(m) = built
                .iter()
                .filter_map(|e| e.mailbox.as_ref())
                .find(|m| m.key == key)
            {
                tracing::info!(upstream = %up.name, shares_with = %m.first, mailbox = %x.mailbox, "upstream sends as the same mailbox as another one: they share its connection and rate limits");
                m.clone()
            } else if let Some(m) = previous
                .iter()
                .filter_map(|e| e.mailbox.as_ref())
                .find(|m| m.key == key && m.limits == limits)
            {
                // Same mailbox, same limits: keep its connections and counters.
                SharedMailbox {
                    first: up.name.clone(),
                    ..m.clone()
                }
            } else if let Some(m) = previous
                .iter()
                .filter_map(|e| e.mailbox.as_ref())
                .find(|m| m.key == key)
            {
                // Same mailbox, new limits: new caps, but the same rolling recipient count
                // (one counter and one file, also while attempts finish on the old one).
                SharedMailbox {
                    key,
                    limits,
                    mailbox: Mailbox::with_counter_of(&x.limits, &m.mailbox),
                    first: up.name.clone(),
                }
            } else {
                let counter = config
                    .state_dir
                    .join("upstreams")
                    .join(format!("{}.recipients.json", up.name));
                SharedMailbox {
                    key,
                    limits,
                    mailbox: Mailbox::new(&x.limits, counter),
                    first: up.name.clone(),
                }
            };
            let ex = crate::upstream::exchange::Exchange::start(
                &up.name,
                (**x).clone(),
                refresher.handle.clone(),
                mailbox.mailbox.clone(),
                config.queue.retry.clone(),
                Some(deps.alerts.clone()),
                stop.clone(),
                deps.draining.clone(),
            )
            .map_err(|e| format!("upstream {}: {e}", up.name))?;
            tracing::info!(
                upstream = %up.name,
                host = %x.host,
                port = x.port,
                mailbox = %x.mailbox,
                client_id = %c.client_id,
                credential = %x.credential_source,
                connections = x.limits.connections,
                messages_per_minute = x.limits.messages_per_minute,
                recipients_per_day = x.limits.recipients_per_day,
                "Exchange Online upstream ready"
            );
            Ok(UpstreamEntry {
                name: up.name.clone(),
                fingerprint,
                upstream: ex,
                stop,
                refresher: Some(refresher),
                mailbox: Some(mailbox),
            })
        }
    }
}

/// The delivery routing for `config` over `entries` (in configuration order).
pub fn routing(config: &Arc<Config>, entries: &[UpstreamEntry]) -> Routing {
    let routing = config.clone();
    let router: Router = Arc::new(move |env: &crate::spool::Envelope| {
        routing.route(&env.sender, env.auth_user.as_deref())
    });
    Routing {
        upstreams: entries.iter().map(|e| e.upstream.clone()).collect(),
        router,
        queue: config.queue.clone(),
        hostname: config.hostname.clone(),
    }
}

/// Stops `retired` upstreams once no attempt holds them any more: their background tasks
/// (reaper, then the token refresher when no other upstream shares it) end; the reaper
/// closes idle connections and saves the counters on its way out.
fn retire(retired: Vec<UpstreamEntry>, shutdown: CancellationToken) {
    for e in retired {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            // The entry holds one reference; routing snapshots and attempts hold the others.
            while Arc::strong_count(&e.upstream) > 1 {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                }
            }
            tracing::info!(upstream = %e.name, "previous upstream object stopped (no attempt uses it any more)");
            e.stop.cancel();
            // Give the reaper a moment to say QUIT and save counters while the object lives.
            tokio::time::sleep(Duration::from_secs(1)).await;
            drop(e);
        });
    }
}

/// The SHA-256 of the configured LAN certificate file (`None`: generated or unreadable).
fn cert_digest(config: &Config) -> Option<[u8; 32]> {
    use sha2::Digest;
    let f = config.tls.cert_file.as_ref()?;
    std::fs::read(f)
        .ok()
        .map(|b| sha2::Sha256::digest(b).into())
}

struct Running {
    /// The configuration in force (the file's, with restart-only parts as they run).
    config: Arc<Config>,
    cert: Option<[u8; 32]>,
    upstreams: Vec<UpstreamEntry>,
}

/// The swappable parts of a running daemon, and the reload that swaps them.
pub struct Reloader {
    running: tokio::sync::Mutex<Running>,
    delivery: Arc<Delivery>,
    /// One per bound listener, in configuration order.
    listeners: Vec<Arc<ArcSwap<SessionCtx>>>,
    deps: UpstreamDeps,
    /// READY=1's STATUS after a reload.
    status: std::sync::Mutex<String>,
}

impl Reloader {
    pub fn new(
        config: Arc<Config>,
        upstreams: Vec<UpstreamEntry>,
        delivery: Arc<Delivery>,
        listeners: Vec<Arc<ArcSwap<SessionCtx>>>,
        deps: UpstreamDeps,
    ) -> Reloader {
        Reloader {
            running: tokio::sync::Mutex::new(Running {
                cert: cert_digest(&config),
                config,
                upstreams,
            }),
            delivery,
            listeners,
            deps,
            status: std::sync::Mutex::new(String::new()),
        }
    }

    /// What READY=1 carries as STATUS after a reload (`listening on ...`).
    pub fn set_status(&self, status: String) {
        *self.status.lock().unwrap_or_else(|e| e.into_inner()) = status;
    }

    /// The configuration in force.
    pub async fn config(&self) -> Arc<Config> {
        self.running.lock().await.config.clone()
    }

    /// [`Reloader::reload`] framed by RELOADING=1 and READY=1 for systemd.
    pub async fn reload_notify(&self, path: &Path) -> Result<Vec<String>, Vec<String>> {
        crate::systemd::reloading();
        let r = self.reload(path).await;
        let status = self
            .status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        crate::systemd::ready(&status);
        r
    }

    /// Re-reads `path` and swaps in what it says. `Ok`: what changed and what needs a
    /// restart; `Err`: every error (nothing changed). Logs either way. One at a time.
    pub async fn reload(&self, path: &Path) -> Result<Vec<String>, Vec<String>> {
        let mut running = self.running.lock().await;
        tracing::info!(config = %path.display(), "reloading the configuration");
        let result = self.prepare(&running, path).await;
        let (new, acceptors, auth, upstreams) = match result {
            Ok(x) => x,
            Err(errors) => {
                tracing::error!(
                    config = %path.display(),
                    errors = errors.len(),
                    "reload failed: {} errors, keeping the previous configuration",
                    errors.len()
                );
                for e in &errors {
                    tracing::error!(config = %path.display(), error = %e, "reload error");
                }
                return Err(errors);
            }
        };
        let (file_config, new) = new;
        let restart = diff::needs_restart(&running.config, &file_config);
        let mut changes = diff::summary(&running.config, &new);
        let cert = cert_digest(&new);
        if cert != running.cert {
            changes.push("LAN certificate replaced".into());
        }

        // Swap: sessions first (a new connection sees the new users and access), then
        // delivery (the next attempt uses the new upstreams and routes).
        for (i, slot) in self.listeners.iter().enumerate() {
            let old = slot.load_full();
            let listener = new.listeners[i].clone();
            let tls = (listener.tls != TlsMode::None)
                .then(|| {
                    acceptors
                        .as_ref()
                        .map(|a| a.for_profile(listener.tls_profile))
                })
                .flatten();
            slot.store(Arc::new(SessionCtx {
                config: new.clone(),
                listener,
                spool: old.spool.clone(),
                scheduler: old.scheduler.clone(),
                stop: old.stop.clone(),
                hard_stop: old.hard_stop.clone(),
                tls,
                auth: auth.clone(),
                auth_failures: old.auth_failures.clone(),
                ops: old.ops.clone(),
            }));
        }
        self.delivery.set_routing(routing(&new, &upstreams));
        let retired: Vec<UpstreamEntry> = std::mem::take(&mut running.upstreams)
            .into_iter()
            .filter(|o| {
                !upstreams
                    .iter()
                    .any(|n| Arc::ptr_eq(&n.upstream, &o.upstream))
            })
            .collect();
        retire(retired, self.deps.background.clone());
        running.upstreams = upstreams;
        running.config = new;
        running.cert = cert;

        for r in &restart {
            tracing::warn!(config = %path.display(), "{r}");
        }
        let summary = if changes.is_empty() {
            "no change".to_string()
        } else {
            changes.join("; ")
        };
        tracing::info!(
            config = %path.display(),
            changes = %summary,
            needs_restart = restart.len(),
            "configuration reloaded"
        );
        changes.extend(restart);
        Ok(changes)
    }

    /// Loads and validates everything; starts nothing that stays running on error.
    #[allow(clippy::type_complexity)]
    async fn prepare(
        &self,
        running: &Running,
        path: &Path,
    ) -> Result<
        (
            (Config, Arc<Config>),
            Option<Arc<crate::inbound::tls::Acceptors>>,
            Arc<crate::inbound::auth::Authenticator>,
            Vec<UpstreamEntry>,
        ),
        Vec<String>,
    > {
        let p: PathBuf = path.to_path_buf();
        let file_config = tokio::task::spawn_blocking(move || crate::config::load(&p))
            .await
            .map_err(|e| vec![format!("reload task failed: {e}")])?
            .map_err(|e| e.0)?;
        let new = Arc::new(diff::effective(&running.config, file_config.clone()));
        let mut errors = Vec::new();
        let acceptors = if new.listeners.iter().any(|l| l.tls != TlsMode::None) {
            let cfg = new.clone();
            match tokio::task::spawn_blocking(move || crate::inbound::tls::acceptor(&cfg)).await {
                Ok(Ok(a)) => Some(a),
                Ok(Err(e)) => {
                    errors.push(format!("tls: {e}"));
                    None
                }
                Err(e) => {
                    errors.push(format!("tls: {e}"));
                    None
                }
            }
        } else {
            None
        };
        let users = new.users.clone();
        let auth = tokio::task::spawn_blocking(move || {
            Arc::new(crate::inbound::auth::Authenticator::new(&users))
        })
        .await
        .map_err(|e| vec![format!("reload task failed: {e}")])?;
        match build_upstreams(&new, &running.upstreams, &self.deps) {
            Ok(upstreams) if errors.is_empty() => {
                Ok(((file_config, new), acceptors, auth, upstreams))
            }
            Ok(upstreams) => {
                discard_new(upstreams, &running.upstreams);
                Err(errors)
            }
            Err(e) => {
                errors.extend(e);
                Err(errors)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, upstreams: &[(&str, &str)]) -> Config {
        let mut y = format!(
            "hostname: relay.test\nstate_dir: {d}/state\nspool:\n  path: {d}/spool\nupstreams:\n",
            d = dir.display()
        );
        for (name, path) in upstreams {
            y.push_str(&format!(
                "  - name: {name}\n    type: outbox\n    path: {}/{path}\n",
                dir.display()
            ));
        }
        crate::config::from_yaml_str(&y).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn unchanged_upstreams_are_kept_and_replaced_ones_stop_once_idle() {
        let dir = tempfile::tempdir().unwrap();
        let (alerts, _rx) = tokio::sync::mpsc::unbounded_channel();
        let deps = UpstreamDeps {
            background: CancellationToken::new(),
            draining: CancellationToken::new(),
            alerts,
            ops: Arc::new(crate::ops::Ops::default()),
        };
        let a = config(dir.path(), &[("local", "out"), ("other", "o1")]);
        let first = build_upstreams(&a, &[], &deps).unwrap();
        let b = config(
            dir.path(),
            &[("local", "out"), ("other", "o2"), ("third", "o3")],
        );
        let second = build_upstreams(&b, &first, &deps).unwrap();
        assert_eq!(second.len(), 3);
        assert!(
            Arc::ptr_eq(&first[0].upstream, &second[0].upstream),
            "unchanged: kept"
        );
        assert!(
            !Arc::ptr_eq(&first[1].upstream, &second[1].upstream),
            "changed: rebuilt"
        );

        // An attempt still holds the replaced upstream.
        let in_flight = first[1].upstream.clone();
        let stop = first[1].stop.clone();
        let kept_stop = first[0].stop.clone();
        let retired: Vec<_> = first
            .into_iter()
            .filter(|o| !second.iter().any(|n| Arc::ptr_eq(&n.upstream, &o.upstream)))
            .collect();
        assert_eq!(retired.len(), 1);
        retire(retired, deps.background.clone());
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(!stop.is_cancelled(), "not while an attempt uses it");
        drop(in_flight);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(stop.is_cancelled(), "stopped once idle");
        assert!(!kept_stop.is_cancelled());

        // A failing build (an outbox that cannot be created) starts nothing.
        std::fs::write(dir.path().join("file"), b"x").unwrap();
        let c = config(dir.path(), &[("local", "out"), ("new", "file/sub")]);
        let errors = build_upstreams(&c, &second, &deps).err().unwrap();
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].starts_with("upstream new: cannot create outbox directory"),
            "{errors:?}"
        );
        assert!(!second[0].stop.is_cancelled());
    }
}
