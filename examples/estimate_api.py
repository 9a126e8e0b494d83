"""Use memplan from Python: estimate one configuration, then find the longest context that fits.

Run: python examples/estimate_api.py
"""

from __future__ import annotations

from memplan import estimate, load_gpu, load_model
from memplan.memory.breakdown import Tier
from memplan.search import largest_fitting
from memplan.units import GiB


def main() -> None:
    model = load_model("llama-3.1-8b")
    gpu = load_gpu("h100")
    est = estimate(model, gpu, job="lora", micro_batch=2, seq_len=4096, recompute="full")
    print(f"{model.name} LoRA on one {gpu.name}: {est.total(Tier.GPU) / GiB:.2f} GiB of "
          f"{est.capacity(Tier.GPU) / GiB:.2f} GiB -> {'fits' if est.fits else 'does not fit'}")
    for row in est.rows:
        if row.tier is Tier.GPU:
            print(f"  {row.component:<34} {row.bytes / GiB:8.2f} GiB  ({row.bytes:,} bytes)")
    serve = estimate(model, gpu, job="infer", micro_batch=16, infer={"context": 8192})
    kv = sum(r.bytes for r in serve.rows if r.component.startswith("kv_cache"))
    print(f"serving 16 × 8192 tokens: KV cache {kv / GiB:.2f} GiB")
    print(f"longest context for 16 sequences: {largest_fitting(serve, 'context'):,} tokens")


if __name__ == "__main__":
    main()
