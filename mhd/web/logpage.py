"""The run's log page (server-rendered HTML) and the bounded tail read it shows."""

from __future__ import annotations

import html
import time
from pathlib import Path
from typing import Any

from mhd.states.preemption import is_preemption
from mhd.store import Run, Store

LOG_TAIL_BYTES = 256 * 1024


def tail_lines(path: Path, n: int, max_bytes: int = LOG_TAIL_BYTES) -> tuple[list[str], bool]:
    """The last ``n`` lines of a file, reading at most ``max_bytes`` from its end."""
    with path.open("rb") as f:
        f.seek(0, 2)
        size = f.tell()
        f.seek(max(0, size - max_bytes))
        data = f.read()
    lines = data.decode("utf-8", errors="replace").splitlines()
    if size > max_bytes and lines:
        lines = lines[1:]  # the first one is probably cut in the middle
    return lines[-n:], size > max_bytes or len(lines) > n


_PREEMPTED_ROW = ' class="preempted"'


def render_log_page(run: Run, store: Store, files: list[dict[str, Any]]) -> str:
    esc = html.escape
    outcome = run.outcome.value if run.outcome else f"active: {run.state.value}"
    rows = "".join(
        f"<tr{_PREEMPTED_ROW if is_preemption(t.reason) else ''}>"
        f"<td>{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(t.at))}</td>"
        f"<td>{esc(t.from_state.value)} → {esc(t.to_state.value)}</td><td>{esc(t.reason)}</td></tr>"
        for t in store.journal(run.id))
    blocks = []
    for f in files:
        if not f["exists"]:
            body = '<p class="muted">not there (yet)</p>'
        else:
            note = '<p class="muted">… earlier lines left out</p>' if f["truncated"] else ""
            body = f'{note}<pre class="log">{esc(chr(10).join(f["lines"]))}</pre>'
        blocks.append(f'<section><h2>{esc(f["name"])}</h2>{body}</section>')
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<title>mhd · log {esc(run.id)}</title><link rel="icon" href="/static/favicon.svg" type="image/svg+xml">'
        '<link rel="stylesheet" href="/static/style.css"></head><body class="logpage">'
        f'<header><h1><a href="/">mhd</a></h1><span class="crumb">run {esc(run.id)} · {esc(outcome)}</span>'
        '</header><main>'
        f'<section><h2>journal</h2><table class="runs"><thead><tr><th>at</th><th>transition</th>'
        f'<th>reason</th></tr></thead><tbody>{rows}</tbody></table></section>'
        f'{"".join(blocks)}</main></body></html>'
    )
