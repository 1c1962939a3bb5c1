"""The provider seam: who gives us a machine to train on.

A provider knows nothing about runs or the DB; the Provisioning and Aborting states call it.
Every method is idempotent where the contract says so, because any of them may be retried after
a crash.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

POD_PREFIX = "mhd-"


def pod_name(run_id: str, attempt: int = 1) -> str:
    """``mhd-<run>`` for a run's first pod, ``mhd-<run>-a<N>`` for the pod after a preemption.

    One name per attempt: looking the name up before creating adopts the pod of *this* attempt
    after a crash, never the preempted one (which is EXITED anyway)."""
    return f"{POD_PREFIX}{run_id}" if attempt <= 1 else f"{POD_PREFIX}{run_id}-a{attempt}"


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    user: str


@dataclass(frozen=True)
class Pod:
    id: str
    name: str
    status: str  # provider's word: PROVISIONING, STARTING, RUNNING, EXITED, TERMINATED, …
    cost_per_hr: float | None = None
    gpu_type: str | None = None
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def gone(self) -> bool:
        return self.status.upper() in {"TERMINATED", "EXITED", "DELETED"}


@runtime_checkable
class Provider(Protocol):
    name: str

    async def create(self, name: str, *, interruptible: bool = False) -> Pod:
        """Rent a machine called ``name``; ``interruptible``: a spot pod, where the provider has them
        (others rent what they have). Raises ProviderError subclasses."""
        ...

    async def find(self, name: str) -> Pod | None:
        """The live pod called ``name``, if any (used to adopt instead of creating twice)."""
        ...

    async def get(self, pod_id: str) -> Pod | None:
        """Fresh facts about a pod; None if it no longer exists."""
        ...

    async def endpoint(self, pod: Pod) -> Endpoint | None:
        """Where to reach the pod's sshd now (never cached); None while it is not mapped yet."""
        ...

    async def terminate(self, pod_id: str) -> None:
        """Stop billing for the pod. Already gone counts as success."""
        ...

    async def list_owned(self) -> list[Pod]:
        """All live pods whose name starts with ``mhd-`` (for the reaper)."""
        ...

    async def aclose(self) -> None: ...
