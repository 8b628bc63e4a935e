#!/bin/sh
# Install Touchpoint Gateway on a Debian 12 / Raspberry Pi OS box, as root:
#
#   sudo sh systemd/install.sh                 # venv in /opt/touchpoint-gateway, enable, start
#   sudo sh systemd/install.sh --bluez-experimental   # also start bluetoothd --experimental
#   DESTDIR=/tmp/root sh systemd/install.sh --no-venv # stage into a root, touch nothing else
#
# It puts the project in a venv under PREFIX, the unit, sysusers and tmpfiles files
# under /etc, the example config in /etc/touchpoint-gateway, and the firmware-config
# folder under PREFIX/share.  It never overwrites /etc/touchpoint-gateway/gateway.toml.
# With an empty DESTDIR it then creates the user and directories, runs
# systemctl daemon-reload and enable, and starts the service once a config exists
# (write one with: touchpoint-gateway provision ...; see systemd/README.md).
set -eu

PREFIX=${PREFIX:-/opt/touchpoint-gateway}
DESTDIR=${DESTDIR:-}
PYTHON=${PYTHON:-python3}
VENV=1
BLUEZ=0
UNIT=touchpoint-gateway.service

usage() {
    cat <<EOF
usage: install.sh [--prefix DIR] [--destdir DIR] [--no-venv] [--bluez-experimental]

  --prefix DIR          where the venv goes (default /opt/touchpoint-gateway; or PREFIX=)
  --destdir DIR         stage everything under DIR; run no system command (or DESTDIR=)
  --no-venv             do not create the venv or pip-install (tests, or a venv you made)
  --bluez-experimental  install the bluetooth.service drop-in for passive BLE scanning
EOF
}

die() {
    echo "install.sh: $*" >&2
    exit 1
}

while [ $# -gt 0 ]; do
    case $1 in
        --prefix) [ $# -ge 2 ] || die "--prefix needs a value"; PREFIX=$2; shift 2 ;;
        --prefix=*) PREFIX=${1#*=}; shift ;;
        --destdir) [ $# -ge 2 ] || die "--destdir needs a value"; DESTDIR=$2; shift 2 ;;
        --destdir=*) DESTDIR=${1#*=}; shift ;;
        --no-venv) VENV=0; shift ;;
        --bluez-experimental) BLUEZ=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown option: $1" ;;
    esac
done

case $PREFIX in
    /*) ;;
    *) die "PREFIX must be an absolute path, not '$PREFIX'" ;;
esac
case $PREFIX in
    *[!A-Za-z0-9/._-]*) die "PREFIX may hold only letters, digits and / . _ -" ;;
esac
if [ -z "$DESTDIR" ] && [ "$(id -u)" != 0 ]; then
    die "run as root (sudo), or give DESTDIR to stage into a folder"
fi

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(dirname "$HERE")
FIRMWARE=$REPO/firmware-config
ROOT=${DESTDIR%/}
SHARE=$PREFIX/share/touchpoint-gateway

say() { echo "==> $*"; }

# 1. The venv.
if [ "$VENV" = 1 ]; then
    say "venv in $ROOT$PREFIX"
    if [ -n "$ROOT" ]; then
        echo "    note: a venv is not relocatable; this one only runs from $ROOT$PREFIX"
    fi
    "$PYTHON" -m venv "$ROOT$PREFIX"
    "$ROOT$PREFIX/bin/pip" install --quiet --upgrade pip
    "$ROOT$PREFIX/bin/pip" install --quiet "$REPO"
else
    say "skipping the venv (--no-venv): $PREFIX/bin/touchpoint-gateway must exist on the box"
    install -d -m 0755 "$ROOT$PREFIX/bin"
fi

# 2. Unit, sysusers, tmpfiles (ExecStart follows PREFIX).
say "unit, sysusers and tmpfiles files under $ROOT/etc"
install -d -m 0755 "$ROOT/etc/systemd/system" "$ROOT/etc/sysusers.d" "$ROOT/etc/tmpfiles.d"
sed -e "s|/opt/touchpoint-gateway/|$PREFIX/|g" "$HERE/$UNIT" >"$ROOT/etc/systemd/system/$UNIT.tmp"
chmod 0644 "$ROOT/etc/systemd/system/$UNIT.tmp"
mv "$ROOT/etc/systemd/system/$UNIT.tmp" "$ROOT/etc/systemd/system/$UNIT"
install -m 0644 "$HERE/touchpoint-gateway.sysusers" "$ROOT/etc/sysusers.d/touchpoint-gateway.conf"
install -m 0644 "$HERE/touchpoint-gateway.tmpfiles" "$ROOT/etc/tmpfiles.d/touchpoint-gateway.conf"

# 3. Config directory: the example and the template; never the live config.
say "config directory $ROOT/etc/touchpoint-gateway"
install -d -m 0755 "$ROOT/etc/touchpoint-gateway" "$ROOT/etc/touchpoint-gateway/tls"
install -d -m 0700 "$ROOT/etc/touchpoint-gateway/credstore"
install -m 0644 "$FIRMWARE/gateway.example.toml" "$ROOT/etc/touchpoint-gateway/gateway.example.toml"
install -m 0644 "$FIRMWARE/store-template.toml" "$ROOT/etc/touchpoint-gateway/store-template.toml"
install -d -m 0750 "$ROOT/var/lib/touchpoint-gateway"

# 4. Reference copies: firmware-config (udev rules, BlueZ drop-in, Pi notes) and docs.
say "reference files in $ROOT$SHARE"
install -d -m 0755 "$ROOT$SHARE/systemd"
cp -R "$FIRMWARE" "$ROOT$SHARE/"
chmod -R u=rwX,go=rX "$ROOT$SHARE/firmware-config"
for f in README.md "$UNIT" touchpoint-gateway.sysusers touchpoint-gateway.tmpfiles; do
    install -m 0644 "$HERE/$f" "$ROOT$SHARE/systemd/$f"
done

if [ "$BLUEZ" = 1 ]; then
    say "bluetooth.service drop-in: bluetoothd --experimental"
    install -d -m 0755 "$ROOT/etc/systemd/system/bluetooth.service.d"
    install -m 0644 "$FIRMWARE/bluez/bluetooth.service.d/experimental.conf" \
        "$ROOT/etc/systemd/system/bluetooth.service.d/touchpoint-experimental.conf"
fi

if [ -n "$ROOT" ]; then
    say "staged into $ROOT; on the box run: systemd-sysusers; systemd-tmpfiles --create;"
    echo "    systemctl daemon-reload; systemctl enable --now $UNIT"
    exit 0
fi

# 5. On the box: user, directories, systemd.
say "user and directories"
systemd-sysusers /etc/sysusers.d/touchpoint-gateway.conf
systemd-tmpfiles --create /etc/tmpfiles.d/touchpoint-gateway.conf
chown touchpoint-gateway:touchpoint-gateway /var/lib/touchpoint-gateway
say "systemctl daemon-reload, enable"
systemctl daemon-reload
systemctl enable "$UNIT"
if [ "$BLUEZ" = 1 ]; then
    systemctl try-restart bluetooth.service
fi
if [ -f /etc/touchpoint-gateway/gateway.toml ]; then
    say "starting $UNIT"
    systemctl restart "$UNIT"
    systemctl --no-pager --lines=0 status "$UNIT" || true
else
    say "enabled, not started: write /etc/touchpoint-gateway/gateway.toml first, e.g."
    echo "    $PREFIX/bin/touchpoint-gateway provision --template /etc/touchpoint-gateway/store-template.toml \\"
    echo "        --store-file STORE.toml --key k1.key=K1FILE --key mqtt.password=PWFILE"
    echo "    then: systemctl start $UNIT"
fi
