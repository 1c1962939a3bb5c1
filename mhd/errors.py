"""The error tree. Every message says what happened, where, and what to do.

    MhdError
    ├── ConfigError                 bad config value (CLI exits 2)
    ├── ProviderError               the GPU provider refused (permanent → Aborting)
    │   ├── TransientProviderError  429/5xx/network: retry with backoff
    │   ├── NoCapacityError         this GPU type has none: try the next
    │   ├── InsufficientFunds       402: stop, nothing to retry
    │   └── Preempted               the pod stopped without mhd asking: resume on a new pod
    ├── RemoteError                 something on the pod failed (permanent)
    │   ├── ConnectionLost          SSH dropped or unreachable (transient → Connecting)
    │   ├── HostKeyMismatch         pinned host key changed (permanent)
    │   ├── IntegrityError          sha256 mismatch / unsafe manifest path
    │   └── JobFailed               the trainer exited non-zero
    ├── DatasetError                unreadable memory_dir
    │   └── NoSamples               no usable sample (run ends `no_data`, no pod rented)
    ├── MergeError                  adapter conversion or registration failed
    ├── InsufficientDisk            the fetch did not fit on the local disk within max_unattended
    ├── BudgetExceeded              budget.max_usd_per_run / max_hours_per_run hit
    └── Cancelled                   `mhd cancel`

`is_transient()` is the single place the retry policy asks.
"""

from __future__ import annotations


class MhdError(Exception):
    """Base of all mhd errors."""


class ConfigError(MhdError):
    def __init__(self, key: str, value: object, expected: str) -> None:
        self.key, self.value, self.expected = key, value, expected
        super().__init__(f"config: {key} = {value!r}: expected {expected}")


class ProviderError(MhdError):
    pass


class TransientProviderError(ProviderError):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NoCapacityError(ProviderError):
    pass


class InsufficientFunds(ProviderError):
    pass


class Preempted(ProviderError):
    """The provider took the pod back (spot preemption, host failure): it is gone or EXITED and
    mhd never asked. The run's work is in its newest checkpoint, not on that pod any more."""

    def __init__(self, pod_id: str, status: str) -> None:
        super().__init__(f"pod {pod_id} is {status} without mhd having stopped it")
        self.pod_id, self.status = pod_id, status


class RemoteError(MhdError):
    pass


class ConnectionLost(RemoteError):
    pass


class HostKeyMismatch(RemoteError):
    pass


class IntegrityError(RemoteError):
    pass


class JobFailed(RemoteError):
    pass


class DatasetError(MhdError):
    pass


class NoSamples(DatasetError):
    """The memories gave no usable training sample: nothing to rent a GPU for."""


class MergeError(MhdError):
    pass


class InsufficientDisk(MhdError):
    """Fetching waited ``runpod.max_unattended`` for free space under state_dir and gave up."""


class BudgetExceeded(MhdError):
    pass


class Cancelled(MhdError):
    pass


class PreflightFailed(MhdError):
    """A check that a run's later steps depend on failed before any pod was rented.

    ``checks`` are the failed :class:`mhd.preflight.Check` objects, each with its fix.
    """

    def __init__(self, message: str, checks: tuple[object, ...] = ()) -> None:
        super().__init__(message)
        self.checks = checks


TRANSIENT: tuple[type[BaseException], ...] = (TransientProviderError, ConnectionLost)


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, TRANSIENT)
