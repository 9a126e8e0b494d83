"""The serving capacity cases of issue 12, answered by memplan's engines, as the markdown table in
docs/serving.md (included in the README). ``--check`` exits 1 when the file is stale (tests/test_readme.py).

    python tools/serving_cases.py          # rewrite docs/serving.md
    python tools/serving_cases.py --check  # verify
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "serving.md"
GiB = 2**30

VLLM = [
    # (case, model, gpu, gpus, tp, context, batch, what the engine's own arithmetic gives)
    ("Llama-3.1-70B bf16, tp 4, 4 × H100, 8k tokens", "llama-3.1-70b", "h100-sxm-80gb", 4, 4, 8192, 1,
     "about 55–60 (0.9 × 4 × 80 GB − 141 GB weights, 2.5 MiB/token)"),
    ("Mixtral-8x22B bf16, tp 8, 8 × H200, 32k tokens", "mixtral-8x22b", "h200-sxm-141gb", 8, 8, 32768, 1,
     "about 90–100 (0.9 × 8 × 141 GB − 281 GB weights)"),
    ("Llama-3.1-8B bf16, 1 × H100, 256 sequences of 1k tokens", "llama-3.1-8b", "h100-sxm-80gb", 1, 1, 1024, 256,
     "serves it in about 50 GiB"),
]


def vllm_rows() -> list[str]:
    from memplan.estimator import estimate

    rows = []
    for case, model, gpu, gpus, tp, context, batch, ref in VLLM:
        est = estimate(model, gpu, job="infer", engine="vllm", gpus_per_node=gpus, tp=tp, micro_batch=batch,
                       infer={"context": context})
        sv = est.serving
        used = sv["budget_bytes"] - sv["kv_pool_bytes"] + batch * -(-context // sv["block_size"]) * (
            sv["kv_pool_bytes"] // max(sv["kv_pool_blocks"], 1))
        cmd = (f"`memplan estimate {model} --gpu {gpu} --gpus {gpus} --tp {tp} --job infer --engine vllm "
               f"--context {context}" + (f" --batch {batch}`" if batch > 1 else "`"))
        answer = (f"{'fits' if est.fits else 'does not fit'}, about {used / GiB:.1f} GiB per GPU"
                  if batch > 1 else f"{sv['max_concurrency']} concurrent")
        rows.append(f"| {case} | {cmd} | KV pool {sv['kv_pool_bytes'] / GiB:.2f} GiB = {sv['kv_pool_tokens']:,} "
                    f"tokens; {answer} | {ref} |")
    return rows


def llamacpp_row() -> str:
    from memplan.estimator import estimate
    from memplan.search import largest_fitting

    base = estimate("qwen2.5-32b", "rtx-4090", job="infer", engine="llamacpp", quant="q4_k_m",
                    infer={"context": 4096}, serve={"flash_attn": False})
    no_fa = largest_fitting(base, "context")
    with_fa = largest_fitting(estimate("qwen2.5-32b", "rtx-4090", base.config, serve={"flash_attn": True}), "context")
    cmd = ("`memplan estimate qwen2.5-32b --gpu rtx-4090 --job infer --engine llamacpp --quant q4_k_m "
           "--max-context`")
    return (f"| Qwen2.5-32B Q4_K_M, 1 × RTX 4090, f16 KV cache | {cmd} | longest context {with_fa:,} tokens "
            f"(flash attention, llama.cpp's default), {no_fa:,} without | about 18k |")


def llamacpp_split_row() -> str:
    """llama.cpp over two GPUs with pipeline parallelism (4 input copies): the CUDA0 compute buffer of the Command-R log
    in ggml-org/llama.cpp PR #6122 (tests/test_llamacpp_pipeline.py)."""
    from memplan.engines import llamacpp
    from memplan.estimator import estimate
    from memplan.memory.context import Context

    est = estimate("command-r", "rtx-4090", job="infer", engine="llamacpp", quant="q4_k_m", pp=2, gpus_per_node=2,
                   infer={"context": 4096},
                   serve={"flash_attn": False, "tensor_split": (12.0, 29.0), "llama_set_rows": False})
    ctx = Context(est.arch, est.config, est.gpu, est.host)
    gpu0 = next(r.bytes for r in llamacpp.rows(ctx) if r.component == "activations/llamacpp_compute")
    cmd = ("`memplan estimate command-r --gpu rtx-4090 --gpus 2 --pp 2 --job infer --engine llamacpp --quant q4_k_m "
           "--context 4096 --no-flash-attn --tensor-split 12,29 --no-llama-set-rows`")
    return (f"| Command-R, 2 GPUs (-sm layer, 12 of 41 layers on CUDA0), 4k tokens, pipeline parallelism | {cmd} | "
            f"CUDA0 compute buffer {gpu0 / 2**20:.2f} MiB (4 copies of its inputs; the log's 2024 build, "
            "before LLAMA_SET_ROWS: builds since add the KV index inputs) | 672.01 MiB (llama.cpp's log, PR #6122) |")


def breakdown_70b() -> str:
    """vLLM's subtraction for the 70B tp 4 case, per GPU, from memplan's pool (memplan.engines.vllm.pool)."""
    from memplan.engines import vllm
    from memplan.estimator import estimate
    from memplan.memory.context import Context

    context = 8192
    est = estimate("llama-3.1-70b", "h100-sxm-80gb", job="infer", engine="vllm", gpus_per_node=4, tp=4,
                   infer={"context": context})
    p = vllm.pool(Context(est.arch, est.config, est.gpu, est.host))
    per_seq = p.blocks_per_sequence(context)
    g = lambda b: f"{b / GiB:.2f}"  # noqa: E731
    return ("Why the 70B case gives fewer sequences than the issue's rough 55–60: per GPU, vLLM takes "
            f"{est.config.serve.gpu_memory_utilization:g} × {g(p.total)} GiB (the CUDA runtime's total, not 80 GB) = "
            f"{g(p.budget)} GiB, less the weights ({g(p.weights)}), non-torch memory with tp > 1 (NCCL and custom "
            f"all-reduce, {g(p.non_torch)}), the profile run's peak (the larger of a forward of "
            f"{p.max_num_batched_tokens:,} tokens and the sampler over {p.max_num_seqs:,} rows beside the kept hidden "
            f"states, plus the sampler's penalty counts, {g(p.activation_peak)}) and CUDA graphs "
            f"({g(p.cudagraphs)}): a pool of {g(p.kv_bytes)} GiB = {p.blocks:,} blocks of {p.block_size} tokens at "
            f"{p.token_bytes // 1024} KiB per token per GPU; {p.blocks:,} // {per_seq} blocks per {context:,}-token "
            f"sequence = {p.blocks // per_seq}. The rough arithmetic counts neither non-torch memory nor the profile "
            "peak.\n")


def render() -> str:
    head = ["| case | command | memplan | the engine's own arithmetic |", "|---|---|---|---|"]
    return ("# Serving capacity, as vLLM and llama.cpp compute it\n\n"
            "Generated by `python tools/serving_cases.py` (issue 12's cases; the tests in "
            "tests/test_vllm_capacity.py and tests/test_llamacpp_published.py hold the same numbers to their bands).\n\n"
            + "\n".join([*head, *vllm_rows(), llamacpp_row(), llamacpp_split_row()]) + "\n\n" + breakdown_70b())


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not OUT.is_file() or OUT.read_text(encoding="utf-8") != text:
            print("out of date: docs/serving.md; run python tools/serving_cases.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main(sys.argv[1:]))
