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
        "hostname: relay.test\nstate_dir: {d}/state\nspool:\n  path: {d}/spool\nupstreams:\n  - name: local\n    type: outbox\n    path: {d}/outbox\n{extra}",
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
        // A TLS listener gets the daemon's acceptor (self-signed certificate in state_dir).
        let tls = (cfg.listeners[0].tls != mailbridge::config::TlsMode::None).then(|| {
            mailbridge::inbound::tls::acceptor(&cfg)
                .expect("TLS set-up")
                .for_profile(cfg.listeners[0].tls_profile)
        });
        let users = cfg.users.clone();
        let ctx = Arc::new(SessionCtx {
            listener: cfg.listeners[0].clone(),
            config: Arc::new(cfg),
            spool: spool.clone(),
            scheduler: handle,
            stop: CancellationToken::new(),
            hard_stop: CancellationToken::new(),
            tls,
            auth: Arc::new(mailbridge::inbound::auth::Authenticator::new(&users)),
            auth_failures: Arc::new(mailbridge::inbound::auth::FailureLimiter::new()),
            ops: Arc::new(mailbridge::ops::Ops::default()),
        });
        Harness { dir, ctx, spool }
    }

    /// A rustls client that trusts the self-signed certificate a TLS listener generated in
    /// this harness's `state/tls/`.
    pub fn tls_connector(&self) -> tokio_rustls::TlsConnector {
        use rustls_pki_types::CertificateDer;
        use rustls_pki_types::pem::PemObject;
        let pem = self.dir.path().join("state/tls/selfsigned-cert.pem");
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(&pem).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        tokio_rustls::TlsConnector::from(Arc::new(cfg))
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

/// A committed message read back from `spool/queue/`.
#[derive(Debug, Clone)]
pub struct QueuedMessage {
    pub path: std::path::PathBuf,
    pub envelope: mailbridge::spool::Envelope,
    /// The stored content: our headers first, then the client's message.
    pub content: Vec<u8>,
}

impl Harness {
    /// Every committed message, decoded and validated (panics on an invalid queue file).
    pub fn queued_messages(&self) -> Vec<QueuedMessage> {
        self.queued()
            .into_iter()
            .map(|path| {
                let bytes = std::fs::read(&path).unwrap();
                let (envelope, range) = mailbridge::spool::format::decode_queue_file(&bytes)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
                assert_eq!(envelope.id, stem, "envelope id matches the file name");
                QueuedMessage {
                    path,
                    envelope,
                    content: bytes[range].to_vec(),
                }
            })
            .collect()
    }

    /// Files left in `spool/tmp/` (partial messages).
    pub fn tmp_files(&self) -> Vec<std::path::PathBuf> {
        std::fs::read_dir(self.dir.path().join("spool/tmp"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect()
    }

    /// Starts a session over an in-memory duplex and returns the client end, for tests that
    /// must read replies before writing more (or never close their side).
    pub fn connect(&self, peer: &str) -> Client {
        let (client, server) = tokio::io::duplex(1 << 20);
        let peer: SocketAddr = peer.parse().unwrap();
        let ctx = self.ctx.clone();
        let task = tokio::spawn(async move {
            mailbridge::inbound::session::run(server, peer, None, ctx).await;
        });
        Client {
            stream: client,
            buf: Vec::new(),
            task,
        }
    }
}

/// The client end of a session started with [`Harness::connect`].
pub struct Client {
    pub stream: tokio::io::DuplexStream,
    buf: Vec<u8>,
    pub task: tokio::task::JoinHandle<()>,
}

impl Client {
    pub async fn send(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Reads one complete reply (all lines of a multi-line reply, CRLF included). Panics if
    /// the server closes first.
    pub async fn reply(&mut self) -> String {
        use tokio::io::AsyncReadExt;
        loop {
            let mut start = 0;
            while let Some(nl) = self.buf[start..].iter().position(|&b| b == b'\n') {
                let line = &self.buf[start..start + nl + 1];
                start += nl + 1;
                if line.len() < 4 || line[3] != b'-' {
                    let r: Vec<u8> = self.buf.drain(..start).collect();
                    return String::from_utf8_lossy(&r).into_owned();
                }
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).await.unwrap();
            if n == 0 {
                panic!(
                    "server closed while a reply was expected; pending {:?}",
                    String::from_utf8_lossy(&self.buf)
                );
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Sends a command and returns its reply.
    pub async fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes()).await;
        self.reply().await
    }

    /// Everything the server sends until it closes (without closing the client's side).
    pub async fn read_to_end(&mut self) -> String {
        use tokio::io::AsyncReadExt;
        let mut out = std::mem::take(&mut self.buf);
        self.stream.read_to_end(&mut out).await.unwrap();
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Closes the client's write side, reads the rest and waits for the session to end.
    pub async fn finish(mut self) -> String {
        use tokio::io::AsyncWriteExt;
        let _ = self.stream.shutdown().await;
        let rest = self.read_to_end().await;
        self.task.await.unwrap();
        rest
    }
}
