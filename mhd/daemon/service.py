"""Assembly of the daemon: one asyncio process, every subsystem in one AsyncExitStack.

SIGTERM/SIGINT stop it cleanly without touching the pod: the run's state is already committed,
and the next start re-enters it (reattaching to a training that kept going meanwhile).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from mhd import __version__
from mhd.config import Config
from mhd.daemon.control import ControlServer
from mhd.daemon.dump import describe
from mhd.daemon.forgetting import Forgetter
from mhd.daemon.merges import MergeRetrier
from mhd.daemon.notify import sd_notify, watchdog_interval
from mhd.daemon.providers import build_connector, build_provider
from mhd.daemon.triggers import Triggers
from mhd.daemon.watcher import MemoryIndex, Watcher
from mhd.remote.provider import Provider, pod_name
from mhd.states.context import RunContext
from mhd.states.model import Outcome
from mhd.states.runner import Runner
from mhd.store import Run, Store, StoreError
from mhd.views import status_snapshot

log = logging.getLogger("mhd")


class JournalFormatter(logging.Formatter):
    """stderr lines journald understands: a ``<priority>`` prefix when run under systemd."""

    PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

    def __init__(self, journal: bool) -> None:
        fmt = "%(name)s: %(message)s" if journal else "%(asctime)s %(levelname)s %(name)s: %(message)s"
        super().__init__(fmt)
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if self.journal:
            return f"<{self.PRIORITY.get(record.levelno, 6)}>" + text.replace("\n", "\n  ")
        return text


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JournalFormatter(journal=bool(os.environ.get("JOURNAL_STREAM"))))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("asyncssh", "apscheduler", "watchdog", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))


class Daemon:
    def __init__(self, cfg: Config, config_path: Path | None = None) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.started = time.time()
        self.store = Store(cfg.db_path_url)
        self.index = MemoryIndex(cfg.memory_dir, self.store, cfg.dataset)
        self.kick = asyncio.Event()
        self.stopping = asyncio.Event()
        self.current: asyncio.Task[Any] | None = None
        self.ctx: RunContext | None = None
        self.provider: Provider | None = None
        self.triggers = Triggers(
            threshold=cfg.threshold, debounce_s=cfg.debounce_s, schedule=cfg.schedule,
            pending=lambda: self.index.pending, busy=self.busy, start=self.start_run,
        )
        self.merge_lock = asyncio.Lock()
        self.merges = MergeRetrier(cfg, self.store, self.merge_lock, self._merged_later)
        self.forgetter = Forgetter(cfg, self.store, self.index, start_run=self.start_run, cancel=self._cancel,
                                   hold_until=lambda: self.triggers.hold_until, on_purged=self._recount)

    # Control ---------------------------------------------------------------------------------
    def busy(self) -> bool:
        return self.store.active_run() is not None

    def start_run(self, trigger: str) -> str | None:
        waiting = self.merges.waiting()
        if waiting is not None and trigger not in ("manual", "forget"):
            # Its memories are trained already; a new pod would fail at the same merge. Retry that.
            log.info("not starting a %s run: run %s's adapter waits for its merge (%s); retrying the "
                     "merge instead of renting a pod", trigger, waiting.id, waiting.error or "failed")
            self.merges.poke_if_due()
            return None
        if waiting is not None:
            log.warning("%s run while run %s's adapter waits for its merge (`mhd merge %s`)",
                        trigger, waiting.id, waiting.id)
        try:
            run = self.store.create_run(trigger, self.cfg.provider)
        except StoreError as exc:
            log.info("not starting a %s run: %s", trigger, exc)
            return None
        log.info("run %s created (trigger: %s, %d memories pending)", run.id, trigger, self.index.pending)
        self.kick.set()
        return run.id

    def _merged_later(self, keys: Any) -> None:
        """A retried merge succeeded: its memories are trained; the threshold looks again."""
        self.index.mark_trained(keys)
        self.triggers.hold_until = 0.0
        self.triggers.changed()
        self.forgetter.changed(0)

    def _cancel(self, run_id: str, why: str) -> None:
        self.store.request_cancel(run_id)
        if self.ctx is not None:
            self.ctx.wake.set()

    def _recount(self) -> None:
        self.index.pending = self.store.pending_count()

    def _memories_changed(self) -> None:
        self.triggers.changed()
        self.forgetter.changed()

    def reload(self) -> None:
        """SIGHUP: re-read the config file; what a run reads at each use applies at once."""
        from mhd.config import load_config
        from mhd.errors import ConfigError

        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            log.error("reload: %s — keeping the running config", exc)
            return
        live = ("merge", "budget", "retry", "training", "dataset", "threshold", "debounce_s", "log_level")
        for name in live:
            setattr(self.cfg, name, getattr(new, name))
        self.triggers.threshold, self.triggers.debounce_s = new.threshold, new.debounce_s
        rest = [k for k in type(new).model_fields if k not in live and getattr(new, k) != getattr(self.cfg, k)]
        log.info("config reloaded from %s (%s)%s", self.config_path or "the default path", ", ".join(live),
                 f"; needs a restart to apply: {', '.join(rest)}" if rest else "")
        if self.merges.waiting() is not None:
            self.merges.poke()
        self.triggers.changed()

    def status(self) -> dict[str, Any]:
        return status_snapshot(
            self.store, pending=self.index.pending, threshold=self.cfg.threshold,
            daemon={"pid": os.getpid(), "version": __version__, "uptime_s": round(time.time() - self.started, 1),
                    "provider": self.cfg.provider, "memory_dir": str(self.cfg.memory_dir)},
            schedule=self.cfg.schedule, next_schedule_at=self.triggers.next_schedule_at(),
            forget_policy=self.cfg.forget.policy,
        )

    async def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req.get("cmd")
        if cmd == "status":
            return {"ok": True, "status": self.status()}
        if cmd == "ping":
            return {"ok": True, "pid": os.getpid()}
        if cmd == "train":
            active = self.store.active_run()
            if active is not None:
                return {"ok": False, "error": f"run {active.id} is already active ({active.state.value})"}
            run_id = self.start_run("manual")
            return {"ok": run_id is not None, "run_id": run_id}
        if cmd in ("merge", "promote"):
            run = self.store.get_run(str(req.get("run_id") or "")) or self.store.find_run(str(req.get("run_id") or ""))
            if run is None:
                return {"ok": False, "error": f"no run {req.get('run_id')}"}
            if cmd == "promote":
                return await self.merges.promote(run.id)
            return await self.merges.attempt(run.id)
        if cmd == "forget":
            reasons = {str(k): "owner" for k in req.get("keys") or []}
            new = self.forgetter.forget(reasons)
            return {"ok": True, "forgotten": new, "policy": self.cfg.forget.policy}
        if cmd == "purge":
            async with self.forgetter.lock:
                return await self.forgetter.purge()
        if cmd == "cancel":
            active = self.store.active_run()
            if active is None:
                return {"ok": False, "error": "no active run to cancel"}
            self.store.request_cancel(active.id)
            if self.ctx is not None:
                self.ctx.wake.set()
            return {"ok": True, "run_id": active.id}
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    # Lifecycle -------------------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        # `systemctl kill -s USR1 mhd`: what every task waits on, into the journal (a stuck run).
        loop.add_signal_handler(signal.SIGUSR1, lambda: log.warning("SIGUSR1 dump:\n%s", describe(loop)))
        loop.add_signal_handler(signal.SIGHUP, self.reload)  # systemctl reload mhd
        async with AsyncExitStack() as stack:
            stack.callback(self.store.close)
            provider, remote_root = build_provider(self.cfg)
            self.provider = provider
            stack.push_async_callback(provider.aclose)
            self.ctx = RunContext(cfg=self.cfg, store=self.store, provider=provider,
                                  connector=build_connector(self.cfg), remote_root=remote_root,
                                  log=logging.getLogger("mhd.run"), on_trained=self.index.mark_trained,
                                  merge_lock=self.merge_lock)

            watcher = Watcher(self.index, self._memories_changed)
            stack.push_async_callback(watcher.stop)
            await watcher.start()
            watcher.start_consumer()

            control = ControlServer(self.cfg.socket_path, self.handle, self.cfg.socket_group)
            await control.start()
            stack.push_async_callback(control.stop)

            self._hold_after(self.store.last_run())
            self.triggers.start_scheduler()
            stack.callback(self.triggers.stop)
            stack.callback(self.forgetter.stop)
            await self._start_web(stack)

            tasks = [asyncio.create_task(self._reaper(), name="reaper"),
                     asyncio.create_task(self.merges.run_forever(), name="merge-retrier")]
            if (interval := watchdog_interval()) is not None:
                tasks.append(asyncio.create_task(self._watchdog(interval), name="watchdog"))
            stack.push_async_callback(_cancel_all, tasks)

            sd_notify(f"READY=1\nSTATUS=watching {self.cfg.memory_dir}, {self.index.pending} pending")
            log.info("mhd %s ready: provider %s, %d memories pending (threshold %d), socket %s",
                     __version__, self.cfg.provider, self.index.pending, self.cfg.threshold,
                     self.cfg.socket_path)
            self.triggers.changed()
            self.forgetter.changed()  # a deletion while the daemon was down counts too
            await self._main_loop()
            sd_notify("STOPPING=1")
            log.info("stopping (SIGTERM): the active run, if any, resumes on next start")
        return 0

    async def _main_loop(self) -> None:
        assert self.ctx is not None
        runner = Runner(self.ctx)
        stop = asyncio.create_task(self.stopping.wait())
        try:
            while not self.stopping.is_set():
                run = self.store.active_run()
                if run is None:
                    self.kick.clear()
                    kicked = asyncio.create_task(self.kick.wait())
                    await asyncio.wait({kicked, stop}, return_when=asyncio.FIRST_COMPLETED)
                    kicked.cancel()
                    continue
                self.current = asyncio.create_task(runner.drive(run), name=f"run-{run.id}")
                await asyncio.wait({self.current, stop}, return_when=asyncio.FIRST_COMPLETED)
                if self.current.done():
                    try:
                        final = self.current.result()
                        log.info("run %s finished: %s", final.id, final.outcome.value if final.outcome else "?")
                        self._hold_after(final)
                    except Exception:
                        log.exception("run %s: runner crashed; retrying in 5 s", run.id)
                        await asyncio.wait({stop}, timeout=5)
                    self.current = None
                    self.triggers.changed()
                    self.forgetter.changed(0)
        finally:
            stop.cancel()
            if self.current is not None and not self.current.done():
                self.current.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self.current
            if self.ctx is not None:
                await self.ctx.drop_session()

    def _hold_after(self, run: Run | None) -> None:
        if run is None or run.finished_at is None or run.outcome is Outcome.SUCCEEDED:
            return
        until = run.finished_at + self.cfg.retry.failed_run_cooldown_s
        if until > time.time():
            self.triggers.hold_until = until
            outcome = run.outcome.value if run.outcome else "?"
            log.info("last run %s ended %s: the threshold trigger waits until %s (`mhd train` does not)",
                     run.id, outcome, time.strftime("%H:%M:%S", time.localtime(until)))

    async def _start_web(self, stack: AsyncExitStack) -> None:
        if not self.cfg.web.enabled:
            return
        try:
            from mhd.web.server import WebServer
        except ImportError:
            return
        web = WebServer(self.cfg.web, self.store, self.status, runs_dir=self.cfg.runs_dir)
        await web.start()
        stack.push_async_callback(web.stop)

    async def _reaper(self) -> None:
        from mhd.remote.reaper import reap

        assert self.provider is not None
        provider = self.provider

        def owned() -> set[str]:
            # By id once known; by name while a run is between `create` and persisting the id.
            run = self.store.active_run()
            if run is None:
                return set()
            return {run.pod_id} if run.pod_id else {pod_name(run.id, run.preemptions + 1)}

        while True:
            try:
                reaped = await reap(provider, owned, logging.getLogger("mhd.reaper"))
                for pod in reaped:
                    self.store.pod_terminated(pod.id, note="reaped: no active run owned it")
                    self.store.add_event(None, "reaped", f"{pod.name} ({pod.id})")
            except Exception:  # the reaper must outlive provider hiccups
                log.exception("reaper failed; will try again")
            await asyncio.sleep(self.cfg.runpod.reap_interval_s)

    async def _watchdog(self, interval: float) -> None:
        while True:
            sd_notify("WATCHDOG=1")
            await asyncio.sleep(interval)


async def _cancel_all(tasks: list[asyncio.Task[Any]]) -> None:
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def run_daemon(cfg: Config, config_path: Path | None = None) -> int:
    setup_logging(cfg.log_level)
    return asyncio.run(_amain(cfg, config_path))


async def _amain(cfg: Config, config_path: Path | None) -> int:
    return await Daemon(cfg, config_path).run()
