"""How the daemon behaves on this machine: control-socket latency, idle cost, event latency,
startup rescan of 100k memory files, and the dataset build — each row against the goal of issue 6.

Run it from the repository root (the real ``mhd daemon`` processes it starts use the local
provider and the protocol-true fake trainer from tests/; loopback and temp folders only):

    .venv/bin/python -m benchmarks.bench_daemon            # the full run (4-5 minutes)
    .venv/bin/python -m benchmarks.bench_daemon --quick    # shorter windows, fewer samples
    .venv/bin/python -m benchmarks.bench_daemon --profile  # also cProfile the in-process rescan

What is measured, in this order:
  small daemon   a daemon watching the 63 committed example memories: start→ready (the start-up
                 baseline), an idle window (RSS, CPU, torch mapped?), memory files written one by
                 one (each timed until ``pending_memories`` counts it), then a long fake-trainer
                 run (5 steps/s, progress read every second) during which 2,000 ``status``
                 requests go over the socket (mhd.daemon.client.request, a connection each, paced
                 at 100/s), and a few full ``mhd status --json`` CLI invocations are timed
  scaling        status_snapshot() in-process on a run with 100 / 1,000 / 5,000 progress rows
  rescan         MemoryIndex's own steps (file_cache, scan, save_file_cache, install) on a real
                 Store in a child process, cold (empty DB cache) then warm: where the time goes
  big daemon     a daemon on 100k memory files: cold start (empty DB cache) → ready, stop, warm
                 start → ready; then an idle window and the same file-written → counted test
  dataset        build_dataset on the 100k files in a child process: memories/s, peak RSS

The 100k corpus is generated once into benchmarks/out/corpus-100k/ (about 420 MB on disk) and
reused; "cold" means an empty DB cache, not an empty page cache (the files are in RAM after
the first read). Prints a table and writes benchmarks/out/daemon.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psutil

from mhd.daemon.client import DaemonNotRunning, request
from mhd.dataset.memories import iter_memory_files
from mhd.devtools.toml_write import write_config
from tests.support.polling import wait_until

REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "benchmarks" / "out"
OUT = OUT_DIR / "daemon.json"
CORPUS_VERSION = 1
OLD_MTIME = 1_600_000_000.0
WRITES_DIR = "bench-writes"  # inside the corpus while the write benchmark runs; removed after
MiB = 1 << 20


# ---- the 100k corpus ---------------------------------------------------------------------------


def ensure_corpus(root: Path, n: int) -> dict[str, Any]:
    """Generate ``n`` memory files in the MetaHuman layout once; reuse them while the stamp matches.

    Built from the committed examples (all types, category folders, both conversation shapes),
    each made distinct with a suffix, one file a day-folder every ~10 minutes over two years.
    About 1 in 1,000 is truncated JSON and 1 in 2,000 an encrypted ``.json.enc``: the rejects a
    real folder has.
    """
    from datetime import UTC, datetime, timedelta

    from mhd.devtools.examples import _CATEGORY, EXAMPLES, LOCAL_TZ, event_id, iso_z, memory_object, slug

    stamp = root.parent / f"{root.name}.stamp.json"
    want = {"version": CORPUS_VERSION, "files": n}
    shutil.rmtree(root / WRITES_DIR, ignore_errors=True)  # left by an interrupted run
    if root.is_dir() and stamp.exists() and json.loads(stamp.read_text()) == want:
        return {**want, "generated_s": None, "reused": True}
    shutil.rmtree(root, ignore_errors=True)
    stamp.unlink(missing_ok=True)
    started = time.perf_counter()
    templates = [(memory_object(ex), ex.category or _CATEGORY.get(ex.type), slug(ex.content)) for ex in EXAMPLES]
    base = datetime(2024, 7, 1, tzinfo=UTC)
    step = timedelta(days=730) / n
    made: set[Path] = set()
    for i in range(n):
        obj, category, name_slug = templates[i % len(templates)]
        ts = base + step * i
        obj = {**obj, "id": event_id(ts), "timestamp": iso_z(ts), "content": f"{obj['content']} (#{i})"}
        local = ts.astimezone(LOCAL_TZ)
        folder = root / category / f"{local:%Y/%m/%d}" if category else root / f"{local:%Y/%m/%d}"
        if folder not in made:
            folder.mkdir(parents=True, exist_ok=True)
            made.add(folder)
        text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
        if i % 2000 == 1999:
            path = folder / f"{obj['id']}-encrypted.json.enc"
            text = json.dumps({"iv": "AAAAAAAAAAAAAAAA", "authTag": "AAAAAAAAAAAAAAAAAAAAAA==",
                               "ciphertext": "QUFB" * 64}, indent=2)
        else:
            path = folder / f"{obj['id']}-{name_slug}.json"
            if i % 1000 == 999:
                text = text[: len(text) // 2]  # a half-written file, long ago: a bad_json reject
        path.write_text(text, encoding="utf-8")
        if i % 1000 == 999 or i % 2000 == 1999:
            os.utime(path, (OLD_MTIME, OLD_MTIME))
    stamp.write_text(json.dumps(want))
    return {**want, "generated_s": round(time.perf_counter() - started, 1), "reused": False,
            "folders": len(made)}


def warm_page_cache(root: Path) -> None:
    """Read every file once: "cold" means an empty DB cache, not a disk read (other benchmarks,
    such as the 1 GiB transfers, may have pushed the corpus out of the page cache)."""
    for path in iter_memory_files(root):
        with contextlib.suppress(OSError):
            path.read_bytes()


def count_dirs(root: Path) -> int:
    return sum(1 for _ in os.walk(root))


# ---- small helpers -----------------------------------------------------------------------------


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(values)
    return s[max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))]


def summary_ms(seconds: list[float]) -> dict[str, float]:
    ms = [x * 1000 for x in seconds]
    return {"n": len(ms), "p50_ms": round(pct(ms, 50), 2), "p95_ms": round(pct(ms, 95), 2),
            "p99_ms": round(pct(ms, 99), 2), "max_ms": round(max(ms), 2), "mean_ms": round(sum(ms) / len(ms), 2)}


def torch_mapped(pid: int) -> list[str]:
    """Shared objects of torch mapped into the process (none: torch was never imported)."""
    found = set()
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and "torch" in parts[5]:
                found.add(parts[5].strip())
    return sorted(found)


# ---- one real daemon process -------------------------------------------------------------------


class Daemon:
    """A real ``mhd daemon`` (tests.support.daemon.DaemonProc) with the local provider."""

    def __init__(self, work: Path, name: str, memory_dir: Path, **overrides: Any) -> None:
        from mhd.config import load_config
        from tests.support.daemon import DaemonProc, base_config

        self.dir = work / name
        self.dir.mkdir(parents=True, exist_ok=True)
        top, sections = base_config(self.dir, memory_dir=str(memory_dir), threshold=10**9,
                                    log_level="INFO", **overrides)
        self.config = write_config(self.dir / "config.toml", top, sections)
        self.cfg = load_config(self.config, {})
        self.log = self.dir / "daemon.log"
        self.proc = DaemonProc(self.config, self.log)
        self.socket = self.cfg.socket_path

    @property
    def pid(self) -> int:
        assert self.proc.proc is not None
        return self.proc.proc.pid

    def start(self, timeout: float = 300) -> float:
        """Start it; seconds from spawning the process to the first answer on the socket."""
        offset = self.log.stat().st_size if self.log.exists() else 0
        started = time.perf_counter()
        self.proc.start(wait=False)
        wait_until(self.proc.ping, timeout, "daemon ready", interval=0.01)
        ready = time.perf_counter() - started
        self._log_offset = offset
        return ready

    def log_since_start(self) -> str:
        with self.log.open("rb") as f:
            f.seek(self._log_offset)
            return f.read().decode(errors="replace")

    def rescan_line(self) -> dict[str, int] | None:
        m = re.search(r"rescan of .*?: (\d+) memory files \((\d+) parsed, (\d+) cached\), (\d+) pending",
                      self.log_since_start())
        if not m:
            return None
        return dict(zip(("files", "parsed", "cached", "pending"), map(int, m.groups()), strict=True))

    def status(self) -> dict[str, Any]:
        resp = request(self.socket, "status")
        assert resp.get("ok"), resp
        st: dict[str, Any] = resp["status"]
        return st

    def stop(self) -> None:
        if self.proc.proc is not None and self.proc.proc.poll() is None:
            self.proc.stop()
        from tests.support.daemon import kill_local_jobs

        kill_local_jobs(self.cfg.local_root)  # only trainer groups this daemon launched (pid files)


def watch_idle(d: Daemon, seconds: float) -> dict[str, Any]:
    """CPU % (of one core) and RSS of the daemon over ``seconds`` of doing nothing asked of it."""
    p = psutil.Process(d.pid)
    log_before = d.log_since_start()
    rss: list[int] = []
    c0 = p.cpu_times()
    t0 = time.monotonic()
    deadline = t0 + seconds
    while (now := time.monotonic()) < deadline:
        rss.append(p.memory_info().rss)
        time.sleep(min(0.5, deadline - now))
    c1 = p.cpu_times()
    wall = time.monotonic() - t0
    rss.append(p.memory_info().rss)
    cpu = max(0.0, (c1.user + c1.system - c0.user - c0.system) / wall * 100)
    log_during = d.log_since_start()[len(log_before):]
    return {
        "seconds": round(wall, 1),
        "cpu_percent": round(cpu, 2),
        "rss_mib_last": round(rss[-1] / MiB, 1),
        "rss_mib_max": round(max(rss) / MiB, 1),
        "threads": p.num_threads(),
        "torch_mapped": torch_mapped(d.pid),
        "inotify_overflows": log_during.count("Inotify queue overflowed; filesystem events were lost"),
        "log_lines": len(log_during.splitlines()),
    }


# ---- the measurements --------------------------------------------------------------------------


def bench_small(work: Path, args: argparse.Namespace, res: dict[str, Any]) -> None:
    """Example memories: start-up baseline, idle, writes, then status latency during a long run."""
    from mhd.devtools.examples import write_examples

    memories = work / "small-memories"
    files = write_examples(memories)
    for p in files:
        os.utime(p, (OLD_MTIME, OLD_MTIME))
    # A run that outlasts the benchmark. 5 steps a second is already faster than real LoRA
    # training logs; the progress file is read every second.
    d = Daemon(work, "small", memories, poll_interval_s=1.0, debounce_s=5.0,
               training={"extra": {"fake_steps": 10**6, "fake_step_s": 0.2}})
    try:
        ready = d.start()
        res["small_daemon"] = {"memory_files": len(files), "start_to_ready_s": round(ready, 3),
                               "rescan": d.rescan_line()}
        print(f"small daemon ready in {ready:.2f} s; idle for {args.idle_small_s:.0f} s ...", flush=True)
        time.sleep(2)
        res["idle_small"] = watch_idle(d, args.idle_small_s)
        print(f"  {args.writes} memory files written one by one ...", flush=True)
        res["write_small"] = measure_writes(d, memories, args)

        resp = request(d.socket, "train")
        assert resp.get("ok"), resp
        wait_until(lambda: (d.status()["progress"]["step"] or 0) >= args.min_step, 120,
                   f"training past step {args.min_step}", interval=0.2)
        first = d.status()
        print(f"  run {first['run_id']} training at step {first['progress']['step']}; "
              f"{args.queries} status requests ...", flush=True)
        # Paced (100/s) rather than back to back, so the queries span many of the daemon's
        # progress polls instead of slipping in between two of them.
        lat: list[float] = []
        states: dict[str, int] = {}
        next_at = time.perf_counter()
        for _ in range(args.queries):
            next_at += 1 / args.query_rate
            t = time.perf_counter()
            resp = request(d.socket, "status")
            lat.append(time.perf_counter() - t)
            st = resp["status"]["state"]
            states[st] = states.get(st, 0) + 1
            if (wait := next_at - time.perf_counter()) > 0:
                time.sleep(wait)
        last = d.status()
        status_row = summary_ms(lat)
        status_row.update({"rate": args.query_rate, "states_seen": states, "step_first": first["progress"]["step"],
                           "step_last": last["progress"]["step"],
                           "loss_history_len": len(last.get("loss_history") or []),
                           "answer_bytes": len(json.dumps(last))})
        pings: list[float] = []
        for _ in range(args.queries // 4):
            t = time.perf_counter()
            request(d.socket, "ping")
            pings.append(time.perf_counter() - t)
        status_row["ping"] = summary_ms(pings)  # the loop's own responsiveness, for comparison
        res["status_socket"] = status_row

        mhd = REPO / ".venv" / "bin" / "mhd"
        cmd = [str(mhd)] if mhd.exists() else [sys.executable, "-m", "mhd.cli"]
        cli: list[float] = []
        for _ in range(args.cli_runs):
            t = time.perf_counter()
            out = subprocess.run([*cmd, "--config", str(d.config), "status", "--json"],
                                 capture_output=True, text=True, check=True)
            cli.append(time.perf_counter() - t)
            assert json.loads(out.stdout)["state"] == "Training", out.stdout[:200]
        shown = " ".join([Path(cmd[0]).name, *cmd[1:], "status", "--json"])
        res["status_cli"] = {**summary_ms(cli), "command": shown}

        request(d.socket, "cancel")
        wait_until(lambda: d.status()["state"] == "Idle", 60, "Idle after cancel", interval=0.2)
    finally:
        d.stop()


def measure_writes(d: Daemon, memory_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Write memory files one at a time; each timed until ``pending_memories`` counts it."""
    folder = memory_dir / WRITES_DIR / "2026" / "07" / "18"
    folder.mkdir(parents=True)
    time.sleep(1.0)  # let the observer add its watches for the new folders
    nonce = uuid.uuid4().hex[:8]
    lat: list[float] = []
    missed = 0
    before = d.status()["pending_memories"]
    for i in range(args.writes):
        body = {"id": f"evt-20260718120000{i % 10}", "timestamp": "2026-07-18T12:00:00.000Z",
                "content": f"Benchmark memory {nonce}-{i}: walked Juniper along the river after work.",
                "type": "observation", "entities": ["Juniper"], "tags": ["bench"], "importance": 0.5}
        path = folder / f"evt-20260718120000{i % 10}-bench-{nonce}-{i}.json"
        t = time.perf_counter()
        path.write_text(json.dumps(body, indent=2) + "\n")  # in place, as the MetaHuman writer does
        deadline = t + args.write_timeout_s
        while True:
            pending = d.status()["pending_memories"]
            if pending > before:
                lat.append(time.perf_counter() - t)
                before = pending
                break
            if time.perf_counter() > deadline:
                missed += 1
                break
            time.sleep(0.001)
        if missed >= 5:
            break  # the daemon is not seeing writes; don't spend minutes proving it
    row: dict[str, Any] = {"writes": len(lat) + missed, "missed": missed, "timeout_s": args.write_timeout_s}
    if lat:
        row.update(summary_ms(lat))  # over the counted writes; any miss fails the row anyway
    return row


def bench_status_scaling(work: Path, res: dict[str, Any]) -> None:
    """What one status answer costs the daemon as a run's progress rows pile up (in-process)."""
    from mhd.store import Store
    from mhd.views import status_snapshot

    store = Store(f"sqlite:///{work / 'scaling' / 'mhd.db'}")
    run = store.create_run("manual", "local")
    rows: list[dict[str, Any]] = []
    have = 0
    for target, reps in ((100, 50), (1000, 30), (5000, 10)):
        while have < target:
            batch = [{"step": s, "total_steps": 10**6, "epoch": s / 1000, "loss": 3.0 / s, "learning_rate": 2e-4,
                      "samples_per_s": 5.0, "eta_s": 1.0, "time": time.time(), "phase": "train"}
                     for s in range(have + 1, min(target, have + 500) + 1)]
            store.add_progress(run.id, batch, have + len(batch))
            have += len(batch)
        lat = []
        for _ in range(reps):
            t = time.perf_counter()
            status_snapshot(store, pending=0, threshold=50, daemon={})
            lat.append(time.perf_counter() - t)
        rows.append({"progress_rows": target, **summary_ms(lat)})
    store.close()
    res["status_scaling"] = rows


def bench_rescan_inprocess(work: Path, corpus: Path, args: argparse.Namespace, res: dict[str, Any]) -> None:
    """MemoryIndex's steps on a real Store, in a child, cold then warm: where the time goes."""
    db = work / "inprocess" / "mhd.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "benchmarks.bench_daemon", "--child-rescan", str(corpus), str(db)]
    if args.profile:
        cmd.append("--profile")
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=True)
    res["rescan_inprocess"] = json.loads(out.stdout.strip().splitlines()[-1])


def bench_big(work: Path, corpus: Path, args: argparse.Namespace, res: dict[str, Any]) -> None:
    """100k files: cold and warm start, idle, then file written → counted in pending_memories."""
    d = Daemon(work, "big", corpus, debounce_s=5.0)
    try:
        print("big daemon: cold start (empty DB cache) ...", flush=True)
        cold = d.start()
        res["rescan_daemon_cold"] = {"start_to_ready_s": round(cold, 3), "rescan": d.rescan_line(),
                                     "inotify_overflows": d.log_since_start().count("Inotify queue overflowed;")}
        print(f"  ready in {cold:.2f} s; warm start ...", flush=True)
        d.stop()
        warm = d.start()
        res["rescan_daemon_warm"] = {"start_to_ready_s": round(warm, 3), "rescan": d.rescan_line(),
                                     "inotify_overflows": d.log_since_start().count("Inotify queue overflowed;")}
        print(f"  ready in {warm:.2f} s; idle for {args.idle_s:.0f} s ...", flush=True)
        time.sleep(2)
        res["idle_big"] = watch_idle(d, args.idle_s)

        print(f"  {args.writes} memory files written one by one ...", flush=True)
        res["write_big"] = measure_writes(d, corpus, args)
    finally:
        d.stop()
        shutil.rmtree(corpus / WRITES_DIR, ignore_errors=True)


def bench_build(work: Path, corpus: Path, res: dict[str, Any]) -> None:
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_daemon", "--child-build", str(corpus),
                          str(work / "dataset")], capture_output=True, text=True, cwd=REPO, check=True)
    res["dataset_build"] = json.loads(out.stdout.strip().splitlines()[-1])


# ---- child modes -------------------------------------------------------------------------------


def maxrss_mib() -> float:
    """Peak RSS of this process (VmHWM: unlike ru_maxrss, not inherited from the forking parent)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError("no VmHWM in /proc/self/status")


def child_rescan(root: Path, db: Path, profile: bool) -> None:
    import cProfile
    import pstats

    from mhd.config import DatasetConfig
    from mhd.daemon.watcher import MemoryIndex, release_heap, scan
    from mhd.store import Store

    store = Store(f"sqlite:///{db}")
    index = MemoryIndex(root, store, DatasetConfig())
    report: dict[str, Any] = {"rss_before_mib": round(psutil.Process().memory_info().rss / MiB, 1)}
    for label in ("cold", "warm"):
        prof = cProfile.Profile() if profile else None
        if prof:
            prof.enable()
        # The steps of MemoryIndex.rescan_blocking, timed one by one.
        t0 = time.perf_counter()
        cache = store.file_cache()
        t1 = time.perf_counter()
        result = scan(root, cache, index.cfg)
        t2 = time.perf_counter()
        store.save_file_cache(result.dirty, result.removed)
        t3 = time.perf_counter()
        pending = store.pending_count()
        t4 = time.perf_counter()
        row: dict[str, Any] = {
            "total_s": round(t4 - t0, 3), "file_cache_load_s": round(t1 - t0, 3), "scan_s": round(t2 - t1, 3),
            "save_file_cache_s": round(t3 - t2, 3), "pending_count_s": round(t4 - t3, 3),
            "files": result.files, "parsed": result.parsed, "cached": result.cached,
            "pending": pending,
        }
        del cache, result
        release_heap()
        if prof:
            prof.disable()
            path = OUT_DIR / f"rescan-{label}.prof"
            prof.dump_stats(path)
            stats = pstats.Stats(prof)
            top = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:10]  # type: ignore[attr-defined]
            row["profile"] = str(path.relative_to(REPO))
            row["profile_top_tottime"] = [f"{fn[0].rsplit('/', 1)[-1]}:{fn[1]}({fn[2]}) {v[2]:.2f}s"
                                          for fn, v in top]
        report[label] = row
    report["rss_after_mib"] = round(psutil.Process().memory_info().rss / MiB, 1)
    report["maxrss_mib"] = maxrss_mib()
    print(json.dumps(report))


def child_build(root: Path, out: Path) -> None:
    from mhd.config import DatasetConfig
    from mhd.dataset.build import build_dataset

    baseline = maxrss_mib()
    t = time.perf_counter()
    manifest = build_dataset(root, out, DatasetConfig())
    seconds = time.perf_counter() - t
    print(json.dumps({
        "seconds": round(seconds, 2), "files_seen": manifest["files_seen"],
        "memories_read": manifest["memories_read"], "samples": manifest["samples"],
        "rejects": manifest["rejects"], "skipped": manifest["skipped"],
        "memories_per_s": round(manifest["memories_read"] / seconds),
        "files_per_s": round(manifest["files_seen"] / seconds),
        "rss_after_imports_mib": baseline, "peak_rss_mib": maxrss_mib(),
    }))


# ---- table -------------------------------------------------------------------------------------


def rows_from(res: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def add(what: str, value: str, goal: str, ok: bool | None, note: str = "") -> None:
        rows.append({"what": what, "value": value, "goal": goal, "pass": ok, "note": note})

    if s := res.get("status_socket"):
        add(f"status over the socket, {s['n']} queries during a run ({s['rate']:.0f}/s)",
            f"p50 {s['p50_ms']:.1f} / p95 {s['p95_ms']:.1f} / p99 {s['p99_ms']:.1f} ms (max {s['max_ms']:.1f})",
            "p99 < 50 ms", s["p99_ms"] < 50,
            f"trainer at steps {s['step_first']}→{s['step_last']} (5 steps/s); ping over the same socket: "
            f"p99 {s['ping']['p99_ms']:.1f} ms")
    if sc := res.get("status_scaling"):
        add("one status answer in-process vs the run's progress rows",
            ", ".join(f"{r['progress_rows']}: {r['p50_ms']:.1f} ms" for r in sc),
            "—", None, "p50 of status_snapshot(); the socket adds ~0.1 ms")
    if c := res.get("status_cli"):
        add(f"`mhd status --json` CLI, {c['n']} runs (process start included)",
            f"p50 {c['p50_ms']:.0f} / max {c['max_ms']:.0f} ms", "—", None)
    for key, label in (("idle_small", "idle daemon, 63 example files"), ("idle_big", "idle daemon, 100k files")):
        if i := res.get(key):
            ok = i["rss_mib_max"] < 80 and i["cpu_percent"] < 0.5 and not i["torch_mapped"]
            note = f"{i['threads']} threads"
            if i["inotify_overflows"]:
                note += f", {i['inotify_overflows']} inotify queue overflows in the window"
            add(f"{label}, {i['seconds']:.0f} s",
                f"RSS {i['rss_mib_max']:.1f} MiB, CPU {i['cpu_percent']:.2f} %, torch "
                f"{'MAPPED' if i['torch_mapped'] else 'not imported'}",
                "< 80 MB, < 0.5 %, no torch", ok, note)
    for key, label in (("write_small", "63 example files"), ("write_big", "100k files")):
        if w := res.get(key):
            what = f"memory file written → counted in pending_memories, {label}"
            if "p50_ms" in w:
                add(what, f"p50 {w['p50_ms']:.0f} / p99 {w['p99_ms']:.0f} ms (max {w['max_ms']:.0f}), "
                          f"{w['missed']} of {w['writes']} never counted",
                    "p99 < 1 s", w["p99_ms"] < 1000 and not w["missed"])
            else:
                add(what, f"none of {w['writes']} counted within {w['timeout_s']:.0f} s (stopped after 5)",
                    "p99 < 1 s", False)
    base = (res.get("small_daemon") or {}).get("start_to_ready_s")
    ip = res.get("rescan_inprocess") or {}
    for kind, limit in (("cold", 5.0), ("warm", 1.0)):
        r = res.get(f"rescan_daemon_{kind}")
        if not r:
            continue
        extra = r["start_to_ready_s"] - base if base is not None else r["start_to_ready_s"]
        parts = ""
        if kind in ip:
            p = ip[kind]
            parts = (f"in-process {p['total_s']:.1f} s = cache load {p['file_cache_load_s']:.1f} + scan "
                     f"{p['scan_s']:.1f} + cache save {p['save_file_cache_s']:.1f} + pending count "
                     f"{p['pending_count_s']:.2f}")
        note = "; ".join(x for x in (parts, f"{r['inotify_overflows']} inotify queue overflows during start"
                                     if r["inotify_overflows"] else "") if x)
        add(f"startup rescan of 100k files, {kind}",
            f"{extra:.2f} s over the baseline start ({r['start_to_ready_s']:.2f} s start→ready)",
            f"< {limit:.0f} s", extra < limit, note)
    if b := res.get("dataset_build"):
        add(f"dataset build from {b['files_seen'] // 1000}k files",
            f"{b['memories_per_s']} memories/s ({b['seconds']:.1f} s), peak RSS {b['peak_rss_mib']:.0f} MiB",
            "report", None, f"{b['samples']} samples; RSS after imports {b['rss_after_imports_mib']:.0f} MiB")
    return rows


def print_table(rows: list[dict[str, Any]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_lines=True)
    for col in ("what", "measured", "goal", "result"):
        table.add_column(col, overflow="fold")
    for r in rows:
        verdict = {True: "[green]pass[/]", False: "[red]FAIL[/]", None: "info"}[r["pass"]]
        table.add_row(r["what"], r["value"] + (f"\n[dim]{r['note']}[/]" if r["note"] else ""), r["goal"], verdict)
    Console(width=160).print(table)


def main(args: argparse.Namespace) -> int:
    started = time.time()
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    corpus = OUT_DIR / f"corpus-{args.files // 1000}k"
    res: dict[str, Any] = {}
    print(f"corpus {corpus} ...", flush=True)
    res["corpus"] = {**ensure_corpus(corpus, args.files), "path": str(corpus.relative_to(REPO)),
                     "dirs": count_dirs(corpus)}
    try:
        bench_small(work, args, res)
        bench_status_scaling(work, res)
        if not args.quick:
            print("in-process rescan (cold, warm) ...", flush=True)
            warm_page_cache(corpus)
            bench_rescan_inprocess(work, corpus, args, res)
        warm_page_cache(corpus)
        bench_big(work, corpus, args, res)
        print("dataset build ...", flush=True)
        bench_build(work, corpus, res)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    rows = rows_from(res)
    print_table(rows, f"mhd daemon benchmarks ({'quick' if args.quick else 'full'}; {os.cpu_count()} CPUs)")
    report = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "seconds": round(time.time() - started, 1),
        "quick": args.quick,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "params": {"files": args.files, "queries": args.queries, "idle_s": args.idle_s,
                   "idle_small_s": args.idle_small_s, "writes": args.writes,
                   "cli_runs": args.cli_runs, "min_step": args.min_step},
        "rows": rows,
        "results": res,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out} "
          f"in {report['seconds']:.0f} s")
    return 0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="20 s idle windows, 500 queries, 50 writes, no in-process rescan breakdown")
    p.add_argument("--files", type=int, default=100_000, help="size of the generated corpus")
    p.add_argument("--profile", action="store_true", help="cProfile the in-process rescan (benchmarks/out/*.prof)")
    p.add_argument("--workdir", type=Path, default=OUT_DIR / "work-daemon")
    p.add_argument("--keep", action="store_true", help="keep the work folder (daemon logs, DBs)")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--child-rescan", nargs=2, metavar=("ROOT", "DB"), help=argparse.SUPPRESS)
    p.add_argument("--child-build", nargs=2, metavar=("ROOT", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.queries = 500 if args.quick else 2000
    args.idle_s = 20.0 if args.quick else 60.0  # the 100k daemon
    args.idle_small_s = 20.0 if args.quick else 30.0
    args.writes = 50 if args.quick else 200
    args.cli_runs = 3 if args.quick else 5
    args.min_step = 20
    args.query_rate = 100.0
    args.write_timeout_s = 5.0
    return args


if __name__ == "__main__":
    a = parse()
    if a.child_rescan:
        child_rescan(Path(a.child_rescan[0]), Path(a.child_rescan[1]), a.profile)
    elif a.child_build:
        child_build(Path(a.child_build[0]), Path(a.child_build[1]))
    else:
        try:
            raise SystemExit(main(a))
        except DaemonNotRunning as exc:
            raise SystemExit(f"bench_daemon: {exc}") from None
