"""State and outcome enums (stored as SQLAlchemy Enum columns, never bare strings)."""

from __future__ import annotations

import enum


class RunState(enum.Enum):
    IDLE = "Idle"
    PROVISIONING = "Provisioning"
    CONNECTING = "Connecting"
    UPLOADING = "Uploading"
    TRAINING = "Training"
    FETCHING = "Fetching"
    MERGING = "Merging"
    ABORTING = "Aborting"

    def is_terminal(self) -> bool:
        return self is RunState.IDLE

    @property
    def needs_session(self) -> bool:
        return self in SESSION_STATES


class Outcome(enum.Enum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    BUDGET_EXCEEDED = "budget_exceeded"
    MERGE_FAILED = "merge_failed"
    NO_DATA = "no_data"
    # Something the run would need after training is missing here: no pod was rented.
    PREFLIGHT_FAILED = "preflight_failed"
    # The quality gate found the new model no better: kept on disk, not registered.
    REJECTED = "rejected"

    def is_success(self) -> bool:
        return self is Outcome.SUCCEEDED


ACTIVE_STATES = frozenset(s for s in RunState if s is not RunState.IDLE)
SESSION_STATES = frozenset({RunState.UPLOADING, RunState.TRAINING, RunState.FETCHING})
HAPPY_PATH = (
    RunState.IDLE,
    RunState.PROVISIONING,
    RunState.CONNECTING,
    RunState.UPLOADING,
    RunState.TRAINING,
    RunState.FETCHING,
    RunState.MERGING,
    RunState.IDLE,
)
