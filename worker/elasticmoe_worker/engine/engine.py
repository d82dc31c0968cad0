"""The single-device engine: scheduler + KV pool + model runner + output processing.

`LLMEngine.step()` runs one continuous-batching step and returns the updates it produced.
It is synchronous and single-threaded on purpose; `async_engine.AsyncEngine` drives it from
a background thread for the HTTP server, and tests drive it directly to control exactly
when requests arrive.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import time

import torch

from elasticmoe_worker.contract import wire
from elasticmoe_worker.engine import kv_cache, output, runner, scheduler, types
from elasticmoe_worker.models import model as model_mod
from elasticmoe_worker.models import registry

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    dtype: str = "auto"
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: derived from kv_cache_bytes
    kv_cache_bytes: int = 256 * 2**20
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None  # None: the model's max_position_embeddings, at most 4096
    max_waiting: int = 256
    seed: int = 0  # engine-wide generator for unseeded sampling


# The tokenizer's files in a checkpoint directory (kept in memory by whoever must not reread them).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def load_tokenizer(model_dir: str | pathlib.Path):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)


def tokenizer_from_files(files: dict[str, str]):
    """The tokenizer from its files' contents (name -> text), for a process that has no
    checkpoint directory to read (an executor; a coordinator that adopted its workers)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="elasticmoe-tok-") as d:
        for name, text in files.items():
            pathlib.Path(d, name).write_text(text)
        return load_tokenizer(d)


def tokenizer_digest(files: dict[str, str]) -> str:
    """A digest of tokenizer files (name -> text): equal for equal files. An executor whose spare
    preloaded files of this digest is sent none (`wire.ExecutorSpec.tokenizer_digest`)."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(files):
        data = files[name].encode()
        h.update(f"{name}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def chat_token_ids(tokenizer, messages) -> list[int]:
    """The chat template applied, with the assistant's turn opened; -> token ids."""
    ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # BatchEncoding in newer transformers
        ids = ids["input_ids"]
    return list(ids)


def resolve_max_model_len(spec, config: "EngineConfig") -> int:
    """The configured context length, by default the model's capped at 4096; never above the model's."""
    return min(config.max_model_len or min(spec.max_position_embeddings, 4096), spec.max_position_embeddings)


@dataclasses.dataclass(eq=False)
class _Tracked:
    """Engine-side state of a request beside the scheduler's."""

    request: scheduler.Request
    detok: output.Detokenizer
    generator: torch.Generator | None
    num_emitted_tokens: int = 0


class LLMEngine:
    def __init__(self, model: model_mod.CausalLM, tokenizer, config: EngineConfig, model_name: str,
                 pool: kv_cache.KVCachePool | None = None) -> None:
        spec = model.spec
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.model_name = model_name
        self.max_model_len = resolve_max_model_len(spec, config)
        per_block = kv_cache.KVCachePool.bytes_per_block(
            spec.num_layers, spec.num_kv_heads, spec.qk_head_dim, spec.v_head_dim, config.block_size, model.dtype
        )
        if pool is not None:  # memory owned by someone else (the HMM)
            assert pool.block_size == config.block_size, "pool and engine disagree on the block size"
            num_blocks = pool.num_blocks
        elif config.num_kv_blocks is not None:
            num_blocks = config.num_kv_blocks
        else:
            useful = config.max_num_seqs * kv_cache.blocks_for(self.max_model_len, config.block_size)
            num_blocks = max(1, min(config.kv_cache_bytes // per_block, useful))
        self.device = model.device
        self.pool = pool or kv_cache.KVCachePool.allocate(
            spec.num_layers, spec.num_kv_heads, spec.qk_head_dim, spec.v_head_dim,
            num_blocks, config.block_size, model.dtype, self.device,
        )
        self.scheduler = scheduler.Scheduler(
            scheduler.SchedulerConfig(
                block_size=config.block_size, max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_model_len=self.max_model_len, max_waiting=config.max_waiting,
            ),
            kv_cache.BlockAllocator(num_blocks),
        )
        self.runner = runner.ModelRunner(model, self.pool)
        self.eos_token_ids = frozenset(spec.eos_token_ids) | (
            {tokenizer.eos_token_id} if getattr(tokenizer, "eos_token_id", None) is not None else set()
        )
        # Generators live on the model's device: sampling draws there (`torch.multinomial`).
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.tracked: dict[str, _Tracked] = {}
        self.num_steps = 0
        self.num_recomputed_tokens_total = 0
        logger.info(
            "engine ready: model %s on %s, max_model_len %d, KV pool %d blocks x %d tokens (%.1f MB)",
            model_name, self.device, self.max_model_len, num_blocks, config.block_size, num_blocks * per_block / 1e6,
        )

    @classmethod
    def from_model_dir(cls, model_dir: str | pathlib.Path, config: EngineConfig | None = None,
                       model_name: str | None = None, device: torch.device = torch.device("cpu")) -> "LLMEngine":
        config = config or EngineConfig()
        model, _ = registry.load_model(model_dir, dtype=config.dtype, device=device)
        return cls(model, load_tokenizer(model_dir), config, model_name or pathlib.Path(model_dir).name)

    # -- requests ------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: types.SamplingParams,
                    arrival_s: float | None = None) -> None:
        if not prompt_token_ids:
            raise ValueError("prompt: empty, expected at least one token")
        vocab = self.model.spec.vocab_size
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt: token ids {bad[:5]} outside the vocabulary [0, {vocab})")
        req = scheduler.Request(request_id, list(prompt_token_ids), params,
                                arrival_s=time.monotonic() if arrival_s is None else arrival_s)
        self.scheduler.add(req)
        generator = (torch.Generator(device=self.device).manual_seed(params.seed) if params.seed is not None
                     else self.generator)
        self.tracked[request_id] = _Tracked(req, output.Detokenizer(self.tokenizer, params.stop), generator)

    def abort_request(self, request_id: str) -> types.RequestOutput | None:
        """Drop a request and free its blocks; -> its final update, None if unknown."""
        tracked = self.tracked.pop(request_id, None)
        if tracked is None:
            return None
        self.scheduler.abort(request_id)
        return self._update(tracked, [], "", types.FinishReason.ABORT)

    def has_work(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running)

    def stats(self) -> types.EngineStats:
        alloc = self.scheduler.allocator
        return types.EngineStats(
            num_running=self.scheduler.num_running, num_waiting=self.scheduler.num_waiting,
            kv_blocks_used=alloc.num_used, kv_blocks_total=alloc.num_blocks,
            num_preemptions_total=self.scheduler.num_preemptions_total, healthy=True,
            num_recomputed_tokens_total=self.num_recomputed_tokens_total,
        )

    # -- the step ------------------------------------------------------------------
    def step(self, always_forward: bool = False) -> list[types.RequestOutput]:
        """One step. `always_forward`: run the model even with nothing scheduled (an
        expert-parallel rank must enter every collective its peers enter)."""
        batch = self.scheduler.schedule()
        if not batch:
            if always_forward:
                self.runner.execute_empty()
            return []
        work = []
        for s in batch:
            req = s.request
            tracked = self.tracked[req.request_id]
            self.num_recomputed_tokens_total += max(0, min(req.num_computed + s.num_new_tokens, req.recompute_until)
                                                    - req.num_computed)
            work.append(runner.SeqWork(
                token_ids=req.tokens(req.num_computed, req.num_computed + s.num_new_tokens),
                start_pos=req.num_computed, block_table=req.block_ids, sample=s.samples,
                params=req.params, generator=tracked.generator,
            ))
        sampled = self.runner.execute(work)
        self.num_steps += 1
        outputs = []
        for s, token in zip(batch, sampled):
            req = s.request
            req.num_computed += s.num_new_tokens
            if token is None:
                continue
            req.output_token_ids.append(token)
            tracked = self.tracked[req.request_id]
            reason = output.finish_reason(req.output_token_ids, len(req.prompt_token_ids), req.params,
                                          self.eos_token_ids, self.max_model_len)
            delta, stop_hit = tracked.detok.update(req.output_token_ids)
            if stop_hit:
                reason = types.FinishReason.STOP
            elif reason is not None:
                delta += tracked.detok.flush()
            if reason is not None:
                self.scheduler.finish(req)
                del self.tracked[req.request_id]
            new_tokens = req.output_token_ids[tracked.num_emitted_tokens:]
            tracked.num_emitted_tokens = len(req.output_token_ids)
            outputs.append(self._update(tracked, new_tokens, delta, reason))
        return outputs

    @staticmethod
    def _update(tracked: _Tracked, new_tokens: list[int], delta: str,
                reason: types.FinishReason | None) -> types.RequestOutput:
        req = tracked.request
        return types.RequestOutput(
            request_id=req.request_id, text=delta, token_ids=new_tokens, finish_reason=reason,
            num_prompt_tokens=len(req.prompt_token_ids), num_output_tokens=len(req.output_token_ids),
        )

    # -- handing sequences to another engine (a reconfiguration) --------------------
    def export_requests(self) -> list[wire.SequenceState]:
        """Every request in flight, with where its KV lives, for `adopt_requests` on the
        engine that takes over (same KV pool: blocks stay in place). Leaves this engine
        empty, without freeing the blocks (they now belong to the adopter)."""
        out = []
        for request_id, tracked in list(self.tracked.items()):
            req = tracked.request
            p = req.params
            out.append(wire.SequenceState(
                request_id=request_id, prompt_token_ids=list(req.prompt_token_ids),
                output_token_ids=list(req.output_token_ids), num_computed=req.num_computed,
                block_ids=list(req.block_ids),
                params=wire.SamplingOptions(max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p,
                                            top_k=p.top_k, seed=p.seed, stop=list(p.stop),
                                            ignore_eos=p.ignore_eos),
                arrival_s=req.arrival_s, emitted_chars=tracked.detok.emitted,
                emitted_tokens=tracked.num_emitted_tokens,
                generator_state=(tracked.generator.get_state().tolist()
                                 if tracked.generator is not self.generator else None),
            ))
        self.tracked.clear()
        self.scheduler.waiting.clear()
        self.scheduler.running.clear()
        self.scheduler.requests.clear()
        return out

    def adopt_requests(self, states: list[wire.SequenceState], keep_kv: bool) -> None:
        """Continue requests exported by another engine. keep_kv: their blocks (`block_ids`, of
        this engine's pool) hold their KV already: kept in place, or copied there from a departing
        device; otherwise they are recomputed from prompt + outputs (`num_recomputed_tokens_total`
        counts what the previous engine had computed)."""
        for st in sorted(states, key=lambda x: x.arrival_s):
            if st.request_id in self.tracked:
                continue  # adopted already (a handover delivered twice)
            o = st.params
            params = types.SamplingParams(max_tokens=o.max_tokens, temperature=o.temperature, top_p=o.top_p,
                                          top_k=o.top_k, seed=o.seed, stop=tuple(o.stop), ignore_eos=o.ignore_eos)
            req = scheduler.Request(st.request_id, list(st.prompt_token_ids), params,
                                    arrival_s=st.arrival_s, output_token_ids=list(st.output_token_ids))
            if keep_kv and st.block_ids and self._can_take(st):
                self.scheduler.allocator.take(list(st.block_ids))
                req.block_ids = list(st.block_ids)
                req.num_computed = st.num_computed
                req.status = scheduler.Status.RUNNING
                self.scheduler.running.append(req)
            else:  # recomputed: what the previous engine had in its KV cache is computed again
                req.recompute_until = st.num_computed
                self.scheduler.waiting.append(req)
            self.scheduler.requests[req.request_id] = req
            generator = self.generator
            if st.generator_state is not None:
                generator = torch.Generator(device=self.device)
                # NOTE: a generator's state is a host byte tensor whatever its device (set_state takes only that).
                generator.set_state(torch.tensor(st.generator_state, dtype=torch.uint8))
            detok = output.Detokenizer(self.tokenizer, params.stop)
            detok.resume(req.output_token_ids, st.emitted_chars)
            self.tracked[req.request_id] = _Tracked(req, detok, generator, st.emitted_tokens)

    def _can_take(self, st: wire.SequenceState) -> bool:
        """Its blocks are free here. NOTE: never otherwise (the plan keeps them disjoint); when they are
        not, it is recomputed rather than sharing a block with another sequence, or failing."""
        if self.scheduler.allocator.are_free(st.block_ids):
            return True
        logger.error("request %s: adopted with KV blocks %s of which some are in use here; recomputing it",
                     st.request_id, st.block_ids[:8])
        return False

    def fail_all(self, error: str) -> list[types.RequestOutput]:
        """The engine cannot go on: end every request in flight with an error."""
        outs = []
        for request_id in list(self.tracked):
            out = self.abort_request(request_id)
            if out is not None:
                out.finish_reason = types.FinishReason.ERROR
                out.error = error
                outs.append(out)
        return outs
