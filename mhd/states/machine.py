"""The run's state machine: ``transitions`` validates the move, the store commits it first.

Every trigger commits the new state (compare-and-set + journal row) *before* control returns to
the runner, which then performs the new state's action. A crash at any instant therefore leaves
the run in a state whose action is safe to (re)enter.
"""

from __future__ import annotations

from typing import Any

from transitions import EventData, Machine

from mhd.states.model import RunState as S
from mhd.store import Run, Store

_ACTIVE = [S.PROVISIONING, S.CONNECTING, S.UPLOADING, S.TRAINING, S.FETCHING, S.MERGING]

TRANSITIONS: list[dict[str, Any]] = [
    {"trigger": "provisioned", "source": S.PROVISIONING, "dest": S.CONNECTING},
    {"trigger": "connected_upload", "source": S.CONNECTING, "dest": S.UPLOADING},
    {"trigger": "connected_train", "source": S.CONNECTING, "dest": S.TRAINING},
    {"trigger": "connected_fetch", "source": S.CONNECTING, "dest": S.FETCHING},
    {"trigger": "uploaded", "source": S.UPLOADING, "dest": S.TRAINING},
    {"trigger": "trained", "source": S.TRAINING, "dest": S.FETCHING},
    {"trigger": "fetched", "source": S.FETCHING, "dest": S.MERGING},
    {"trigger": "merged", "source": S.MERGING, "dest": S.IDLE},
    # An SSH drop (or a restart, which has no session yet) goes back through Connecting.
    {"trigger": "lost", "source": [S.UPLOADING, S.TRAINING, S.FETCHING], "dest": S.CONNECTING},
    # The provider took the pod back: the run rents a new one and resumes from its checkpoint.
    {"trigger": "preempted", "source": [S.CONNECTING, S.UPLOADING, S.TRAINING, S.FETCHING],
     "dest": S.PROVISIONING},
    {"trigger": "abort", "source": _ACTIVE, "dest": S.ABORTING},
    {"trigger": "aborted", "source": S.ABORTING, "dest": S.IDLE},
]

RESUME_TRIGGER = {S.UPLOADING: "connected_upload", S.TRAINING: "connected_train", S.FETCHING: "connected_fetch"}


class RunMachine:
    """Model object for ``transitions``; ``self.run`` is the committed row after each move."""

    state: S

    def __init__(self, store: Store, run: Run) -> None:
        self.store = store
        self.run = run
        self.machine = Machine(
            model=self,
            states=S,
            transitions=TRANSITIONS,
            initial=run.state,
            auto_transitions=False,
            send_event=True,
            before_state_change="_commit",
        )

    def _commit(self, event: EventData) -> None:
        assert event.transition is not None
        src, dest = S[str(event.transition.source)], S[str(event.transition.dest)]
        reason = str(event.kwargs.get("reason", ""))
        fields = dict(event.kwargs.get("fields") or {})
        # Raises StoreError if the row moved under us; transitions then leaves the state as is.
        self.run = self.store.transition(self.run.id, src, dest, reason or event.event.name, **fields)

    def fire(self, trigger: str, reason: str = "", **fields: Any) -> None:
        getattr(self, trigger)(reason=reason, fields=fields)

    def refresh(self) -> Run:
        run = self.store.get_run(self.run.id)
        assert run is not None
        self.run = run
        return run
