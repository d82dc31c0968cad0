"""Device-memory backends of the HMM: factory, zero-copy attach across processes, expert pages.

The CPU backend is real and fully exercised here. The same tests run on CUDA / Ascend where the
device exists (marked `cuda` / `ascend`, skipped with the reason otherwise); CPU-only checks
(/proc accounting, /dev/shm, SIGSEGV on an unmapped slot) say so in their names.
"""

from __future__ import annotations

import errno
import gc
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import httpx
import msgspec
import pytest
import torch

import testprocs

from elasticmoe_worker import backends
from elasticmoe_worker.backends import cpu as cpu_backend

logger = logging.getLogger(__name__)

MiB = 2**20

def _device_param(name: str):
    """`name` as a test parameter, marked with its pytest marker and skipped with what is missing."""
    reason = backends.unavailable_reason(name)
    return pytest.param(name, id=name, marks=[getattr(pytest.mark, name),
                                              pytest.mark.skipif(reason is not None, reason=f"{name}: {reason}")])


BACKEND_PARAMS = [pytest.param("cpu", id="cpu"), _device_param("cuda"), _device_param("ascend")]


@pytest.fixture(params=BACKEND_PARAMS)
def backend(request) -> backends.DeviceBackend:
    return backends.get_backend(request.param)


def _sync(backend: backends.DeviceBackend) -> None:
    if backend.name == "cuda":
        torch.cuda.synchronize(backend.torch_device())
    elif backend.name == "ascend":
        torch.npu.synchronize(backend.torch_device())


def smaps_rollup() -> dict[str, int]:
    """/proc/self/smaps_rollup in bytes."""
    out = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return out


def uss_bytes(smaps: dict[str, int]) -> int:
    return smaps["Private_Clean"] + smaps["Private_Dirty"]


def shm_entries() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if "elasticmoe" in n}


def maps_mention(text: str) -> bool:
    with open("/proc/self/maps") as f:
        return text in f.read()


# --- factory -------------------------------------------------------------------------------


def test_get_backend_cpu() -> None:
    b = backends.get_backend("cpu")
    assert (b.name, b.collective_backend) == ("cpu", "gloo")
    assert b.torch_device(0) == torch.device("cpu")
    assert b.is_available() and b.page_size_bytes() % 4096 == 0


def test_get_backend_unknown_names_the_value_and_the_choices() -> None:
    with pytest.raises(ValueError, match=r"'tpu'.*cpu, cuda, ascend"):
        backends.get_backend("tpu")


@pytest.mark.parametrize("name", ["cuda", "ascend"])
def test_get_backend_without_hardware_is_a_clear_runtime_error(name: str) -> None:
    if backends.backend_available(name):
        pytest.skip(f"{name} is available here")
    with pytest.raises(RuntimeError, match=f"'{name}' is not usable here: .+"):
        backends.get_backend(name)


def test_cuda_unavailable_reason_names_everything_missing_here() -> None:
    reason = backends.unavailable_reason("cuda")
    if reason is None:
        pytest.skip("cuda is available here")
    import importlib.util
    import ctypes.util

    if torch.version.cuda is None:
        assert "a build without CUDA" in reason, reason
    if importlib.util.find_spec("cuda") is None:
        assert "`cuda-python` is not installed (pip install 'elasticmoe[cuda]')" in reason, reason
    if ctypes.util.find_library("cuda") is None:
        assert "libcuda.so.1 cannot be loaded" in reason, reason


def test_ascend_unavailable_reason_names_everything_missing_here() -> None:
    reason = backends.unavailable_reason("ascend")
    if reason is None:
        pytest.skip("ascend is available here")
    import importlib.util

    if importlib.util.find_spec("torch_npu") is None:
        assert "`torch_npu` is not installed (pip install 'elasticmoe[ascend]')" in reason, reason
    if not os.environ.get("ASCEND_TOOLKIT_HOME"):
        assert "libascendcl.so cannot be loaded" in reason, reason


def test_handle_roundtrips_through_msgpack() -> None:
    with backends.get_backend("cpu").allocate(5000, "layer0.expert3.w13") as region:
        wire = msgspec.msgpack.encode(region.handle)
        assert msgspec.msgpack.decode(wire, type=backends.MemoryHandle) == region.handle
        assert region.handle.size_bytes == 5000 and region.alloc_bytes == 8192


# --- regions --------------------------------------------------------------------------------


def test_region_is_zeroed_and_views_share_memory(backend) -> None:
    with backend.allocate(3 * MiB + 12, "weights") as region:
        a = region.tensor(torch.float32, (3, 4), offset_bytes=16)
        assert not a.any()
        b = region.tensor(torch.int32, (12,), offset_bytes=16)
        a.fill_(1.0)
        _sync(backend)
        assert int(b[5]) == 0x3F800000  # the same bytes, reinterpreted: no copy


def test_region_tensor_rejects_bad_requests() -> None:
    with backends.get_backend("cpu").allocate(100, "r") as region:
        with pytest.raises(ValueError, match="needs 104 bytes"):
            region.tensor(torch.float32, (26,))
        with pytest.raises(ValueError, match="multiple of"):
            region.tensor(torch.float32, (2,), offset_bytes=2)
        with pytest.raises(TypeError, match="torch.dtype"):
            region.tensor("float32", (2,))
    with pytest.raises(ValueError, match="closed"):
        region.tensor(torch.uint8, (1,))


CHILD = textwrap.dedent(
    """
    import json, sys
    import msgspec, torch
    torch.set_num_threads(1)
    from elasticmoe_worker import backends

    def smaps():
        out = {}
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) == 3 and parts[2] == "kB":
                    out[parts[0].rstrip(":")] = int(parts[1]) * 1024
        return out

    handle = msgspec.json.decode(sys.argv[1].encode(), type=backends.MemoryHandle)
    backend = backends.get_backend(handle.backend, handle.device_index)
    torch.arange(4096, dtype=torch.int64).sum()  # first-reduction buffers stay out of the window
    before = smaps()
    region = backend.attach(handle)
    words = region.tensor(torch.int64, (handle.size_bytes // 8,))
    total = int(words.sum())  # reads every page
    after = smaps()
    words[-1] = -7
    if handle.backend == "cuda":
        torch.cuda.synchronize()
    elif handle.backend == "ascend":
        torch.npu.synchronize()
    print(json.dumps({"sum": total, "before": before, "after": after}), flush=True)
    sys.stdin.readline()  # the parent has written words[0]
    print(json.dumps({"first": int(words[0])}), flush=True)
    region.close()
    """
)


def test_zero_copy_across_processes(backend, tmp_path) -> None:
    size_bytes = 64 * MiB
    n = size_bytes // 8
    region = backend.allocate(size_bytes, "test.zero_copy")
    words = region.tensor(torch.int64, (n,))
    torch.arange(n, out=words)  # in place: words is a view of the region
    _sync(backend)
    script = tmp_path / "attach_child.py"
    script.write_text(CHILD)
    try:
        with subprocess.Popen(
            [sys.executable, str(script), msgspec.json.encode(region.handle).decode()],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=tmp_path,
        ) as proc:
            try:
                line = proc.stdout.readline()
                assert line, f"child died: {proc.wait()} {proc.stderr.read()}"
                report = json.loads(line)
                assert report["sum"] == n * (n - 1) // 2, "the child did not see the parent's data"
                _sync(backend)
                assert int(words[-1]) == -7, "the parent did not see the child's write"
                words[0] = 12345
                _sync(backend)
                proc.stdin.write("go\n")
                proc.stdin.flush()
                reply = json.loads(proc.stdout.readline())
                assert reply["first"] == 12345, "the child did not see the parent's write"
                assert proc.wait(timeout=30) == 0, proc.stderr.read()
            finally:
                if proc.poll() is None:
                    proc.kill()
    finally:
        region.close()

    if backend.name != "cpu":
        return  # host-side accounting below is what zero copy means on CPU
    before, after = report["before"], report["after"]
    delta = {k: after[k] - before[k] for k in ("Rss", "Pss", "Shared_Clean", "Shared_Dirty",
                                                 "Private_Clean", "Private_Dirty", "Anonymous")}
    logger.info("attach + read of %d MiB in the child, deltas in MiB: %s", size_bytes // MiB,
                {k: round(v / MiB, 2) for k, v in delta.items()})
    # Rss counts every page the child maps, shared or not: it must grow by ~the whole region,
    # which proves the child really touched every page (so the checks below can fail).
    assert delta["Rss"] >= 0.9 * size_bytes, delta
    # The metric: USS = Private_Clean + Private_Dirty, the memory only this process maps (what
    # its exit would free). A copy would land there (anonymous or a file page of its own); a
    # page shared with the owner, which keeps the whole region mapped and touched, is
    # Shared_* instead. Pss is not the metric: it charges 1/N of every shared page to each of
    # the N mappers, so perfect sharing still adds size/2 here; it is checked for exactly that.
    assert uss_bytes(after) - uss_bytes(before) < 0.05 * size_bytes, delta
    assert delta["Anonymous"] < 0.05 * size_bytes, delta
    assert 0.45 * size_bytes <= delta["Pss"] <= 0.55 * size_bytes, delta


def test_attach_after_owner_closed_is_an_attach_error() -> None:
    b = backends.get_backend("cpu")
    region = b.allocate(4096, "short.lived")
    handle = region.handle
    region.close()
    with pytest.raises(backends.AttachError, match="closed the region"):
        b.attach(handle)


def test_attach_rejects_another_backends_handle() -> None:
    handle = backends.MemoryHandle(backend="cuda", name="x", size_bytes=1, owner_pid=os.getpid())
    with pytest.raises(ValueError, match="'cuda'"):
        backends.get_backend("cpu").attach(handle)


# --- expert pages ---------------------------------------------------------------------------


def _experts(backend, shape, count: int) -> list[backends.Region]:
    nbytes = torch.Size(shape).numel() * 4
    regions = []
    for i in range(count):
        r = backend.allocate(nbytes, f"layer0.expert{i}.w13")
        r.tensor(torch.float32, shape).copy_(torch.arange(torch.Size(shape).numel()).view(shape) + 1000 * i)
        regions.append(r)
    _sync(backend)
    return regions


def _expected(shape, i: int, device) -> torch.Tensor:
    return (torch.arange(torch.Size(shape).numel()).view(shape) + 1000 * i).float().to(device)


def test_expert_pages_remap_swaps_without_copying(backend) -> None:
    shape = (1024, 1024)  # 4 MiB per expert
    expert_bytes = 4 * MiB
    regions = _experts(backend, shape, 4)
    slot_bytes = backends.round_up(expert_bytes, backend.page_size_bytes())
    pages = backend.expert_pages(4, slot_bytes)
    try:
        for i, r in enumerate(regions):
            pages.map(i, r)
        view = pages.view(torch.float32, shape)
        assert view.shape == (4, *shape) and pages.view(torch.float32, shape) is view
        dev = backend.torch_device()
        for i in range(4):
            assert torch.equal(view[i], _expected(shape, i, dev)), f"slot {i}"
        ptr = view.data_ptr()

        measure = backend.name == "cpu"
        before = smaps_rollup() if measure else None
        pages.map(1, regions[2])
        pages.map(2, regions[1])
        sums = view.sum(dim=(1, 2))  # reads every page of every slot
        after = smaps_rollup() if measure else None

        want = torch.stack([_expected(shape, i, dev).sum() for i in (0, 2, 1, 3)])
        assert torch.equal(sums, want), "the view does not show the swapped experts"
        assert view.data_ptr() == ptr
        assert pages.mapped_slots() == {i: regions[j].name for i, j in enumerate((0, 2, 1, 3))}
        # The decisive no-copy check: a write through the ORIGINAL region shows up in the slot
        # it is mapped to now.
        regions[1].tensor(torch.float32, shape)[7, 9] = -42.0
        _sync(backend)
        assert float(view[2, 7, 9]) == -42.0 and float(view[1, 7, 9]) != -42.0
        if measure:
            grew = uss_bytes(after) - uss_bytes(before)
            logger.info("swap + read of 4 x %d MiB experts: private memory grew %d KiB",
                        expert_bytes // MiB, grew // 1024)
            assert grew < expert_bytes // 2, f"private memory grew by {grew} bytes during the swap"
    finally:
        pages.close()
        for r in regions:
            r.close()


def test_expert_pages_pad_slots_for_unaligned_experts(backend) -> None:
    shape = (3, 100)  # 1200 bytes: not a page multiple
    page = backend.page_size_bytes()
    regions = _experts(backend, shape, 3)
    assert all(r.alloc_bytes == page for r in regions)
    pages = backend.expert_pages(3, page)
    try:
        for slot, r in zip((2, 0, 1), regions):
            pages.map(slot, r)
        view = pages.view(torch.float32, shape)
        assert view.shape == (3, 3, 100) and view.stride() == (page // 4, 100, 1)
        dev = backend.torch_device()
        for slot, i in ((2, 0), (0, 1), (1, 2)):
            assert torch.equal(view[slot], _expected(shape, i, dev)), f"slot {slot}"
        half = pages.view(torch.float16, (600,))  # another dtype over the same range
        assert half.stride() == (page // 2, 1)
        assert torch.equal(half[0].view(torch.float32).view(shape), view[0])
    finally:
        pages.close()
        for r in regions:
            r.close()


def test_expert_pages_reject_bad_arguments() -> None:
    b = backends.get_backend("cpu")
    page = b.page_size_bytes()
    with pytest.raises(ValueError, match="multiple of the page size"):
        b.expert_pages(2, page + 1)
    with pytest.raises(ValueError, match="num_slots"):
        b.expert_pages(0, page)
    with b.expert_pages(2, page) as pages, b.allocate(page + 1, "big") as big:
        with pytest.raises(ValueError, match="slots are"):
            pages.map(0, big)
        with pytest.raises(ValueError, match=r"slot must be an int in \[0, 2\)"):
            pages.unmap(2)
        with pytest.raises(ValueError, match="slots are"):
            pages.view(torch.float32, (page // 4 + 1,))
        with pytest.raises(TypeError, match="Region"):
            pages.map(0, object())


def test_unmapped_slot_keeps_the_view_usable(backend) -> None:
    shape = (8, 128)
    regions = _experts(backend, shape, 2)
    pages = backend.expert_pages(3, backend.page_size_bytes())
    try:
        pages.map(0, regions[0])
        pages.map(2, regions[1])
        view = pages.view(torch.float32, shape)
        pages.unmap(2)
        pages.unmap(2)  # idempotent
        empty = view[1:]  # slicing over unmapped slots touches nothing
        assert empty.shape == (2, *shape)
        assert torch.equal(view[0], _expected(shape, 0, backend.torch_device()))
        pages.map(1, regions[1])
        assert torch.equal(view[1], _expected(shape, 1, backend.torch_device()))
        assert pages.mapped_slots() == {0: regions[0].name, 1: regions[1].name}
    finally:
        pages.close()
        for r in regions:
            r.close()


UNMAPPED_READ_CHILD = textwrap.dedent(
    """
    import resource
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # the crash is expected: no core file
    import torch
    from elasticmoe_worker import backends
    b = backends.get_backend("cpu")
    pages = b.expert_pages(2, b.page_size_bytes())
    view = pages.view(torch.float32, (4,))
    print("view ok", flush=True)
    float(view[1, 0])  # slot 1 was never mapped
    print("read returned", flush=True)
    """
)


def test_cpu_reading_an_unmapped_slot_faults_like_a_device(tmp_path) -> None:
    script = tmp_path / "unmapped_read.py"
    script.write_text(UNMAPPED_READ_CHILD)
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert proc.stdout.startswith("view ok") and "read returned" not in proc.stdout
    assert proc.returncode == -signal.SIGSEGV, (proc.returncode, proc.stderr)


# --- lifetime and cleanup (CPU) -------------------------------------------------------------


@pytest.mark.parametrize("use_memfd", [True, False], ids=["memfd", "devshm-fallback"])
def test_cpu_close_leaves_nothing_in_dev_shm(use_memfd: bool) -> None:
    b = cpu_backend.CpuBackend(use_memfd=use_memfd)
    before = shm_entries()
    region = b.allocate(3 * 4096, "cleanup.check")
    link = os.readlink(f"/proc/self/fd/{region.handle.fd}")
    if use_memfd:
        assert link.startswith("/memfd:cleanup.check"), link
    else:  # the fallback file exists only as an open, already unlinked file
        assert link.startswith("/dev/shm/elasticmoe-") and link.endswith("(deleted)"), link
    assert shm_entries() == before
    attached = b.attach(region.handle)
    pages = b.expert_pages(2, 3 * 4096)
    pages.map(1, attached)
    view = pages.view(torch.uint8, (3 * 4096,))
    view[1].fill_(5)
    assert int(region.tensor(torch.uint8, (1,))[0]) == 5
    del view
    for obj in (pages, attached, region):
        obj.close()
    gc.collect()
    assert shm_entries() == before
    assert not maps_mention("cleanup.check"), "a mapping of the region outlived every view"


def test_cpu_close_under_a_live_view_defers_the_unmap() -> None:
    b = backends.get_backend("cpu")
    region = b.allocate(4096, "lifetime.check")
    t = region.tensor(torch.int32, (1024,))
    t.fill_(7)
    pages = b.expert_pages(1, 4096)
    pages.map(0, region)
    view = pages.view(torch.int32, (1024,))
    region.close()
    pages.close()
    # Both objects are closed, but the views still own their mappings: reading is safe.
    assert int(t.sum()) == 7 * 1024 and int(view.sum()) == 7 * 1024
    assert maps_mention("lifetime.check")
    del t, view
    gc.collect()
    assert not maps_mention("lifetime.check")


# --- handles in restricted pods (fds over a Unix socket, SCM_RIGHTS) ---------------------------

# Drops every capability for the command and all its descendants: bounding, inheritable and
# ambient sets cleared, so even uid 0 execs with none (what `capabilities: drop: [ALL]` gives a pod).
DROP_ALL_CAPS = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--ambient-caps=-all", "--no-new-privs"]


def _capabilities(pid: int | str = "self") -> dict[str, int]:
    with open(f"/proc/{pid}/status") as f:
        return {k: int(v, 16) for k, v in (line.split(":") for line in f if line.startswith("Cap"))}


def _capless_prefix() -> list[str]:
    """The command prefix that runs a process with no capability, or skip when none works here."""
    if shutil.which("setpriv"):
        probe = subprocess.run([*DROP_ALL_CAPS, "grep", "^Cap", "/proc/self/status"], capture_output=True, text=True)
        if probe.returncode == 0 and all(int(line.split()[1], 16) == 0 for line in probe.stdout.splitlines()):
            return DROP_ALL_CAPS
    if not any(_capabilities().values()):
        return []  # this process has none to drop
    pytest.skip("cannot drop capabilities here (no working setpriv) and this process holds some")


ATTACH_CHILD = textwrap.dedent(
    """
    import json, os, sys
    import msgspec, torch
    from elasticmoe_worker import backends
    handle = msgspec.json.decode(sys.argv[1].encode(), type=backends.MemoryHandle)
    caps = {l.split(":")[0]: int(l.split()[1], 16) for l in open("/proc/self/status") if l.startswith("Cap")}
    try:  # the route attach used to take; reported, not used
        os.close(os.open(f"/proc/{handle.owner_pid}/fd/{handle.fd}", os.O_RDWR))
        proc_fd = "opened"
    except OSError as exc:
        proc_fd = exc.strerror
    try:
        region = backends.get_backend("cpu").attach(handle)
    except backends.AttachError as exc:
        print(json.dumps({"caps": caps, "proc_fd": proc_fd, "error": str(exc)}), flush=True)
        sys.exit(0)
    words = region.tensor(torch.int64, (4,))
    seen = int(words[0])
    words[1] = seen + 1
    print(json.dumps({"caps": caps, "proc_fd": proc_fd, "seen": seen}), flush=True)
    """
)


def _run_attach_child(tmp_path, handle, prefix: list[str], via_grandchild: bool = False) -> dict:
    script = tmp_path / "attach.py"
    script.write_text(ATTACH_CHILD)
    cmd = [sys.executable, str(script), msgspec.json.encode(handle).decode()]
    if via_grandchild:  # a shell that stays the parent of python: not the owner's child
        cmd = ["sh", "-c", '"$@"; exit $?', "sh", *cmd]
    proc = subprocess.run([*prefix, *cmd], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_cpu_attach_with_every_capability_dropped(tmp_path) -> None:
    prefix = _capless_prefix()
    b = backends.get_backend("cpu")
    with b.allocate(4096, "restricted.attach") as region:
        words = region.tensor(torch.int64, (4,))
        words[0] = 41
        report = _run_attach_child(tmp_path, region.handle, prefix)
        assert not any(report["caps"][k] for k in ("CapEff", "CapPrm", "CapBnd")), report["caps"]
        assert report.get("seen") == 41, report
        assert int(words[1]) == 42, "the parent does not see the child's write: not the same memory"
        logger.info("capless child: /proc/<owner>/fd reopen gave %r; attach over the socket worked",
                    report["proc_fd"])
        if any(_capabilities().values()):
            # The owner (this test) holds capabilities the child lacks: the kernel denies it
            # /proc/<owner>/fd, so the attach above cannot have gone that way.
            assert report["proc_fd"] == "Permission denied", report


def test_cpu_attach_from_a_process_the_owner_did_not_start_is_refused(tmp_path) -> None:
    with backends.get_backend("cpu").allocate(4096, "restricted.grandchild") as region:
        report = _run_attach_child(tmp_path, region.handle, [], via_grandchild=True)
    assert "is not a child of the owner pid" in report.get("error", ""), report


def test_attach_with_a_forged_token_names_the_closed_region() -> None:
    b = backends.get_backend("cpu")
    with b.allocate(4096, "real") as region:
        forged = msgspec.structs.replace(region.handle, fd_token=bytes(16))
        with pytest.raises(backends.AttachError, match="'real'.*closed the region"):
            b.attach(forged)
        with pytest.raises(backends.AttachError, match="names no fd server"):
            b.attach(msgspec.structs.replace(region.handle, fd_socket=""))
        assert b.attach(region.handle).alloc_bytes == 4096  # the connection still serves


def test_serve_with_every_capability_dropped(tiny_models, tmp_path) -> None:
    """A real HMM + executor (serve --devices 1) under no capability, as in the operator's pods."""
    prefix = _capless_prefix()
    port = testprocs.free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([*prefix, *testprocs.elasticmoe("serve", "--model", str(tiny_models["mixtral"]),
                                                                  "--port", str(port), "--devices", "1")],
                                stdout=out, stderr=subprocess.STDOUT, preexec_fn=testprocs.die_with_test)
    try:
        base = f"http://127.0.0.1:{port}"
        testprocs.until("serve to be healthy", lambda: testprocs.healthy(base), 120, proc, log)
        caps = _capabilities(proc.pid)
        assert not (caps["CapEff"] or caps["CapBnd"]), caps  # the bounding set binds every descendant
        r = httpx.post(f"{base}/v1/completions", timeout=60,
                       json={"model": "mixtral", "prompt": [5, 6, 7], "max_tokens": 4, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text
    finally:
        testprocs.interrupt(proc)
    assert "executor rank 0 of 1 started" in log.read_text()


PEER_COPY_CHILD = textwrap.dedent(
    """
    import json, sys
    import msgspec, torch
    from elasticmoe_worker import backends
    out = []
    b = backends.get_backend("cpu")
    for arg in sys.argv[1:]:
        handle = msgspec.json.decode(arg.encode(), type=backends.MemoryHandle)
        with b.allocate(8192, "peer.dst") as dst:
            try:
                b.copy_from_peer(dst, 4096, handle, 8, 16)
                out.append({"bytes": dst.tensor(torch.uint8, (16,), 4096).tolist()})
            except backends.AttachError as exc:
                out.append({"error": str(exc)})
            try:  # and the other way: 4 bytes of ours into the peer region at 100
                dst.tensor(torch.uint8, (4,), 0).copy_(torch.tensor([7, 6, 5, 4], dtype=torch.uint8))
                b.copy_to_peer(dst, 0, handle, 100, 4)
                out[-1]["pushed"] = True
            except backends.AttachError as exc:
                out[-1]["push_error"] = str(exc)
    print(json.dumps(out), flush=True)
    """
)


def _peer_copy_in_a_peer(tmp_path, *handles) -> list[dict]:
    script = tmp_path / "peer_copy.py"
    script.write_text(PEER_COPY_CHILD)
    # a shell stays the parent of python: a peer of the owner (same uid), not its child
    cmd = ["sh", "-c", '"$@"; exit $?', "sh", sys.executable, str(script),
           *(msgspec.json.encode(h).decode() for h in handles)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_a_peer_copies_only_granted_regions_and_only_until_revoked(tmp_path) -> None:
    from elasticmoe_worker.backends import fdpass

    b = backends.get_backend("cpu")
    with b.allocate(4096, "peer.granted") as granted, b.allocate(4096, "peer.private") as private:
        granted.tensor(torch.uint8, (4096,)).copy_(torch.arange(4096) % 256)
        server = fdpass.server()
        server.grant(granted.handle.fd_token)
        ok, refused = _peer_copy_in_a_peer(tmp_path, granted.handle, private.handle)
        assert ok == {"bytes": list(range(8, 24)), "pushed": True}, ok
        assert granted.tensor(torch.uint8, (4,), 100).tolist() == [7, 6, 5, 4]  # the peer copied into it too
        assert "not granted to peers" in refused.get("error", ""), refused
        assert "not granted to peers" in refused.get("push_error", ""), refused
        assert not private.tensor(torch.uint8, (4096,)).any()
        server.grant(granted.handle.fd_token)  # grants are counted: one revoke leaves one
        server.revoke(granted.handle.fd_token)
        assert server.granted(granted.handle.fd_token)
        server.revoke(granted.handle.fd_token)
        [after] = _peer_copy_in_a_peer(tmp_path, granted.handle)
        assert "not granted to peers" in after.get("error", ""), after
    with pytest.raises(KeyError, match="no region"):
        server.grant(granted.handle.fd_token)  # closed: unregistered


@pytest.mark.parametrize("into", ["fresh", "populated", "fresh, no copy_file_range"])
def test_peer_copies_at_unaligned_offsets_and_never_past_the_peers_file(into, monkeypatch) -> None:
    b = backends.get_backend("cpu")
    if into == "fresh, no copy_file_range":
        def unsupported(*args):
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        monkeypatch.setattr(os, "copy_file_range", unsupported)
    with b.allocate(3 * 4096, "offsets.src") as src, b.allocate(2 * 4096, "offsets.dst") as dst:
        if into == "populated":
            b.populate(dst)
            assert dst.populated
        src.tensor(torch.uint8, (3 * 4096,)).copy_(torch.arange(3 * 4096) % 251)
        b.copy_from_peer(dst, 100, src.handle, 4000, 5000)
        assert torch.equal(dst.tensor(torch.uint8, (5000,), 100), src.tensor(torch.uint8, (5000,), 4000))
        assert not dst.tensor(torch.uint8, (100,)).any() and not dst.tensor(torch.uint8, (8192 - 5100,), 5100).any()
        with pytest.raises(ValueError, match="do not fit"):
            b.copy_from_peer(dst, 4096, src.handle, 0, 5000)
        b.copy_to_peer(src, 0, dst.handle, 3000, 4000)  # and pushed into a peer's region
        assert torch.equal(dst.tensor(torch.uint8, (4000,), 3000), src.tensor(torch.uint8, (4000,), 0))
        with pytest.raises(ValueError, match="do not fit"):
            b.copy_to_peer(src, 0, dst.handle, 4096, 5000)
        # a handle that claims more than its owner's file holds: neither a short read nor a write that
        # grows the peer's file
        bigger = msgspec.structs.replace(dst.handle, size_bytes=4 * 4096)
        with pytest.raises(backends.AttachError, match="do not fit in the 8192 bytes"):
            b.copy_to_peer(src, 0, bigger, 8192, 4096)
        with pytest.raises(backends.AttachError, match="do not fit in the 8192 bytes"):
            b.copy_from_peer(src, 0, bigger, 6000, 4096)
        assert os.fstat(dst.fd).st_size == 8192
