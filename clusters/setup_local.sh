#!/usr/bin/env bash
# Prepare this machine for clusters/local.yaml (run as root; idempotent):
#   * openssh-server and rsync (apt-get, when missing),
#   * an SSH server listening on 127.0.0.1:22 only, keys only,
#   * the unprivileged user the cluster runs as ("saliency"), whose ~/.ssh/authorized_keys
#     holds the key ~/.ssh/saliency_cluster_ed25519 of the user running this script, and whose
#     ~/.bashrc puts this machine's Python (the one running the tests) first on PATH and gives
#     Ray a temp dir of its own.
# Exit codes: 0 ready; 3 the SSH path cannot be made available here (the reason is the last
# line printed); anything else is a bug.
set -euo pipefail

CLUSTER_USER="${SALIENCY_CLUSTER_USER:-saliency}"
KEY="${HOME}/.ssh/saliency_cluster_ed25519"
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
# the interpreter as its environment sees it (a virtualenv's bin/ holds its `ray`), and the
# file it links to (whose folders must be reachable too)
PYTHON="$("$PYTHON" -c 'import sys; print(sys.executable)')"
REAL_PYTHON="$(readlink -f "$PYTHON")"
RAY_TMP="/tmp/${CLUSTER_USER}-ray"

unavailable() { echo "local cluster unavailable: $*"; exit 3; }

[ "$(id -u)" -eq 0 ] || unavailable "setup needs root (it installs sshd and adds a user); run: sudo bash $0"

# --- packages -------------------------------------------------------------------------------
if [ ! -x /usr/sbin/sshd ] || ! command -v rsync > /dev/null; then
  command -v apt-get > /dev/null || unavailable "no sshd/rsync and no apt-get to install them"
  echo "installing openssh-server and rsync"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq > /dev/null 2>&1 || unavailable "apt-get update failed (no package mirror reachable?)"
  apt-get install -y -qq openssh-server rsync > /dev/null 2>&1 \
    || unavailable "apt-get install openssh-server rsync failed"
fi

# --- the cluster's user ---------------------------------------------------------------------
id "$CLUSTER_USER" > /dev/null 2>&1 || useradd --create-home --shell /bin/bash "$CLUSTER_USER"
HOME_DIR="$(getent passwd "$CLUSTER_USER" | cut -d: -f6)"

# Its Python is this machine's: every directory above the interpreter must let it through.
for target in "$(dirname "$PYTHON")" "$(dirname "$REAL_PYTHON")"; do
  path=""
  IFS=/ read -ra parts <<< "$target"
  for part in "${parts[@]}"; do
    [ -n "$part" ] || continue
    path="$path/$part"  # top down: a directory can only be tested once its parent lets us in
    if ! su -s /bin/sh "$CLUSTER_USER" -c "test -x '$path'"; then
      echo "letting $CLUSTER_USER traverse $path (chmod o+x: enter, not list)"
      chmod o+x "$path"
    fi
  done
done
su -s /bin/sh "$CLUSTER_USER" -c "'$PYTHON' -c 'import ray, torch'" \
  || unavailable "$CLUSTER_USER cannot import ray and torch with $PYTHON"

mkdir -p "$RAY_TMP"
chown "$CLUSTER_USER:" "$RAY_TMP"
BASHRC="$HOME_DIR/.bashrc"
touch "$BASHRC"
# Our block first in the file (Debian's .bashrc returns early for non-interactive shells),
# rewritten on every run so that it names the Python of this run.
sed -i '/^# saliency-sweep local cluster/,/^export RAY_TMPDIR=/d' "$BASHRC"
{
  echo "# saliency-sweep local cluster (clusters/setup_local.sh)"
  echo "export PATH=\"$(dirname "$PYTHON"):\$PATH\""
  echo "export RAY_TMPDIR=\"$RAY_TMP\""
  cat "$BASHRC"
} > "$BASHRC.new"
mv "$BASHRC.new" "$BASHRC"
chown "$CLUSTER_USER:" "$BASHRC"

# --- keys -----------------------------------------------------------------------------------
mkdir -p "$(dirname "$KEY")"
chmod 700 "$(dirname "$KEY")"
[ -f "$KEY" ] || ssh-keygen -q -t ed25519 -N "" -C "saliency-sweep local cluster" -f "$KEY"
install -d -m 700 -o "$CLUSTER_USER" -g "$(id -gn "$CLUSTER_USER")" "$HOME_DIR/.ssh"
AUTH="$HOME_DIR/.ssh/authorized_keys"
touch "$AUTH"
grep -qF "$(cat "$KEY.pub")" "$AUTH" || cat "$KEY.pub" >> "$AUTH"
chown "$CLUSTER_USER:" "$AUTH"
chmod 600 "$AUTH"

# --- sshd on the loopback -------------------------------------------------------------------
mkdir -p /run/sshd
ssh-keygen -A > /dev/null
ssh_ok() {
  ssh -i "$KEY" -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
      -o ConnectTimeout=5 -o LogLevel=ERROR "$CLUSTER_USER@127.0.0.1" true 2> /dev/null
}
if ! ssh_ok; then
  if ! (exec 3<> /dev/tcp/127.0.0.1/22) 2> /dev/null; then
    echo "starting sshd on 127.0.0.1:22"
    /usr/sbin/sshd -o ListenAddress=127.0.0.1 -o PasswordAuthentication=no \
      -o KbdInteractiveAuthentication=no || unavailable "sshd did not start"
    for _ in $(seq 1 20); do ssh_ok && break; sleep 0.5; done
  fi
  ssh_ok || unavailable "ssh $CLUSTER_USER@127.0.0.1 with $KEY is refused (another SSH server on port 22?)"
fi

# --- the login shell Ray opens finds this Python and Ray ------------------------------------
ssh -i "$KEY" -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
    -o LogLevel=ERROR "$CLUSTER_USER@127.0.0.1" \
    "bash --login -c -i 'python -c \"import ray, torch\" && command -v ray'" > /dev/null 2>&1 \
  || unavailable "the login shell of $CLUSTER_USER does not find python/ray of $PYTHON"
echo "local cluster ready: ssh $CLUSTER_USER@127.0.0.1 with $KEY, python $PYTHON"
