#!/bin/sh
# The pod's Python stack from the lock, so a stock image (RunPod's PyTorch image) can train:
#   sh bootstrap.sh requirements.lock        (run.sh calls it when job.env sets MHD_BOOTSTRAP)
# Prints the interpreter to use on stdout (one line); everything else goes to stderr (train.log).
#
# Idempotent: the environment holds a marker with the lock's sha256, written last, so a second
# pod on the same network volume (or a relaunch) reuses it and a half-done install is redone.
# The environment lives on /workspace when it exists (the network volume: later pods skip the
# ~5 GB install), else under $HOME. Exit 4 with one "mhd-bootstrap: ..." line on any failure.
#
# Environment: MHD_BOOTSTRAP  auto (default: only when MHD_PYTHON lacks the training stack) | always
#              MHD_PYTHON     the image's interpreter (python3); the venv is made from it
#              MHD_ENV_DIR    where the environment goes (default /workspace/mhd-env or ~/.mhd-env)
#              MHD_PIP_ARGS   extra pip arguments (a mirror: --index-url URL; tests: --no-index --find-links DIR)
set -u

fail() {
  echo "mhd-bootstrap: $*" >&2
  [ -z "${MHD_BOOTSTRAP_ERR:-}" ] || echo "mhd-bootstrap: $*" >"$MHD_BOOTSTRAP_ERR"
  exit 4
}
say() {
  echo "mhd-bootstrap: $(date -u +%Y-%m-%dT%H:%M:%SZ) $*" >&2
}

lock=${1:-requirements.lock}
[ -f "$lock" ] || fail "no lock file $lock next to run.sh: the daemon uploads it with the trainer"
python=${MHD_PYTHON:-python3}
command -v "$python" >/dev/null 2>&1 || fail "no $python on this pod: the image needs CPython 3.11"
mode=${MHD_BOOTSTRAP:-auto}

if [ "$mode" = auto ] && "$python" -c 'import importlib.util as u, sys
sys.exit(0 if all(u.find_spec(m) for m in ("torch", "transformers", "peft", "trl", "datasets")) else 1)' 2>/dev/null
then
  say "$python already has torch, transformers, peft, trl and datasets; using it (bootstrap = \"always\" installs the lock anyway)"
  echo "$python"
  exit 0
fi

sha=$(sha256sum "$lock" | cut -d' ' -f1) || fail "cannot hash $lock"
# The lock is for one CPython (its wheels are cp311): another one would fail deep inside pip.
want=$(sed -n 's/^# mhd-lock: python=\([0-9.]*\).*/\1/p' "$lock" | head -1)
have=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])') || fail "$python does not run"
if [ -n "$want" ] && [ "$want" != "$have" ]; then
  fail "the lock is for CPython $want but $python is $have: use an image with python $want (runpod.image) or set training.python"
fi

if [ -n "${MHD_ENV_DIR:-}" ]; then
  env_dir=$MHD_ENV_DIR
elif [ -d /workspace ] && [ -w /workspace ]; then
  env_dir=/workspace/mhd-env
else
  env_dir=${HOME:-/root}/.mhd-env
fi
marker=$env_dir/.mhd-lock-sha256

for ready in /opt/mhd/venv "$env_dir"; do  # the custom image bakes the same lock into /opt/mhd/venv
  if [ -x "$ready/bin/python" ] && [ "$(cat "$ready/.mhd-lock-sha256" 2>/dev/null)" = "$sha" ]; then
    say "$ready already holds this lock (sha256 ${sha%"${sha#????????????}"}); not installing"
    echo "$ready/bin/python"
    exit 0
  fi
done

mkdir -p "$(dirname "$env_dir")" || fail "cannot create $(dirname "$env_dir")"
# Two pods on one network volume: one installs, the other waits and then finds the marker.
if command -v flock >/dev/null 2>&1; then
  exec 8>"$env_dir.lock" || fail "cannot open $env_dir.lock"
  flock 8 || fail "cannot lock $env_dir.lock"
  if [ "$(cat "$marker" 2>/dev/null)" = "$sha" ]; then
    say "$env_dir was installed by another pod meanwhile; not installing"
    echo "$env_dir/bin/python"
    exit 0
  fi
fi

say "installing the pod's packages from $lock into $env_dir (first pod on this volume; several GB for the full lock)"
rm -rf "$env_dir"
"$python" -m venv "$env_dir" >&2 || fail "$python -m venv $env_dir failed (Debian/Ubuntu: apt-get install python3-venv)"
# shellcheck disable=SC2086  # MHD_PIP_ARGS is a list of words on purpose
"$env_dir/bin/python" -m pip install --disable-pip-version-check --no-input --progress-bar off \
    --require-hashes --no-deps --only-binary=:all: ${MHD_PIP_ARGS:-} -r "$lock" >&2 \
  || fail "pip could not install $lock into $env_dir (see the pip lines above in train.log); the lock or the index is broken"
"$env_dir/bin/python" -m pip check >&2 || fail "the installed packages conflict (pip check, above): the lock is inconsistent"
if ! { echo "$sha" >"$marker.tmp" && mv "$marker.tmp" "$marker"; }; then
  fail "cannot write $marker"
fi
say "installed; later pods on this volume reuse $env_dir"
echo "$env_dir/bin/python"
