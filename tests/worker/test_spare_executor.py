"""A device's spare executor: it imports at low priority and comes back to its HMM's priority
once given work; its spec is written without the writer waiting for it to be read."""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import re
import sys
import threading
import time
import types

import pytest

from elasticmoe_worker.engine import engine
from elasticmoe_worker.instance import executor, procutil, spares, zygote

import testprocs


def _nice_of_threads(pid: int) -> set[int]:
    values = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        values.add(int(fields[16]))  # field 19 of stat: nice (after pid and comm)
    return values


def _wait_for(predicate, timeout_s: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.skipif(not procutil.may_lower_nice(os.getpriority(os.PRIO_PROCESS, 0)),
                    reason="this process may not lower a nice value again (no CAP_SYS_NICE, RLIMIT_NICE too low)")
@pytest.mark.skipif(os.getpriority(os.PRIO_PROCESS, 0) >= procutil.SPARE_NICE,
                    reason=f"the tests run at nice >= {procutil.SPARE_NICE}: a spare cannot import at a lower priority")
def test_a_spare_imports_at_low_priority_and_is_reniced_when_given_work():
    env = procutil.spare_nice()
    base = os.getpriority(os.PRIO_PROCESS, 0)
    assert env == {procutil.SPARE_NICE_ENV: str(base)}
    proc = subprocess.Popen([sys.executable, "-m", "elasticmoe_worker.instance.executor"], stdin=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, **env})
    try:
        _wait_for(lambda: len(_nice_of_threads(proc.pid)) > 0 and _nice_of_threads(proc.pid) == {procutil.SPARE_NICE},
                  what="the spare to renice itself")
        time.sleep(0.5)  # threads started by its imports inherit the spare's value
        assert _nice_of_threads(proc.pid) == {procutil.SPARE_NICE}
        # the HMM takes it (perhaps still importing): every thread back at once
        procutil.renice_threads(base, proc.pid)
        assert _nice_of_threads(proc.pid) == {base}
        proc.stdin.write(struct.pack("<Q", 10))  # a header; then EOF: it leaves, saying why
        proc.stdin.close()
        err = proc.stderr.read()
        proc.wait(timeout=120)
        assert proc.returncode != 0 and b"stdin closed after 0 of 10 bytes" in err, err[-2000:]
        assert f"given work: back from nice {procutil.SPARE_NICE} to {base}".encode() in err, err[-2000:]
    finally:
        proc.kill()
        proc.wait()


def test_a_spec_larger_than_the_pipe_is_written_without_waiting_for_the_reader(tmp_path):
    """The reader (a spare still importing) reads nothing until the writer has returned: a
    writer that waited would never return."""
    data = os.urandom(3 * 1024 * 1024)  # a pipe buffers 64 KiB by default
    go = tmp_path / "go"
    reader = subprocess.Popen([sys.executable, "-c", "import hashlib, os, sys, time\n"
                               f"while not os.path.exists({str(go)!r}): time.sleep(0.02)\n"
                               "print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        done = threading.Event()

        def write() -> None:
            feeder = spares.StdinFeeder(reader)
            feeder.write(data[:1000])
            feeder.write(data[1000:])
            feeder.close()
            done.set()

        threading.Thread(target=write, daemon=True).start()
        returned = done.wait(30)
        go.touch()
        # NOTE: not communicate(): it closes stdin under the feeder, which is still writing
        out = reader.stdout.read()
        reader.wait(timeout=60)
        assert returned, "the writer waited for the reader"
        assert out.decode().strip() == hashlib.sha256(data).hexdigest(), "every byte, in order, then EOF"
    finally:
        reader.kill()
        reader.wait()


def test_an_executor_takes_the_tokenizer_sent_ahead_by_digest_or_loads_the_one_its_spec_carries(monkeypatch):
    loaded = []
    monkeypatch.setattr(executor.engine_mod, "tokenizer_from_files", lambda files: loaded.append(files) or "loaded")
    files, other = {"tokenizer.json": "{1}"}, {"tokenizer.json": "{2}"}
    digest, other_digest = engine.tokenizer_digest(files), engine.tokenizer_digest(other)
    assert digest != other_digest and digest == engine.tokenizer_digest(dict(files))

    def spec(tokenizer_files, tokenizer_digest=""):
        return types.SimpleNamespace(start=types.SimpleNamespace(rank=0), tokenizer_files=tokenizer_files,
                                     tokenizer_digest=tokenizer_digest)

    ahead = executor.Preloaded(files, digest, "ahead")
    assert executor._tokenizer(spec({}, digest), ahead) == "ahead" and loaded == []
    # an older HMM: the files again, no digest
    assert executor._tokenizer(spec(files), executor.Preloaded(files, "", "ahead")) == "ahead" and loaded == []
    # loading ahead failed: once more from the files sent ahead
    assert executor._tokenizer(spec({}, digest), executor.Preloaded(files, digest, None)) == "loaded"
    assert loaded == [files]
    # other files ahead than the spec's: the spec's
    assert executor._tokenizer(spec(other, other_digest), ahead) == "loaded" and loaded[-1] == other
    assert executor._tokenizer(spec(other), None) == "loaded" and loaded[-1] == other
    # named by digest, but nothing (or something else) was sent ahead: said, not guessed
    with pytest.raises(RuntimeError, match="by digest .* sent none ahead"):
        executor._tokenizer(spec({}, digest), None)
    with pytest.raises(RuntimeError, match="sent others ahead"):
        executor._tokenizer(spec({}, other_digest), ahead)


def _children(pid: int) -> set[int]:
    """Live executor children of every thread of `pid` (the HMM forks executors from a thread of
    its own); not its zygote."""
    out = set()
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out |= {int(x) for x in f.read().split()}
        except FileNotFoundError:
            continue
    return {c for c in out if _comm(c) != zygote.NAME}


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except FileNotFoundError:
        return ""


def test_a_scale_spawns_the_next_spare_only_when_it_ends(tiny_models, capfd):
    """A staying device holds its serving executor and the standby during a scale, not a third
    process importing (the peak of its memory); a spare is back once the scale committed. Both
    standbys' spares loaded their tokenizer while they waited: the staying device's HMM read the
    model, the warm worker's was told it when it registered (`ModelFiles`), with the memory to
    reserve: the scale copies into that memory, and what is left of it is released at the commit."""
    from elasticmoe_worker.engine import engine as engine_mod
    from elasticmoe_worker.instance import coordinator

    cfg = engine_mod.EngineConfig(dtype="float32", kv_cache_bytes=8 << 20, max_num_batched_tokens=64)
    inst = coordinator.Instance(tiny_models["qwen3_moe"], 1, cfg, warm_workers=1).start()
    try:
        hmm_pid = inst.fleet.pids()[0]
        _wait_for(lambda: len(_children(hmm_pid)) == 2, what="device 0's executor and its spare")
        # the spares say when they finished importing (heartbeats carry it to the coordinator)
        _wait_for(lambda: inst.spares_ready == {0, 1}, what="both devices' spares ready")
        # NOTE: the logs are read once, after shutdown: reading capfd while workers write can lose a line.
        # The warm worker's reserve: its replicated region and 4 experts' w13 and w2 in each of 2 MoE layers
        _wait_for(lambda: testprocs.reserve_regions(inst.fleet.pids()[1], 1) == 1 + 4 * 2 * 2,
                  what="the warm worker's reserve")
        # its heartbeats say it holds the model's tokenizer files: the transition sends them no more
        _wait_for(lambda: 1 in inst.members.informed([1]),
                  what="the warm worker's heartbeat naming the tokenizer's digest")
        steady = _children(hmm_pid)
        most, done = 0, threading.Event()

        def sample():
            nonlocal most
            while not done.is_set():
                most = max(most, len(_children(hmm_pid)))
                time.sleep(0.002)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            record = inst.scale(2, "test")
        finally:
            done.set()
            sampler.join()
        assert record.outcome.value == "Succeeded", record
        assert most == 2, f"device 0 held {most} executor processes at once during the scale"
        # the scale's rendezvous keys went with it
        assert not [k for k in inst.transport.store.data if k.startswith("transition-2/")], inst.transport.store.data
        # and so did the old configuration's executor group's; the serving one's stay
        groups = {k.partition("/")[0] for k in inst.transport.store.data if k.startswith("config-")}
        assert groups == {"config-2"}, inst.transport.store.data
        # the old executor exited, the old spare serves as the standby it became, a new spare imports
        _wait_for(lambda: len(_children(hmm_pid)) == 2 and len(_children(hmm_pid) - steady) == 1,
                  what="a new spare beside the new executor")
        _wait_for(lambda: inst.spares_ready == {0, 1}, what="the new spares ready")
    finally:
        inst.shutdown()  # its Shutdown reaches each HMM after the commit, on the same channel
    err = capfd.readouterr().err
    assert "rank 0: tokenizer loaded ahead" in err and "rank 1: tokenizer loaded ahead" in err, err[-3000:]
    # both standbys' spares had been sent the tokenizer: their specs named it by digest only
    for d in (0, 1):
        assert re.search(rf"device {d}: executor rank \d of 2 started \(pid \d+, configuration 2, pre-initialised "
                         r"while its bytes arrive, its tokenizer sent ahead\)", err), err[-3000:]
    assert "device 1: told the model's files" in err, err[-3000:]
    assert "device 1: joins configuration 2; the model's tokenizer files were told before, not sent again" in err, \
        err[-3000:]
    # 8 experts on 2 devices: the new one holds 4 of them in each of 2 MoE layers, and its replicated region
    commit = re.search(r"device 1: configuration 2 committed.*; (\d+) region\(s\) came from its reserve", err)
    assert commit and int(commit.group(1)) == 1 + 4 * 2 * 2, err[-3000:]
    # the coordinator told both HMMs each other's locality and mailbox (from their hellos): nothing went
    # through the store
    for d in (0, 1):
        assert re.search(rf"device {d}: transition 2 moved .*peers' locality \(told\).*peers told through their "
                         "mailboxes", err), err[-3000:]
    # each peer copy had the regions' fds with their handles (the source's mailbox sent them)
    copies = re.findall(r"device \d: peer copy of .* their file descriptors [\d.]+ s \(([^)]*)\)", err)
    assert copies and set(copies) == {"with the handles"}, err[-3000:]
