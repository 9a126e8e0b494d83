"""Run one job on a real model and measure its memory, in memplan's component names.

Training (full fine-tuning, pre-training, LoRA): a warm-up step creates the optimizer states, then
the measured step runs forward (with the loss), backward and the optimizer step, gradients set to
None before it (``zero_grad(set_to_none=True)``, PyTorch's default). With a 16-bit model and
``cfg.uses_master_weights`` the step is the mixed-precision one memplan's rows describe (Micikevicius
et al. 2018, Sec. 3.1; DeepSpeed's bf16 optimizer): fp32 master copies, the 16-bit gradients copied
into fp32 gradients of the masters, AdamW on the masters, the masters copied back.
Inference: a prefill of ``context − decode_steps`` tokens, then ``decode_steps`` steps of one
token, with the last token's logits only (``logits_to_keep=1``, as ``generate`` does).

What is measured:
- weights, gradients, master copies and optimizer states: the distinct storages of the tensors
  after the measured step (``peak.storage_bytes``), each under memplan's component name;
- activations saved for backward: ``memplan.measure.saved.saved_bytes`` on a separate forward;
- KV cache: the distinct storages of the returned cache's key and value tensors;
- the peak of each phase: ``peak.PeakMeter`` (profiler memory events on CPU, allocator statistics on CUDA).
"""

from __future__ import annotations

import contextlib
import gc
import warnings
from dataclasses import dataclass, field
from typing import Any, TypedDict

from memplan.catalog.schema import ModelSpec
from memplan.config import Job, JobConfig, OptimizerImpl, OptimizerKind, Recompute
from memplan.dtypes import Dtype
from memplan.errors import MemplanError
from memplan.measure.peak import PeakMeter, PhasePeaks, storage_bytes
from memplan.measure.saved import saved_bytes

SEED = 0
LEARNING_RATE = 1e-5
SGD_MOMENTUM = 0.9
ADAPTER_MARK = "lora_"
"""peft names every adapter parameter ``lora_A``/``lora_B``/``lora_magnitude_vector``/``lora_embedding_*``."""
TOKEN_FLOOR = 3
"""Random token ids start above the special ids (``build.TOKEN_IDS``)."""
STATE_COMPONENTS = {"exp_avg": "optimizer/adam_m", "exp_avg_sq": "optimizer/adam_v",
                    "momentum_buffer": "optimizer/momentum"}
BUFFERS = "weights/model_buffers"
"""The model's non-persistent buffers (outside the state dict): memplan counts the large ones (``memory.hf_buffers``)."""
UNMODELLED_STATES = {"step": "optimizer/step"}
"""AdamW's per-tensor step counter (a 0-d fp32 tensor; on CUDA it stays on the host unless fused or
capturable): real bytes memplan does not count."""


@dataclass
class Measurement(PhasePeaks):
    """What one run measured. Bytes are ints; ``components`` uses memplan's component names."""

    device: str
    components: dict[str, int] = field(default_factory=dict)
    unmodelled: dict[str, int] = field(default_factory=dict)
    saved: dict[str, Any] | None = None
    phases: dict[str, int] = field(default_factory=dict)
    baseline: int = 0
    reserved: int | None = None
    driver_used: int | None = None
    info: dict[str, Any] = field(default_factory=dict)


def check_device(device: str) -> str:
    """``cpu`` or ``cuda`` (as ``cuda:0``); a MemplanError when torch sees no CUDA device."""
    import torch

    if device == "cpu":
        return device
    if device in ("cuda", "cuda:0"):
        if not torch.cuda.is_available():
            raise MemplanError("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False).")
        return "cuda:0"
    raise MemplanError(f"--device must be cpu or cuda, got {device!r}.")


def token_ids(vocab: int, batch: int, seq: int, device: str) -> Any:
    import torch

    generator = torch.Generator().manual_seed(SEED + 1)
    return torch.randint(TOKEN_FLOOR, vocab, (batch, seq), generator=generator).to(device)


class _AdamWFlags(TypedDict, total=False):
    """The implementation flags passed to ``torch.optim.AdamW``."""

    foreach: bool
    fused: bool


def _optimizer(kind: OptimizerKind, params: list[Any], impl: OptimizerImpl = OptimizerImpl.FOREACH) -> Any:
    """The torch optimizer; AdamW with the implementation named (``foreach``/``fused`` passed explicitly, so
    a CPU run takes the path CUDA takes by default)."""
    import torch

    if kind in (OptimizerKind.ADAMW, OptimizerKind.ADAMW_BF16):
        table: dict[OptimizerImpl, _AdamWFlags] = {
            OptimizerImpl.FOREACH: {"foreach": True}, OptimizerImpl.FOR_LOOP: {"foreach": False},
            OptimizerImpl.FUSED: {"fused": True}}
        flags = table[impl]
        return torch.optim.AdamW(params, lr=LEARNING_RATE, **flags)
    if kind is OptimizerKind.SGD:
        return torch.optim.SGD(params, lr=LEARNING_RATE)
    if kind is OptimizerKind.SGD_MOMENTUM:
        return torch.optim.SGD(params, lr=LEARNING_RATE, momentum=SGD_MOMENTUM)
    raise MemplanError(f"measure runs torch optimizers adamw, adamw-bf16, sgd and sgd-momentum; not {kind.value}.")


class Stepper:
    """The optimizer step: plain torch, or mixed precision with fp32 master copies."""

    def __init__(self, params: list[Any], kind: OptimizerKind, master: bool,
                 impl: OptimizerImpl = OptimizerImpl.FOREACH) -> None:
        self.params = params
        self.masters = [p.detach().float().clone() for p in params] if master else []
        self.optimizer = _optimizer(kind, self.masters or params, impl)

    def step(self) -> None:
        import torch

        if not self.masters:
            self.optimizer.step()
            return
        for master, param in zip(self.masters, self.params, strict=True):
            master.grad = None if param.grad is None else param.grad.float()
        self.optimizer.step()
        with torch.no_grad():
            for master, param in zip(self.masters, self.params, strict=True):
                param.copy_(master)

    def zero(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        for param in self.params:
            param.grad = None

    def states(self) -> tuple[dict[str, int], dict[str, int]]:
        """(memplan component -> bytes, unmodelled component -> bytes) of the optimizer's state tensors."""
        known: dict[str, list[Any]] = {}
        other: dict[str, list[Any]] = {}
        for state in self.optimizer.state.values():
            for key, value in state.items():
                if key in STATE_COMPONENTS:
                    known.setdefault(STATE_COMPONENTS[key], []).append(value)
                else:
                    other.setdefault(UNMODELLED_STATES.get(key, f"optimizer/{key}"), []).append(value)
        return ({k: storage_bytes(v) for k, v in known.items()}, {k: storage_bytes(v) for k, v in other.items()})


def wrap_lora(model: Any, spec: ModelSpec, cfg: JobConfig) -> Any:
    """peft LoRA/DoRA with memplan's rank, alpha, targets and adapter dtype (fp32 adapters: peft's default)."""
    try:
        import peft
    except ImportError:
        raise MemplanError("measuring a LoRA job needs peft; install memplan[measure].") from None
    from memplan.measure.build import lora_modules

    lora = cfg.lora
    if lora.dtype is not Dtype.FP32 and lora.dtype is not cfg.dtype:
        raise MemplanError(f"measure runs adapters in fp32 (peft's default) or the model dtype, not {lora.dtype.value}.")
    config = peft.LoraConfig(r=lora.rank,
                             # peft annotates lora_alpha as int but uses it as a float (scaling = lora_alpha / r)
                             lora_alpha=lora.alpha,  # type: ignore[arg-type]
                             target_modules=lora_modules(spec, lora.targets), use_dora=lora.dora)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            wrapped = peft.get_peft_model(model, config, autocast_adapter_dtype=lora.dtype is Dtype.FP32)
        except ValueError as exc:
            raise MemplanError(f"peft refuses this LoRA configuration: {exc}") from None
    return wrapped


def prepare_training(model: Any, spec: ModelSpec, cfg: JobConfig, checkpointed: int) -> Any:
    """Train mode, LoRA wrapping and activation checkpointing of the first ``checkpointed`` layers."""
    from memplan.measure.build import checkpoint_layers

    if cfg.job is Job.LORA:
        model = wrap_lora(model, spec, cfg)
    if checkpointed:
        checkpoint_layers(model, checkpointed)
        if cfg.recompute is Recompute.OP:
            from memplan.measure.sac import op_checkpoint

            op_checkpoint(model)
        if cfg.job is Job.LORA:  # as peft does: the block input must require grad to reach the adapters
            model.enable_input_require_grads()
    model.train()
    return model


def _params_by_component(model: Any) -> tuple[dict[str, int], list[Any]]:
    """(weights/* bytes, trainable parameters); adapters apart from the frozen base weights.

    Persistent buffers (in the state dict, e.g. DeepSeek-V3's ``e_score_correction_bias``) are weights
    too; non-persistent ones (rotary ``inv_freq``, GPT-BigCode's causal ``bias``) are ``weights/model_buffers``.
    """
    import torch

    base: list[torch.Tensor] = []
    adapters: list[torch.Tensor] = []
    for name, tensor in model.state_dict(keep_vars=True).items():
        (adapters if ADAPTER_MARK in name and isinstance(tensor, torch.nn.Parameter) else base).append(tensor)
    out = {"weights/params": storage_bytes(base)}
    if adapters:
        out["weights/lora_adapters"] = storage_bytes(adapters)
    in_state = {id(tensor) for tensor in base}
    out[BUFFERS] = storage_bytes(b for b in model.buffers() if id(b) not in in_state)
    return out, [p for p in model.parameters() if p.requires_grad]


def _gradient_components(cfg: JobConfig, stepper: Stepper) -> dict[str, int]:
    lora = cfg.job is Job.LORA
    out = {"gradients/lora_adapters" if lora else "gradients": storage_bytes(p.grad for p in stepper.params)}
    if stepper.masters:
        out["optimizer/lora_master_fp32" if lora else "optimizer/master_fp32"] = storage_bytes(stepper.masters)
        out["gradients/fp32_partition"] = storage_bytes(m.grad for m in stepper.masters)
    return out


def _one_step(model: Any, stepper: Stepper, ids: Any, meter: PeakMeter | None) -> None:
    phase = meter.phase if meter is not None else (lambda _name: contextlib.nullcontext())
    with phase("forward"):
        output = model(input_ids=ids, attention_mask=_ones(ids), labels=ids, use_cache=False)
        loss = output.loss
        del output  # the caller drops the logits before backward, as the HF Trainer does
    with phase("backward"):
        loss.backward()
        del loss
    with phase("optimizer step"):
        stepper.step()


def measure_training(model: Any, cfg: JobConfig, *, device: str, vocab: int) -> Measurement:
    """Warm-up step, one measured step, then the saved activations on a separate forward."""
    weights, trainable = _params_by_component(model)
    master = cfg.uses_master_weights if cfg.job is not Job.LORA else _adapter_master(cfg)
    stepper = Stepper(trainable, cfg.optimizer, master, cfg.effective_optimizer_impl)
    ids = token_ids(vocab, cfg.micro_batch, cfg.seq_len, device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _one_step(model, stepper, ids, None)
        stepper.zero()
        gc.collect()
        with PeakMeter(device, _resident(model, stepper, ids)) as meter:
            _one_step(model, stepper, ids, meter)
        states, unmodelled = stepper.states()
        components = {**weights, **_gradient_components(cfg, stepper), **states}
        stepper.zero()
        # last: saved_bytes' identity pack hook can leave the graph of ops that save their own output
        # (exp, log_softmax) in a reference cycle, which would inflate a later peak
        saved = saved_bytes(model, {"input_ids": ids, "attention_mask": _ones(ids), "use_cache": False},
                            labels=ids)
    return Measurement(device=device, components=components, unmodelled=unmodelled, saved=saved,
                       phases=meter.phases, baseline=meter.baseline, reserved=meter.peak_reserved,
                       driver_used=meter.driver_used)


def _resident(model: Any, stepper: Stepper | None, ids: Any) -> list[Any]:
    """The job's tensors alive when the measured step starts: weights, buffers, masters, states, inputs."""
    tensors = [*model.parameters(), *model.buffers(), ids]
    if stepper is not None:
        tensors += stepper.masters
        tensors += [v for state in stepper.optimizer.state.values() for v in state.values() if hasattr(v, "device")]
    return [t for t in tensors if t.device == ids.device]


def _adapter_master(cfg: JobConfig) -> bool:
    from memplan.memory.peft import adapter_master_weights

    return adapter_master_weights(cfg)


def cache_bytes(cache: Any) -> int:
    """Distinct storages of every layer's key and value tensors (what the cache keeps alive)."""
    tensors = []
    for layer in getattr(cache, "layers", []):
        tensors += [getattr(layer, "keys", None), getattr(layer, "values", None)]
    return storage_bytes(tensors)


def measure_inference(model: Any, cfg: JobConfig, *, device: str, vocab: int, decode_steps: int) -> Measurement:
    """Prefill ``context − decode_steps`` tokens, then ``decode_steps`` one-token steps, under no_grad."""
    import torch

    context = cfg.infer.context
    ids = token_ids(vocab, cfg.micro_batch, context - decode_steps, device)
    model.eval()
    kv: dict[str, int] = {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        weights, _ = _params_by_component(model)
        with PeakMeter(device, _resident(model, None, ids)) as meter:
            with meter.phase("prefill"):
                output = model(input_ids=ids, use_cache=True, logits_to_keep=1)
                cache, token = output.past_key_values, output.logits[:, -1:].argmax(-1)
                del output
            kv["kv_cache/after_prefill"] = cache_bytes(cache)
            with meter.phase("decode"):
                for _ in range(decode_steps):
                    output = model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
                    cache, token = output.past_key_values, output.logits[:, -1:].argmax(-1)
                    del output
            kv["kv_cache"] = cache_bytes(cache)
    return Measurement(device=device, components={**weights, **kv}, phases=meter.phases, baseline=meter.baseline,
                       reserved=meter.peak_reserved, driver_used=meter.driver_used)


def _ones(ids: Any) -> Any:
    import torch

    return torch.ones_like(ids)
