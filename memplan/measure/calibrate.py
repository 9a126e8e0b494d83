"""``memplan calibrate``: measure the runtime overheads no formula gives, on this CUDA GPU, and keep them.

What is measured (CUDA only; run on an otherwise idle GPU, one process):
- ``driver_overhead_bytes``: what the driver holds for this process beyond the caching allocator's
  segments once the kernels of a training step are loaded: ``mem_get_info`` total − free −
  ``memory_reserved`` after a warm training step (the CUDA context, lazily loaded kernel images,
  cuBLAS/cuDNN handles);
- ``cublas_workspace_bytes``: the bytes a first matmul leaves allocated (PyTorch allocates the cuBLAS
  workspace through its caching allocator and keeps it);
- ``allocator_reserve_pct``: (``max_memory_reserved`` − ``max_memory_allocated``) / allocated × 100
  over a training step of a Llama-style model (``CALIBRATION_MODEL``).
``cuda_context_bytes`` = driver overhead + cuBLAS workspace: memplan's ``runtime/cuda_context`` row.

The profile is JSON in ``$XDG_CONFIG_HOME/memplan/profiles/<gpu>.json`` (``~/.config`` when the
variable is unset), one per catalog GPU name. ``load_profile`` reads it without importing torch, so
``memplan.memory.runtime`` can use it for the runtime rows.
"""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from memplan.catalog.profiles import profile_path
from memplan.errors import MemplanError

"""Keys every profile holds: what the runtime rows use."""
CALIBRATION_MODEL = {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 4,
                     "num_attention_heads": 16, "num_key_value_heads": 4, "vocab_size": 32000,
                     "max_position_embeddings": 4096}
"""A 4-layer slice of a TinyLlama-1.1B-shaped model: large tensors, as in a real step, in seconds."""
CALIBRATION_JOB = {"job": "full", "dtype": "bf16", "micro_batch": 4, "seq_len": 1024, "attention": "sdpa"}
MATMUL_SIDE = 1024


def save_profile(gpu_name: str, profile: dict[str, Any]) -> Path:
    path = profile_path(gpu_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def _driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True)
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown (nvidia-smi not available)"


def gpu_identity() -> dict[str, Any]:
    """Name, driver, CUDA runtime, compute capability and total memory of CUDA device 0."""
    import torch

    props = torch.cuda.get_device_properties(0)
    return {"device_name": props.name, "driver": _driver_version(), "cuda": torch.version.cuda,
            "compute_capability": f"{props.major}.{props.minor}", "total_memory_bytes": props.total_memory}


def catalog_name_for(device_name: str) -> str:
    """The catalog GPU whose source quotes ``device_name`` as nvidia-smi prints it; else a MemplanError."""
    from memplan.catalog.store import all_gpus

    found = [g.name for g in all_gpus() if f"'{device_name}'" in g.source]
    if len(found) != 1:
        raise MemplanError(f"cannot tell which catalog GPU {device_name!r} is; pass --gpu NAME (see 'memplan gpus').")
    return found[0]


def _used(torch: Any) -> int:
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return int(total - free)


def _cublas_workspace(torch: Any) -> int:
    """Bytes a first matmul leaves allocated (the cuBLAS workspace), its inputs and output freed."""
    a = torch.randn(MATMUL_SIDE, MATMUL_SIDE, device="cuda", dtype=torch.bfloat16)
    before = torch.cuda.memory_allocated()
    c = a @ a
    del c
    torch.cuda.synchronize()
    return int(torch.cuda.memory_allocated() - before)


def calibrate(gpu_name: str | None = None) -> dict[str, Any]:
    """Measure this GPU's runtime overheads; returns the profile (``save_profile`` writes it)."""
    import torch

    from memplan.catalog.store import catalog_gpu
    from memplan.estimator import make_config
    from memplan.measure.job import measure_job
    from memplan.measure.tiny import spec_from_config

    if not torch.cuda.is_available():
        raise MemplanError("calibrate needs a CUDA GPU; torch sees none.")
    identity = gpu_identity()
    name = gpu_name or catalog_name_for(identity["device_name"])
    workspace = _cublas_workspace(torch)
    spec = spec_from_config(CALIBRATION_MODEL, name="calibration-llama")
    report = measure_job(spec, make_config(None, **CALIBRATION_JOB), catalog_gpu(name), device="cuda")
    allocated = max(report.phases_measured.values())
    reserved = next(int(line.measured or 0) for line in report.lines if line.component == "peak/reserved")
    overhead = _used(torch) - int(torch.cuda.memory_reserved())
    pct = round(100.0 * max(0, reserved - allocated) / allocated, 2) if allocated else 0.0
    return {"gpu": name, **identity, "torch": torch.__version__, "cuda_context_bytes": overhead + workspace,
            "driver_overhead_bytes": overhead, "cublas_workspace_bytes": workspace,
            "allocator_reserve_pct": pct, "calibration_peak_allocated_bytes": allocated,
            "calibration_peak_reserved_bytes": reserved, "calibration_job": {**CALIBRATION_JOB, **CALIBRATION_MODEL},
            "measured_at": datetime.now(UTC).isoformat(timespec="seconds")}
