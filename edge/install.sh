#!/usr/bin/env bash
# Install fedbus on an edge device (Raspberry Pi 4/5, Jetson, any Debian-like aarch64/x86_64).
# Idempotent: run it again after `git pull` to upgrade. See edge/README.md.
#
#   sudo edge/install.sh                      # trainer + aggregator units, torch (CPU)
#   sudo edge/install.sh --no-torch           # numpy-only: aggregator, or Jetson with NVIDIA's torch
#   sudo edge/install.sh --broker             # also Debian's mosquitto with brokers/edge.conf
#   sudo FEDBUS_BROKER_HOST=10.0.0.5 edge/install.sh --node pi-0 \
#       --manifest examples/digits/edge-manifest.yaml [--secure DIR]   # + this node's own unit
#   edge/install.sh --dry-run                 # print what would be done, change nothing
set -euo pipefail

PREFIX=/opt/fedbus
ETC=/etc/fedbus
UNIT_DIR=/etc/systemd/system
USER_NAME=fedbus
PYTHON=${PYTHON:-python3}
# Where torch comes from: PyTorch's CPU index (PyPI's builds are CUDA ones); a mirror may
# replace it (any PEP 503 index with torch and its dependencies).
TORCH_CPU_INDEX=${FEDBUS_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}
DRY_RUN=0
WITH_TORCH=1
WITH_BROKER=0
NODE=
MANIFEST=
SECURE=
CONNECT=
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
    sed -n '2,8s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
    cat <<EOF

Options:
  --dry-run      print the commands instead of running them (no root needed)
  --no-torch     install without the trainer extra (numpy-only aggregator; Jetson: bring your own torch)
  --broker       apt-get install mosquitto and configure it with brokers/edge.conf
  --node ID      generate and enable fedbus-ID.service (fedbus units) for this device's node
  --manifest F   the manifest (path inside the checkout) that --node is in
  --secure DIR   a "fedbus acl" folder: the node's password goes into /etc/fedbus/ID.env
  --connect H:P  the broker --node connects to, for a manifest that names none
  --prefix DIR   install under DIR instead of ${PREFIX}
  -h, --help     this text
EOF
}

while (($#)); do
    case $1 in
        --dry-run) DRY_RUN=1 ;;
        --no-torch) WITH_TORCH=0 ;;
        --broker) WITH_BROKER=1 ;;
        --node | --manifest | --secure | --connect)
            [[ $# -ge 2 ]] || { echo "install.sh: $1 needs a value" >&2; exit 2; }
            case $1 in
                --node) NODE=$2 ;;
                --manifest) MANIFEST=$2 ;;
                --secure) SECURE=$2 ;;
                --connect) CONNECT=$2 ;;
            esac
            shift
            ;;
        --prefix)
            [[ $# -ge 2 ]] || { echo "install.sh: --prefix needs a directory" >&2; exit 2; }
            PREFIX=$2
            shift
            ;;
        -h | --help) usage; exit 0 ;;
        *) echo "install.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done

VENV=$PREFIX/venv
APP=$PREFIX/app
if [[ -n $NODE && -z $MANIFEST ]]; then
    echo "install.sh: --node needs --manifest (the manifest the node is in)" >&2
    exit 2
fi

log() { printf '==> %s\n' "$*"; }

# Run a command, or print it (shell-quoted) under --dry-run.
run() {
    if ((DRY_RUN)); then
        printf '+'
        printf ' %q' "$@"
        printf '\n'
    else
        "$@"
    fi
}

check_prerequisites() {
    if ! ((DRY_RUN)) && ((EUID != 0)); then
        echo "install.sh: run as root (sudo), or try --dry-run" >&2
        exit 1
    fi
    if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo "install.sh: $PYTHON must be Python >= 3.11 (Debian 12 / Raspberry Pi OS Bookworm" \
            "have 3.11; on older systems set PYTHON=/path/to/python3.11)" >&2
        exit 1
    fi
    if ! "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then
        echo "install.sh: the venv module is missing: apt-get install python3-venv" >&2
        ((DRY_RUN)) || exit 1
    fi
    for f in pyproject.toml constraints.txt edge/fedbus-trainer@.service; do
        [[ -f $SRC/$f ]] || { echo "install.sh: $SRC/$f not found; run from a checkout" >&2; exit 1; }
    done
}

create_user() {
    if id -u "$USER_NAME" >/dev/null 2>&1; then
        log "user $USER_NAME exists"
    else
        log "creating system user $USER_NAME"
        run useradd --system --user-group --home-dir /var/lib/fedbus --no-create-home \
            --shell /usr/sbin/nologin "$USER_NAME"
    fi
}

install_python() {
    if [[ -x $VENV/bin/python ]]; then
        log "virtual environment $VENV exists"
    else
        log "creating virtual environment $VENV"
        run install -d -m 0755 "$PREFIX"
        run "$PYTHON" -m venv "$VENV"
    fi
    local target=$SRC what="numpy only" torch_pin
    if ((WITH_TORCH)); then
        target="${SRC}[trainer]"
        what="trainer extra, CPU torch"
    fi
    log "installing fedbus ($what)"
    run "$VENV/bin/python" -m pip install --upgrade pip
    if ((WITH_TORCH)); then
        # PyPI's torch is a CUDA build on x86_64 and on aarch64 too (2.13.0 on aarch64 brings
        # 2.5 GB of nvidia-* packages, measured: docs/deploy.md), useless on a Pi. torch comes
        # first from the CPU index, as PyTorch's own instructions install it; the pin holds.
        torch_pin=$(grep -E '^torch==' "$SRC/constraints.txt" || echo torch)
        run "$VENV/bin/python" -m pip install --index-url "$TORCH_CPU_INDEX" "$torch_pin"
    fi
    # Not editable: the venv must keep working if the checkout moves or is deleted.
    run "$VENV/bin/python" -m pip install --upgrade --constraint "$SRC/constraints.txt" "$target"
    # Task modules named by manifests (examples.*) and the docs units point at.
    run install -d -m 0755 "$APP" "$APP/edge"
    run cp -R "$SRC/examples" "$APP/"
    run install -m 0644 "$SRC/edge/README.md" "$APP/edge/README.md"
}

install_config() {
    run install -d -m 0750 -o root -g "$USER_NAME" "$ETC"
    if [[ -f $ETC/fedbus.env ]]; then
        log "$ETC/fedbus.env exists; leaving it alone (compare with edge/fedbus.env.example)"
    else
        log "installing $ETC/fedbus.env: edit FEDBUS_BROKER_HOST and FEDBUS_MANIFEST"
        run install -m 0640 -o root -g "$USER_NAME" "$SRC/edge/fedbus.env.example" "$ETC/fedbus.env"
    fi
}

systemd_version() {
    systemctl --version 2>/dev/null | awk 'NR == 1 { print $2 + 0 }'
}

install_units() {
    log "installing systemd units into $UNIT_DIR"
    local unit version
    version=$(systemd_version || true)
    for unit in fedbus-trainer@.service fedbus-aggregator.service; do
        run install -m 0644 "$SRC/edge/$unit" "$UNIT_DIR/$unit"
        # RestartSteps/RestartMaxDelaySec exist from systemd 254 on; older ones warn on them.
        if ((${version:-0} >= 254)); then
            run install -d -m 0755 "$UNIT_DIR/$unit.d"
            run install -m 0644 "$SRC/edge/restart-backoff.conf" "$UNIT_DIR/$unit.d/restart-backoff.conf"
        fi
    done
}

# The node's own unit and env file, generated from the manifest by the installed fedbus.
install_node_unit() {
    local version out args
    version=$(systemd_version || true)
    if ((DRY_RUN)); then out=/tmp/fedbus-units; else out=$(mktemp -d); fi
    args=("$SRC/$MANIFEST" --node "$NODE" --out "$out" --prefix "$PREFIX" --env-dir "$ETC"
        --manifest-path "$APP/$MANIFEST" --systemd "${version:-252}")
    if [[ -n $SECURE ]]; then
        args+=(--secure "$SECURE")
    fi
    if [[ -n $CONNECT ]]; then
        args+=(--broker "$CONNECT")
    fi
    log "generating fedbus-$NODE.service from $MANIFEST"
    # Under --dry-run the venv may not exist yet: print the command instead.
    run "$VENV/bin/fedbus" units "${args[@]}"
    run install -m 0644 "$out/fedbus-$NODE.service" "$UNIT_DIR/fedbus-$NODE.service"
    if [[ -f $ETC/$NODE.env ]]; then
        log "$ETC/$NODE.env exists; leaving it alone (new one: $out/$NODE.env)"
    else
        run install -m 0640 -o root -g "$USER_NAME" "$out/$NODE.env" "$ETC/$NODE.env"
    fi
    if ((DRY_RUN)) || command -v systemctl >/dev/null; then
        # works offline too (an image being prepared in a chroot): it only makes the links
        run systemctl enable "fedbus-$NODE.service"
    else
        log "systemctl not found: fedbus-$NODE.service installed, not enabled (no systemd here)"
    fi
}

install_broker() {
    local conf=$SRC/brokers/edge.conf
    log "installing Debian's mosquitto with $conf"
    [[ -f $conf ]] || { echo "install.sh: $conf not found" >&2; exit 1; }
    if ! dpkg-query -W -f='${Status}' mosquitto 2>/dev/null | grep -q 'install ok installed'; then
        run apt-get install -y mosquitto
    fi
    run install -m 0644 "$conf" /etc/mosquitto/conf.d/fedbus.conf
    run systemctl enable mosquitto.service
    run systemctl restart mosquitto.service
}

main() {
    check_prerequisites
    if ((DRY_RUN)); then
        log "dry run: nothing is changed"
    fi
    create_user
    install_python
    install_config
    install_units
    if [[ -n $NODE ]]; then
        install_node_unit
    fi
    if ((WITH_BROKER)); then
        install_broker
    fi
    log "reloading systemd"
    if ((DRY_RUN)) || [[ -d /run/systemd/system ]]; then
        run systemctl daemon-reload
    else
        log "systemd is not running here; skipped daemon-reload"
    fi
    cat <<EOF
==> done. Next:
    1. edit $ETC/fedbus.env (broker host, manifest)
    2. fedbus validate: sudo -u $USER_NAME sh -c 'set -a; . $ETC/fedbus.env; $VENV/bin/fedbus validate \$FEDBUS_MANIFEST'
    3. trainer:    systemctl enable --now fedbus-trainer@<node-id>
       aggregator: systemctl enable --now fedbus-aggregator
    4. logs:       journalctl -fu 'fedbus-*'
EOF
    if [[ -n $NODE ]]; then
        echo "    this node: systemctl start fedbus-$NODE (enabled; settings in $ETC/$NODE.env)"
    fi
}

main
