"""What every memory component reads: the model's tensors, the job, the GPU and the host."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from memplan.arch.parallel import heaviest_stage, stage_layers, stage_tensors
from memplan.arch.pp_schedules import V_SHAPE
from memplan.arch.tensors import Architecture, Layer, Tensor
from memplan.catalog.schema import GpuSpec, HostSpec
from memplan.config import JobConfig


@dataclass(frozen=True)
class Context:
    arch: Architecture
    cfg: JobConfig
    gpu: GpuSpec
    host: HostSpec
    stage_override: int | None = None
    """Report this pipeline stage instead of the one most loaded by parameters (the planner
    evaluates every stage)."""

    @cached_property
    def stage(self) -> int:
        """The reported pipeline stage: the override, else the one most loaded by parameters."""
        if self.stage_override is not None:
            return self.stage_override
        return heaviest_stage(self.arch, self.cfg.pp, self.cfg.tp, self.cfg.ep, self.balanced, self.v_shape)

    @property
    def balanced(self) -> bool:
        """Training cuts pipeline stages balanced by parameters, serving evenly (``arch.parallel``)."""
        return self.cfg.job.trains

    @property
    def v_shape(self) -> bool:
        """Whether a V-shaped pipeline schedule places the stages (``engine_config.pp_schedule`` ZBVZeroBubble or
        DualPipeV, ``arch.parallel.v_chunk_ranges``): rank 0 holds the embedding and the output layer."""
        return self.cfg.job.trains and self.cfg.pp > 1 and self.cfg.engine_config.pp_schedule in V_SHAPE

    @property
    def output_stage(self) -> int:
        """The pipeline rank holding the final norm, the output layer and the loss: the last, or 0 when V-shaped."""
        return 0 if self.v_shape else self.cfg.pp - 1

    @property
    def holds_output(self) -> bool:
        """Whether the reported rank holds the final norm, the output layer and the loss (``output_stage``)."""
        return self.stage == self.output_stage

    def at_stage(self, stage: int) -> Context:
        """The same job seen from another pipeline stage."""
        return Context(self.arch, self.cfg, self.gpu, self.host, stage_override=stage)

    @cached_property
    def tensors(self) -> list[Tensor]:
        """Parameter tensors resident on the reported stage (before tp/ep sharding)."""
        return stage_tensors(self.arch, self.cfg.pp, self.stage, self.balanced, self.v_shape)

    @cached_property
    def layers(self) -> list[tuple[int, Layer]]:
        """(index, layer) pairs of the reported stage."""
        return stage_layers(self.arch, self.cfg.pp, self.stage, self.balanced, self.v_shape)
