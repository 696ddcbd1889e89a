//! Shared test fixtures: an in-memory session harness over a temporary spool.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use mailbridge::config::{self, Config};
use mailbridge::delivery::Delivery;
use mailbridge::inbound::SessionCtx;
use mailbridge::scheduler::Scheduler;
use mailbridge::spool::Spool;
use mailbridge::upstream::outbox::Outbox;
use tokio_util::sync::CancellationToken;

/// A configuration for tests, from YAML with `{dir}` replaced by a temporary directory.
pub fn config_yaml(dir: &Path, extra: &str) -> Config {
    let yaml = format!(
        "hostname: relay.test\nspool:\n  path: {d}/spool\nupstreams:\n  - name: local\n    type: outbox\n    path: {d}/outbox\n{extra}",
        d = dir.display()
    );
    config::from_yaml_str(&yaml).expect("test config is valid")
}

/// Everything a session needs, over a real spool in a temporary directory. The scheduler is
/// not running: committed messages stay in `spool/queue/` for the test to inspect.
pub struct Harness {
    pub dir: tempfile::TempDir,
    pub ctx: Arc<SessionCtx>,
    pub spool: Spool,
}

impl Harness {
    pub fn new(extra_yaml: &str) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config_yaml(dir.path(), extra_yaml);
        let spool = Spool::open(&cfg.spool.path).unwrap();
        let outbox = Outbox::new("local", &dir.path().join("outbox")).unwrap();
        let delivery = Arc::new(Delivery::new(
            spool.clone(),
            Arc::new(outbox),
            cfg.queue.clone(),
        ));
        let (_scheduler, handle) = Scheduler::new(delivery, 1, std::time::Duration::from_secs(60));
        // Keep the receiver alive by leaking the scheduler: events are simply not consumed.
        std::mem::forget(_scheduler);
        let ctx = Arc::new(SessionCtx {
            listener: cfg.listeners[0].clone(),
            config: Arc::new(cfg),
            spool: spool.clone(),
            scheduler: handle,
            stop: CancellationToken::new(),
            hard_stop: CancellationToken::new(),
        });
        Harness { dir, ctx, spool }
    }

    /// Files in `spool/queue/` ending in `.msg`.
    pub fn queued(&self) -> Vec<std::path::PathBuf> {
        let mut v: Vec<_> = std::fs::read_dir(self.dir.path().join("spool/queue"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "msg"))
            .collect();
        v.sort();
        v
    }

    /// Runs a session over an in-memory duplex: writes `input` (all at once, as one
    /// pipelined write), then closes the client's write side (EOF), and returns everything
    /// the server sent until it closed.
    pub async fn converse(&self, peer: &str, input: &[u8]) -> String {
        let (client, server) = tokio::io::duplex(1 << 20);
        let peer: SocketAddr = peer.parse().unwrap();
        let ctx = self.ctx.clone();
        let task = tokio::spawn(async move {
            mailbridge::inbound::session::run(server, peer, None, ctx).await;
        });
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut rd, mut wr) = tokio::io::split(client);
        let input = input.to_vec();
        let writer = tokio::spawn(async move {
            let _ = wr.write_all(&input).await;
            let _ = wr.shutdown().await;
            wr
        });
        let mut out = Vec::new();
        rd.read_to_end(&mut out).await.unwrap();
        drop(writer.await);
        task.await.unwrap();
        String::from_utf8_lossy(&out).into_owned()
    }
}
