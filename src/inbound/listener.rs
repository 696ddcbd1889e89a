//! Accept loop: connection limits (global and per client address) and the network
//! allowlist, applied before any SMTP is spoken (behaviour.md C30, C31).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::task::TaskTracker;

use super::SessionCtx;
use crate::config::canonical_ip;
use crate::smtp::reply::{self, Reply};

/// Counts open connections, in total and per client address.
#[derive(Default)]
pub struct ConnCounter {
    inner: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// Held for the life of a connection; releases its slot when dropped.
pub struct ConnSlot {
    counter: Arc<ConnCounter>,
    ip: IpAddr,
}

impl ConnCounter {
    /// Takes a slot, or says which limit is full.
    pub fn acquire(
        self: &Arc<Self>,
        ip: IpAddr,
        max_total: usize,
        max_per_ip: usize,
    ) -> Result<ConnSlot, Reply> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if g.0 >= max_total {
            return Err(reply::TOO_MANY_CONNECTIONS);
        }
        let n = g.1.entry(ip).or_insert(0);
        if *n >= max_per_ip {
            return Err(reply::TOO_MANY_FROM_IP);
        }
        *n += 1;
        g.0 += 1;
        Ok(ConnSlot {
            counter: self.clone(),
            ip,
        })
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut g = self.counter.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.0 -= 1;
        if let Some(n) = g.1.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                g.1.remove(&self.ip);
            }
        }
    }
}

/// Accepts connections until `ctx.stop` is cancelled. Sessions run on `sessions`.
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<SessionCtx>,
    counter: Arc<ConnCounter>,
    sessions: TaskTracker,
) {
    let limits = &ctx.config.limits;
    loop {
        let (stream, peer) = tokio::select! {
            _ = ctx.stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let ip = canonical_ip(peer.ip());
        // Outsiders are refused first, so they never take a slot that a printer needs.
        if !ctx.config.access.may_connect(ip) {
            tracing::warn!(client = %ip, "connection from a network in neither access.allow_networks nor access.auth_networks refused");
            sessions.spawn(refuse(stream, reply::RELAY_DENIED));
            continue;
        }
        let slot = match counter.acquire(ip, limits.max_connections, limits.max_connections_per_ip)
        {
            Ok(s) => s,
            Err(r) => {
                tracing::warn!(client = %ip, reason = %r.text, "connection refused");
                sessions.spawn(refuse(stream, r));
                continue;
            }
        };
        let ctx = ctx.clone();
        sessions.spawn(async move {
            let local = stream.local_addr().ok();
            super::session::run(stream, SocketAddr::new(ip, peer.port()), local, ctx).await;
            drop(slot);
        });
    }
}

/// Sends one reply as the greeting and closes (RFC 5321 §3.1 allows a 554 greeting).
async fn refuse(mut stream: TcpStream, r: Reply) {
    let mut out = Vec::new();
    r.write_to(&mut out);
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        let _ = stream.write_all(&out).await;
        let _ = stream.shutdown().await;
    })
    .await;
}
