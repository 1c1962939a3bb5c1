"""Episodic memories → training samples: parse and validate (``memories``), build (``build``)."""

from mhd.dataset.build import build_dataset
from mhd.dataset.memories import Memory, NotReady, Reject, iter_memory_files, read_memory

__all__ = ["Memory", "NotReady", "Reject", "build_dataset", "iter_memory_files", "read_memory"]
