"""The web page: its JSON is the CLI's JSON, it guards itself off loopback, and a real headless
Chromium sees a run go from Training to Idle without reloading.

The server runs the way the daemon runs it (a WebServer on an asyncio loop), here on its own thread,
while the test plays the daemon's part by writing to the same SQLite file through a second Store —
exactly what the page would see if a separate process drove the run.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from mhd.config import WebConfig
from mhd.errors import ConfigError
from mhd.states.model import Outcome, RunState
from mhd.store import Store
from mhd.views import run_dict, runs_list, status_snapshot
from mhd.web import WebServer, charts
from tests.support.polling import wait_until

S = RunState
TOKEN = "test-token-0123456789abcdef"
DAEMON = {"pid": 4242, "version": "test", "uptime_s": 1.0, "provider": "runpod", "memory_dir": "/m"}
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
SCREENSHOT_COPY = Path("/tmp/mhd-web-screenshot.png")


# Helpers: a run in the store, a server on its own loop -------------------------------------------
def walk(store: Store, run_id: str, states: list[RunState], **fields: Any) -> None:
    """Move a run along ``states`` (compare-and-set each step), putting ``fields`` on the last move."""
    cur = store.get_run(run_id)
    assert cur is not None
    for i, new in enumerate(states):
        store.transition(run_id, cur.state, new, reason=f"test: to {new.value}",
                         **(fields if i == len(states) - 1 else {}))
        cur = store.get_run(run_id)
        assert cur is not None


def point(step: int, total: int, *, gpu: bool, scale: float = 1.0, eval_every: int = 0) -> dict[str, Any]:
    loss = scale * (0.6 + 1.9 / (1 + 0.4 * step)) + 0.03 * (step % 3)
    p: dict[str, Any] = {"step": step, "total_steps": total, "epoch": step / total, "loss": loss,
                         "learning_rate": 2e-4, "samples_per_s": 4.0, "eta_s": (total - step) * 0.5,
                         "time": time.time(), "phase": "train"}
    if eval_every and step % eval_every == 0:
        p["eval_loss"] = loss + 0.12
    if gpu:
        p.update(gpu_util=60.0 + step % 5 * 7, gpu_mem_used=9000.0 + 150 * step, gpu_mem_total=24564.0)
    return p


def start_training(store: Store) -> str:
    run = store.create_run("threshold", "runpod")
    walk(store, run.id, [S.CONNECTING], pod_id="pod-test", gpu_type="NVIDIA RTX A6000", cost_per_hr=0.79,
         pod_started_at=time.time() - 30)
    walk(store, run.id, [S.UPLOADING, S.TRAINING])
    store.update_run(run.id, samples=42)
    return run.id


def finish(store: Store, run_id: str, model: str) -> None:
    walk(store, run_id, [S.FETCHING], pod_stopped_at=time.time())
    walk(store, run_id, [S.MERGING])
    walk(store, run_id, [S.IDLE], outcome=Outcome.SUCCEEDED, model_name=model, finished_at=time.time())


def finished_run(store: Store, steps: int, *, gpu: bool = False, scale: float = 1.0) -> str:
    run_id = start_training(store)
    store.add_progress(run_id, [point(i, steps, gpu=gpu, scale=scale) for i in range(1, steps + 1)], offset=steps)
    finish(store, run_id, f"mhd-{run_id}")
    return run_id


class ServerThread:
    """A WebServer on an asyncio loop of its own, as inside the daemon."""

    def __init__(self, cfg: WebConfig, store: Store, status: Callable[[], dict[str, Any]],
                 runs_dir: Path | None = None) -> None:
        self.server = WebServer(cfg, store, status, runs_dir=runs_dir)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        try:
            await self.server.start()
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        await self._stop.wait()
        await self.server.stop()

    def __enter__(self) -> ServerThread:
        self._thread.start()
        assert self._ready.wait(30), "web server did not start"
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self._thread.is_alive() and self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        assert not self._thread.is_alive(), "web server did not stop"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"


def roundtrip(obj: Any) -> Any:
    """What `mhd … --json` prints, read back: the page's JSON must equal this."""
    return json.loads(json.dumps(obj))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path / 'state' / 'mhd.db'}")
    yield s
    s.close()


# (a) JSON endpoints and access -------------------------------------------------------------------
def test_json_endpoints_equal_the_cli_views_at_the_same_moment(store, tmp_path, monkeypatch):
    prev_id = finished_run(store, 6)  # a CPU run: its GPU chart must say so
    run_id = start_training(store)
    store.add_progress(run_id, [point(i, 20, gpu=True) for i in range(1, 8)], offset=7)
    runs_dir = tmp_path / "state" / "runs"
    (runs_dir / run_id).mkdir(parents=True)
    (runs_dir / run_id / "run.log").write_text("".join(f"run line {i}\n" for i in range(5)))
    (runs_dir / run_id / "train.log").write_text("".join(f"train line {i}\n" for i in range(500)))
    # One frozen clock for the server and for this test: "the same moment", exactly.
    frozen = time.time()
    monkeypatch.setattr("mhd.views.now", lambda: frozen)

    def status() -> dict[str, Any]:
        return status_snapshot(store, pending=7, threshold=50, daemon=DAEMON)

    with ServerThread(WebConfig(listen="127.0.0.1:0"), store, status, runs_dir=runs_dir) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as http:
        got = http.get("/api/status")
        assert got.status_code == 200 and got.headers["content-type"] == "application/json"
        assert got.json() == roundtrip(status())
        assert got.json()["state"] == "Training" and got.json()["gpu"]["gpu_mem_total"] == 24564.0
        assert http.get("/api/runs").json() == roundtrip(runs_list(store))
        assert http.get(f"/api/runs/{run_id}").json() == roundtrip(run_dict(store.get_run(run_id)))

        progress = http.get(f"/api/runs/{run_id}/progress").json()
        assert [p["step"] for p in progress] == list(range(1, 8))
        assert progress[0]["gpu_util"] is not None
        journal = http.get(f"/api/runs/{run_id}/journal").json()
        assert [j["to_state"] for j in journal] == ["Provisioning", "Connecting", "Uploading", "Training"]

        logs = http.get(f"/api/runs/{run_id}/log", params={"lines": 50}).json()["files"]
        assert logs[0] == {"name": "run.log", "exists": True, "truncated": False,
                           "lines": [f"run line {i}" for i in range(5)]}
        assert logs[1]["lines"] == [f"train line {i}" for i in range(450, 500)] and logs[1]["truncated"]
        page = http.get(f"/runs/{run_id}/log")
        assert page.status_code == 200 and "train line 499" in page.text and "Uploading → Training" in page.text

        loss = http.get(f"/charts/{run_id}/loss.svg")
        assert loss.headers["content-type"] == "image/svg+xml"
        assert loss.text.count('<circle class="train"') == 7
        assert f'data-run="{prev_id}"' in loss.text  # the previous run, faint behind
        assert "no GPU" in http.get(f"/charts/{prev_id}/gpu.svg").text
        assert http.get(f"/charts/{run_id}/gpu.svg").text.count('<circle class="util"') == 7

        for bad in ("/api/runs/nope/progress", "/api/runs/..%2F..%2Fetc/log", "/static/../server.py", "/x"):
            assert http.get(bad).status_code == 404, bad
        assert http.post("/api/status").status_code == 405  # read-only
        # A web site the owner visits must not read the page by pointing its name at 127.0.0.1.
        assert http.get("/api/status", headers={"Host": f"evil.example:{srv.server.port}"}).status_code == 403
        assert http.get("/api/status", headers={"Host": f"localhost:{srv.server.port}"}).status_code == 200

        # The same runs as the real CLI prints, once nothing in them moves with the clock any more.
        finish(store, run_id, "mhd-now")
        cfg = tmp_path / "config.toml"
        cfg.write_text(f'state_dir = "{tmp_path / "state"}"\nmemory_dir = "{tmp_path / "memories"}"\n')
        cli = subprocess.run([sys.executable, "-m", "mhd.cli", "--config", str(cfg), "runs", "--json"],
                             capture_output=True, text=True, timeout=120, check=True)
        assert http.get("/api/runs").json() == json.loads(cli.stdout)


def test_event_stream_pushes_status_and_ends_when_the_server_stops(store):
    run_id = start_training(store)
    with ServerThread(WebConfig(listen="127.0.0.1:0"), store,
                      lambda: status_snapshot(store, pending=1, threshold=5, daemon=DAEMON)) as srv, \
            httpx.Client(timeout=30) as http, http.stream("GET", f"{srv.url}/api/events") as resp:
        assert resp.headers["content-type"] == "text/event-stream"
        lines = resp.iter_lines()
        events = []
        while len(events) < 2:
            line = next(lines)
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
        assert [e["run_id"] for e in events] == [run_id, run_id]
        assert events[1]["time"] > events[0]["time"]  # a fresh snapshot each second
        # The daemon stopping must end open streams, not wait for the browser to go away.
        started = time.monotonic()
        srv.stop()
        for _ in lines:
            pass
        assert time.monotonic() - started < 15


def test_non_loopback_listen_without_token_refuses_to_start(store):
    for listen in ("0.0.0.0:0", "[::]:0", "192.0.2.7:8765"):
        server = WebServer(WebConfig(listen=listen), store, dict)
        with pytest.raises(ConfigError) as err:
            asyncio.run(server.start())
        msg = str(err.value)
        assert "web.listen" in msg and listen in msg, msg
        assert "a loopback address, or set web.token to serve on other interfaces" in msg


def test_with_a_token_every_request_needs_it(store):
    start_training(store)

    def status() -> dict[str, Any]:
        return status_snapshot(store, pending=1, threshold=5, daemon=DAEMON)

    with ServerThread(WebConfig(listen="0.0.0.0:0", token=TOKEN), store, status) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as http:
        seen: list[httpx.Response] = []
        for path in ("/", "/api/status", "/api/runs", "/api/events", "/static/app.js"):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
                r = http.get(path, headers=headers)
                assert r.status_code == 401, (path, headers)
                seen.append(r)
            assert http.get(path, params={"token": "wrong"}).status_code == 401
        ok = http.get("/api/status", headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200 and ok.json()["state"] == "Training"
        seen.append(ok)
        # A browser: ?token= once, redirected to a clean address with a session cookie.
        first = http.get("/", params={"token": TOKEN})
        assert first.status_code == 303 and first.headers["location"] == "/"
        cookie = first.cookies["mhd_session"]
        assert cookie and cookie != TOKEN
        seen.append(first)
        deep = http.get("/runs/x/log", params={"lines": "5", "token": TOKEN})
        assert deep.status_code == 303 and deep.headers["location"] == "/runs/x/log?lines=5"
        with httpx.Client(base_url=srv.url, timeout=30, cookies={"mhd_session": cookie}) as browser:
            page = browser.get("/")
            assert page.status_code == 200 and 'id="state"' in page.text
            seen.append(page)
            assert browser.get("/api/runs").status_code == 200
        # The token is never echoed, in a body or a header.
        for r in seen:
            assert TOKEN not in r.text and TOKEN not in str(r.headers), r.request.url


def test_charts_count_every_line_even_when_too_many_to_draw_each():
    long_run = [{"step": i, "loss": 3 / i, "time": 1000.0 + i} for i in range(1, 5001)]
    svg = charts.loss_svg(long_run)
    assert 'id="loss-chart" data-points="5000"' in svg
    assert "<circle" not in svg  # no dot per point at this size; the line alone
    m = re.search(r'<polyline class="train" data-points="5000"[^>]* points="([^"]*)"', svg)
    assert m is not None and len(m.group(1).split()) <= charts.MAX_VERTICES + 1
    assert charts.step_ticks(0, 3, 6) == [0, 1, 2, 3]  # no half steps
    assert charts.time_ticks(0, 200, 6) == [0, 60, 120, 180]
    assert "&lt;b&gt;" in charts.line_chart("c", "<b>", [charts.Series("train", "x", [(0, 1), (1, 2)])],
                                             x_label="step")


# (b) A real headless Chromium watching a run ------------------------------------------------------
class WebDriverError(Exception):
    pass


class Browser:
    """Just enough of the W3C WebDriver protocol, spoken to chromedriver over httpx."""

    def __init__(self, driver_url: str, profile: Path) -> None:
        self.http = httpx.Client(base_url=driver_url, timeout=120)
        caps = {"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:loggingPrefs": {"browser": "ALL"},
            "goog:chromeOptions": {"binary": CHROMIUM, "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1280,900",
                "--force-device-scale-factor=1", "--lang=en-US"]},
        }}}
        self.session = self._call("POST", "/session", caps)["sessionId"]

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        r = self.http.request(method, path, json=body)
        value = r.json().get("value")
        if r.status_code != 200:
            raise WebDriverError(f"{method} {path}: {value}")
        return value

    def cmd(self, method: str, path: str, body: Any = None) -> Any:
        return self._call(method, f"/session/{self.session}{path}", body)

    def open(self, url: str) -> None:
        self.cmd("POST", "/url", {"url": url})

    def js(self, script: str, *args: Any) -> Any:
        return self.cmd("POST", "/execute/sync", {"script": script, "args": list(args)})

    def screenshot(self, path: Path) -> Path:
        # Grow the window to the page's height so one shot shows every section.
        height = int(self.js("return document.documentElement.scrollHeight"))
        self.cmd("POST", "/window/rect", {"width": 1280, "height": max(900, height + 140)})
        path.write_bytes(base64.b64decode(self.cmd("GET", "/screenshot")))
        return path

    def console_errors(self) -> list[str]:
        return [e["message"] for e in self.cmd("POST", "/se/log", {"type": "browser"}) if e["level"] == "SEVERE"]

    def quit(self) -> None:
        try:
            self.cmd("DELETE", "")
        finally:
            self.http.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        msg = "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    port = free_port()
    # A session of its own, so teardown can end chromedriver and the browser it started, and only them.
    driver = subprocess.Popen([CHROMEDRIVER, f"--port={port}"], stdout=subprocess.DEVNULL,
                              stderr=(tmp_path / "chromedriver.log").open("wb"), start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: _driver_ready(url), 60, "chromedriver to listen", interval=0.2)
        b = Browser(url, tmp_path / "chromium-profile")
        try:
            yield b
        finally:
            b.quit()
    finally:
        with_group = driver.pid
        driver.terminate()
        try:
            driver.wait(20)
        except subprocess.TimeoutExpired:
            driver.kill()
            driver.wait(20)
        try:
            os.killpg(with_group, signal.SIGKILL)  # any browser process it left behind
        except ProcessLookupError:
            pass


def _driver_ready(url: str) -> bool:
    try:
        return bool(httpx.get(f"{url}/status", timeout=2).json()["value"]["ready"])
    except (httpx.HTTPError, ValueError, KeyError):
        return False


COUNTS_JS = """
const svg = document.querySelector('#loss-chart');
const line = document.querySelector('#loss-chart polyline.train');
const prev = document.querySelector('#loss-chart polyline.prev');
const util = document.querySelector('#gpu-chart polyline.util');
return {
  points: svg ? Number(svg.dataset.points) : -1,
  vertices: line ? line.points.numberOfItems : -1,
  circles: document.querySelectorAll('#loss-chart circle.train').length,
  prev: prev ? Number(prev.dataset.points) : -1,
  gpu: util ? util.points.numberOfItems : -1,
  eval: document.querySelectorAll('#loss-chart circle.eval').length,
  step: document.getElementById('step').textContent,
};
"""


@pytest.mark.slow
def test_page_follows_a_run_from_training_to_idle_without_reload(tmp_path, browser):
    db = f"sqlite:///{tmp_path / 'state' / 'mhd.db'}"
    daemon_side = Store(db)  # the test plays the daemon, writing through its own Store
    web_side = Store(db)
    prev_steps, steps = 9, 12
    finished_run(daemon_side, prev_steps, scale=1.3)
    run_id = start_training(daemon_side)
    run_dir = tmp_path / "state" / "runs" / run_id
    run_dir.mkdir(parents=True)
    (run_dir / "run.log").write_text("2026-07-18T22:30:00 Provisioning: pod mhd-test adopted\n")
    (run_dir / "train.log").write_text("".join(f"step {i}: loss <{i}> & more\n" for i in range(1, 13)))

    def status() -> dict[str, Any]:
        return status_snapshot(web_side, pending=3, threshold=5, daemon=DAEMON)

    try:
        with ServerThread(WebConfig(listen="127.0.0.1:0"), web_side, status,
                          runs_dir=tmp_path / "state" / "runs") as srv:
            browser.open(srv.url + "/")
            state_text = "return document.getElementById('state').textContent"
            wait_until(lambda: browser.js(state_text) == "Training", 60, "the page to show Training")
            browser.js("window.__sameDocument = 'yes'")  # gone if the page ever reloads

            # Progress lines arrive one by one, as the trainer logs them.
            for i in range(1, steps + 1):
                daemon_side.add_progress(run_id, [point(i, steps, gpu=True, eval_every=4)], offset=i)
                time.sleep(0.25)
            live = wait_until(lambda: (c := browser.js(COUNTS_JS))["points"] == steps and c, 60,
                              "the loss curve to grow to every progress line while training")
            assert live["step"] == f"{steps} / {steps}"
            browser.screenshot(tmp_path / "web-training.png")

            finish(daemon_side, run_id, "mhd-model-under-test")
            wait_until(lambda: browser.js(state_text) == "Idle", 60, "the page to show Idle without a reload")
            assert browser.js("return window.__sameDocument") == "yes", "the page reloaded"

            counts = wait_until(lambda: (c := browser.js(COUNTS_JS))["vertices"] == steps and c, 60,
                                "the final loss curve")
            assert counts["points"] == counts["vertices"] == counts["circles"] == steps
            assert counts["prev"] == prev_steps  # the previous run's curve, faint behind
            assert counts["gpu"] == steps
            assert counts["eval"] == steps // 4
            chips = browser.js("return [...document.querySelectorAll('#timeline .chip .name')]"
                               ".map(e => e.textContent)")
            assert chips == ["Provisioning", "Connecting", "Uploading", "Training", "Fetching", "Merging", "Idle"]
            rows = wait_until(lambda: browser.js(
                "return [...document.querySelectorAll('#runs-body tr')].map(r => r.innerText)")
                if len(browser.js("return document.querySelectorAll('#runs-body tr[data-run]')")) == 2
                else None, 30, "both runs in the table")
            assert "succeeded" in rows[0] and "mhd-model-under-test" in rows[0]
            shot = browser.screenshot(tmp_path / "web-idle.png")
            assert shot.stat().st_size > 10_000
            assert browser.console_errors() == []

            # Each run's "log" link opens its log tail (a plain page, escaped).
            href = browser.js(f"return document.querySelector('#runs-body tr[data-run=\"{run_id}\"] a').href")
            browser.open(href)
            logs = wait_until(lambda: browser.js(
                "return [...document.querySelectorAll('pre.log')].map(p => p.textContent)"), 30, "the log page")
            assert "pod mhd-test adopted" in logs[0] and "step 12: loss <12> & more" in logs[1]
            browser.screenshot(tmp_path / "web-log.png")
    finally:
        daemon_side.close()
        web_side.close()
    shutil.copyfile(tmp_path / "web-training.png", SCREENSHOT_COPY)
    shutil.copyfile(tmp_path / "web-idle.png", SCREENSHOT_COPY.with_name("mhd-web-screenshot-idle.png"))


def test_the_gate_card_gets_the_numbers_decision_and_generations_of_the_run(store, tmp_path):
    from mhd.config import EvalConfig
    from mhd.quality.gate import decide

    run_id = finished_run(store, 4)
    ev = {"format": 1, "heldout": {"count": 8, "tokens": 120, "base": 4.0, "new": 3.5, "current": 3.6},
          "probe": {"count": 66, "tokens": 900, "base": 5.0, "new": 4.9, "current": 4.95},
          "generations": [{"prompt": "How was the walk?", "base": "the the the", "new": "Lovely, by the river."}]}
    out = tmp_path / "runs" / run_id / "output"
    out.mkdir(parents=True)
    (out / "eval.json").write_text(json.dumps(ev))
    decision = decide(ev, EvalConfig())
    store.update_run(run_id, eval_json=decision.as_json(), eval_decision=decision.decision)
    with ServerThread(WebConfig(listen="127.0.0.1:0"), store, lambda: {}, runs_dir=tmp_path / "runs") as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as http:
        got = http.get(f"/api/runs/{run_id}/eval").json()
    assert got["eval"]["decision"] == "promoted" and got["eval"]["heldout_nll_current"] == 3.6
    assert got["eval"]["probe_nll_new"] == 4.9 and "min_gain" in got["eval"]["reason"]
    assert got["generations"] == ev["generations"]
    page = (Path(__file__).resolve().parents[2] / "mhd" / "web" / "static" / "app.js").read_text()
    assert "/eval`" in page and "renderGate" in page


def test_the_timeline_marks_each_preemption(store, tmp_path):
    run_id = start_training(store)
    store.transition(run_id, S.TRAINING, S.PROVISIONING, reason="preempted: pod pod-test EXITED in Training "
                     "(preemption 1 of max_preemptions 3); resuming on a new interruptible pod from checkpoint step 8")
    walk(store, run_id, [S.CONNECTING, S.UPLOADING, S.TRAINING])
    with ServerThread(WebConfig(listen="127.0.0.1:0"), store, lambda: {}, runs_dir=tmp_path / "runs") as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as http:
        journal = http.get(f"/api/runs/{run_id}/journal").json()
        page = http.get(f"/runs/{run_id}/log").text
    marked = [(j["from_state"], j["to_state"]) for j in journal if j["preempted"]]
    assert marked == [("Training", "Provisioning")], journal
    assert page.count('<tr class="preempted">') == 1
    app = (Path(__file__).resolve().parents[2] / "mhd" / "web" / "static" / "app.js").read_text()
    assert "if (t.preempted)" in app  # the chip of that transition gets its mark
