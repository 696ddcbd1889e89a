#!/bin/sh
# Install a built mailbridge as a systemd service. Safe to run again: it
# replaces the binary, unit and helper files, and never overwrites an existing
# /etc/mailbridge/relay.yaml or anything in
# /etc/systemd/system/mailbridge.service.d/ (local changes to the unit, such
# as the port-25 drop-in, belong there). It does not enable or start the
# service.
#
# Usage (from the repository, after `cargo build --release --locked`):
#   sudo sh deploy/install.sh
set -eu

prog=install.sh
die() {
    printf '%s: %s\n' "$prog" "$*" >&2
    exit 1
}
say() {
    printf '%s: %s\n' "$prog" "$*"
}

# The repository root is the parent of the directory holding this script.
here=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd)
repo=$(dirname -- "$here")

bin_src="$repo/target/release/mailbridge"
bin=/usr/local/bin/mailbridge
unit=/etc/systemd/system/mailbridge.service
sysusers=/etc/sysusers.d/mailbridge.conf
tmpfiles=/etc/tmpfiles.d/mailbridge.conf
confdir=/etc/mailbridge
conf=$confdir/relay.yaml
docdir=/usr/local/share/doc/mailbridge
dropin_src=systemd/mailbridge.service.d/port-25.conf
dropin=/etc/systemd/system/mailbridge.service.d/port-25.conf
credentials_src=systemd/mailbridge.service.d/credentials.conf.example

[ "$(id -u)" -eq 0 ] || die "run as root: sudo sh deploy/install.sh"
if [ ! -f "$bin_src" ] || [ ! -x "$bin_src" ]; then
    die "$bin_src not found: build it first with 'cargo build --release --locked'"
fi
for f in systemd/mailbridge.service systemd/mailbridge.sysusers.conf \
    systemd/mailbridge.tmpfiles.conf "$dropin_src" "$credentials_src" relay.example.yaml; do
    [ -f "$repo/$f" ] || die "$repo/$f is missing"
done
command -v systemctl >/dev/null 2>&1 || die "systemd (systemctl) is required"

# 1. The binary. Copy beside the target, then rename over it, so a running
#    daemon keeps its old executable until it is restarted.
install -d -m 0755 /usr/local/bin
install -m 0755 "$bin_src" "$bin.new"
mv -f "$bin.new" "$bin"
say "installed $bin"

# 2. The service user and group.
install -d -m 0755 /etc/sysusers.d
install -m 0644 "$repo/systemd/mailbridge.sysusers.conf" "$sysusers"
if command -v systemd-sysusers >/dev/null 2>&1; then
    systemd-sysusers "$sysusers"
elif ! id mailbridge >/dev/null 2>&1; then
    useradd --system --user-group --no-create-home \
        --home-dir /var/spool/mailbridge --shell /usr/sbin/nologin \
        --comment "mailbridge SMTP relay" mailbridge
fi
id mailbridge >/dev/null 2>&1 || die "could not create the user mailbridge"
say "user mailbridge is present"

# 3. Directories: /etc/mailbridge (0750 root:mailbridge) and the spool
#    /var/spool/mailbridge (0700 mailbridge:mailbridge).
install -d -m 0755 /etc/tmpfiles.d
install -m 0644 "$repo/systemd/mailbridge.tmpfiles.conf" "$tmpfiles"
if command -v systemd-tmpfiles >/dev/null 2>&1; then
    systemd-tmpfiles --create "$tmpfiles"
else
    install -d -m 0750 -o root -g mailbridge "$confdir"
    install -d -m 0700 -o mailbridge -g mailbridge /var/spool/mailbridge
fi
say "created $confdir and /var/spool/mailbridge"

# 4. The configuration, only if there is none yet.
if [ -e "$conf" ]; then
    say "kept the existing $conf"
else
    install -m 0640 -o root -g mailbridge "$repo/relay.example.yaml" "$conf"
    say "installed $conf from relay.example.yaml: edit it before starting"
fi

# 5. Documentation, for the unit's Documentation= line, and the port-25
#    drop-in as an example to copy (it is not activated here: it grants a
#    capability, which only the administrator should decide), and the
#    LoadCredential= example drop-in.
install -d -m 0755 "$docdir"
install -m 0644 "$repo/README.md" "$repo/relay.example.yaml" \
    "$repo/$dropin_src" "$repo/$credentials_src" "$docdir/"
for f in "$repo"/docs/*.md; do
    if [ -f "$f" ]; then
        install -m 0644 "$f" "$docdir/"
    fi
done

# 6. The unit. Drop-ins in $unit.d/ are kept as they are.
install -m 0644 "$repo/systemd/mailbridge.service" "$unit"
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
fi
say "installed $unit"
if [ -e "$dropin" ]; then
    say "kept the drop-in $dropin"
fi

# Report on the configuration without failing the install.
if "$bin" check-config -c "$conf" >/dev/null 2>&1; then
    say "$conf: check-config ok"
else
    say "$conf: check-config reports errors (run: $bin check-config -c $conf)"
fi

if [ -d /run/systemd/system ] && systemctl is-active --quiet mailbridge; then
    cat <<EOF

mailbridge is running the previous binary. Apply the update with:
  systemctl restart mailbridge
EOF
else
    cat <<EOF

Next steps:
  As installed, $conf listens on 127.0.0.1:2525 only, lets only this
  machine send, and writes mail to /var/lib/mailbridge/outbox.
  1. Edit $conf: hostname, upstreams (Exchange Online:
     $docdir/exchange-setup.md), then listeners, access.allowed_senders and
     access.allow_networks or users. Reference: $docdir/configuration.md
  2. Check it:      sudo -u mailbridge $bin check-config -c $conf
  3. Start it:      systemctl enable --now mailbridge
  4. Watch the log: journalctl -u mailbridge -f
  5. Send a test:   swaks --server 127.0.0.1:2525 --from printer@example.com --to you@example.com
  To listen on a port below 1024 (25, 465, 587), install the drop-in:
    install -D -m 0644 $docdir/port-25.conf $dropin
    systemctl daemon-reload
EOF
fi
