"""memplan's prediction next to a measurement, per component: bytes, error in bytes and in %.

Errors are ``predicted − measured`` (positive: memplan predicts more), in % of the measured bytes.
Bounds (the issue's acceptance targets): weights, gradients, master copies, optimizer states and
the KV cache exact; activations saved for backward within 3%; the peak of a training step within
10% on CPU and 5% on CUDA (``max_memory_allocated``). Lines without a bound are shown for reading.

The peak of a step. memplan's estimate sums its rows: gradients and activations together, as a
capacity figure. A PyTorch step with ``zero_grad(set_to_none=True)`` never holds both: the
gradients appear during backward while the saved activations are freed. ``step_phases`` models
the step as three moments and the peak as the largest (see its docstring); the sum of rows is
shown too, with its error, so the difference between the two stays visible.
"""

from __future__ import annotations

from dataclasses import dataclass

from memplan.arch.tensors import Architecture
from memplan.config import Job, JobConfig, OptimizerKind
from memplan.memory import activations as act
from memplan.memory import activations_block as blk
from memplan.memory.breakdown import Tier, components
from memplan.memory.context import Context
from memplan.units import bits_to_bytes

EXACT = "exact"
SAVED_BOUND_PCT = 3.0
CPU_PEAK_BOUND_PCT = 10.0
CUDA_PEAK_BOUND_PCT = 5.0
TOP_EXACT = ("weights", "gradients", "optimizer", "kv_cache")
RUNTIME_ROWS = ("runtime/cuda_context", "runtime/allocator_reserve")
"""Rows that are not tensors of the job: the CUDA context and the caching allocator's reserve (CUDA only)."""
CPU_ADAM_TEMPORARIES = 2
"""CPU AdamW (``torch.optim.adam._single_tensor_adam``, PyTorch's path for CPU tensors): ``denom =
(exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)`` holds two state-sized temporaries of one tensor."""
CUDA_ADAM_TEMPORARIES = 1
"""CUDA AdamW (``_multi_tensor_adam``, the foreach default on CUDA): ``torch._foreach_sqrt(exp_avg_sqs)``
copies every second-moment state of the group at once; the later ``_foreach_*_`` calls work in place."""


@dataclass(frozen=True)
class Line:
    """One compared component. ``bound``: "exact", a percentage such as "3%", or "" (not bounded)."""

    component: str
    predicted: int | None
    measured: int | None
    bound: str = ""
    note: str = ""

    @property
    def error_bytes(self) -> int | None:
        if self.predicted is None or self.measured is None:
            return None
        return self.predicted - self.measured

    @property
    def error_pct(self) -> float | None:
        error = self.error_bytes
        if error is None or not self.measured:
            return None
        return 100.0 * error / self.measured

    @property
    def ok(self) -> bool | None:
        """True/False against the bound; None when unbounded."""
        if not self.bound:
            return None
        if self.error_bytes is None:
            return False
        if self.bound == EXACT:
            return self.error_bytes == 0
        pct = self.error_pct
        return pct is not None and abs(pct) <= float(self.bound.rstrip("%"))

    def as_dict(self) -> dict[str, object]:
        return {"component": self.component, "predicted_bytes": self.predicted, "measured_bytes": self.measured,
                "error_bytes": self.error_bytes, "error_pct": self.error_pct, "bound": self.bound, "ok": self.ok,
                "note": self.note}


def counting_for_device(cfg: JobConfig, device: str) -> blk.Counting:
    """The saved-tensor widths of the kernels that run: PyTorch CPU kernels on CPU, CUDA's otherwise."""
    return blk.cpu_counting(blk.activation_bits(cfg)) if device == "cpu" else act.counting_for(cfg)


def predicted_components(ctx: Context, device: str) -> tuple[dict[str, int], dict[str, int]]:
    """(model components, runtime components) of memplan's GPU rows; training activations counted
    with the device's kernels (``counting_for_device``)."""
    from memplan.memory import components as comp

    comp.validate(ctx)
    rows, _ = comp.stage_rows(ctx)
    gpu = components(rows, Tier.GPU)
    runtime = {k: v for k, v in gpu.items() if k in RUNTIME_ROWS}
    out = {k: v for k, v in gpu.items() if k not in RUNTIME_ROWS}
    if ctx.cfg.job.trains:
        out = {k: v for k, v in out.items() if not k.startswith("activations")}
        out.update(act.breakdown(ctx, counting_for_device(ctx.cfg, device)))
    return out, runtime


def largest_update_numel(arch: Architecture) -> int:
    """Elements of the largest parameter tensor the optimizer updates in one piece.

    transformers >= 5 stores each MoE layer's routed experts as fused 3-D parameters (``gate_up_proj``
    of E·2F·D, ``down_proj`` of E·D·F), so the routed tensors of a layer count together by kind.
    """
    largest = 0
    for tensors in [arch.pre, arch.post, *[layer.tensors for layer in arch.layers]]:
        fused = {"gate_up": 0, "down": 0}
        for t in tensors:
            if t.routed:
                fused["down" if "down" in t.projections else "gate_up"] += t.numel
            else:
                largest = max(largest, t.numel)
        largest = max(largest, *fused.values())
    return largest


def optimizer_temp_bytes(*, kind: OptimizerKind, device: str, state_bits: int, largest_numel: int,
                         second_moment_bytes: int) -> int:
    """Transient bytes of the optimizer step beyond the states.

    Formula: AdamW on CPU: 2 · largest tensor · state bits/8; AdamW on CUDA: the second-moment
    states once more (``CUDA_ADAM_TEMPORARIES`` × v); SGD, with or without momentum: 0 (in place).
    Source: PyTorch ``torch/optim/adam.py`` (``_single_tensor_adam``, ``_multi_tensor_adam``), ``sgd.py``.
    Assumes: default ``foreach`` selection (foreach on CUDA, per tensor on CPU), not fused, no amsgrad.
    """
    if kind not in (OptimizerKind.ADAMW, OptimizerKind.ADAMW_BF16):
        return 0
    if device == "cpu":
        return CPU_ADAM_TEMPORARIES * bits_to_bytes(largest_numel, state_bits)
    return CUDA_ADAM_TEMPORARIES * second_moment_bytes


def step_phases(predicted: dict[str, int], *, step_temp: int) -> dict[str, int]:
    """Predicted bytes allocated at three moments of a training step; the step's peak is the largest.

    - activations: end of the forward pass through the loss's backward: weights, master copies and
      optimizer states (P), every saved activation (A) and the logits transient (the larger of the
      loss's forward and backward copies); no gradients yet (set to None);
    - gradients: end of backward: P, the 16-bit (or adapter) gradients G and one checkpointed block's
      recompute workspace; the saved activations are freed;
    - optimizer step: P, G, the fp32 gradients of a mixed-precision step and the step's temporaries.
    Formula: max(P + A + logits, P + G + workspace, P + G + G32 + temp).
    Source: PyTorch autograd frees saved tensors as backward consumes them; ``Optimizer.zero_grad``
    sets gradients to None (default since PyTorch 2.0); see ``optimizer_temp_bytes``.
    """
    persistent = sum(v for k, v in predicted.items() if k.split("/")[0] in ("weights", "optimizer"))
    grads32 = predicted.get("gradients/fp32_partition", 0)
    grads = sum(v for k, v in predicted.items() if k.split("/")[0] == "gradients") - grads32
    saved = sum(v for k, v in predicted.items() if k in act.SAVED_ROWS)
    return {
        "activations (forward + loss)": persistent + saved + predicted.get("activations/logits", 0)
        + predicted.get("runtime/dora_workspace", 0),
        "gradients (end of backward)": persistent + grads + predicted.get("activations/recompute_workspace", 0),
        "optimizer step": persistent + grads + grads32 + step_temp,
    }


def state_lines(predicted: dict[str, int], measured: dict[str, int]) -> list[Line]:
    """Exact lines for every weights/gradients/optimizer/kv_cache component either side has."""
    names = [k for k in predicted if k.split("/")[0] in TOP_EXACT]
    names += [k for k in measured if k not in predicted]
    return [Line(name, predicted.get(name), measured.get(name), EXACT) for name in names]


def _method(device: str) -> str:
    return "profiler memory events + resident tensors" if device == "cpu" else "torch.cuda.max_memory_allocated"


def peak_lines(predicted_peak: int, phase: str, measured: int, measured_phase: str, *, device: str,
               rows_sum: int) -> list[Line]:
    """Training: the modelled peak (bounded) and the sum of memplan's rows (shown, not bounded)."""
    bound = f"{CPU_PEAK_BOUND_PCT if device == 'cpu' else CUDA_PEAK_BOUND_PCT:g}%"
    return [Line("peak/step (phase model)", predicted_peak, measured, bound,
                 f"predicted at {phase}; measured in {measured_phase} ({_method(device)})"),
            Line("peak/step (rows summed)", rows_sum, measured, "",
                 "memplan's estimate: every row added, gradients and activations together; no optimizer temporaries")]


def inference_peak_line(rows_sum: int, measured: int, measured_phase: str, *, device: str) -> Line:
    """Inference: memplan's rows summed (weights, KV cache, workspace) against the measured peak; not bounded."""
    return Line("peak/inference (rows summed)", rows_sum, measured, "",
                f"measured in {measured_phase} ({_method(device)}); workspace rows model CUDA kernels")


def cuda_lines(predicted: dict[str, int], runtime: dict[str, int], allocated_peak: int, reserved: int | None,
               driver_used: int | None) -> list[Line]:
    """CUDA only: reserved vs allocated + allocator reserve; the driver's view vs the whole GPU total."""
    reserve = runtime.get("runtime/allocator_reserve", 0)
    total = sum(predicted.values()) + sum(runtime.values())
    return [Line("peak/reserved", allocated_peak + reserve, reserved, "",
                 "predicted: the modelled peak + runtime/allocator_reserve; measured: max_memory_reserved"),
            Line("runtime/driver_used", total, driver_used, "",
                 "predicted: every GPU row (rows summed); measured: total − free from mem_get_info after the step")]


def saved_line(predicted: dict[str, int], measured_total: int, device: str) -> Line:
    counted = "PyTorch CPU kernels (activations_block.cpu_counting)" if device == "cpu" else "CUDA kernels"
    value = sum(v for k, v in predicted.items() if k in act.SAVED_ROWS)
    return Line("activations/saved", value, measured_total, f"{SAVED_BOUND_PCT:g}%",
                f"saved_tensors_hooks, deduplicated by storage; predicted with {counted}")


def transient_lines(predicted: dict[str, int], names: tuple[str, ...]) -> list[Line]:
    """Predicted-only lines for transients that show up in the peak, not as a component."""
    return [Line(name, predicted[name], None, "", "transient: part of the peak, not measured alone")
            for name in names if predicted.get(name)]


def trains_adapters(cfg: JobConfig) -> bool:
    return cfg.job is Job.LORA
