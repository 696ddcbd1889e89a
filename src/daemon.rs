//! Wiring only: open the spool, recover, start the scheduler and listeners, wait for a
//! signal, then shut down in order: listeners and idle sessions, sessions in DATA (bounded),
//! the scheduler, then delivery attempts in flight.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::delivery::Delivery;
use crate::inbound::{SessionCtx, listener};
use crate::scheduler::Scheduler;
use crate::spool::Spool;

/// How long sessions in DATA, and then delivery attempts, may go on after shutdown begins
/// (each). Twice this stays under systemd's `TimeoutStopSec=60` in the shipped unit.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(25);

/// A running daemon, for `serve` and for tests that start one in-process.
pub struct Daemon {
    pub addrs: Vec<std::net::SocketAddr>,
    /// Where `/metrics`, `/healthz` and the status page are served (`admin.http_address`).
    /// The allowed networks are those at start-up (a reload does not change them).
    pub http_addr: Option<std::net::SocketAddr>,
    stop: CancellationToken,
    done: tokio::task::JoinHandle<()>,
    /// Cancelled when the scheduler loop or an accept loop ends (returns or panics): before
    /// shutdown that means the daemon no longer works, which [`Daemon::health`] reports.
    scheduler_ended: CancellationToken,
    listener_ended: CancellationToken,
    ops: Arc<crate::ops::Ops>,
    control: Arc<crate::ops::control::Control>,
    /// The swappable parts and the live reload (issue 9 §5).
    reloader: Arc<crate::reload::Reloader>,
}

impl Daemon {
    /// Opens everything and starts serving. Errors here are start-up errors (exit 1).
    pub async fn start(config: Config) -> anyhow::Result<Daemon> {
        let config = Arc::new(config);
        let spool_path = config.spool.path.clone();
        let (spool, recovered) = tokio::task::spawn_blocking(move || {
            let spool = Spool::open(&spool_path)?;
            let recovered = spool.recover()?;
            Ok::<_, crate::spool::SpoolError>((spool, recovered))
        })
        .await?
        .with_context(|| format!("cannot open the spool at {}", config.spool.path.display()))?;
        tracing::info!(
            spool = %config.spool.path.display(),
            queued = recovered.queued.len(),
            corrupt = recovered.corrupt,
            partial_removed = recovered.tmp_removed,
            "spool recovered"
        );
        for id in &recovered.interrupted {
            tracing::warn!(queue_id = %id, "possible duplicate: a delivery attempt was interrupted; the message will be sent again");
        }

        // Background tasks that live as long as the daemon: token refreshers, connection
        // reapers. Cancelled last, after delivery attempts have ended.
        let background = CancellationToken::new();
        let (alert_tx, mut alert_rx) = tokio::sync::mpsc::unbounded_channel();
        // Cancelled when the queue stops: attempts waiting for a send slot end at once.
        let queue_stop = CancellationToken::new();
        let ops = Arc::new(crate::ops::Ops::new(Some(config.state_dir.clone())));
        let upstream_deps = crate::reload::UpstreamDeps {
            background: background.clone(),
            draining: queue_stop.clone(),
            alerts: alert_tx,
            ops: ops.clone(),
        };
        let upstreams = crate::reload::build_upstreams(&config, &[], &upstream_deps)
            .map_err(|e| anyhow::anyhow!(e.join("\n")))?;
        let routing = crate::reload::routing(&config, &upstreams);
        let delivery = Arc::new(
            Delivery::with_upstreams(
                spool.clone(),
                routing.upstreams,
                routing.router,
                routing.queue,
                &routing.hostname,
            )
            .with_ops(ops.clone()),
        );
        let max_delay = config
            .queue
            .retry
            .iter()
            .max()
            .copied()
            .unwrap_or(Duration::from_secs(3600));
        let (scheduler, handle) = Scheduler::new(delivery.clone(), config.queue.workers, max_delay);
        delivery.set_scheduler(handle.clone());
        {
            let delivery = delivery.clone();
            let background = background.clone();
            tokio::spawn(async move {
                loop {
                    let alert = tokio::select! {
                        _ = background.cancelled() => return,
                        a = alert_rx.recv() => match a { Some(a) => a, None => return },
                    };
                    let alert: crate::upstream::exchange::Alert = alert;
                    delivery
                        .alert(&alert.upstream, &alert.subject, &alert.body)
                        .await;
                }
            });
        }
        for q in recovered.queued {
            handle.queued(q);
        }

        let tls = if config
            .listeners
            .iter()
            .any(|l| l.tls != crate::config::TlsMode::None)
        {
            let cfg = config.clone();
            Some(tokio::task::spawn_blocking(move || crate::inbound::tls::acceptor(&cfg)).await??)
        } else {
            None
        };

        let users = config.users.clone();
        let authenticator = Arc::new(
            tokio::task::spawn_blocking(move || crate::inbound::auth::Authenticator::new(&users))
                .await?,
        );
        let auth_failures = Arc::new(crate::inbound::auth::FailureLimiter::new());

        let mut bound = Vec::new();
        for l in &config.listeners {
            let listener = TcpListener::bind(l.address).await.with_context(|| {
                format!(
                    "cannot listen on {} (in use by another program? ports below 1024 need CAP_NET_BIND_SERVICE)",
                    l.address
                )
            })?;
            bound.push((listener, l.clone()));
        }

        let stop = CancellationToken::new();
        let hard_stop = CancellationToken::new();
        let sessions = TaskTracker::new();
        let workers = TaskTracker::new();
        let counter = Arc::new(listener::ConnCounter::default());
        let mut addrs = Vec::new();
        let mut accept_loops = Vec::new();
        let mut listener_ctxs = Vec::new();
        let listener_ended = CancellationToken::new();
        for (l, lcfg) in bound {
            let addr = l.local_addr()?;
            addrs.push(addr);
            if lcfg.tls != crate::config::TlsMode::None
                && lcfg.tls_profile == crate::config::TlsProfile::Legacy
            {
                tracing::warn!(
                    address = %addr,
                    "listener {addr} has tls_profile: legacy: it accepts TLS 1.0 and 1.1 and SHA-1 suites (OpenSSL security level 0), which a capable attacker can break; keep it on a port only old devices on a trusted network can reach"
                );
            }
            tracing::info!(address = %addr, "listening");
            let ctx = Arc::new(SessionCtx {
                config: config.clone(),
                tls: if lcfg.tls == crate::config::TlsMode::None {
                    None
                } else {
                    tls.as_ref().map(|t: &Arc<crate::inbound::tls::Acceptors>| {
                        t.for_profile(lcfg.tls_profile)
                    })
                },
                listener: lcfg,
                auth: authenticator.clone(),
                auth_failures: auth_failures.clone(),
                ops: ops.clone(),
                spool: spool.clone(),
                scheduler: handle.clone(),
                stop: stop.clone(),
                hard_stop: hard_stop.clone(),
            });
            let ctx = Arc::new(arc_swap::ArcSwap::new(ctx));
            listener_ctxs.push(ctx.clone());
            let accept = listener::serve_swappable(l, ctx, counter.clone(), sessions.clone());
            // Dropped when the loop ends, even by a panic: the watchdog sees it.
            let ended = listener_ended.clone().drop_guard();
            accept_loops.push(tokio::spawn(async move {
                let _ended = ended;
                accept.await
            }));
        }
        let reloader = Arc::new(crate::reload::Reloader::new(
            config.clone(),
            upstreams,
            delivery.clone(),
            listener_ctxs.clone(),
            upstream_deps,
        ));
        let scheduler_ended = CancellationToken::new();
        let control = Arc::new(crate::ops::control::Control {
            ops: ops.clone(),
            spool: spool.clone(),
            scheduler: handle.clone(),
            delivery: delivery.clone(),
            listeners: addrs.iter().copied().zip(listener_ctxs.clone()).collect(),
            health: health_fn(
                stop.clone(),
                scheduler_ended.clone(),
                listener_ended.clone(),
            ),
        });
        // /metrics, /healthz and the status page (admin.http_address; off by default).
        let http = match config.admin.http_address {
            Some(addr) => {
                let admin = config.admin.clone();
                let allow: crate::admin::http::AllowFn = Arc::new(move |ip| admin.http_allows(ip));
                Some(
                    crate::admin::http::HttpServer::start(
                        addr,
                        allow,
                        control.clone(),
                        stop.clone(),
                    )
                    .await?,
                )
            }
            None => None,
        };
        let http_addr = http.as_ref().map(|h| h.local_addr());
        // The admin socket, once the listeners are bound; it outlives the ordered shutdown
        // (status stays readable meanwhile) and its file is removed at the end.
        let admin_stop = CancellationToken::new();
        let admin_task = config.admin.socket.as_ref().and_then(|path| {
            let l = crate::admin::socket::bind(path)?;
            Some(tokio::spawn(crate::admin::socket::serve(
                l,
                path.clone(),
                control.clone(),
                admin_stop.clone(),
            )))
        });
        let senders_task = tokio::spawn(crate::ops::senders::run_flusher(
            ops.clone(),
            admin_stop.clone(),
        ));
        let sched_task = {
            let ended = scheduler_ended.clone().drop_guard();
            let run = scheduler.run(queue_stop.clone(), workers.clone());
            tokio::spawn(async move {
                let _ended = ended;
                run.await
            })
        };

        let stop2 = stop.clone();
        let done = tokio::spawn(async move {
            stop2.cancelled().await;
            tracing::info!("shutting down: no new connections, idle sessions get 421");
            for a in accept_loops {
                let _ = a.await;
            }
            sessions.close();
            if tokio::time::timeout(SHUTDOWN_GRACE, sessions.wait())
                .await
                .is_err()
            {
                tracing::warn!(
                    "sessions still in DATA after the grace period: cutting them off (no 250 was sent)"
                );
                hard_stop.cancel();
                sessions.wait().await;
            }
            queue_stop.cancel();
            let _ = sched_task.await;
            workers.close();
            if tokio::time::timeout(SHUTDOWN_GRACE, workers.wait())
                .await
                .is_err()
            {
                // The attempt's next time is already on disk; it is repeated after a restart
                // (logged then as a possible duplicate).
                tracing::warn!(
                    "delivery attempts still running after the grace period: exiting without them"
                );
            }
            background.cancel();
            // Let the reapers close idle upstream connections and save counters.
            tokio::time::sleep(Duration::from_millis(200)).await;
            // The HTTP endpoint stopped with `stop` (open connections get a moment).
            if let Some(h) = http {
                h.wait().await;
            }
            drop(spool);
            admin_stop.cancel();
            let _ = senders_task.await;
            if let Some(t) = admin_task {
                let _ = t.await;
            }
            tracing::info!("stopped");
        });
        Ok(Daemon {
            addrs,
            http_addr,
            stop,
            done,
            scheduler_ended,
            listener_ended,
            ops,
            control,
            reloader,
        })
    }

    /// Turns on live reload from `path` (the file the daemon was started with): SIGHUP in
    /// [`serve`] and `Control::reload` (`mailbridge reload`) re-read it. Without this (the
    /// demo), a reload is refused.
    pub fn enable_reload(&self, path: std::path::PathBuf) {
        let r = self.reloader.clone();
        self.ops.set_reload(Arc::new(move || {
            let r = r.clone();
            let path = path.clone();
            Box::pin(async move { r.reload_notify(&path).await })
        }));
    }

    /// The swappable parts (for tests: the configuration in force).
    pub fn reloader(&self) -> &Arc<crate::reload::Reloader> {
        &self.reloader
    }

    /// Metrics, sender inventory, recent outcomes.
    pub fn ops(&self) -> &Arc<crate::ops::Ops> {
        &self.ops
    }

    /// The queue, status and commands, as the admin socket and the HTTP endpoint use them.
    pub fn control(&self) -> &Arc<crate::ops::control::Control> {
        &self.control
    }

    /// For the systemd watchdog: whether the parts that must run as long as the daemon does
    /// still run. `Err` says which one stopped. Always `Ok` once shutdown has begun.
    pub fn health(&self) -> impl Fn() -> Result<(), String> + Send + Sync + 'static {
        let f = health_fn(
            self.stop.clone(),
            self.scheduler_ended.clone(),
            self.listener_ended.clone(),
        );
        move || f()
    }

    /// Begins the ordered shutdown and waits for it to finish.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let _ = self.done.await;
    }
}

fn health_fn(
    stop: CancellationToken,
    scheduler: CancellationToken,
    listener: CancellationToken,
) -> crate::ops::control::HealthFn {
    Arc::new(move || {
        if stop.is_cancelled() {
            Ok(())
        } else if scheduler.is_cancelled() {
            Err("the delivery scheduler stopped: queued mail is not being delivered".into())
        } else if listener.is_cancelled() {
            Err("a listener stopped accepting connections".into())
        } else {
            Ok(())
        }
    })
}

/// `mailbridge serve`: runs until SIGTERM or SIGINT; SIGHUP reloads the configuration from
/// `config_path` (`None`: the demo, which has no file and cannot reload).
pub async fn serve(
    config: Config,
    demo_hint: bool,
    config_path: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    // Installed before the listeners open, so a SIGTERM at any moment is an ordered stop.
    let mut signals = Signals::install()?;
    let daemon = Daemon::start(config).await?;
    // Type=notify: start-up is over only now, with the spool recovered and every listener
    // bound and accepting (sd_notify(3)).
    let listening: Vec<String> = daemon.addrs.iter().map(|a| a.to_string()).collect();
    let status = format!("listening on {}", listening.join(", "));
    daemon.reloader().set_status(status.clone());
    match &config_path {
        Some(p) => daemon.enable_reload(p.clone()),
        None => daemon.ops().set_reload(Arc::new(|| {
            Box::pin(async {
                Err(vec![
                    "the demo (serve --demo) has no configuration file to re-read: restart it, or run serve -c PATH".to_string(),
                ])
            })
        })),
    }
    crate::systemd::ready(&status);
    let watchdog = crate::systemd::watchdog_interval()
        .map(|every| tokio::spawn(crate::systemd::run_watchdog(every, daemon.health())));
    if demo_hint {
        let addr = daemon.addrs[0];
        println!(
            "mailbridge demo: listening on {addr}; send a test message with `swaks --server {addr} --from printer@example.com --to you@example.com` and find it in ./mailbridge-demo/outbox/ (Ctrl-C stops)"
        );
    }
    while signals.next().await == Signal::Reload {
        // A reload logs its own outcome (and returns it to `mailbridge reload`); the demo's
        // refusal is logged here.
        if let Err(e) = daemon.control().reload().await
            && config_path.is_none()
        {
            tracing::warn!("SIGHUP ignored: {}", e.join("; "));
        }
    }
    // systemd stops the watchdog with STOPPING=1; the grace periods run under TimeoutStopSec.
    crate::systemd::stopping();
    if let Some(w) = watchdog {
        w.abort();
    }
    daemon.shutdown().await;
    Ok(())
}

struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

#[derive(Debug, PartialEq, Eq)]
enum Signal {
    Stop,
    Reload,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("install SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("install SIGINT handler")?,
            hup: signal(SignalKind::hangup()).context("install SIGHUP handler")?,
        })
    }

    async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::Stop,
            _ = self.int.recv() => Signal::Stop,
            _ = self.hup.recv() => Signal::Reload,
        }
    }
}
