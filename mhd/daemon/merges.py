"""The merge retrier: a trained adapter whose merge failed is merged again, never trained again.

A run that fetched its adapter and failed in Merging ends ``merge_failed`` with
``merge_retry_at`` set (``mhd/states/merging.py``). This task retries it with doubling backoff
(``retry.merge_base_s`` … ``retry.merge_max_s``), and at once when poked: ``mhd merge RUN``, a
config reload (SIGHUP), or the threshold being met while the adapter waits. While it waits the
daemon rents no pod for threshold or schedule runs: the memories it holds are already trained,
and a pod would only fail at the same place. Once the merge succeeds the run is ``succeeded``,
its memories stop being pending, and the threshold decides on the newer memories alone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from mhd.config import Config
from mhd.errors import MergeError
from mhd.states.merging import adapter_dir, forgotten_refusal, merge_adapter, merge_backoff, record_merged
from mhd.states.model import Outcome
from mhd.store import Run, Store, now

log = logging.getLogger("mhd.merge")


class MergeRetrier:
    def __init__(self, cfg: Config, store: Store, lock: asyncio.Lock,
                 on_merged: Callable[[Iterable[str]], None]) -> None:
        self.cfg = cfg
        self.store = store
        self.lock = lock
        self.on_merged = on_merged
        self._poked = asyncio.Event()
        self._force = False
        self.last_attempt_at = 0.0

    def waiting(self) -> Run | None:
        return self.store.waiting_merge()

    def poke(self, *, force: bool = True) -> None:
        """Retry now (``force``), or just re-read the schedule."""
        self._force = self._force or force
        self._poked.set()

    def poke_if_due(self) -> None:
        """A threshold crossing is a fair moment to retry, but not more often than the base backoff."""
        if time.time() - self.last_attempt_at >= self.cfg.retry.merge_base_s:
            self.poke()

    async def run_forever(self) -> None:
        while True:
            run = self.waiting()
            if run is not None and not adapter_dir(self.cfg, run.id).exists():
                log.error("run %s: its adapter %s is gone; the merge cannot be retried", run.id,
                          adapter_dir(self.cfg, run.id))
                self.store.update_run(run.id, merge_retry_at=None)
                self.store.add_event(run.id, "merge_retry", "adapter gone from disk: merge retries stopped")
                continue
            delay = None if run is None else max(0.0, (run.merge_retry_at or 0.0) - now())
            if run is None or (delay and not self._force):
                self._poked.clear()
                try:
                    await asyncio.wait_for(self._poked.wait(), delay)
                except TimeoutError:
                    pass
                else:
                    continue  # poked: look again (a forced poke retries at once)
            assert run is not None
            await self.attempt(run.id)

    async def attempt(self, run_id: str) -> dict[str, Any]:
        """One merge try of ``run_id`` (a waiting ``merge_failed`` run); the socket's answer."""
        self._force = False
        self.last_attempt_at = time.time()
        async with self.lock:
            run = self.store.get_run(run_id)
            if run is None:
                return {"ok": False, "error": f"no run {run_id}"}
            if run.outcome is Outcome.SUCCEEDED and run.model_name:
                return {"ok": True, "run_id": run.id, "model": run.model_name, "note": "already merged"}
            if run.outcome is not Outcome.MERGE_FAILED:
                return {"ok": False, "error": f"run {run.id} did not fail in Merging "
                                              f"({run.outcome.value if run.outcome else run.state.value})"}
            attempts = (run.merge_attempts or 0) + 1
            if (refusal := forgotten_refusal(self.store, run_id)) is not None:
                self.store.update_run(run_id, outcome=Outcome.REJECTED, error=refusal, merge_retry_at=None)
                self.store.add_event(run_id, "merge_retry", refusal)
                log.warning("%s; merge retries stopped", refusal)
                return {"ok": False, "run_id": run_id, "error": refusal}
            lines: list[str] = []

            def note(line: str) -> None:
                lines.append(line)
                log.info("run %s: merge retry %d: %s", run_id, attempts, line)

            try:
                model = await merge_adapter(self.cfg, self.store, run_id, note)
            except (MergeError, OSError, ValueError) as exc:  # all local: worth another try later
                delay = merge_backoff(self.cfg, attempts)
                self.store.update_run(run_id, merge_attempts=attempts, merge_retry_at=now() + delay, error=str(exc))
                self.store.add_event(run_id, "merge_retry", f"attempt {attempts} failed: {exc}; next in {delay:.0f}s")
                log.warning("run %s: merge attempt %d failed: %s — next try in %.0fs", run_id, attempts, exc, delay)
                return {"ok": False, "run_id": run_id, "error": str(exc), "attempts": attempts,
                        "next_retry_at": now() + delay, "log": lines}
            keys = record_merged(self.store, self.cfg, run_id)
            self.store.update_run(run_id, outcome=Outcome.SUCCEEDED, error=None, model_name=model,
                                  merge_attempts=attempts, merge_retry_at=None)
            self.store.add_event(run_id, "merge", f"merge attempt {attempts} succeeded: {model}")
            log.info("run %s: merged on attempt %d: %s", run_id, attempts, model)
        self.on_merged(keys)
        return {"ok": True, "run_id": run_id, "model": model, "attempts": attempts, "log": lines}

    async def promote(self, run_id: str) -> dict[str, Any]:
        """`mhd promote RUN`: register a run the quality gate rejected — the owner's call."""
        async with self.lock:
            run = self.store.get_run(run_id)
            if run is None:
                return {"ok": False, "error": f"no run {run_id}"}
            if run.outcome is Outcome.SUCCEEDED:
                return {"ok": True, "run_id": run.id, "model": run.model_name,
                        "note": f"run {run.id} is promoted already ({run.model_name or 'adapter kept'}): nothing to do"}
            if run.outcome is not Outcome.REJECTED:
                return {"ok": False, "error": f"run {run.id} was not rejected by the quality gate "
                                              f"({run.outcome.value if run.outcome else run.state.value}); "
                                              "`mhd merge RUN` retries a failed merge"}
            if (refusal := forgotten_refusal(self.store, run_id)) is not None:
                return {"ok": False, "run_id": run_id, "error": refusal}
            lines: list[str] = []
            try:
                model = await merge_adapter(self.cfg, self.store, run_id, lines.append)
            except (MergeError, OSError, ValueError) as exc:
                return {"ok": False, "run_id": run_id, "error": str(exc), "log": lines}
            keys = record_merged(self.store, self.cfg, run_id)
            self.store.update_run(run_id, outcome=Outcome.SUCCEEDED, error=None, model_name=model,
                                  eval_decision="promoted_by_owner")
            self.store.add_event(run_id, "promote", f"promoted by the owner despite the gate: {model or 'adapter'}")
            log.info("run %s: promoted by the owner (`mhd promote`): %s", run_id, model)
        self.on_merged(keys)
        return {"ok": True, "run_id": run_id, "model": model, "log": lines}
