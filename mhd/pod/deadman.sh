#!/bin/sh
# mhd dead-man timer: the pod stops itself when the daemon has gone quiet and nothing trains.
#
# Started in the background by the image's start.sh, once per container start:
#   sh /path/to/deadman.sh >> /workspace/mhd/deadman.log 2>&1 &
#
# Every MHD_DEADMAN_INTERVAL seconds it looks at $MHD_ROOT/runs/*/heartbeat (the daemon touches
# the one in its run folder at every poll). When the newest heartbeat -- or, with none, this
# container's start -- is older than MHD_MAX_UNATTENDED seconds AND no trainer is running, it
# stops the pod with `runpodctl` (RunPod injects a pod-scoped RUNPOD_API_KEY and RUNPOD_POD_ID).
# A lost daemon then costs at most MHD_MAX_UNATTENDED of GPU time, not days.
#
# "Trainer running" = some run folder has a `pid` file, no `exit_code` file, and that process is
# alive. A training run is never stopped: it finishes, writes exit_code, and then the clock
# counts. A pid file older than the container's start is from an earlier life of the pod (stopped,
# then resumed): its number may belong to another process now, so it is ignored -- otherwise a
# reused pid would keep the pod billing forever.
#
# Environment (all optional):
#   MHD_ROOT               default /workspace/mhd
#   MHD_MAX_UNATTENDED     seconds, default 7200
#   MHD_DEADMAN_INTERVAL   seconds between checks, default 60
#   MHD_DEADMAN_STOP_CMD   command run (via sh -c) to stop the pod; default runpodctl
#   MHD_DEADMAN_STARTED_AT epoch seconds of the container's start; default from /proc/1 (tests)
#   RUNPOD_POD_ID          set by RunPod; needed by the default stop command
# `deadman.sh --once` makes one check and exits: 0 nothing to do, 3 stop requested, 4 stop failed.
#
# Never `set -x` here and never print the environment: RUNPOD_API_KEY is in it.

set -u

root=${MHD_ROOT:-/workspace/mhd}

say() {
  echo "mhd-deadman: $(date -u +%Y-%m-%dT%H:%M:%SZ) $*"
}

# When this container started, in epoch seconds: boot time + PID 1's start (field 22 of
# /proc/1/stat, in clock ticks; the fields after "(comm) " are counted from field 3). PID 1 of a
# container is its init, so this is the pod's (re)start. Falls back to now.
container_start() {
  btime=$(awk '$1 == "btime" { print $2 }' /proc/stat 2>/dev/null)
  hz=$(getconf CLK_TCK 2>/dev/null)
  ticks=$(sed 's/^.*) //' /proc/1/stat 2>/dev/null | awk '{ print $20 }')
  case "$btime$hz$ticks" in
    '' | *[!0-9]*) date +%s ;;
    *) if [ "$hz" -gt 0 ]; then echo $((btime + ticks / hz)); else date +%s; fi ;;
  esac
}

# A positive whole number from $1, or the default $2 -- a typo in the config must not disable the
# guard (or make it fire every second), so anything else falls back with a warning.
whole() {
  v=${1%%.*}
  case $v in
    '' | *[!0-9]*) say "ignoring '$1' (not a number of seconds); using $2" >&2; echo "$2" ;;
    *) if [ "$v" -gt 0 ]; then echo "$v"; else echo "$2"; fi ;;
  esac
}

max=$(whole "${MHD_MAX_UNATTENDED:-7200}" 7200)
interval=$(whole "${MHD_DEADMAN_INTERVAL:-60}" 60)
started=$(whole "${MHD_DEADMAN_STARTED_AT:-$(container_start)}" "$(date +%s)")

# Modification time in epoch seconds: GNU/busybox stat, else date -r; empty if neither works.
mtime() {
  stat -c %Y "$1" 2>/dev/null || date -r "$1" +%s 2>/dev/null
}

# The newest heartbeat's mtime, or nothing.
newest_heartbeat() {
  newest=
  for hb in "$root"/runs/*/heartbeat; do
    [ -f "$hb" ] || continue
    t=$(mtime "$hb") || continue
    [ -n "$t" ] || continue
    if [ -z "$newest" ] || [ "$t" -gt "$newest" ]; then
      newest=$t
    fi
  done
  echo "$newest"
}

# Prints the run folder of a live trainer and succeeds, or fails if none runs.
training_running() {
  for pidfile in "$root"/runs/*/pid; do
    [ -f "$pidfile" ] || continue
    dir=${pidfile%/pid}
    [ -e "$dir/exit_code" ] && continue
    t=$(mtime "$pidfile")
    if [ -n "$t" ] && [ "$t" -lt "$started" ]; then
      continue  # written before this container started: a stale number, maybe reused now
    fi
    pid=$(head -n 1 "$pidfile" 2>/dev/null | tr -dc '0-9')
    [ -n "$pid" ] || continue
    if kill -0 "$pid" 2>/dev/null; then
      echo "$dir"
      return 0
    fi
  done
  return 1
}

stop_pod() {
  if [ -n "${MHD_DEADMAN_STOP_CMD:-}" ]; then
    sh -c "$MHD_DEADMAN_STOP_CMD"
    return
  fi
  if [ -z "${RUNPOD_POD_ID:-}" ]; then
    say "cannot stop the pod: RUNPOD_POD_ID is not set" >&2
    return 1
  fi
  if ! command -v runpodctl >/dev/null 2>&1; then
    say "cannot stop the pod: runpodctl is not on PATH" >&2
    return 1
  fi
  # Output is discarded: only the exit status is logged, so nothing the CLI prints (it knows the
  # key) can reach the log. Current runpodctl spells it `pod stop`; older releases `stop pod`.
  runpodctl pod stop "$RUNPOD_POD_ID" >/dev/null 2>&1 || runpodctl stop pod "$RUNPOD_POD_ID" >/dev/null 2>&1
}

# One check. Returns 0 if nothing to do, 3 after a stop request, 4 if the request failed.
check() {
  now=$(date +%s)
  last=$(newest_heartbeat)
  if [ -n "$last" ]; then
    what="last heartbeat"
  else
    last=$started
    what="no heartbeat yet; container started"
  fi
  age=$((now - last))
  [ "$age" -gt "$max" ] || return 0
  if dir=$(training_running); then
    # Logged once per interval at most; the trainer's own end (exit_code) re-arms the stop.
    say "unattended for ${age}s (> ${max}s) but training is running in $dir; not stopping"
    return 0
  fi
  say "unattended for ${age}s (> ${max}s; $what $last) and nothing is training: stopping pod ${RUNPOD_POD_ID:-?}"
  stop_pod
  rc=$?
  if [ "$rc" -eq 0 ]; then
    say "stop requested"
    return 3
  fi
  say "stop request failed (exit $rc); retrying in ${interval}s" >&2
  return 4
}

if [ "${1:-}" = "--once" ]; then
  check
  exit $?
fi

say "watching $root/runs/*/heartbeat every ${interval}s; stopping the pod after ${max}s unattended"
while :; do
  sleep "$interval"
  # Keep checking after a stop request: if the pod is somehow still up next time, ask again.
  check || :
done
