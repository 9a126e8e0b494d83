"""Which JobConfig fields each job reads, and the sentences that name a field set where it is not read.

Part of ``memplan.config`` (which re-exports every name); ``JobConfig``'s validators call these.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel

from memplan.config_enums import Job

if TYPE_CHECKING:  # annotations only: config_job imports this module
    from memplan.config_job import JobConfig


TRAINING_ONLY = ("optimizer", "master_weights", "grad_dtype", "zero", "offload_optimizer", "optimizer_gpu_layers",
                 "accounting", "seq_len", "grad_accum", "recompute", "recompute_layers", "recompute_map",
                 "sequence_parallel", "cp", "cp_comm", "offload_activations", "dropout", "loss_fp32",
                 "activation_accounting", "lora", "galore", "optimizer_impl", "engine_config", "kept_output",
                 "transformers_version", "module_layout", "bnb_version", "previous_seq_len", "perf")
"""JobConfig fields that describe a training step; an inference estimate reads none of them (``perf`` tunes the
training step-time model; serving plans time themselves without it)."""
NOT_READ: dict[Job, tuple[str, ...]] = {
    Job.INFER: TRAINING_ONLY,
    Job.PRETRAIN: ("lora", "galore", "infer", "serve"),
    Job.FULL: ("lora", "galore", "infer", "serve"),
    Job.LORA: ("grad_dtype", "accounting", "galore", "infer", "serve"),
    Job.QLORA: ("grad_dtype", "accounting", "galore", "infer", "serve", "optimizer_impl"),
    Job.GALORE: ("accounting", "lora", "infer", "serve"),
}
"""The declaration of which JobConfig fields each job ignores (the memory functions never read them): a
value other than the default for one of these is an error, so no flag, recipe key or API argument is
silently ignored (a LoRA job: adapters' gradients take ``lora.dtype``, not ``grad_dtype``; DeepSpeed's
accounting rows cover the full-weight states of pretrain and full jobs only). Kept in step with the memory model by
tests/test_option_coverage.py, which sets every field to another value and checks the result changes."""
QUANTIZED_BASE_JOBS = (Job.LORA, Job.QLORA, Job.INFER)
"""Jobs whose base weights stay frozen, so they may be stored quantized."""
SIXTEEN_BIT_WORDS = ("none", "bf16", "fp16", "16bit")
"""Ways to write "no weight quantization" (16-bit weights), as ``--quant none`` on the command line."""


def changed_fields(cfg: BaseModel, names: tuple[str, ...]) -> list[str]:
    """Of ``names``, those whose value differs from the field's default; a sub-config by its own changed
    fields (``lora.paged_optimizer``)."""
    out = []
    for name in names:
        value, default = getattr(cfg, name), type(cfg).model_fields[name].default
        if isinstance(value, BaseModel) and isinstance(default, BaseModel):
            out += [f"{name}.{sub}" for sub in type(value).model_fields
                    if getattr(value, sub) != getattr(default, sub)]
        elif value != default:
            out.append(name)
    return out


def not_read_error(cfg: JobConfig) -> str | None:
    """One sentence naming the fields set for a job that does not read them, or None."""
    wrong = changed_fields(cfg, NOT_READ[cfg.job])
    if cfg.job is Job.QLORA:  # the QLoRA adapter-dtype default is not the user's choice
        wrong = [w for w in wrong if w != "lora.dtype"]
    if not wrong:
        return None
    users = [j.value for j in Job if all(w.split(".")[0] not in NOT_READ[j] for w in wrong)]
    where = f"; {'it applies' if len(wrong) == 1 else 'they apply'} to {', '.join(users)} jobs" if users else ""
    article = "an" if cfg.job is Job.INFER else "a"
    return f"{', '.join(wrong)} {'does' if len(wrong) == 1 else 'do'} not apply to {article} {cfg.job.value} job{where}"


def perf_not_read(cfg: JobConfig) -> list[str]:
    """The step-time knobs set for traffic the job does not have: links and overlap on one GPU, an interleaved
    pipeline on one GPU, the inter-node fabric on one node (``planner.steptime`` never reads them there)."""
    p = cfg.perf
    single = {"cluster": p.cluster, "intra_node_gbps": p.intra_node_gbps, "intra_node_latency_us": p.intra_node_latency_us,
              "comm_overlap": p.comm_overlap, "virtual_stages": None if p.virtual_stages == 1 else p.virtual_stages}
    node = {"inter_node_gbps": p.inter_node_gbps, "inter_node_latency_us": p.inter_node_latency_us}
    out = [f"perf.{k}" for k, v in single.items() if v is not None] if cfg.world_size == 1 else []
    return out + ([f"perf.{k}" for k, v in node.items() if v is not None] if cfg.nodes == 1 else [])
