"""What every `mhd` command shares: exit codes, the config, the daemon's socket, the store."""

from __future__ import annotations

import sys
from typing import Any, NoReturn

import click

from mhd.config import Config, load_config
from mhd.errors import ConfigError

EXIT_FAIL, EXIT_CONFIG, EXIT_NO_DAEMON = 1, 2, 3


def _die(msg: str, code: int) -> NoReturn:
    click.echo(f"mhd: {msg}", err=True)
    sys.exit(code)


def _cfg(ctx: click.Context) -> Config:
    obj = ctx.ensure_object(dict)
    if "cfg" not in obj:
        try:
            obj["cfg"] = load_config(obj.get("config_path"))
        except ConfigError as exc:
            _die(str(exc), EXIT_CONFIG)
    cfg: Config = obj["cfg"]
    return cfg


def _ask(cfg: Config, cmd: str, **args: Any) -> dict[str, Any]:
    from mhd.daemon.client import DaemonNotRunning, request

    try:
        return request(cfg.socket_path, cmd, **args)
    except DaemonNotRunning as exc:
        _die(str(exc), EXIT_NO_DAEMON)
    except OSError as exc:
        _die(f"cannot talk to the daemon at {cfg.socket_path}: {exc}", EXIT_NO_DAEMON)


def _store(cfg: Config) -> Any:
    from mhd.store import Store, StoreError

    try:
        return Store(cfg.db_path_url)
    except StoreError as exc:
        _die(str(exc), EXIT_FAIL)
