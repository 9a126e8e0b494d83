"""Engine profiles: what each engine (pytorch, fsdp2, deepspeed, megatron; vllm, llamacpp, transformers)
does with a job. Layer order: catalog → arch → memory → engines → planner → report → cli."""
