#!/usr/bin/env bash
# Entrypoint of the mhd trainer pod: SSH in with a key, the container's env in every session,
# the dead-man timer in the background, then wait forever (tini, PID 1, reaps what exits).
#
# Never `set -x` and never print a value from the environment: RUNPOD_API_KEY, HF_TOKEN and
# friends are in it, and this script's output lands in the provider's container log.
set -euo pipefail

ENV_FILE=${MHD_ENV_FILE:-/etc/mhd/container.env}
MHD_ROOT=${MHD_ROOT:-/workspace/mhd}

say() {
  echo "mhd-start: $(date -u +%Y-%m-%dT%H:%M:%SZ) $*"
}

install_public_key() {
  install -d -m 700 /root/.ssh
  touch /root/.ssh/authorized_keys
  chmod 600 /root/.ssh/authorized_keys
  if [[ -z "${PUBLIC_KEY:-}" ]]; then
    say "PUBLIC_KEY is not set: nobody can log in over SSH (password login is disabled)"
    return
  fi
  # One key per line; a restart must not append the same keys again.
  local key
  while IFS= read -r key; do
    [[ -n "$key" ]] || continue
    grep -qxF -- "$key" /root/.ssh/authorized_keys || printf '%s\n' "$key" >>/root/.ssh/authorized_keys
  done <<<"$PUBLIC_KEY"
  say "installed $(grep -c . /root/.ssh/authorized_keys) authorized key(s)"
}

# SSH sessions do not inherit PID 1's environment, yet the trainer needs it (PATH to the image's
# python, HF_TOKEN, RUNPOD_POD_ID ...). Login shells read it via /etc/profile.d; command sessions
# (what mhd runs) via BASH_ENV, which sshd sets (image/Dockerfile: sshd_config.d/mhd.conf).
export_environment() {
  install -d -m 700 "$(dirname "$ENV_FILE")"
  local tmp name count=0
  tmp=$(mktemp "$ENV_FILE.XXXXXX")
  chmod 600 "$tmp"
  while IFS= read -r name; do
    case "$name" in
      HOME | HOSTNAME | PWD | OLDPWD | SHLVL | TERM | _ | PUBLIC_KEY | BASH_ENV | MHD_ENV_FILE) continue ;;
    esac
    [[ "$name" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || continue
    printf 'export %s=%q\n' "$name" "${!name}" >>"$tmp"
    count=$((count + 1))
  done < <(compgen -e)
  mv -f "$tmp" "$ENV_FILE"
  say "exported $count environment variables for SSH sessions (names only are logged)"
}

# A stock image (RunPod's PyTorch image, mhd's default) may lack sshd or our settings: the same
# ones the custom image bakes in (image/Dockerfile) are written here, once.
ensure_sshd() {
  if [[ ! -x /usr/sbin/sshd ]]; then
    say "no sshd in this image: installing openssh-server"
    command -v apt-get >/dev/null || { say "no apt-get to install openssh-server with: use an image that has sshd"; return 1; }
    if ! { DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openssh-server >/dev/null; }; then
      say "apt-get could not install openssh-server"
      return 1
    fi
  fi
  local conf=/etc/ssh/sshd_config.d/mhd.conf
  [[ -f "$conf" ]] && return 0
  install -d -m 755 /etc/ssh/sshd_config.d /etc/profile.d
  printf '%s\n' 'PermitRootLogin prohibit-password' 'PasswordAuthentication no' \
    'KbdInteractiveAuthentication no' 'PubkeyAuthentication yes' 'ClientAliveInterval 30' \
    'ClientAliveCountMax 4' 'SetEnv BASH_ENV=/etc/mhd/container.env' >"$conf"
  # the first value of a keyword wins, so the include must come first
  grep -q '^Include /etc/ssh/sshd_config.d/' /etc/ssh/sshd_config 2>/dev/null \
    || sed -i '1i Include /etc/ssh/sshd_config.d/*.conf' /etc/ssh/sshd_config
  printf '%s\n' '[ -r /etc/mhd/container.env ] && . /etc/mhd/container.env' >/etc/profile.d/mhd-env.sh
  say "sshd configured for key-only root login"
}

start_sshd() {
  install -d -m 755 /run/sshd
  ssh-keygen -A >/dev/null # host keys are made per container, never baked into the image
  /usr/sbin/sshd -t
  /usr/sbin/sshd
  say "sshd listening on port 22"
}

start_deadman() {
  if [[ ! -f /opt/mhd/deadman.sh ]]; then
    say "no /opt/mhd/deadman.sh: the pod will not stop itself if the daemon disappears"
    return
  fi
  mkdir -p "$MHD_ROOT"
  nohup sh /opt/mhd/deadman.sh >>"$MHD_ROOT/deadman.log" 2>&1 </dev/null &
  say "dead-man timer started (pid $!, log $MHD_ROOT/deadman.log)"
}

main() {
  install_public_key
  export_environment
  ensure_sshd
  start_sshd
  start_deadman
  say "ready"
  exec sleep infinity
}

# Sourcing (tests) defines the functions without starting anything. Piped into bash (a stock
# image's start command, mhd/remote/runpod.py) BASH_SOURCE is empty: that starts it too.
if [[ "${BASH_SOURCE[0]:-$0}" == "$0" ]]; then
  main "$@"
fi
