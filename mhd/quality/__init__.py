"""The quality gate: a new adapter is promoted only when it is measurably better than the old one."""
