"""The reaper: no ``mhd-*`` pod outlives the run that rented it.

Runs at daemon start and every ``runpod.reap_interval_s``. It lists the account's ``mhd-*`` pods
and terminates each one that no active run owns: pods whose run crashed past recovery, pods whose
termination in Aborting ran out of time, duplicates. Stopped (EXITED) pods count too: they still
bill for their disk.

Ownership is asked of the caller through ``owned()``, a set of pod ids and/or pod names. Pod ids
are the normal case. A name (``pod_name(run.id)``) covers the short window in which a run has
asked the provider for a pod but not yet stored its id; include a name only while that run has no
pod id, so a stale namesake of a run that since moved to a new pod is still reaped. ``owned()`` is
asked again right before each terminate, because a run may adopt a pod while we are listing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection

from mhd.errors import ProviderError, TransientProviderError
from mhd.remote.provider import POD_PREFIX, Pod, Provider

# Statuses of pods that no longer exist: nothing to terminate, nothing billing.
_DELETED = frozenset({"TERMINATED", "DELETED"})


def _is_owned(pod: Pod, owned: Collection[str]) -> bool:
    return pod.id in owned or pod.name in owned


def _cost(pod: Pod) -> str:
    return "?" if pod.cost_per_hr is None else f"{pod.cost_per_hr:.3f}"


async def reap(provider: Provider, owned: Callable[[], Collection[str]], log: logging.Logger) -> list[Pod]:
    """Terminate every ``mhd-*`` pod not in ``owned()``; return the pods terminated.

    Transient provider errors (listing or terminating) are logged and the round ends or moves on:
    the next round retries. A pod the key may not terminate (403) is logged loudly and skipped.
    A permanent error while *listing* (bad key, wrong URL) is raised: nothing can be reaped until
    it is fixed, and the daemon should say so.
    """
    try:
        pods = await provider.list_owned()
    except TransientProviderError as exc:
        log.warning("reaper: cannot list %s pods now (%s); trying again next round", provider.name, exc)
        return []
    reaped: list[Pod] = []
    for pod in pods:
        # list_owned already filters, but terminating someone else's pod is the one mistake the
        # reaper must never make, so the prefix is checked here as well.
        if not pod.name.startswith(POD_PREFIX) or pod.status.upper() in _DELETED:
            continue
        if _is_owned(pod, owned()):
            continue
        try:
            await provider.terminate(pod.id)
        except TransientProviderError as exc:
            log.warning("reaper: terminating unowned pod %s (%s, $%s/h) failed for now: %s; next round retries",
                        pod.id, pod.name, _cost(pod), exc)
            continue
        except ProviderError as exc:
            log.error("reaper: cannot terminate unowned pod %s (%s, $%s/h): %s; it keeps billing until "
                      "it is terminated by hand in the %s console", pod.id, pod.name, _cost(pod), exc,
                      provider.name)
            continue
        log.warning("reaper: terminated unowned pod %s (%s, %s, $%s/h)", pod.id, pod.name, pod.status,
                    _cost(pod))
        reaped.append(pod)
    return reaped
