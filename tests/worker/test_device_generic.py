"""One compute path for every device: the engine, runner, sampler, models, expert-parallel
exchange and peer-to-peer transfers make their tensors on the backend's torch device and form
their groups with the backend's collective library.

How a CPU-only machine can catch a tensor made on the wrong device: a tensor factory called
without `device=` lands on the CPU, which looks right on CPU. So (1) a static check reads the
compute modules and fails on any factory call without `device=` that is not allow-listed with
a reason, (2) the engine runs whole steps under a `TorchFunctionMode` that fails on such a
call made at run time from our code and on any result off the expected device, and (3) the
step metadata is built on the `meta` device, where a tensor made elsewhere shows. Devices
other than the CPU run the same tests where they exist (skipped with the reason otherwise).
"""

from __future__ import annotations

import ast
import pathlib
import sys

import pytest
import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

import elasticmoe_worker
from elasticmoe_worker import backends
from elasticmoe_worker.engine import engine as engine_mod
from elasticmoe_worker.engine import runner, types
from elasticmoe_worker.instance import ep, rendezvous
from elasticmoe_worker.models import layers, registry

PACKAGE = pathlib.Path(elasticmoe_worker.__file__).parent
# The modules whose tensors must live on the device (the HMM's checkpoint loading in
# instance/memory.py copies host reads into device regions and is not compute).
COMPUTE_MODULES = sorted(
    [*(PACKAGE / "engine").glob("*.py"), *(PACKAGE / "models").glob("*.py"),
     *(PACKAGE / "instance" / name for name in ("ep.py", "executor.py", "transition.py", "rendezvous.py"))])
FACTORIES = frozenset({
    "tensor", "as_tensor", "arange", "zeros", "ones", "empty", "full", "rand", "randn", "randint", "randperm",
    "linspace", "logspace", "eye", "empty_strided", "scalar_tensor", "tril_indices", "triu_indices", "Generator",
})
# (module, enclosing function, factory) -> why the tensor is made on the host on purpose. At run
# time the audit below lets every call in these functions return host tensors.
HOST_ON_PURPOSE = {
    ("models/layers.py", "__init__", "arange"):
        "Rotary's frequency table is computed on the host and then moved to the device, as a transformers "
        "model computes its buffer and moves it with .to(): the same table bit for bit on every device",
    ("engine/engine.py", "adopt_requests", "tensor"):
        "a generator's state is a host byte tensor whatever the generator's device (set_state takes only that)",
}


def _device_params():
    """Device names ("npu" is a device type only once torch_npu is imported)."""
    return [
        pytest.param("cpu", id="cpu"),
        pytest.param("cuda:0", id="cuda", marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not torch.cuda.is_available(),
                               reason=f"needs an NVIDIA GPU visible to torch: {backends.unavailable_reason('cuda')}")]),
        pytest.param("npu:0", id="ascend", marks=[
            pytest.mark.ascend,
            pytest.mark.skipif(backends.unavailable_reason("ascend") is not None,
                               reason=f"needs an Ascend NPU: {backends.unavailable_reason('ascend')}")]),
    ]


# -- 1. static: no factory without device= ------------------------------------------------
def _factories_without_device(source: str, rel: str) -> list[tuple[str, str, str, int]]:
    """-> (module `rel`, enclosing function, factory, line) for each `torch.<factory>(...)`
    call in `source` without a `device=` keyword."""
    found = []

    def visit(node: ast.AST, func: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, child.name)
                continue
            if (isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute)
                    and isinstance(child.func.value, ast.Name) and child.func.value.id == "torch"
                    and child.func.attr in FACTORIES
                    and not any(kw.arg == "device" for kw in child.keywords)):
                found.append((rel, func, child.func.attr, child.lineno))
            visit(child, func)

    visit(ast.parse(source), "<module>")
    return found


def test_compute_modules_make_tensors_on_a_given_device():
    assert len(COMPUTE_MODULES) > 10, COMPUTE_MODULES
    found = [f for path in COMPUTE_MODULES
             for f in _factories_without_device(path.read_text(), path.relative_to(PACKAGE).as_posix())]
    unexplained = [f"{mod}:{line} {func}(): torch.{name}(...) without device=" for mod, func, name, line in found
                   if (mod, func, name) not in HOST_ON_PURPOSE]
    assert not unexplained, "tensors made on the host implicitly:\n" + "\n".join(unexplained)
    stale = set(HOST_ON_PURPOSE) - {(mod, func, name) for mod, func, name, _ in found}
    assert not stale, f"allow-list entries that match nothing any more: {sorted(stale)}"


def test_the_static_check_sees_a_missing_device():
    """The check above is only as good as its parser: it must flag what it exists to flag."""
    source = ("import torch\n\nclass A:\n    def f(self, n, d):\n        a = torch.arange(n, device=d)\n"
              "        return torch.tensor([1, 2]), torch.zeros_like(a), torch.Generator()\n")
    assert _factories_without_device(source, "engine/x.py") == [
        ("engine/x.py", "f", "tensor", 6), ("engine/x.py", "f", "Generator", 6)]


# -- 2. at run time: every factory our code calls gets a device, every result is on it -----
_HOST_FUNCTIONS = {(mod, func) for mod, func, _ in HOST_ON_PURPOSE}


class DeviceAudit(TorchFunctionMode):
    """Records torch calls made from the package's own code that create a tensor without
    `device=` (not allow-listed) or return a tensor off `device`."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.problems: list[str] = []
        self.num_calls = 0

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        caller = sys._getframe(1)
        path = pathlib.Path(caller.f_code.co_filename)
        ours = path.is_relative_to(PACKAGE)
        name = getattr(func, "__name__", str(func))
        checked = False
        if ours:
            self.num_calls += 1
            where = (path.relative_to(PACKAGE).as_posix(), caller.f_code.co_name)
            checked = where not in _HOST_FUNCTIONS
            if name in FACTORIES and "device" not in kwargs and (*where, name) not in HOST_ON_PURPOSE \
                    and getattr(func, "__module__", "") == "torch":
                self.problems.append(f"{where[0]}:{caller.f_lineno} {where[1]}(): torch.{name} without device=")
        out = func(*args, **kwargs)
        if checked:
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor) and t.device != self.device:
                    self.problems.append(f"{where[0]}:{caller.f_lineno} {where[1]}(): {name} -> a tensor on {t.device}")
        return out


def test_the_audit_sees_a_tensor_made_without_device():
    audit = DeviceAudit(torch.device("cpu"))
    with audit:
        runner.build_metadata([runner.SeqWork([5, 6], 0, [0], sample=True)], 4, torch.device("cpu"))
        code = compile("torch.arange(3)", str(PACKAGE / "engine" / "runner.py"), "eval")
        eval(code, {"torch": torch})  # as if the runner had made a tensor without a device
    assert audit.num_calls == 4  # build_metadata's ids, positions and slots, and the arange
    assert len(audit.problems) == 1 and "torch.arange without device=" in audit.problems[0], audit.problems


def _hf_greedy(model_dir, prompts, max_new_tokens: int, device: torch.device) -> list[list[int]]:
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).to(device)
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        return [hf.generate(torch.tensor([p], device=device), max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=0)[0, len(p):].tolist() for p in prompts]


@pytest.mark.parametrize("device_name", _device_params())
@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v2", "mixtral"])
def test_engine_steps_keep_every_tensor_on_the_device(tiny_models, family, device_name):
    """Build and run the engine on `device` (chunked prefills with cached context, decodes of
    several lengths, a seeded sampled request): no tensor of ours is made or lands elsewhere,
    the KV pool and generators are on it, and greedy outputs equal `transformers` on it."""
    device = torch.device(device_name)
    prompts = [[3, 9, 27, 81, 243, 7, 21], [11, 12] * 13, [5], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51]]
    max_new = 6
    cfg = engine_mod.EngineConfig(dtype="float32", block_size=4, max_num_batched_tokens=10, num_kv_blocks=64)
    audit = DeviceAudit(device)
    with audit:
        engine = engine_mod.LLMEngine.from_model_dir(tiny_models[family], cfg, device=device)
        greedy = types.SamplingParams(max_tokens=max_new, temperature=0.0, ignore_eos=True)
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, greedy)
        engine.add_request("seeded", prompts[0], types.SamplingParams(max_tokens=max_new, temperature=0.9,
                                                                      seed=7, ignore_eos=True))
        generators = [t.generator for t in engine.tracked.values()]
        got: dict[str, list[int]] = {}
        for _ in range(200):
            for out in engine.step():
                got.setdefault(out.request_id, []).extend(out.token_ids)
            if not engine.has_work():
                break
    assert not audit.problems, "\n".join(audit.problems[:20])
    assert audit.num_calls > 1000, "the audit saw too little of the step to mean anything"
    assert all(g.device.type == device.type for g in [engine.generator, *generators])
    assert engine.runner.device == engine.model.device == device
    for k, v in engine.pool.caches:
        assert k.device == device and v.device == device
    assert any(bool(k.abs().sum() > 0) for k, _ in engine.pool.caches), "the steps wrote no keys"
    assert len(got["seeded"]) == max_new
    assert [got[str(i)] for i in range(len(prompts))] == _hf_greedy(tiny_models[family], prompts, max_new, device)


# -- 3. the step metadata and the expert exchange, given a device ----------------------------
def test_metadata_is_built_on_the_given_device():
    """On `meta` (no data at all), a tensor made anywhere else would show."""
    meta_dev = torch.device("meta")
    work = [
        runner.SeqWork(token_ids=[1, 2, 3], start_pos=0, block_table=[7], sample=True),  # fresh prefill
        runner.SeqWork(token_ids=[4, 5], start_pos=5, block_table=[2, 9], sample=False),  # chunk with context
        runner.SeqWork(token_ids=[6], start_pos=3, block_table=[1], sample=True),  # decodes of 2 lengths
        runner.SeqWork(token_ids=[6], start_pos=12, block_table=[3, 4, 5, 6], sample=True),
    ]
    ids, meta = runner.build_metadata(work, 4, meta_dev)
    tensors = [ids, meta.positions, meta.slot_mapping]
    tensors += [t for g in meta.decodes for t in (g.token_idx, g.blocks, g.mask)]
    tensors += [p.gather_slots for p in meta.prefills if p.gather_slots is not None]
    assert len(meta.decodes) == 2 and len(meta.prefills) == 2 and len(tensors) == 10
    assert all(t.device == meta_dev for t in tensors), [t.device for t in tensors]
    # The same call on the CPU gives the values the runner has always used.
    ids, meta = runner.build_metadata(work, 4, torch.device("cpu"))
    assert ids.tolist() == [1, 2, 3, 4, 5, 6, 6]
    assert meta.slot_mapping.tolist() == [28, 29, 30, 37, 38, 7, 24]
    assert meta.prefills[1].gather_slots.tolist() == [8, 9, 10, 11, 36, 37, 38]
    groups = sorted(meta.decodes, key=lambda g: g.blocks.shape[1])
    assert groups[0].blocks.tolist() == [[1]] and groups[0].mask.tolist() == [[True] * 4]
    assert groups[1].blocks.tolist() == [[3, 4, 5, 6]] and groups[1].mask[0].sum().item() == 13


def _one_rank_group(backend_name: str, device: torch.device):
    cls = backends._backend_class(backend_name)
    return rendezvous.process_group(cls.collective_backend, dist.HashStore(), 0, 1, 30.0, device, host="127.0.0.1")


@pytest.mark.parametrize("device_name", _device_params())
def test_expert_exchange_runs_on_the_given_device(device_name):
    """A rank's whole exchange (counts, ids, rows, results) on `device`, through a group of the
    device's collective library: the same result as computing the experts locally."""
    device = torch.device(device_name)
    backend_name = {"cpu": "cpu", "cuda": "cuda", "npu": "ascend"}[device.type]
    group = _one_rank_group(backend_name, device)
    gen = torch.Generator().manual_seed(3)
    num_experts, hidden, inter, tokens, k = 4, 8, 16, 5, 2
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen).to(device)
    w2 = torch.randn(num_experts, hidden, inter, generator=gen).to(device)
    x = torch.randn(tokens, hidden, generator=gen).to(device)
    topk_ids = torch.stack([torch.randperm(num_experts, generator=gen)[:k] for _ in range(tokens)]).to(device)
    topk_weights = torch.rand(tokens, k, generator=gen).to(device)
    owner = torch.zeros(num_experts, dtype=torch.int64, device=device)
    local_map = torch.arange(num_experts, device=device)
    exchange = ep.ExpertParallel(group, 1, owner, local_map, w13, w2, device)
    audit = DeviceAudit(device)
    with audit:
        y = exchange(x, topk_ids, topk_weights)
        empty = exchange(x[:0], topk_ids[:0], topk_weights[:0])  # an idle rank still exchanges
    assert not audit.problems, "\n".join(audit.problems)
    assert y.device == device and empty.shape == (0, hidden)
    torch.testing.assert_close(y, layers.expert_mlp(x, w13, w2, topk_ids, topk_weights))


def test_expert_exchange_refuses_tensors_on_another_device():
    w = torch.zeros(2, 4, 4)
    with pytest.raises(ValueError, match=r"expert parallel owner: on cpu, expected meta"):
        ep.ExpertParallel(None, 1, torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64),
                          w, w, torch.device("meta"))


def test_model_refuses_weights_on_another_device(tiny_models):
    from elasticmoe_worker.models import config as config_mod
    from elasticmoe_worker.models import weights as weights_mod

    model_dir = tiny_models["mixtral"]
    spec = config_mod.load_spec(model_dir)
    ckpt = weights_mod.Checkpoint(model_dir)
    host_weights = weights_mod.CheckpointWeights(ckpt, torch.float32, range(spec.num_experts), torch.device("cpu"))
    with pytest.raises(ValueError, match=r"model embed: on cpu, expected the model's device meta"):
        registry.family(spec.model_type).build(spec, host_weights, list(range(spec.num_experts)),
                                               torch.device("meta"))


# -- 4. process groups of the backend's collective library -----------------------------------
def test_each_backend_names_its_collective_library():
    assert {name: backends._backend_class(name).collective_backend for name in backends.BACKEND_NAMES} == {
        "cpu": "gloo", "cuda": "nccl", "ascend": "hccl"}
    assert set(rendezvous.COLLECTIVE_BACKENDS) == {"gloo", "nccl", "hccl"}


def test_cpu_backend_gets_a_gloo_group_that_reduces():
    group = _one_rank_group("cpu", torch.device("cpu"))
    assert isinstance(group, dist.ProcessGroupGloo)
    flags = torch.tensor([0, 1, 0], dtype=torch.int64, device=torch.device("cpu"))
    opts = dist.AllreduceOptions()
    opts.reduceOp = dist.ReduceOp.MAX
    group.allreduce([flags], opts).wait()
    assert flags.tolist() == [0, 1, 0]


def test_unknown_collective_library_is_refused():
    with pytest.raises(ValueError, match=r"collective backend: got 'mpi', expected one of gloo, nccl, hccl"):
        rendezvous.process_group("mpi", dist.HashStore(), 0, 1, 5.0, torch.device("cpu"))


def test_hccl_without_torch_npu_names_the_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # as on a machine without it, even where it is
    with pytest.raises(rendezvous.CollectiveUnavailable, match=r"'hccl' needs the Python package `torch_npu`"):
        # "npu" is no device type without torch_npu; the device is never reached
        rendezvous.process_group("hccl", dist.HashStore(), 0, 1, 5.0, torch.device("meta"))


@pytest.mark.skipif(dist.is_nccl_available(), reason="this torch has NCCL: the group forms (see the cuda tests)")
def test_nccl_without_nccl_says_so():
    with pytest.raises(rendezvous.CollectiveUnavailable, match=r"'nccl': this torch build .* has no NCCL"):
        rendezvous.process_group("nccl", dist.HashStore(), 0, 1, 5.0, torch.device("cuda", 0))


def _check_two_ranks(fingerprints: list[dict[str, int]]) -> list[BaseException | None]:
    """`ep.check_group` on two gloo ranks (threads, one store) -> what each raised."""
    import threading

    store, results = dist.HashStore(), [None, None]

    def rank(r: int) -> None:
        try:
            group = rendezvous.process_group("gloo", store, r, 2, 30.0, torch.device("cpu"), host="127.0.0.1")
            ep.check_group(group, fingerprints[r], torch.device("cpu"))
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            results[r] = exc

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "the check did not end"
    return results


def test_a_new_group_checks_that_its_ranks_hold_the_same_model_and_placement():
    same = ep.fingerprint(7, 2, '{"hidden_size": 8}', [0, 1, 0, 1], 2, torch.float32)
    assert _check_two_ranks([same, dict(same)]) == [None, None]
    other = ep.fingerprint(7, 2, '{"hidden_size": 8}', [0, 1, 1, 0], 2, torch.bfloat16)
    errors = _check_two_ranks([same, other])
    for exc, mine in zip(errors, (same, other)):  # both ranks see it, each names its own value
        assert isinstance(exc, RuntimeError), exc
        text = str(exc)
        assert text.startswith("the ranks of this group disagree on expert placement (crc32): "), text
        assert f"dtype bytes: 2..4 (this rank {mine['dtype bytes']})" in text, text
        assert "configuration" not in text and "model config" not in text, text
