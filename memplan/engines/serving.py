"""Serving engines: which module computes the rows of an inference job under each engine.

``None`` (the default) and ``transformers`` keep memplan's per-component model of an HF ``generate``
process (memory.kv_cache, memory.inference, memory.runtime); ``vllm`` and ``llamacpp`` have their own
arithmetic (``memplan.engines.vllm``, ``memplan.engines.llamacpp``).
"""

from __future__ import annotations

from memplan.config import Engine, Job, JobConfig
from memplan.errors import MemplanError
from memplan.memory.breakdown import Row, Tier, tier_total
from memplan.memory.context import Context

OWN_ROWS = (Engine.VLLM, Engine.SGLANG, Engine.LLAMACPP)


VLLM_KNOBS = frozenset({"gpu_memory_utilization", "max_num_batched_tokens", "max_num_seqs", "block_size",
                        "enforce_eager", "cudagraph_capture_sizes", "max_model_len", "non_torch_bytes",
                        "allreduce_keeps_inputs", "vllm_release"})
SGLANG_KNOBS = frozenset({"mem_fraction_static", "chunked_prefill_size", "max_running_requests", "page_size",
                          "cuda_graph_max_bs"})
LLAMACPP_KNOBS = frozenset({"n_gpu_layers", "n_ctx", "n_batch", "n_ubatch", "cache_type_k", "cache_type_v", "flash_attn",
                            "tensor_split", "ggml_sched_max_copies", "op_offload", "llama_set_rows",
                            "swa_full"})
TRANSFORMERS_KNOBS = frozenset({"cache_implementation"})
COMMON_KNOBS = frozenset({"prompt_tokens", "hbm_efficiency", "compute_efficiency"})
KNOBS = {Engine.VLLM: VLLM_KNOBS, Engine.SGLANG: SGLANG_KNOBS, Engine.LLAMACPP: LLAMACPP_KNOBS,
         Engine.TRANSFORMERS: TRANSFORMERS_KNOBS}
"""The knobs each serving engine reads (one engine each). The default engine (None) models no transformers cache
class: cache_implementation needs --engine transformers (memory.kv_cache, memory.inference read it only there)."""


def check_knobs(cfg: JobConfig) -> None:
    """No serving knob is silently ignored: each set ``serve`` field must belong to the job's engine."""
    from memplan.config import ServeConfig

    default = ServeConfig()
    given = {k for k in ServeConfig.model_fields if getattr(cfg.serve, k) != getattr(default, k)}
    if not given:
        return
    if cfg.job is not Job.INFER:
        raise MemplanError(f"serve settings ({', '.join(sorted(given))}) apply to inference jobs only (job=infer).")
    if cfg.engine is Engine.LLAMACPP and "enforce_eager" in given:
        return  # llamacpp.check says why, in its own words
    own = KNOBS.get(cfg.engine, frozenset()) if cfg.engine is not None else frozenset()
    foreign = sorted(given - own - COMMON_KNOBS)
    if foreign:
        engine = cfg.engine.value if cfg.engine else "the default engine"
        raise MemplanError(f"{', '.join(foreign)} {'is' if len(foreign) == 1 else 'are'} not a knob of {engine}; "
                           f"{_owners(foreign)}.")


def _owners(knobs: list[str]) -> str:
    """The way out of a foreign serving knob: the engine(s) that read ``knobs`` (each knob is one engine's), never
    a fixed list that would name the job's own engine."""
    owners = {e: sorted(k for k in knobs if k in KNOBS[e]) for e in KNOBS}
    owners = {e: ks for e, ks in owners.items() if ks}
    if not owners:
        return "no serving engine reads " + ("it" if len(knobs) == 1 else "them") + ": drop " + (
            "it" if len(knobs) == 1 else "them")
    if len(owners) == 1:
        (engine,) = owners
        it = "it" if len(knobs) == 1 else "them"
        return f"choose {engine.value}, the engine that reads {it}, or drop {it}"
    reads = ", ".join(f"{e.value} reads {', '.join(ks)}" for e, ks in owners.items())
    return f"choose the engine that reads them ({reads}) or drop them"


def has_own_rows(cfg: JobConfig) -> bool:
    """Whether the job is served by an engine with its own memory arithmetic."""
    return cfg.job is Job.INFER and cfg.engine in OWN_ROWS


def stage_rows(ctx: Context) -> list[Row]:
    """The rows of one pipeline stage's GPU (and the host) under the job's serving engine."""
    if ctx.cfg.engine is Engine.VLLM:
        from memplan.engines import vllm

        return vllm.rows(ctx)
    if ctx.cfg.engine is Engine.SGLANG:
        from memplan.engines import sglang

        return sglang.rows(ctx)
    from memplan.engines import llamacpp

    return llamacpp.rows(ctx)


def all_rows(ctx: Context) -> tuple[list[Row], list[str], int]:
    """Rows of the most loaded GPU over the pipeline stages, no missing components, and the stage reported."""
    from memplan.memory import components

    components.validate(ctx)
    best: tuple[list[Row], int] | None = None
    for stage in range(ctx.cfg.pp):
        rows = [r for r in stage_rows(ctx.at_stage(stage)) if r.bytes or r.tier is Tier.GPU]
        if best is None or tier_total(rows, Tier.GPU) > tier_total(best[0], Tier.GPU):
            best = (rows, stage)
    assert best is not None
    return best[0], [], best[1]


def summary(ctx: Context) -> dict[str, int]:
    """The serving engine's own capacity report (vLLM, SGLang: KV pool bytes, blocks, tokens, concurrency, longest
    context), the smallest over the pipeline stages; empty for engines that print no such figures."""
    if ctx.cfg.job is not Job.INFER or ctx.cfg.effective_engine not in (Engine.VLLM, Engine.SGLANG):
        return {}
    from memplan.engines import sglang, vllm

    engine = vllm if ctx.cfg.effective_engine is Engine.VLLM else sglang
    per_stage = [engine.summary(ctx.at_stage(stage)) for stage in range(ctx.cfg.pp)]
    return {key: min(s[key] for s in per_stage) for key in per_stage[0]}
