"""The run state machine and one module per state's action."""

from mhd.states.model import ACTIVE_STATES, Outcome, RunState

__all__ = ["ACTIVE_STATES", "Outcome", "RunState"]
