//! Checks on files that ship with mailbridge and become live on install (issue 8 §5): the
//! example configuration that deploy/install.sh copies to /etc/mailbridge/relay.yaml, and the
//! systemd unit with its port-25 drop-in. Reads repository files only; starts nothing.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn read(rel: &str) -> String {
    let path = repo_file(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Lines that systemd reads: not blank, not a `#` or `;` comment.
fn directives(unit: &str) -> Vec<&str> {
    unit.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';'))
        .collect()
}

/// install.sh copies relay.example.yaml to /etc/mailbridge/relay.yaml when there is none, so
/// as installed it must be safe: loopback only, no users, nothing else allowed to send. It
/// used to listen on 0.0.0.0 and let a whole /24 send as anyone.
#[test]
fn relay_example_is_safe_as_installed() {
    let path = repo_file("relay.example.yaml");
    let cfg = mailbridge::config::load(&path)
        .unwrap_or_else(|e| panic!("relay.example.yaml does not load: {:?}", e.0));

    for l in &cfg.listeners {
        assert!(
            l.address.ip().is_loopback(),
            "relay.example.yaml listens on {}, not on loopback only",
            l.address
        );
    }
    assert!(cfg.users.is_empty(), "relay.example.yaml defines users");

    let only_loopback = |name: &str, nets: &[ipnet::IpNet]| {
        for n in nets {
            assert!(
                n.network().is_loopback() && n.broadcast().is_loopback(),
                "relay.example.yaml: access.{name} contains {n}, beyond loopback"
            );
        }
    };
    only_loopback("allow_networks", &cfg.access.allow_networks);
    only_loopback("auth_networks", &cfg.access.auth_networks);
    only_loopback("lf_only_networks", &cfg.access.lf_only_networks);

    // The same, the way the listener asks: no LAN, public or IPv4-mapped address may connect.
    for ip in [
        "192.168.10.20",
        "10.1.2.3",
        "172.16.0.1",
        "203.0.113.7",
        "fd00::1",
        "2001:db8::1",
        "::ffff:192.168.10.20",
    ] {
        let ip: IpAddr = ip.parse().unwrap();
        assert!(
            !cfg.access.may_connect(ip),
            "relay.example.yaml lets {ip} connect"
        );
    }
    // The machine itself can still send a test message.
    assert!(cfg.access.allows("127.0.0.1".parse().unwrap()));

    // Metrics and the status page: off, or on loopback only; nobody else may read them.
    if let Some(addr) = cfg.admin.http_address {
        assert!(
            addr.ip().is_loopback(),
            "relay.example.yaml serves the status page on {addr}"
        );
    }
    assert!(
        cfg.admin.http_allow_networks.is_empty(),
        "relay.example.yaml: admin.http_allow_networks is not empty"
    );
    assert!(!cfg.admin.http_allows("192.168.10.20".parse().unwrap()));
    assert_eq!(
        cfg.admin.socket.as_deref(),
        Some(Path::new(mailbridge::config::DEFAULT_ADMIN_SOCKET))
    );
}

/// install.sh overwrites /etc/systemd/system/mailbridge.service on every run, so a capability
/// uncommented there is lost. The unit grants none, and says nothing to uncomment; the port-25
/// setting is a drop-in under mailbridge.service.d/, which install.sh never touches.
#[test]
fn port_25_capability_is_a_drop_in_not_a_unit_edit() {
    let unit = read("systemd/mailbridge.service");
    assert!(
        !unit.contains("CAP_NET_BIND_SERVICE"),
        "systemd/mailbridge.service mentions CAP_NET_BIND_SERVICE (commented lines there are lost on reinstall)"
    );
    assert!(
        directives(&unit).contains(&"CapabilityBoundingSet="),
        "the unit must still drop every capability"
    );

    let drop_in = read("systemd/mailbridge.service.d/port-25.conf");
    let d = directives(&drop_in);
    assert_eq!(
        d.first(),
        Some(&"[Service]"),
        "the drop-in needs a [Service] section"
    );
    assert!(d.contains(&"AmbientCapabilities=CAP_NET_BIND_SERVICE"));
    assert!(d.contains(&"CapabilityBoundingSet=CAP_NET_BIND_SERVICE"));

    // install.sh ships the drop-in with the documentation but never writes below
    // /etc/systemd/system/mailbridge.service.d/ itself (text it prints is not code).
    let install = read("deploy/install.sh");
    assert!(
        install.contains("systemd/mailbridge.service.d/port-25.conf"),
        "install.sh does not ship the drop-in"
    );
    let mut in_heredoc = false;
    for line in directives(&install) {
        if in_heredoc {
            in_heredoc = line != "EOF";
            continue;
        }
        in_heredoc = line.contains("<<EOF") || line.contains("<<'EOF'");
        let writes = ["install ", "cp ", "mv ", "ln ", "rm "]
            .iter()
            .any(|c| line.starts_with(c))
            || line.contains("tee ")
            || line.contains('>');
        assert!(
            !(writes && (line.contains("service.d") || line.contains("$dropin"))),
            "install.sh writes into the drop-in directory: {line}"
        );
    }
}

/// `systemd-analyze`, or `None` (outside CI) when it is not installed. In CI (.ci/run installs
/// Debian's `systemd` package) a missing tool is a failure.
fn systemd_analyze() -> Option<std::process::Command> {
    let found = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            !crate::daemon::in_ci(),
            "systemd-analyze is missing (apt-get install systemd)"
        );
        eprintln!("skipped: systemd-analyze is not installed");
        return None;
    }
    Some(std::process::Command::new("systemd-analyze"))
}

/// The unit as installed, in a temp dir, with ExecStart=/ExecStartPre= pointing at the binary
/// just built (systemd-analyze checks that the command exists), and `drop_ins` in its
/// `mailbridge.service.d/`.
fn unit_copy(dir: &Path, drop_ins: &[(&str, &str)]) -> PathBuf {
    let unit = read("systemd/mailbridge.service").replace(
        "/usr/local/bin/mailbridge",
        env!("CARGO_BIN_EXE_mailbridge"),
    );
    let path = dir.join("mailbridge.service");
    std::fs::write(&path, unit).unwrap();
    let d = dir.join("mailbridge.service.d");
    std::fs::create_dir_all(&d).unwrap();
    for (src, name) in drop_ins {
        std::fs::write(d.join(name), read(src)).unwrap();
    }
    path
}

/// `systemd-analyze verify` accepts the unit with both drop-ins, without a single warning
/// (it exits 0 on unknown keys and unparsable values, so its output must be empty too).
#[test]
fn unit_and_drop_ins_pass_systemd_analyze_verify() {
    let Some(mut cmd) = systemd_analyze() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_copy(
        dir.path(),
        &[
            ("systemd/mailbridge.service.d/port-25.conf", "port-25.conf"),
            (
                "systemd/mailbridge.service.d/credentials.conf.example",
                "credentials.conf",
            ),
        ],
    );
    let out = cmd
        .args(["verify", "--man=no"])
        .arg(&unit)
        .output()
        .unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && all.trim().is_empty(),
        "systemd-analyze verify ({}):\n{all}",
        out.status
    );
}

/// Issue 9 §5: Type=notify with a watchdog, /run/mailbridge, no core dumps, task and memory
/// limits, and ExecReload= sending SIGHUP (the daemon reloads its configuration).
#[test]
fn unit_is_notify_with_runtime_directory_and_limits() {
    let unit = read("systemd/mailbridge.service");
    let d = directives(&unit);
    for want in [
        "Type=notify",
        "RuntimeDirectory=mailbridge",
        "LimitCORE=0",
        "WatchdogSec=60s",
        // Without it glibc keeps freed argon2 buffers and MemoryMax= is reached.
        "Environment=GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1048576",
    ] {
        assert!(d.contains(&want), "the unit lacks {want}");
    }
    for key in ["TasksMax=", "MemoryMax="] {
        assert!(
            d.iter().any(|l| l.starts_with(key) && l.len() > key.len()),
            "the unit sets no {key}"
        );
    }
    // SIGHUP reloads the configuration (tests/it/reload.rs).
    assert!(
        d.contains(&"ExecReload=/bin/kill -HUP $MAINPID"),
        "the unit lacks ExecReload=/bin/kill -HUP $MAINPID"
    );
}

/// `systemd-analyze security` rates the unit (without drop-ins) at 1.4 or better, and the
/// figure in docs/configuration.md is the one it prints now.
#[test]
fn unit_security_exposure_is_at_most_1_4_and_documented() {
    let Some(mut cmd) = systemd_analyze() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_copy(dir.path(), &[]);
    let out = cmd
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&unit)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let level = stdout
        .lines()
        .find_map(|l| {
            l.split_once("Overall exposure level for mailbridge.service: ")?
                .1
                .split_whitespace()
                .next()
        })
        .unwrap_or_else(|| {
            panic!(
                "no exposure level in:\n{stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let score: f64 = level.parse().unwrap();
    assert!(
        score <= 1.4,
        "exposure level {score} (at most 1.4):\n{stdout}"
    );
    let docs = read("docs/configuration.md");
    assert!(
        docs.contains(&format!("exposure level {level}")),
        "docs/configuration.md does not record the exposure level {level}"
    );
}
