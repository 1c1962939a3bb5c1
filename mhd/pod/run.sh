#!/bin/sh
# The job launcher, started by mhd detached from any SSH session:
#   setsid nohup sh <run dir>/run.sh >> <run dir>/train.log 2>&1 < /dev/null &
# It owns the protocol files pid, launches and exit_code; the trainer owns the rest.
dir=$(cd "$(dirname "$0")" && pwd) || exit 97
cd "$dir" || exit 97
# One trainer per run folder, whatever happens to the daemon: the lock lives as long as this
# shell and its children, so a second launch while the first still runs is a no-op.
if command -v flock >/dev/null 2>&1; then
  exec 9>"$dir/run.lock"
  if ! flock -n 9; then
    echo "mhd: a launcher already holds $dir/run.lock; not starting a second trainer"
    exit 0
  fi
fi
echo $$ > pid.tmp && mv pid.tmp pid
rm -f exit_code
date +%s >> launches
# Settings and secrets arrive in a 0600 file, never on a command line.
if [ -f job.env ]; then
  set -a
  . ./job.env
  set +a
fi
# A stock image gets the trainer's packages from the lock first (bootstrap.sh: once per volume).
code=0
if [ -n "${MHD_BOOTSTRAP:-}" ] && [ "$MHD_BOOTSTRAP" != never ]; then
  rm -f bootstrap.err
  if py=$(MHD_BOOTSTRAP_ERR="$dir/bootstrap.err" sh "$dir/bootstrap.sh" "$dir/requirements.lock"); then
    MHD_PYTHON=$py
  else
    code=4
  fi
fi
if [ "$code" = 0 ]; then
  echo "mhd: launcher $$ starting ${MHD_TRAINER:-train.py} at $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  "${MHD_PYTHON:-python3}" -u "${MHD_TRAINER:-train.py}" --run-dir "$dir"
  code=$?
fi
if [ -s bootstrap.err ] && [ "$code" = 4 ]; then
  # the last line of train.log becomes the run's reason: make it the bootstrap's own error
  echo "mhd: the trainer was not started, exit 4; $(tail -n 1 bootstrap.err)"
else
  echo "mhd: trainer exited with $code at $(date -u +%Y-%m-%dT%H:%M:%SZ)"
fi
echo "$code" > exit_code.tmp && mv exit_code.tmp exit_code
