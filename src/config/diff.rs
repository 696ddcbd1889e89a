//! What a configuration reload changes (issue 9 §5): which changes take effect at once
//! (users, access, limits, upstreams, routes, TLS, queue settings), which need a restart
//! (listener addresses and TLS modes, the spool, `state_dir`, `admin.*`, `queue.workers`,
//! `log.*`), and the configuration that then runs: the new file with the restart-only parts
//! kept as they run. Messages name keys and user or upstream names, never a secret.

use sha2::{Digest, Sha256};

use super::{Config, TlsMode, UpstreamConfig, UpstreamKind};

/// One line per change that the running daemon cannot apply; each ends with "needs a
/// restart" so that an admin can grep for it.
pub fn needs_restart(running: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    let matched = match_listeners(running, new);
    for (i, m) in matched.iter().enumerate() {
        match (running.listeners.get(i), m.map(|j| &new.listeners[j])) {
            (Some(a), Some(b)) => {
                if a.address != b.address {
                    out.push(format!(
                        "listeners[{i}].address: {} -> {} needs a restart (the old address keeps listening until then)",
                        a.address, b.address
                    ));
                }
                if a.tls != b.tls {
                    out.push(format!(
                        "listeners[{i}].tls: {} -> {} needs a restart",
                        mode(a.tls),
                        mode(b.tls)
                    ));
                }
            }
            (Some(a), None) => out.push(format!(
                "listeners[{i}] ({}) removed: needs a restart (it keeps listening until then)",
                a.address
            )),
            (None, _) => {}
        }
    }
    for (j, b) in new.listeners.iter().enumerate() {
        if !matched.contains(&Some(j)) {
            out.push(format!(
                "listeners[{j}] ({}) added: needs a restart",
                b.address
            ));
        }
    }
    if running.spool.path != new.spool.path {
        out.push(format!(
            "spool.path: {} -> {} needs a restart",
            running.spool.path.display(),
            new.spool.path.display()
        ));
    }
    if running.state_dir != new.state_dir {
        out.push(format!(
            "state_dir: {} -> {} needs a restart",
            running.state_dir.display(),
            new.state_dir.display()
        ));
    }
    if format!("{:?}", running.admin) != format!("{:?}", new.admin) {
        out.push("admin: changed; needs a restart".into());
    }
    if running.queue.workers != new.queue.workers {
        out.push(format!(
            "queue.workers: {} -> {} needs a restart",
            running.queue.workers, new.queue.workers
        ));
    }
    if running.log.level != new.log.level || running.log.format != new.log.format {
        out.push("log: changed; needs a restart".into());
    }
    out
}

fn mode(m: TlsMode) -> &'static str {
    match m {
        TlsMode::None => "none",
        TlsMode::StartTls => "starttls",
        TlsMode::Implicit => "implicit",
    }
}

/// For each running listener, the new file's listener whose settings it takes: the one with
/// the same address, else the one at the same position unless that one's address is another
/// running listener's (a reordered file must not move the settings of one address, such as
/// `require_auth` or `allow_plaintext_auth`, to another).
fn match_listeners(running: &Config, new: &Config) -> Vec<Option<usize>> {
    let by_address: Vec<Option<usize>> = running
        .listeners
        .iter()
        .map(|a| new.listeners.iter().position(|b| b.address == a.address))
        .collect();
    by_address
        .iter()
        .enumerate()
        .map(|(i, m)| {
            m.or_else(|| {
                new.listeners
                    .get(i)
                    .filter(|b| !running.listeners.iter().any(|a| a.address == b.address))
                    .filter(|_| !by_address.contains(&Some(i)))
                    .map(|_| i)
            })
        })
        .collect()
}

/// The configuration that runs after a reload: `new`, with what needs a restart kept as it
/// runs (listener addresses, TLS modes and count, spool, `state_dir`, admin, workers, log).
/// Per-listener settings that can change live (`require_auth`, `tls_profile`, ...) come
/// from `new`'s listener with the same address, else the one at the same position (see
/// [`match_listeners`]).
pub fn effective(running: &Config, mut new: Config) -> Config {
    let matched = match_listeners(running, &new);
    let listeners = running
        .listeners
        .iter()
        .enumerate()
        .map(|(i, old)| match matched[i].map(|j| &new.listeners[j]) {
            Some(l) => {
                let mut l = l.clone();
                l.address = old.address;
                l.tls = old.tls;
                l
            }
            None => old.clone(),
        })
        .collect();
    new.listeners = listeners;
    new.spool = running.spool.clone();
    new.state_dir = running.state_dir.clone();
    new.admin = running.admin.clone();
    new.queue.workers = running.queue.workers;
    new.log = running.log.clone();
    new
}

/// What changed that takes effect now, one short item each (for "configuration reloaded").
pub fn summary(old: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    let names =
        |c: &Config| -> Vec<String> { c.users.iter().map(|u| u.username.clone()).collect() };
    let (ou, nu) = (names(old), names(new));
    for u in nu.iter().filter(|u| !ou.contains(u)) {
        out.push(format!("user {u} added"));
    }
    for u in ou.iter().filter(|u| !nu.contains(u)) {
        out.push(format!("user {u} removed"));
    }
    for n in &new.users {
        if let Some(o) = old.users.iter().find(|o| o.username == n.username)
            && (o.password_hash != n.password_hash
                || o.allowed_senders != n.allowed_senders
                || upstream_name(old, o.upstream) != upstream_name(new, n.upstream))
        {
            out.push(format!("user {} changed", n.username));
        }
    }
    let same =
        |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") == format!("{b:?}");
    if !same(&old.access, &new.access) {
        out.push("access changed".into());
    }
    if !same(&old.limits, &new.limits) {
        out.push("limits changed".into());
    }
    if !same(&old.tls, &new.tls) {
        out.push("tls changed".into());
    }
    for (i, (a, b)) in old.listeners.iter().zip(&new.listeners).enumerate() {
        if !same(a, b) {
            out.push(format!("listeners[{i}] settings changed"));
        }
    }
    for u in &new.upstreams {
        match old.upstreams.iter().find(|o| o.name == u.name) {
            None => out.push(format!("upstream {} added", u.name)),
            Some(o)
                if upstream_fingerprint(o, &old.queue.retry)
                    != upstream_fingerprint(u, &new.queue.retry) =>
            {
                out.push(format!("upstream {} changed", u.name))
            }
            Some(_) => {}
        }
    }
    for o in &old.upstreams {
        if !new.upstreams.iter().any(|u| u.name == o.name) {
            out.push(format!("upstream {} removed", o.name));
        }
    }
    let routes = |c: &Config| -> Vec<(String, String)> {
        c.routes
            .iter()
            .map(|r| {
                (
                    format!("{:?}", r.sender),
                    upstream_name(c, Some(r.upstream)),
                )
            })
            .collect()
    };
    if routes(old) != routes(new) {
        out.push("routes changed".into());
    }
    if !same(&old.queue, &new.queue) {
        out.push("queue settings changed".into());
    }
    if old.hostname != new.hostname {
        out.push(format!("hostname {} -> {}", old.hostname, new.hostname));
    }
    if old.received_auth_user != new.received_auth_user {
        out.push("received_auth_user changed".into());
    }
    out
}

fn upstream_name(c: &Config, i: Option<usize>) -> String {
    i.and_then(|i| c.upstreams.get(i))
        .map(|u| u.name.clone())
        .unwrap_or_default()
}

/// A digest of everything an upstream object is built from: its settings (the `Debug` form,
/// which shows no secret), the secret's value, the `ca_file`'s contents, and the retry
/// schedule it paces probes with. Equal digests: the running upstream is kept (pause state,
/// connections, counters, token); different: it is rebuilt.
pub fn upstream_fingerprint(u: &UpstreamConfig, retry: &[std::time::Duration]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(u.name.as_bytes());
    h.update([0]);
    match &u.kind {
        UpstreamKind::Outbox { path } => {
            h.update(b"outbox\0");
            h.update(path.as_os_str().as_encoded_bytes());
        }
        UpstreamKind::ExchangeOnline(x) => {
            h.update(b"exchange\0");
            h.update(format!("{x:?}").as_bytes());
            h.update(credentials_fingerprint(
                &x.credentials,
                x.ca_file.as_deref(),
            ));
            h.update(format!("{retry:?}").as_bytes());
        }
    }
    h.finalize().into()
}

/// A digest of a token client's identity: token URL, client id, scope, the secret's value
/// (or the certificate, whose key must match it), and the `ca_file` contents the HTTP client
/// trusts. Equal digests can share one token refresher.
pub fn credentials_fingerprint(
    c: &crate::token::ClientCredentials,
    ca_file: Option<&std::path::Path>,
) -> [u8; 32] {
    let mut h = Sha256::new();
    for s in [&c.token_url, &c.client_id, &c.scope] {
        h.update(s.as_bytes());
        h.update([0]);
    }
    match &c.secret {
        crate::token::ClientSecret::Secret(s) => {
            h.update(b"secret\0");
            h.update(s.expose().as_bytes());
        }
        // The Debug form carries the certificate's SHA-256 thumbprint, not the key.
        crate::token::ClientSecret::Certificate(cert) => {
            h.update(b"certificate\0");
            h.update(format!("{cert:?}").as_bytes());
        }
    }
    if let Some(f) = ca_file {
        h.update(f.as_os_str().as_encoded_bytes());
        h.update(std::fs::read(f).unwrap_or_default());
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> Config {
        let yaml = format!(
            "hostname: relay.test\nstate_dir: /tmp/mb-diff/state\nspool:\n  path: /tmp/mb-diff/spool\nupstreams:\n  - name: local\n    type: outbox\n    path: /tmp/mb-diff/outbox\n{extra}"
        );
        crate::config::from_yaml_str(&yaml).unwrap()
    }

    #[test]
    fn listener_address_spool_and_workers_need_a_restart_and_keep_running_values() {
        let old = cfg("listeners:\n  - address: 127.0.0.1:2525\nqueue:\n  workers: 4\n");
        let new = cfg(
            "listeners:\n  - address: 127.0.0.1:2526\n    allow_plaintext_auth: true\nqueue:\n  workers: 8\naccess:\n  allow_networks: [10.0.0.0/8]\n",
        );
        let r = needs_restart(&old, &new);
        assert_eq!(r.len(), 2, "{r:?}");
        assert!(
            r[0].starts_with(
                "listeners[0].address: 127.0.0.1:2525 -> 127.0.0.1:2526 needs a restart"
            )
        );
        assert!(r[1].contains("queue.workers: 4 -> 8 needs a restart"));
        let eff = effective(&old, new);
        assert_eq!(eff.listeners[0].address.port(), 2525);
        assert!(
            eff.listeners[0].allow_plaintext_auth,
            "live listener settings apply"
        );
        assert_eq!(eff.queue.workers, 4);
        assert!(needs_restart(&old, &eff).is_empty());
        let s = summary(&old, &eff);
        assert!(s.contains(&"access changed".to_string()), "{s:?}");
        assert!(
            s.contains(&"listeners[0] settings changed".to_string()),
            "{s:?}"
        );
    }

    #[test]
    fn reordered_listeners_keep_their_own_settings() {
        // Swapping two listeners in the file must not move one's settings (require_auth,
        // plaintext AUTH, TLS profile) to the other's address.
        let old = cfg(
            "listeners:\n  - address: 127.0.0.1:2587\n    require_auth: true\n    allow_plaintext_auth: true\n  - address: 127.0.0.1:2525\n",
        );
        let new = cfg(
            "listeners:\n  - address: 127.0.0.1:2525\n  - address: 127.0.0.1:2587\n    require_auth: true\n    allow_plaintext_auth: true\n",
        );
        assert!(
            needs_restart(&old, &new).is_empty(),
            "{:?}",
            needs_restart(&old, &new)
        );
        let eff = effective(&old, new);
        assert_eq!(eff.listeners[0].address.port(), 2587);
        assert!(eff.listeners[0].require_auth && eff.listeners[0].allow_plaintext_auth);
        assert_eq!(eff.listeners[1].address.port(), 2525);
        assert!(!eff.listeners[1].require_auth && !eff.listeners[1].allow_plaintext_auth);
        assert!(needs_restart(&old, &eff).is_empty());
        assert!(summary(&old, &eff).is_empty(), "{:?}", summary(&old, &eff));
    }

    #[test]
    fn a_changed_client_secret_is_named_never_shown() {
        let up = |secret: &str| {
            cfg(&format!(
                "  - name: exo\n    type: exchange-online\n    mailbox: relay@contoso.com\n    tenant_id: contoso.com\n    client_id: 11111111-1111-1111-1111-111111111111\n    client_secret: {secret}\n"
            ))
        };
        let (old, new) = (up("Old~S3cret.Value"), up("New~S3cret.Value"));
        let s = summary(&old, &new);
        assert_eq!(s, vec!["upstream exo changed".to_string()]);
        let r = needs_restart(&old, &new);
        let eff = effective(&old, new);
        for text in [
            format!("{s:?}{r:?}"),
            format!("{eff:?}"),
            format!("{old:?}"),
        ] {
            assert!(!text.contains("S3cret"), "{text}");
        }
    }

    #[test]
    fn unchanged_config_has_an_empty_summary() {
        let a = cfg("");
        let b = cfg("");
        assert!(summary(&a, &b).is_empty());
        assert!(needs_restart(&a, &b).is_empty());
        assert_eq!(
            upstream_fingerprint(&a.upstreams[0], &a.queue.retry),
            upstream_fingerprint(&b.upstreams[0], &b.queue.retry)
        );
    }
}
