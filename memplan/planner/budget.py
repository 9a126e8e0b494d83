"""Step time of one fixed training configuration, term by term, and what a token budget costs.

``step_time`` is the planner's own model (``train_plan.step_seconds``: the same terms the ILP adds up),
for a configuration the user fixes, as ``estimate`` fixes it: the global batch is micro-batch ×
gradient accumulation × data-parallel degree.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from memplan.arch.build import build_architecture
from memplan.catalog.schema import GpuSpec, HostSpec, ModelSpec
from memplan.config import JobConfig, Offload
from memplan.planner import steptime, train, train_offload

SECONDS_PER_HOUR = 3600.0


@dataclass(frozen=True)
class StepTime:
    """Seconds per step by term (floats), the global batch, and throughput."""

    pipeline_s: float
    """Compute of the slowest stage through the pipeline, with tensor-parallel, expert and p2p traffic."""
    data_parallel_s: float
    """Data-parallel/ZeRO communication not hidden behind compute."""
    expert_s: float
    """Expert-parallel all-to-alls not hidden behind compute, through the pipeline."""
    recompute_s: float
    offload_s: float
    global_batch: int
    tokens_per_step: int
    gpus: int
    model_flops_per_step: float
    peak_flops: float

    @property
    def step_s(self) -> float:
        return self.pipeline_s + self.data_parallel_s + self.expert_s + self.recompute_s + self.offload_s

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_s

    @property
    def mfu(self) -> float:
        """Model FLOPs (no recomputation) per second over the GPUs' dense peak (PaLM's MFU, Chowdhery et al.
        2022, App. B)."""
        return self.model_flops_per_step / self.step_s / (self.gpus * self.peak_flops)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "step_s": self.step_s, "tokens_per_s": self.tokens_per_s, "mfu": self.mfu}


def model_flops(arch: Any, cfg: JobConfig, global_batch: int) -> float:
    """FLOPs of one step without recomputation: (forward of every layer + output layer) × passes."""
    tokens = global_batch * cfg.seq_len
    fwd = sum(steptime.layer_forward_flops(arch, layer, cfg.seq_len, tokens) for layer in arch.layers)
    fwd += steptime.head_forward_flops(arch, tokens)
    if not arch.layers:  # a model known only by its parameter count
        fwd = 2.0 * arch.active_params * tokens
    return fwd * steptime._passes(cfg)


def step_time(model: ModelSpec, gpu: GpuSpec, cfg: JobConfig, host: HostSpec | None = None) -> StepTime:
    """The step time of ``cfg`` on ``gpu``, term by term (the planner's model; see ``steptime``)."""
    from memplan.memory import components

    arch = build_architecture(model)
    gb = steptime.global_batch_of(cfg)
    setting = train.TrainSetting(arch=arch, gpu=gpu, host=host or HostSpec(), base=cfg, global_batch=gb)
    per_stage = [components.state_rows(c) for c in train._contexts(setting, cfg)]
    modes = steptime.layer_recompute_modes(cfg, len(arch.layers))
    recompute = sum(steptime.recompute_seconds(arch, gpu, cfg, gb, layer, m)
                    for layer, m in zip(arch.layers, modes, strict=True))
    offload = train.offload_seconds(setting, cfg, per_stage)
    if cfg.offload_params is not Offload.NONE:  # ZeRO-Infinity parameter fetches (the planner's comm factor)
        offload += train_offload.param_fetch_seconds(setting, cfg)
    return StepTime(pipeline_s=steptime.shape_seconds(arch, gpu, cfg, gb),
                    data_parallel_s=steptime.dp_comm_seconds(arch, gpu, cfg, gb),
                    expert_s=steptime.ep_seconds(arch, gpu, cfg, gb), recompute_s=recompute,
                    offload_s=offload, global_batch=gb,
                    tokens_per_step=gb * cfg.seq_len, gpus=cfg.world_size,
                    model_flops_per_step=model_flops(arch, cfg, gb), peak_flops=steptime.peak_flops(gpu, cfg))


def train_budget(*, tokens_per_s: float, gpus: int, train_tokens: int) -> dict[str, float]:
    """Wall-clock seconds, days and GPU-hours to train ``train_tokens`` tokens at ``tokens_per_s``.

    Formula: T = tokens / throughput; GPU-hours = T · GPUs / 3600 (DeepSeek-V3 reports its budget this way:
    2.788M H800 GPU-hours, DeepSeek-AI 2024, Table 1)."""
    seconds = train_tokens / tokens_per_s
    return {"train_tokens": float(train_tokens), "seconds": seconds, "days": seconds / 86400.0,
            "gpu_hours": seconds * gpus / SECONDS_PER_HOUR}
