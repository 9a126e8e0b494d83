"""``module_layout="litgpt"`` (memory.litgpt) against litgpt's own modules, measured on CPU.

The modules below are litgpt 43c44323's ``model.py`` / ``lora.py`` forward passes (RMSNorm, ``LoRAQKVLinear`` with
``zero_pad`` and the grouped ``conv1d``, ``CausalSelfAttention`` with ``apply_rope`` and SDPA, ``LLaMAMLP``), reduced to
a Llama block (Apache-2.0, Lightning AI). bitsandbytes is not installable here: its 4-bit linear is a stand-in that
keeps its input as ``MatMul4Bit.forward`` does (bitsandbytes 0.42 ``ctx.tensors = (A, B)``), through
``save_for_backward`` so that the saved-tensor hooks see it (``test_ctx_attribute_outlives_backward`` checks the
attribute's own lifetime). Each block's saved bytes are compared with memplan's count for the same shapes."""

from __future__ import annotations

import math
import weakref

import pytest

torch = pytest.importorskip("torch", reason="measuring saved tensors needs torch (the measure extra)")
nn, F = torch.nn, torch.nn.functional

from memplan.arch.build import build_architecture  # noqa: E402
from memplan.catalog.hf import spec_from_hf_config  # noqa: E402
from memplan.catalog.schema import HostSpec  # noqa: E402
from memplan.catalog.store import catalog_gpu  # noqa: E402
from memplan.config import Job, JobConfig, LoraConfig, Recompute  # noqa: E402
from memplan.dtypes import Dtype  # noqa: E402
from memplan.errors import MemplanError  # noqa: E402
from memplan.estimator import estimate  # noqa: E402
from memplan.measure import saved_bytes  # noqa: E402
from memplan.memory import activations as act  # noqa: E402
from memplan.memory import activations_block as blk  # noqa: E402
from memplan.memory import bnb_workspace  # noqa: E402
from memplan.memory.context import Context  # noqa: E402

pytestmark = pytest.mark.measure
B, T, D, HEADS, FFN, VOCAB, LAYERS, RANK = 2, 64, 128, 8, 344, 512, 3, 8


class Kept4bit(torch.autograd.Function):
    """bitsandbytes MatMul4Bit: ``linear(A, dequantize(B))``, A kept for backward whenever an input needs a grad."""

    @staticmethod
    def forward(ctx, a, w, attribute):  # type: ignore[override]
        if attribute:  # 0.42: a plain attribute, (None, None) when no input needs a gradient
            ctx.tensors = (a, w) if any(ctx.needs_input_grad[:2]) else (None, None)
        else:
            ctx.save_for_backward(a, w)
        ctx.attribute = attribute
        return F.linear(a, w)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        _, w = ctx.tensors if ctx.attribute else ctx.saved_tensors
        return g @ w, None, None


class Linear(nn.Module):
    def __init__(self, i: int, o: int, quant: bool, attribute: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(o, i) / math.sqrt(i), requires_grad=False)
        self.quant, self.attribute = quant, attribute

    def forward(self, x):
        return Kept4bit.apply(x, self.weight, self.attribute) if self.quant else F.linear(x, self.weight)


def rms_norm(x, weight, eps=1e-5):
    dtype, x = x.dtype, x.float()
    return (x * torch.rsqrt(torch.mean(x * x, dim=-1, keepdim=True) + eps)).to(dtype) * weight


def apply_rope(x, cos, sin):
    x1, x2 = x[..., : x.size(-1) // 2], x[..., x.size(-1) // 2:]
    return ((x * cos) + (torch.cat((-x2, x1), dim=-1) * sin)).to(dtype=x.dtype)


class LitBlock(nn.Module):
    """litgpt Block + CausalSelfAttention + LoRAQKVLinear + LLaMAMLP (43c44323), non-parallel residual."""

    def __init__(self, groups: int, enable: tuple[bool, bool, bool], dropout: float, quant: bool, attr: bool) -> None:
        super().__init__()
        hs, self.groups, self.enable = D // HEADS, groups, enable
        self.qkv_out = (HEADS + 2 * groups) * hs
        self.norm_1, self.norm_2 = nn.Parameter(torch.ones(D), False), nn.Parameter(torch.ones(D), False)
        self.attn, self.proj = Linear(D, self.qkv_out, quant, attr), Linear(D, D, quant, attr)
        self.fc_1, self.fc_2, self.mlp_proj = Linear(D, FFN, quant, attr), Linear(D, FFN, quant, attr), \
            Linear(FFN, D, quant, attr)
        self.shapes = [w for w, on in zip((HEADS * hs, groups * hs, groups * hs), enable, strict=True) if on]
        self.lora_A = nn.Parameter(torch.randn(RANK * sum(enable), D) * 0.01)
        self.lora_B = nn.Parameter(torch.randn(sum(self.shapes), RANK) * 0.01)
        self.dropout = nn.Dropout(dropout) if dropout else (lambda x: x)
        total = HEADS // groups + 2
        self.lora_ind = [i for i in range(self.qkv_out) if ((i // hs) % total < total - 2 and enable[0])
                         or ((i // hs) % total == total - 2 and enable[1]) or ((i // hs) % total == total - 1 and enable[2])]

    def zero_pad(self, x):
        if all(self.enable):
            return x
        x = x.transpose(0, 1)
        result = x.new_zeros((*x.shape[:-1], self.qkv_out)).view(-1, self.qkv_out)
        result = result.index_copy(1, torch.tensor(self.lora_ind), x.reshape(-1, sum(self.shapes)))
        return result.view((*x.shape[:-1], self.qkv_out)).transpose(0, 1)

    def conv1d(self, inp, weight):
        if self.groups == HEADS:
            return F.conv1d(inp, weight, groups=sum(self.enable))
        return torch.cat([F.conv1d(a, b) for a, b in zip(inp.chunk(sum(self.enable), dim=1),
                                                          weight.split(self.shapes), strict=True)], dim=1)

    def forward(self, x, cos, sin):
        xn = rms_norm(x, self.norm_1)
        after_a = F.linear(self.dropout(xn), self.lora_A)
        after_b = self.conv1d(after_a.transpose(-2, -1), self.lora_B.unsqueeze(-1)).transpose(-2, -1)
        qkv = self.attn(xn) + self.zero_pad(after_b) * 2.0
        hs, q_per_kv = D // HEADS, HEADS // self.groups
        qkv = qkv.view(B, T, self.groups, q_per_kv + 2, hs).permute(0, 2, 3, 1, 4)
        q, k, v = qkv.split((q_per_kv, 1, 1), dim=2)
        if self.groups != HEADS:
            k, v = k.expand(B, self.groups, q_per_kv, T, hs), v.expand(B, self.groups, q_per_kv, T, hs)
        q, k, v = q.reshape(B, -1, T, hs), k.reshape(B, -1, T, hs), v.reshape(B, -1, T, hs)
        q = torch.cat((apply_rope(q, cos, sin), q[..., hs:]), dim=-1)
        k = torch.cat((apply_rope(k, cos, sin), k[..., hs:]), dim=-1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, D)
        x = self.proj(y) + x
        xn = rms_norm(x, self.norm_2)
        return self.mlp_proj(F.silu(self.fc_1(xn)) * self.fc_2(xn)) + x


class LitGPT(nn.Module):
    def __init__(self, groups=HEADS, enable=(True, False, True), dropout=0.05, quant=False, attr=False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.wte = nn.Parameter(torch.randn(VOCAB, D), requires_grad=False)
        self.h = nn.ModuleList(LitBlock(groups, enable, dropout, quant, attr) for _ in range(LAYERS))
        self.ln_f, self.lm_head = nn.Parameter(torch.ones(D), False), Linear(D, VOCAB, quant, attr)
        theta = 1.0 / (10000 ** (torch.arange(0, D // HEADS, 2).float() / (D // HEADS)))
        idx = torch.outer(torch.arange(T).float(), theta).repeat(1, 2)
        self.register_buffer("cos", torch.cos(idx), persistent=False)
        self.register_buffer("sin", torch.sin(idx), persistent=False)
        self.to(torch.bfloat16)
        self.cos, self.sin = torch.cos(idx), torch.sin(idx)  # fit() resets the rope cache in fp32

    def forward(self, input_ids, labels):
        x = F.embedding(input_ids, self.wte)
        for block in self.h:
            x = block(x, self.cos, self.sin)
        logits = [self.lm_head(x_i) for x_i in rms_norm(x, self.ln_f).split(32, dim=1)]
        chunks = [F.cross_entropy(c.reshape(-1, VOCAB), t.reshape(-1), reduction="none")
                  for c, t in zip(logits, labels.split(32, dim=1), strict=True)]
        return torch.cat(chunks).sum() / labels.numel(), logits


def _config(groups: int, enable: tuple[bool, bool, bool], dropout: float, quant: bool) -> JobConfig:
    targets = tuple(p for p, on in zip("qkv", enable, strict=True) if on)
    return JobConfig(job=Job.QLORA if quant else Job.LORA, dtype=Dtype.BF16, micro_batch=B, seq_len=T,
                     attention="sdpa", quant="nf4" if quant else None, module_layout="litgpt",
                     bnb_integration="lightning" if quant else "transformers",
                     lora=LoraConfig(rank=RANK, targets=targets, dtype=Dtype.BF16, dropout=dropout))


def _context(groups: int, cfg: JobConfig) -> Context:
    spec = spec_from_hf_config(dict(hidden_size=D, intermediate_size=FFN, num_attention_heads=HEADS,
                                    num_key_value_heads=groups, vocab_size=VOCAB, num_hidden_layers=LAYERS,
                                    model_type="llama", max_position_embeddings=4096), name="tiny-lit", source="test")
    return Context(build_architecture(spec), cfg, catalog_gpu("h100-sxm-80gb"), HostSpec())


@pytest.mark.parametrize("quant", [False, True], ids=["lora", "qlora"])
@pytest.mark.parametrize(("groups", "enable", "dropout"), [
    (HEADS, (True, False, True), 0.05), (2, (True, False, True), 0.05), (1, (True, False, True), 0.05),
    (HEADS, (True, True, True), 0.05), (2, (False, True, False), 0.05), (HEADS, (True, False, True), 0.0)])
def test_each_block_saves_what_litgpts_modules_save(groups, enable, dropout, quant) -> None:
    model = LitGPT(groups, enable, dropout, quant)
    ids = torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(1))
    by_module = saved_bytes(model, {"input_ids": ids}, labels=ids)["by_module"]
    ctx = _context(groups, _config(groups, enable, dropout, quant))
    for i in range(LAYERS):  # block 0 reads the frozen embedding: no input gradient
        measured = sum(b for name, b in by_module.items() if name.startswith(f"h.{i}"))
        assert act.layer_micro_bytes(ctx, i, Recompute.NONE, blk.cpu_counting(16)) == measured, f"block {i}"


def test_ctx_attribute_outlives_backward() -> None:
    """bitsandbytes <= 0.43.1 keeps A on ``ctx``: autograd's release after backward frees saved variables only, so
    the quantized linears' inputs live while the loop holds ``logits``; their bytes are memplan's
    ``activations/bnb_retained_inputs`` (litgpt: every block but the first's q/k/v input, plus lm_head's input)."""
    held = {}
    model = LitGPT(quant=True, attr=True)
    original = Kept4bit.forward

    def spy(ctx, a, w, attribute):
        out = original(ctx, a, w, attribute)
        held[a.untyped_storage().data_ptr()] = (weakref.ref(a), a.untyped_storage().nbytes())
        return out

    Kept4bit.forward = staticmethod(spy)
    try:
        ids = torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(1))
        loss, logits = model(ids, ids)
        loss.backward()
        del loss
        alive = sum(n for ref, n in held.values() if ref() is not None and ref().requires_grad)
        del logits
        after = sum(1 for ref, _ in held.values() if ref() is not None)
    finally:
        Kept4bit.forward = original
    cfg = _config(HEADS, (True, False, True), 0.05, True).model_copy(update={"bnb_version": "0.42.0"})
    assert bnb_workspace.retained_input_bytes(_context(HEADS, cfg)) == alive > 0
    assert after == 0  # dropping the graph frees them


def test_bnb_release_decides_what_the_4bit_matmul_keeps() -> None:
    # bitsandbytes 9e75374 (0.43.2, PR #1270): MatMul4Bit keeps (None, B); before it (A, B)
    kw = dict(job="qlora", quant="nf4", micro_batch=2, seq_len=512, cuda_context_bytes=0, allocator_reserve_pct=0,
              lora={"rank": 32, "targets": ("q", "v"), "dtype": "bf16"})
    rows = {v: {r.component: r.bytes for r in estimate("llama-2-7b", "h100-sxm-80gb", bnb_version=v, **kw).rows}
            for v in (None, "0.42.0", "0.43.2")}
    # Llama-2-7B, 32 blocks, 2·512 tokens, bf16. Kept inputs of a block: q/k/v (4096), o (4096), gate/up (4096),
    # down (11008). In the HF layout the q/v adapters' lora_A already saves the q/k/v input (no dropout) and SDPA the
    # o input (its own output), so only the gate/up and down inputs are the 4-bit matmuls' alone.
    tokens = 2 * 512
    assert rows[None]["activations/layers"] - rows["0.43.2"]["activations/layers"] == 32 * tokens * (4096 + 11008) * 2
    retained = 32 * tokens * (4096 + 4096 + 4096 + 11008) * 2  # lm_head stays bf16 (transformers)
    assert rows["0.42.0"]["activations/bnb_retained_inputs"] == retained
    assert "activations/bnb_retained_inputs" not in rows[None]


@pytest.mark.parametrize(("model", "fields"), [
    ("llama-2-7b", {"job": "infer", "module_layout": "litgpt"}),  # inference reads no training layout
    ("llama-2-7b", {"job": "lora", "bnb_version": "0.42.0", "lora": {"dtype": "bf16"}}),  # no bitsandbytes format
    ("llama-2-7b", {"job": "lora", "previous_seq_len": 0, "lora": {"dtype": "bf16"}}),  # only litgpt's loop holds it
    ("llama-2-7b", {"job": "lora", "module_layout": "litgpt", "lora": {"dtype": "fp32"}}),  # model's dtype only
    ("mixtral-8x7b", {"job": "lora", "module_layout": "litgpt", "lora": {"dtype": "bf16"}}),  # not litgpt's block
    ("llama-2-7b", {"job": "lora", "module_layout": "litgpt", "seq_len": 512, "previous_seq_len": 1024,
                    "lora": {"dtype": "bf16"}}),
])
def test_litgpt_and_bnb_knobs_are_refused_where_they_do_not_apply(model: str, fields: dict) -> None:
    with pytest.raises(MemplanError):
        estimate(model, "h100-sxm-80gb", dtype="bf16", **fields)


def test_litgpt_layout_brings_litgpts_loop_and_loss_unless_named() -> None:
    # finetune/lora.py (43c44323): ``logits`` held by the loop, chunked_cross_entropy on bf16 chunks; lora.py builds
    # lora_A/lora_B under the model's dtype
    cfg = JobConfig(job=Job.LORA, module_layout="litgpt")
    assert (cfg.kept_output, cfg.loss_fp32, cfg.lora.dtype) == ("logits", False, Dtype.BF16)
    named = JobConfig(job=Job.LORA, module_layout="litgpt", kept_output="none", loss_fp32=True)
    assert (named.kept_output, named.loss_fp32) == ("none", True)
    assert JobConfig(job=Job.LORA).lora.dtype is Dtype.FP32  # peft's default elsewhere
