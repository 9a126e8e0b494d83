"""Measure the bytes a real forward pass keeps for backward (the activations of training).

Method. The forward pass runs inside ``torch.autograd.graph.saved_tensors_hooks``: every
tensor that autograd saves for the backward pass (an op's input or output that its
derivative formula needs, or a custom Function's ``ctx.save_for_backward``) goes through
the pack hook. The hook returns the tensor unchanged and records its *storage*:
``untyped_storage().data_ptr()`` identifies it and ``untyped_storage().nbytes()`` is
counted once, however many ops save it or views of it (a linear layer's input saved by
q, k and v projections counts once; a view keeps its whole storage alive, so the whole
storage counts).

Parameters and buffers are excluded: ``x @ W.T`` saves ``W`` (through a view of the
parameter's storage), but those bytes are weights, resident whether or not a backward pass
follows, and memplan counts them under ``weights``. They are detected by comparing each
saved storage with the storages of ``model.parameters()`` and ``model.buffers()``, and
reported separately as ``excluded_weight_bytes``.

Attribution. Forward pre-hooks and forward hooks on every submodule keep a stack of module
names; a storage is attributed to the innermost module running when it is first saved.

What this counts, and what it does not:
- it counts what is held between the end of the forward pass and the backward pass (the
  saved tensors), which is what activation-memory formulas (Korthikanti et al. 2022,
  Sec. 4) describe;
- it does not count transients that are freed before the forward pass ends (the 16-bit
  logits and their fp32 copy inside the loss, attention scores of a fused kernel), nor
  what the caller holds itself (the model output object);
- with activation checkpointing, PyTorch's ``torch.utils.checkpoint`` saves the checkpointed
  function's positional tensor inputs with ``ctx.save_for_backward`` (``_NoopSaveInputs`` when
  ``use_reentrant=False``, the ``CheckpointFunction`` when ``use_reentrant=True``); those go
  through the outer hook and are counted, while the tensors saved inside the checkpointed
  region are packed by checkpoint's own inner hook (non-reentrant) or not saved at all
  (reentrant forward runs under ``no_grad``) and are not counted. Tensors that Hugging Face
  binds as keyword arguments of the checkpointed layer (``partial(forward, **kwargs)``:
  rotary cos/sin, the attention mask) are held by that closure until backward although no
  autograd hook sees them; a forward pre-hook on each checkpointed layer (a transformers
  ``GradientCheckpointingLayer`` with ``gradient_checkpointing`` set) records them, once per
  storage like every other tensor.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

ROOT = "(model)"
"""Name used for tensors saved outside any submodule (e.g. the loss computed in the top-level forward)."""


def _weight_storages(model: Any) -> set[int]:
    """Storage pointers of the model's parameters and buffers (excluded from activations)."""
    ptrs = set()
    for tensor in list(model.parameters()) + list(model.buffers()):
        ptrs.add(tensor.untyped_storage().data_ptr())
    return ptrs


def _register_tags(model: Any, stack: list[str]) -> list[Any]:
    """Forward (pre-)hooks that push/pop each submodule's qualified name on ``stack``."""

    def push(name: str) -> Any:
        def hook(_module: Any, _args: Any) -> None:
            stack.append(name)

        return hook

    def pop(_module: Any, _args: Any, _output: Any) -> None:  # returning None keeps the output
        stack.pop()

    handles = []
    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_pre_hook(push(name)))
            handles.append(module.register_forward_hook(pop))
    return handles


def _register_checkpoint_kwargs(model: Any, record: Any) -> list[Any]:
    """Pre-hooks on checkpointed HF layers that record their keyword-argument tensors.

    transformers binds them into ``partial(forward, **kwargs)``, which the checkpoint keeps
    until backward: they are held, though no autograd hook sees them.
    """

    def hook(module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        if getattr(module, "gradient_checkpointing", False) and module.training:
            for value in kwargs.values():
                for item in value if isinstance(value, tuple | list) else (value,):
                    record(item)

    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # pragma: no cover - no transformers, no HF checkpointed layers
        return []
    return [m.register_forward_pre_hook(hook, with_kwargs=True)
            for _, m in model.named_modules() if isinstance(m, GradientCheckpointingLayer)]


class _Recorder:
    """The pack hook: records each saved storage once, parameters and buffers apart."""

    def __init__(self, model: Any) -> None:
        self.weights = _weight_storages(model)
        self.seen: dict[int, dict[str, Any]] = {}
        self.excluded: dict[int, int] = {}
        self.stack = [ROOT]

    def pack(self, tensor: Any) -> Any:
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError, TypeError):  # pragma: no cover - exotic subclasses
            return tensor.detach()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if ptr in self.weights:
            self.excluded[ptr] = nbytes
        elif nbytes and ptr not in self.seen:
            self.seen[ptr] = {
                "module": self.stack[-1],
                "nbytes": nbytes,
                "dtype": str(tensor.dtype).removeprefix("torch."),
                "shape": tuple(tensor.shape),
                "producer": type(tensor.grad_fn).__name__ if tensor.grad_fn is not None else "none",
            }
        return tensor.detach()

    def held(self, value: Any) -> None:
        """Record a tensor that something other than autograd keeps until backward."""
        if hasattr(value, "untyped_storage"):
            self.pack(value)

    def result(self, records: bool) -> dict[str, Any]:
        by_module: dict[str, int] = {}
        for rec in self.seen.values():
            by_module[rec["module"]] = by_module.get(rec["module"], 0) + rec["nbytes"]
        out: dict[str, Any] = {
            "total_bytes": sum(rec["nbytes"] for rec in self.seen.values()),
            "by_module": by_module,
            "excluded_weight_bytes": sum(self.excluded.values()),
        }
        if records:
            out["tensors"] = list(self.seen.values())
        return out


def saved_bytes(
    model: Any,
    inputs: Mapping[str, Any],
    *,
    labels: Any = None,
    records: bool = False,
    checkpoint_kwargs: bool = True,
) -> dict[str, Any]:
    """Run ``model(**inputs, labels=labels)`` once and measure the bytes saved for backward.

    Returns a dict:
    - ``total_bytes``: int, sum of unique saved storages, parameters and buffers excluded;
    - ``by_module``: module name -> bytes first saved while it was the innermost running module
      (``"(model)"`` for the top level); sums to ``total_bytes``;
    - ``excluded_weight_bytes``: int, unique parameter/buffer storages that were saved;
    - ``tensors`` (only when ``records``): one dict per unique storage with ``module``,
      ``nbytes``, ``dtype``, ``shape`` and ``producer`` (the class name of the tensor's grad_fn).

    With ``checkpoint_kwargs`` (default), tensors passed as keyword arguments to a checkpointed
    Hugging Face layer (rotary cos/sin, the attention mask) are counted too: the checkpoint holds
    them until backward. Without it, the count is autograd's saved tensors alone.

    The model should be in train mode (dropout active) with gradients enabled; the caller
    chooses dtype, device, attention implementation and checkpointing. The forward's output
    (and so the autograd graph) is released before returning.
    """
    import torch

    recorder = _Recorder(model)
    handles = _register_tags(model, recorder.stack)
    if checkpoint_kwargs:
        handles += _register_checkpoint_kwargs(model, recorder.held)
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(recorder.pack, lambda t: t):
            output = model(**dict(inputs), **({} if labels is None else {"labels": labels}))
        del output
    finally:
        for handle in handles:
            handle.remove()
    return recorder.result(records)
