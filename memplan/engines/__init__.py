"""Engine profiles: what each engine (pytorch, fsdp1, fsdp2, deepspeed, megatron; vllm, llamacpp, transformers)
does with a job. Layer order: catalog → arch → memory → engines → planner → report → cli.

Training engines: ``profiles`` (data: layouts, buffers, knobs, sources; ``default_engine``) and ``rules``
(which combinations run)."""

from memplan.engines.profiles import default_engine, default_reason

__all__ = ["default_engine", "default_reason"]
