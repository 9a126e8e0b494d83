"""Serving latency and throughput: time to first token (TTFT), time per output token (TPOT), tokens/s.

Decode is one forward of B tokens (one per sequence); each GPU reads its weights (only the routed experts
the step's tokens touch) and the K/V of every cached token, and does 2 FLOPs per active parameter per token
plus attention's 4·S·N·H per token and layer. The step takes the longer of the two at effective rates
(roofline; Pope et al. 2022, "Efficiently Scaling Transformer Inference", Sec. 2; Williams et al. 2009):

    t_decode = max(bytes_read / (η_mem · HBM bandwidth), flops / (η_flop · peak FLOP/s))

Prefill of a P-token prompt is compute bound: 2·P·N_active + 2·P²·N·H·L FLOPs (causal attention, half of
4·P²·N·H per layer), so TTFT = prefill FLOPs / (η_flop · peak). Pipeline stages run one after another for a
token (× pp); data-parallel replicas serve side by side (× replicas in tokens/s). Communication is not modelled.
"""

from __future__ import annotations

from dataclasses import dataclass

from memplan.arch.parallel import stage_layers
from memplan.catalog.schema import GpuSpec
from memplan.config import JobConfig
from memplan.memory import weights
from memplan.memory.breakdown import Tier, tier_total
from memplan.memory.context import Context
from memplan.memory.kv_cache import cached_shapes, elements_per_token, sized_kv_dtype
from memplan.units import bits_to_bytes

GENERATION_BY_NAME = (("h100", "hopper"), ("h200", "hopper"), ("gh200", "hopper"), ("b200", "blackwell"),
                      ("rtx-5090", "blackwell"), ("a100", "ampere"), ("a10g", "ampere"), ("a40", "ampere"),
                      ("rtx-3090", "ampere"), ("rtx-a6000", "ampere"), ("l40", "ada"), ("l4", "ada"),
                      ("rtx-40", "ada"), ("mi300", "cdna3"), ("mi250", "cdna2"), ("v100", "volta"), ("t4", "turing"))
"""Catalog name prefix -> GPU generation (first match wins, so ``l40`` precedes ``l4``)."""
HBM_EFFICIENCY = {"hopper": 0.80, "blackwell": 0.80, "ampere": 0.80, "ada": 0.85, "cdna3": 0.65, "cdna2": 0.65,
                  "volta": 0.75, "turing": 0.75}
"""Default share of peak memory bandwidth a decode step reaches, by generation. An assumption, not a
measurement: memory-bound GEMV/attention kernels typically sustain 70-90% of the datasheet bandwidth on
NVIDIA parts and less on AMD CDNA with today's kernels. Override: ``ServeConfig.hbm_efficiency``."""
COMPUTE_EFFICIENCY = {"hopper": 0.50, "blackwell": 0.45, "ampere": 0.55, "ada": 0.55, "cdna3": 0.35, "cdna2": 0.35,
                      "volta": 0.45, "turing": 0.45}
"""Default share of peak dense bf16 FLOP/s a prefill reaches, by generation (an assumption, as above;
newer parts reach a smaller share of a larger peak). Override: ``ServeConfig.compute_efficiency``."""
DEFAULT_GENERATION = "ampere"
FLOPS_PER_MAC = 2


def generation(gpu: GpuSpec) -> str:
    """The GPU's generation from its catalog name (``DEFAULT_GENERATION`` when unknown)."""
    name = gpu.name.lower()
    return next((gen for prefix, gen in GENERATION_BY_NAME if name.startswith(prefix)), DEFAULT_GENERATION)


def efficiencies(gpu: GpuSpec, cfg: JobConfig) -> tuple[float, float]:
    """(memory, compute) efficiency: the config's overrides, else the generation's defaults."""
    gen = generation(gpu)
    return (cfg.serve.hbm_efficiency or HBM_EFFICIENCY[gen], cfg.serve.compute_efficiency or COMPUTE_EFFICIENCY[gen])


def expert_read_fraction(*, experts: int, top_k: int, tokens: int) -> float:
    """Expected share of a layer's routed experts a step of ``tokens`` tokens touches: 1 − (1 − k/E)^B.

    Assumption: uniform, independent routing (each token picks k of E experts)."""
    if not experts:
        return 1.0
    return 1.0 - (1.0 - min(top_k, experts) / experts) ** tokens


def roofline_seconds(*, bytes_read: float, flops: float, bytes_per_s: float, flops_per_s: float) -> float:
    """max(bytes / bandwidth, flops / peak), both already scaled by their efficiencies (seconds)."""
    return max(bytes_read / bytes_per_s, flops / flops_per_s)


@dataclass(frozen=True)
class ServeCost:
    """Latency and throughput of one serving configuration."""

    ttft_s: float
    tpot_s: float
    tokens_per_s_replica: float
    replicas: int

    @property
    def tokens_per_s(self) -> float:
        """Aggregate decode throughput over the data-parallel replicas."""
        return self.tokens_per_s_replica * self.replicas


def _stage_terms(ctx: Context, batch: int, context: int) -> tuple[float, float, float]:
    """(decode bytes read, decode FLOPs, prefill FLOPs per prompt token-pair term) of one GPU of the stage."""
    arch, cfg, spec = ctx.arch, ctx.cfg, ctx.arch.spec
    layers = stage_layers(arch, cfg.pp, ctx.stage)
    w_bytes = tier_total(weights.rows(ctx), Tier.GPU)
    stage_params = sum(layer.params for _, layer in layers) or arch.params
    routed = sum(t.numel for _, layer in layers for t in layer.tensors if t.routed)
    # expert parallelism: this GPU's experts serve the tokens of all ep replicas of the group (all-to-all)
    frac = expert_read_fraction(experts=spec.num_experts or 0, top_k=spec.num_experts_per_tok or 0,
                                tokens=batch * cfg.ep)
    read = w_bytes * (1 - routed / max(stage_params, 1) * (1 - frac))
    shapes = cached_shapes(spec, mla_cache=cfg.infer.mla_cache, tp=cfg.tp)
    kv_token = bits_to_bytes(len(layers) * elements_per_token(shapes), sized_kv_dtype(cfg).bits)
    read += batch * context * kv_token
    head = sum(t.numel for t in arch.post) if ctx.stage == cfg.pp - 1 else 0  # lm_head runs for every decoded token
    active = (sum(layer.active_params for _, layer in layers) + head) / cfg.tp
    attn_width = (spec.num_attention_heads or 0) * spec.dim_per_head / cfg.tp * len(layers)
    flops = FLOPS_PER_MAC * active * batch + 2 * FLOPS_PER_MAC * batch * context * attn_width
    return read, flops, attn_width


def serve_cost(ctx: Context) -> ServeCost:
    """TTFT, TPOT and tokens/s of ``micro_batch`` sequences of ``infer.context`` tokens per replica."""
    cfg, gpu = ctx.cfg, ctx.gpu
    eta_mem, eta_flop = efficiencies(gpu, cfg)
    bw, peak = gpu.hbm_bandwidth_gbps * 1e9 * eta_mem, gpu.bf16_dense_tflops * 1e12 * eta_flop
    batch, context = cfg.micro_batch, cfg.infer.context
    read, flops, attn_width = _stage_terms(ctx, batch, context)
    tpot = cfg.pp * roofline_seconds(bytes_read=read, flops=flops, bytes_per_s=bw, flops_per_s=peak)
    prompt = cfg.serve.prompt_tokens or context  # lm_head runs for the last prompt token only: not counted
    active = sum(layer.active_params for _, layer in stage_layers(ctx.arch, cfg.pp, ctx.stage)) / cfg.tp
    prefill = FLOPS_PER_MAC * active * prompt + FLOPS_PER_MAC * prompt * prompt * attn_width
    ttft = cfg.pp * prefill / peak
    replicas = max(1, cfg.world_size // (cfg.tp * cfg.pp))
    return ServeCost(ttft_s=ttft, tpot_s=tpot, tokens_per_s_replica=batch / tpot, replicas=replicas)
