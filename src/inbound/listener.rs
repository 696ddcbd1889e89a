//! Accept loop: connection limits (global, per client, and the share reserved for
//! `allow_networks`) and the network allowlist, applied before any SMTP is spoken
//! (behaviour.md C30, C31; issue 8 §3.3). Sees only the peer address, which it trusts as the
//! kernel reports it.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::task::TaskTracker;

use super::SessionCtx;
use crate::config::canonical_ip;
use crate::smtp::reply::{self, Reply};

/// The unit that per-client limits count: the address for IPv4 (`::ffff:a.b.c.d` is IPv4),
/// its /64 for IPv6. One host commonly holds a whole /64 (RFC 4291 §2.5.1, SLAAC privacy
/// addresses of RFC 8981), so counting single IPv6 addresses would give one client as many
/// slots or AUTH guesses as it has addresses.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match canonical_ip(ip) {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
        v4 => v4,
    }
}

/// Counts open connections, in total and per client ([`client_key`]).
#[derive(Default)]
pub struct ConnCounter {
    inner: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// Held for the life of a connection; releases its slot when dropped.
pub struct ConnSlot {
    counter: Arc<ConnCounter>,
    key: IpAddr,
}

/// What [`ConnCounter::acquire`] checks.
#[derive(Debug, Clone, Copy)]
pub struct SlotLimits {
    pub max_total: usize,
    pub max_per_client: usize,
    /// Slots only `allow_networks` clients may take.
    pub reserved: usize,
}

impl ConnCounter {
    /// Takes a slot, or says which limit is full. `privileged`: the client is in
    /// `allow_networks`, and may use the reserved slots.
    pub fn acquire(
        self: &Arc<Self>,
        ip: IpAddr,
        privileged: bool,
        limits: SlotLimits,
    ) -> Result<ConnSlot, Reply> {
        let key = client_key(ip);
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let cap = if privileged {
            limits.max_total
        } else {
            limits.max_total.saturating_sub(limits.reserved)
        };
        if g.0 >= cap {
            return Err(reply::TOO_MANY_CONNECTIONS);
        }
        let max_per_ip = limits.max_per_client;
        let n = g.1.entry(key).or_insert(0);
        if *n >= max_per_ip {
            return Err(reply::TOO_MANY_FROM_IP);
        }
        *n += 1;
        g.0 += 1;
        Ok(ConnSlot {
            counter: self.clone(),
            key,
        })
    }

    /// Open connections in total (for tests and metrics).
    pub fn open(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).0
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut g = self.counter.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.0 -= 1;
        if let Some(n) = g.1.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                g.1.remove(&self.key);
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
    serve_swappable(
        listener,
        Arc::new(arc_swap::ArcSwap::new(ctx)),
        counter,
        sessions,
    )
    .await
}

/// [`serve`] with a context a configuration reload can replace: each connection takes the
/// current one (access, limits, users, TLS) when it is accepted, and its session keeps that
/// snapshot to the end. The stop tokens are the same in every snapshot.
pub async fn serve_swappable(
    listener: TcpListener,
    current: Arc<arc_swap::ArcSwap<SessionCtx>>,
    counter: Arc<ConnCounter>,
    sessions: TaskTracker,
) {
    let stop = current.load().stop.clone();
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => break,
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
        let ctx = current.load_full();
        let limits = &ctx.config.limits;
        let ip = canonical_ip(peer.ip());
        // Outsiders are refused first, so they never take a slot that a printer needs.
        if !ctx.config.access.may_connect(ip) {
            tracing::warn!(client = %ip, "connection from a network in neither access.allow_networks nor access.auth_networks refused");
            sessions.spawn(refuse(stream, reply::RELAY_DENIED));
            continue;
        }
        let slot_limits = SlotLimits {
            max_total: limits.max_connections,
            max_per_client: limits.max_connections_per_ip,
            reserved: limits.reserved_connections,
        };
        let privileged = ctx.config.access.allows(ip);
        let slot = match counter.acquire(ip, privileged, slot_limits) {
            Ok(s) => s,
            Err(r) => {
                if privileged {
                    tracing::warn!(client = %ip, reason = %r.text, "connection refused");
                } else {
                    // The reserve may be what refused it: say so, or the admin sees free slots.
                    tracing::warn!(client = %ip, reason = %r.text, reserved_connections = slot_limits.reserved, "connection refused (a client outside access.allow_networks may not use the slots limits.reserved_connections keeps for allow_networks)");
                }
                sessions.spawn(refuse(stream, r));
                continue;
            }
        };
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv6_clients_are_counted_per_64_and_ipv4_per_address() {
        assert_eq!(client_key(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(
            client_key(ip("2001:db8:1:2:ffff:ffff:ffff:ffff")),
            ip("2001:db8:1:2::")
        );
        assert_ne!(client_key(ip("2001:db8:1:3::1")), ip("2001:db8:1:2::"));
        assert_eq!(client_key(ip("192.0.2.7")), ip("192.0.2.7"));
        // ::ffff:a.b.c.d is the IPv4 client, not the /64 ::ffff:0:0/64 (which would lump
        // every IPv4 client of a dual-stack listener together).
        assert_eq!(client_key(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(client_key(ip("::1")), ip("::"));
    }

    const LIMITS: SlotLimits = SlotLimits {
        max_total: 100,
        max_per_client: 2,
        reserved: 0,
    };

    #[test]
    fn rotating_addresses_within_a_64_share_one_per_client_limit() {
        let c = Arc::new(ConnCounter::default());
        let a = c.acquire(ip("2001:db8::1"), true, LIMITS).unwrap();
        let b = c.acquire(ip("2001:db8::2:3:4"), true, LIMITS).unwrap();
        let e = c.acquire(ip("2001:db8::ffff"), true, LIMITS).err();
        assert_eq!(e, Some(reply::TOO_MANY_FROM_IP));
        // Another /64 is another client.
        let other = c.acquire(ip("2001:db8:0:1::1"), true, LIMITS).unwrap();
        // IPv4 stays per address, in either notation.
        let v4 = c.acquire(ip("192.0.2.1"), true, LIMITS).unwrap();
        let _v4b = c.acquire(ip("::ffff:192.0.2.1"), true, LIMITS).unwrap();
        assert!(c.acquire(ip("192.0.2.1"), true, LIMITS).is_err());
        let _v4c = c.acquire(ip("192.0.2.2"), true, LIMITS).unwrap();
        drop(a);
        let _again = c.acquire(ip("2001:db8::abcd"), true, LIMITS).unwrap();
        drop((b, other, v4));
        assert_eq!(c.open(), 3);
    }

    #[test]
    fn reserved_slots_are_for_allow_networks_only() {
        let limits = SlotLimits {
            max_total: 4,
            max_per_client: 10,
            reserved: 2,
        };
        let c = Arc::new(ConnCounter::default());
        let auth_only: Vec<_> = (0..2)
            .map(|_| c.acquire(ip("192.168.1.5"), false, limits).unwrap())
            .collect();
        // Two of four taken: the rest is the reserve.
        assert_eq!(
            c.acquire(ip("192.168.1.6"), false, limits).err(),
            Some(reply::TOO_MANY_CONNECTIONS)
        );
        let p1 = c.acquire(ip("10.0.0.9"), true, limits).unwrap();
        let _p2 = c.acquire(ip("10.0.0.9"), true, limits).unwrap();
        assert_eq!(
            c.acquire(ip("10.0.0.9"), true, limits).err(),
            Some(reply::TOO_MANY_CONNECTIONS)
        );
        // An allow_networks client leaving frees a slot, but it is still reserved.
        drop(p1);
        assert!(c.acquire(ip("192.168.1.6"), false, limits).is_err());
        assert!(c.acquire(ip("10.0.0.10"), true, limits).is_ok());
        drop(auth_only);
        // Reserve 0: everyone shares every slot.
        let c = Arc::new(ConnCounter::default());
        let open = SlotLimits {
            reserved: 0,
            ..limits
        };
        let _all: Vec<_> = (0..4)
            .map(|_| c.acquire(ip("192.168.1.5"), false, open).unwrap())
            .collect();
        assert!(c.acquire(ip("10.0.0.9"), true, open).is_err());
    }
}
