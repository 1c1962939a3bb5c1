"""mhd — keeps a personal model in step with its owner's memories."""

from mhd.errors import (
    ConfigError,
    ConnectionLost,
    DatasetError,
    HostKeyMismatch,
    MergeError,
    MhdError,
    ProviderError,
    RemoteError,
    TransientProviderError,
)

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "ConnectionLost",
    "DatasetError",
    "HostKeyMismatch",
    "MergeError",
    "MhdError",
    "ProviderError",
    "RemoteError",
    "TransientProviderError",
    "__version__",
]
