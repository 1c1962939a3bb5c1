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
  start_sshd
  start_deadman
  say "ready"
  exec sleep infinity
}

# Sourcing (tests) defines the functions without starting anything.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  main "$@"
fi
