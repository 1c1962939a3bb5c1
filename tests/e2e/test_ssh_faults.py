"""The whole loop for real — daemon process, OpenSSH sshd behind a TCP proxy, the real trainer on
the tiny model, the Ollama stand-in — first clean, then with a fault injected at a precise point.

Every successful scenario asserts the same invariants (``E2E.assert_succeeded``): the run ends
Idle with ``succeeded``; the launcher started the trainer once; each fetched file matches the
manifest's sha256; no trainer process is left; the model is registered in Ollama; and the journal
shows the path the run took (the detours through Connecting that the fault caused).
"""

from __future__ import annotations

import os
import re
import signal

import pytest

from mhd.remote.ssh import host_key_fingerprint
from tests.support.e2e import E2E, HAPPY, count_transitions, pending_signals, wait_until
from tests.support.memories import memory, write
from tests.support.ollama_standin import normalize

pytestmark = pytest.mark.slow


def test_clean_run_trains_fetches_and_registers_the_model(e2e: E2E) -> None:
    e2e.configure()
    e2e.write_memories(6)
    d = e2e.daemon().start()
    run_id = e2e.start_run(d)
    last = e2e.wait_run_end(d, run_id)

    assert e2e.assert_succeeded(last) == HAPPY
    total = 6  # 6 samples, batch 1, no accumulation, 1 epoch
    assert last["progress"]["step"] == total and last["progress"]["total_steps"] == total
    assert e2e.train_starts(run_id) == [(total, 0)]
    # Ollama < 0.34.1: a GGUF LoRA on top of the base, then the alias moved to it.
    model = normalize(last["model_name"])
    create = [b for b in e2e.ollama.create_bodies() if normalize(b["model"]) == model]
    assert len(create) == 1 and create[0]["from"] == "qwen3:tiny" and create[0]["adapters"], create
    assert e2e.ollama.models["mhd:latest"]["copied_from"] == model
    assert d.status()["pending_memories"] == 0  # the run's memories are now trained
    assert d.stop() == 0


def test_link_cut_three_times_during_upload_skips_what_arrived(e2e: E2E) -> None:
    e2e.configure()
    e2e.write_memories(6)
    d = e2e.daemon(pause="Uploading.partial=0.3").start()
    run_id = e2e.start_run(d)
    e2e.cut_during("Uploading", "Uploading.partial", cuts=3)
    last = e2e.wait_run_end(d, run_id)

    path = e2e.assert_succeeded(last)
    assert count_transitions(path, "Uploading", "Connecting") == 3, path
    assert count_transitions(path, "Connecting", "Uploading") == 4, path
    # The pass that finished re-sent nothing that had arrived whole before the cuts.
    sent, skipped = map(int, re.findall(r"uploaded (\d+) file\(s\), (\d+) already", e2e.run_log(run_id))[-1])
    inputs = [p for p in (e2e.run_dir(run_id) / "input").iterdir() if p.name != "job.env"]
    assert sent + skipped == len(inputs) and skipped >= 1, (sent, skipped, inputs)


def test_link_cut_three_times_then_dead_during_training_reattaches_without_relaunch(e2e: E2E) -> None:
    e2e.configure()  # keepalive every 2 s, 3 missed answers = dead
    e2e.write_memories(6)
    d = e2e.daemon().start()
    run_id = e2e.start_run(d)
    # Frozen, the trainer provably outlasts the faults; its pid stays alive all along.
    with e2e.hold_trainer(run_id, at_step=1):
        for i in range(1, 4):
            assert e2e.proxy.cut() >= 1
            wait_until(lambda i=i: e2e.log_count("Training → Connecting") >= i and
                       e2e.log_count("Connecting → Training") >= i, 60, f"reattach after cut {i}",
                       on_timeout=e2e.tail)
        # Then a link that dies silently (no RST, as behind a NAT that forgot us): keepalive notices.
        e2e.proxy.stall()
        wait_until(lambda: e2e.log_count("Training → Connecting") >= 4, 60, "the dead link noticed",
                   on_timeout=e2e.tail)
        e2e.proxy.unstall()
        wait_until(lambda: e2e.log_count("Connecting → Training") >= 4, 60, "reattach after the stall",
                   on_timeout=e2e.tail)
    last = e2e.wait_run_end(d, run_id)

    path = e2e.assert_succeeded(last)
    assert path == HAPPY[:5] + ["Connecting", "Training"] * 4 + HAPPY[5:], path
    # Progress was read from the stored byte offset across reconnects: each step exactly once.
    store = e2e.store()
    steps = [p.step for p in store.progress(run_id) if p.phase == "train"]
    store.close()
    assert steps == list(range(1, 7)), steps


def test_link_cut_three_times_during_fetch_resumes_and_verifies(e2e: E2E) -> None:
    e2e.configure()
    e2e.write_memories(6)
    d = e2e.daemon(pause="Fetching.partial=0.3").start()
    run_id = e2e.start_run(d)
    # The third cut is armed during the third pause and fires mid-transfer (tokenizer.json).
    e2e.cut_during("Fetching", "Fetching.partial", cuts=3, arm=lambda i: 20_000 if i == 3 else None)
    last = e2e.wait_run_end(d, run_id, timeout=180)

    path = e2e.assert_succeeded(last)
    assert count_transitions(path, "Fetching", "Connecting") == 3, path
    assert path[:6] == HAPPY[:6] and path.count("Training") == 1, path
    # No file was fetched whole twice: later passes found the verified ones in place.
    fetched = [(p, int(n)) for p, n in re.findall(r"downloaded (\S+): (\d+) bytes", e2e.run_log(run_id))]
    whole = [p for p, n in fetched if n > 0]
    assert len(whole) == len(set(whole)), fetched


def test_daemon_sigkill_during_training_reattaches_then_finds_the_finished_job(e2e: E2E) -> None:
    e2e.configure()
    e2e.write_memories(6)
    d = e2e.daemon().start()
    run_id = e2e.start_run(d)
    with e2e.hold_trainer(run_id, at_step=1) as pgid:
        d.kill()
        d2 = e2e.daemon().start()  # the trainer still runs: reattach to it
        wait_until(lambda: e2e.log_count("Connecting → Training") >= 1, 60, "reattached", on_timeout=e2e.tail)
        assert e2e.trainer_process(run_id) is not None and e2e.job_group(run_id) == pgid
        d2.kill()
    # The trainer finishes while no daemon watches; the next one finds exit_code and goes on.
    wait_until((e2e.remote_dir(run_id) / "exit_code").exists, 90, "training to end unwatched")
    d3 = e2e.daemon().start()
    last = e2e.wait_run_end(d3, run_id)

    path = e2e.assert_succeeded(last)
    assert path == [*HAPPY[:5], *["Connecting", "Training"] * 2, *HAPPY[5:]], path
    store = e2e.store()
    steps = [p.step for p in store.progress(run_id) if p.phase == "train"]
    store.close()
    assert steps == list(range(1, 7)), steps  # read across three daemons, each line once
    assert d3.stop() == 0


def test_daemon_sigkill_during_fetch_then_restart_finishes(e2e: E2E) -> None:
    e2e.configure()
    e2e.write_memories(6)
    d = e2e.daemon(pause="Fetching.partial=30").start()
    run_id = e2e.start_run(d)
    wait_until(lambda: "downloaded " in e2e.run_log(run_id), 90, "the first file fetched", on_timeout=e2e.tail)
    d.kill()
    d2 = e2e.daemon().start()
    last = e2e.wait_run_end(d2, run_id)

    path = e2e.assert_succeeded(last)
    assert path == [*HAPPY[:6], "Connecting", "Fetching", *HAPPY[6:]], path
    fetched = [(p, int(n)) for p, n in re.findall(r"downloaded (\S+): (\d+) bytes", e2e.run_log(run_id))]
    whole = [p for p, n in fetched if n > 0]
    files = e2e.verify_output(run_id)["files"]
    assert sorted(whole) == sorted(f["path"] for f in files), fetched  # each file fetched whole once
    assert fetched[1] == (fetched[0][0], 0), fetched  # the first one was found verified in place
    assert d2.stop() == 0


def test_sshd_restart_during_training_reconnects_and_reattaches(e2e: E2E) -> None:
    e2e.configure()
    e2e.write_memories(6)
    d = e2e.daemon().start()
    run_id = e2e.start_run(d)
    with e2e.hold_trainer(run_id, at_step=1):
        e2e.sshd.stop()  # every SSH connection dropped; detached jobs live on
        wait_until(lambda: e2e.log_count("Training → Connecting") >= 1, 60, "the drop noticed", on_timeout=e2e.tail)
        # Down for a while: the daemon keeps trying (with backoff) and is refused each time.
        tries = e2e.proxy.connections
        wait_until(lambda: e2e.proxy.connections >= tries + 2, 60, "reconnect attempts", on_timeout=e2e.tail)
        assert e2e.log_count("Connecting → Training") == 0
        e2e.sshd.start()  # a new sshd process: same host key, same port
        wait_until(lambda: e2e.log_count("Connecting → Training") >= 1, 60, "reattached", on_timeout=e2e.tail)
    last = e2e.wait_run_end(d, run_id)

    path = e2e.assert_succeeded(last)
    assert path == [*HAPPY[:5], "Connecting", "Training", *HAPPY[5:]], path
    assert e2e.sshd.starts == 2


def test_trainer_killed_on_the_host_is_relaunched_and_resumes_from_checkpoint(e2e: E2E) -> None:
    e2e.configure(training={"num_train_epochs": 2})  # 12 steps: checkpoints at 4 and 8
    e2e.write_memories(6)
    d = e2e.daemon().start()
    run_id = e2e.start_run(d)
    ckpt = e2e.remote_dir(run_id) / "checkpoints" / "checkpoint-4"
    with e2e.hold_trainer(run_id, at_step=5, when=ckpt.is_dir):  # past the first checkpoint
        trainer = e2e.trainer_process(run_id)
        assert trainer is not None
        os.kill(trainer.pid, signal.SIGKILL)  # only the trainer: the launcher records its end
    wait_until(lambda: e2e.launches(run_id) == 2, 60, "the relaunch", on_timeout=e2e.tail)
    last = e2e.wait_run_end(d, run_id)

    path = e2e.assert_succeeded(last, launches=2)  # by design: the trainer died, not the link
    assert path == HAPPY, path  # relaunching happens inside Training
    assert "trainer ended by signal (exit 137)" in e2e.run_log(run_id)
    (total, first), (total2, resumed) = e2e.train_starts(run_id)
    assert first == 0 and total2 == total == 12
    assert resumed >= 4 and resumed % 4 == 0  # from a checkpoint, not from scratch
    steps = [p["step"] for p in e2e.progress(run_id)]
    relaunch = len(steps) - 1 - steps[::-1].index(resumed + 1)  # the relaunched trainer's first line
    before, after = steps[:relaunch], steps[relaunch:]
    assert before == list(range(1, len(before) + 1)) and len(before) >= resumed, steps
    assert after == list(range(resumed + 1, total + 1)) and after[0] > 1, steps
    assert last["progress"]["step"] == total


def test_host_key_change_aborts_with_a_clear_reason_and_stops_the_job(e2e: E2E) -> None:
    e2e.configure()
    e2e.write_memories(6)
    d = e2e.daemon().start()
    run_id = e2e.start_run(d)
    old = host_key_fingerprint(e2e.sshd.host_public_key)
    with e2e.hold_trainer(run_id, at_step=1):
        trainer = e2e.trainer_process(run_id)
        assert trainer is not None
        new = host_key_fingerprint(e2e.sshd.rotate_host_key())  # the "pod" was replaced
        # Aborting ends the job: a SIGTERM to its group, queued while the group is frozen.
        wait_until(lambda: signal.SIGTERM in pending_signals(trainer.pid), 60, "Aborting to signal the job",
                   on_timeout=e2e.tail)
    last = e2e.wait_run_end(d, run_id)

    assert last["outcome"] == "failed", last
    assert "host key" in last["error"] and old in last["error"] and new in last["error"], last["error"]
    path = e2e.journal(run_id)
    assert path == [*HAPPY[:5], "Connecting", "Aborting", "Idle"], path
    assert e2e.launches(run_id) == 1
    e2e.wait_no_jobs()
    assert not (e2e.remote_dir(run_id) / "manifest.json").exists()
    assert not (e2e.run_dir(run_id) / "output" / "manifest.json").exists()
    assert d.status()["pending_memories"] == 6  # nothing was marked trained


def test_malformed_half_written_and_binary_memories_are_counted_not_fatal(e2e: E2E) -> None:
    e2e.configure(dataset={"not_ready_grace_s": 600})
    e2e.write_memories(5)
    day = "2026/07/19"
    write(e2e.memories, f"{day}/evt-1-broken.json", text='{"content": "unterminated')
    write(e2e.memories, f"{day}/evt-2-image.json", text=b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\xff")
    write(e2e.memories, f"{day}/evt-3-list.json", ["not", "an", "object"])
    write(e2e.memories, f"{day}/evt-4-empty.json", {"type": "observation", "content": "  ", "tags": []})
    # Being written right now: half a JSON object with a fresh mtime.
    half = write(e2e.memories, f"{day}/evt-5-half.json", text='{"id": "evt-5", "content": "I was wri', mtime=None)
    d = e2e.daemon().start()
    run_id = e2e.start_run(d)
    last = e2e.wait_run_end(d, run_id)

    assert e2e.assert_succeeded(last) == HAPPY
    report = last["report"]
    assert report["rejects"] == {"bad_json": 1, "binary": 1, "not_object": 1, "empty_content": 1}, report
    assert report["not_ready"] == 1, report
    assert last["samples"] == 5 and report["memories_read"] == 5, report
    assert e2e.train_starts(run_id) == [(5, 0)]
    assert d.status()["pending_memories"] == 0
    # The writer finishes the half-written file: now it is a memory waiting for the next run.
    write(e2e.memories, f"{day}/evt-5-half.json", memory("I was writing this when the run began."), mtime=None)
    d.wait_for(lambda: d.status()["pending_memories"] == 1, 30, f"{half.name} counted once complete")
    assert d.stop() == 0
