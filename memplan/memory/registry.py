"""The component registry: each memory component declared once, with the phases in which it is alive.

The breakdown, ``explain``, the phase peaks and the ILP all read this table. A component name is
matched by its longest registered prefix (``optimizer/adam_m`` falls back to ``optimizer``), so a
new row inherits its family's phases until it is declared on its own.

The training phases follow the measured shape of a PyTorch step (shared/design/engines-and-phases.md):
peak = P + O + max(A + logits/loss transients, G + optimizer temporaries).
"""

from __future__ import annotations

from dataclasses import dataclass

from memplan.memory.breakdown import INFER_PHASES, TRAIN_PHASES, Phase, Row

ALL = frozenset(TRAIN_PHASES) | frozenset(INFER_PHASES)


@dataclass(frozen=True)
class Component:
    """One declared component: its slash name (or family prefix), the phases it is alive in, its source."""

    name: str
    phases: frozenset[Phase]
    source: str = ""


REGISTRY: dict[str, Component] = {}


def register(name: str, phases: frozenset[Phase] | tuple[Phase, ...], source: str = "") -> Component:
    """Declare a component (or a family prefix) once; declaring a name twice is a programming error."""
    if name in REGISTRY:
        raise ValueError(f"component {name!r} is declared twice")
    comp = Component(name, frozenset(phases), source)
    REGISTRY[name] = comp
    return comp


def lookup(name: str) -> Component:
    """The declaration of ``name``: the longest registered slash prefix of it."""
    parts = name.split("/")
    for n in range(len(parts), 0, -1):
        comp = REGISTRY.get("/".join(parts[:n]))
        if comp is not None:
            return comp
    raise KeyError(f"component {name!r} is not registered")


def with_phases(row: Row) -> Row:
    """``row`` with its phases from the registry, unless the row already names its own."""
    if row.phases is not None:
        return row
    from dataclasses import replace

    return replace(row, phases=lookup(row.component).phases)


# Families: a row that is not declared on its own is alive wherever its family is.
register("weights", ALL, "parameters live through the whole step")
register("gradients", (Phase.BACKWARD, Phase.OPTIMIZER), "gradients exist from backward until the optimizer step")
register("optimizer", TRAIN_PHASES, "optimizer states persist across steps")
register("activations", (Phase.FORWARD, Phase.BACKWARD_START, Phase.BACKWARD, Phase.PREFILL),
         "saved for backward during forward, freed during backward; the prefill forward when serving")
register("kv_cache", (Phase.PREFILL, Phase.DECODE), "allocated at the first forward, held while decoding")
register("runtime", ALL, "process-wide: CUDA context, allocator reserve, margins")
register("runtime/vllm_non_torch", ALL, "vLLM: CUDA context, cuBLAS, NCCL and custom all-reduce buffers")
register("activations/vllm_profile_peak", (Phase.PREFILL, Phase.DECODE),
         "vLLM: the profile run's torch peak, reserved out of the budget for every scheduler step")
register("runtime/vllm_cudagraphs", (Phase.PREFILL, Phase.DECODE), "vLLM: CUDA graph memory pool after capture")
register("runtime/vllm_unbudgeted", ALL, "vLLM: memory outside gpu_memory_utilization × total")
register("activations/llamacpp_compute", (Phase.PREFILL, Phase.DECODE),
         "llama.cpp: compute buffer reserved at context creation for the worst-case ubatch graph")
register("activations/llamacpp_output", (Phase.PREFILL, Phase.DECODE), "llama.cpp: host logits buffer")
register("kv_cache/dynamic_growth", (Phase.DECODE,), "transformers DynamicCache: one layer's old K/V during torch.cat")
