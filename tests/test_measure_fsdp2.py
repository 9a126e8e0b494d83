"""FSDP2 ``fully_shard`` measured on two CPU processes (gloo) against memplan's ``--engine fsdp2 --gpus 2`` answer.

One spawn of two processes runs every case (``memplan.measure.fsdp2``): tiny real-layout models of 14 families
(three MoE: mixtral, qwen2_moe, deepseek_v3), ``fully_shard`` per decoder block and on the root,
MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) over fp32 parameters, and four families in pure bf16.
Each rank's measured peak (tensor storages, DTensor parameters through their local shards) is compared with
memplan's answer (estimate's phase peak, tensors only): within 3%, and never more than 1% under (issue 11, part 5).
The sharded states are checked against the parameter count of the built model, halved, and where FSDP2 pads a
dim 0 or keeps a buffer whole, against its padding rule per rank.
"""

from __future__ import annotations

import pytest

pytest.importorskip("torch", reason="measure needs torch (pip install memplan[measure])")
pytest.importorskip("transformers", reason="measure needs transformers (pip install memplan[measure])")

from memplan.measure import compare as cmp
from memplan.measure import fsdp2

WHY = fsdp2.unavailable()
pytestmark = [pytest.mark.measure, pytest.mark.skipif(WHY is not None, reason=f"FSDP2 on CPU needs gloo: {WHY}")]

WITHIN_PCT = 3.0
UNDER_PCT = 1.0
MIXED = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "phi3", "gpt2", "gpt_neox", "falcon", "olmo2", "gpt_bigcode",
         "mixtral", "qwen2_moe", "deepseek_v3")
PURE = ("gemma", "stablelm", "qwen2_moe", "deepseek_v3")
CASES = [fsdp2.Case(f) for f in MIXED] + [fsdp2.Case(f, mixed=False) for f in PURE]
CASES += [fsdp2.Case(f, mixed=m, reshard_after_forward=False) for f in ("llama", "mixtral") for m in (True, False)]
PADDED = [c for c in CASES if c.family in ("qwen2_moe", "deepseek_v3")]
"""qwen2_moe's ``shared_expert_gate`` is (1, D): dim 0 is odd, so FSDP2 pads it; deepseek_v3's router keeps an
``e_score_correction_bias`` buffer, which ``fully_shard`` does not shard."""


@pytest.fixture(scope="module")
def measured() -> dict[str, list[fsdp2.RankResult]]:
    return fsdp2.measure_fsdp2(CASES)


def _param_count(case: fsdp2.Case) -> int:
    """Elements of the built model's distinct parameters (tied embeddings once), counted by torch on the meta device."""
    from memplan.measure import build

    cfg = fsdp2.context(case).cfg
    model = build.build_model(fsdp2.tiny_spec(case.family), cfg, attention=cfg.attention_impl, device="meta")
    return sum(p.numel() for p in model.parameters())


def test_two_ranks_measured_every_case(measured: dict[str, list[fsdp2.RankResult]]) -> None:
    assert len({c.family for c in CASES}) >= 10
    for case in CASES:
        ranks = measured[case.label]
        assert sorted(r.rank for r in ranks) == list(range(fsdp2.WORLD))
        assert all(set(r.phases) == {"forward", "backward", "optimizer step"} for r in ranks)
        assert all(len(r.step_peaks) == fsdp2.MEASURED_STEPS for r in ranks)
        # every free of a buffer the job allocated was recorded: gloo's worker thread let go of FSDP's collective
        # buffers before FSDP freed them (memplan.measure.gloo_comm); otherwise a buffer freed on that thread stays
        # in the measured sum until its address is reused (mixtral's rank 1 read 7,916,868 B for 7,403,588)
        assert [r.unrecorded_frees for r in ranks] == [0] * fsdp2.WORLD, case.label


@pytest.mark.parametrize("case", CASES, ids=[c.label for c in CASES])
def test_answer_covers_each_rank_peak(case: fsdp2.Case, measured: dict[str, list[fsdp2.RankResult]]) -> None:
    answer = max(cmp.answer_phases(fsdp2.context(case), "cpu").values())
    for rank in measured[case.label]:
        error_pct = 100.0 * (answer - rank.peak) / rank.peak
        assert -UNDER_PCT <= error_pct <= WITHIN_PCT, (case.label, rank.rank, answer, rank.peak, error_pct)
    assert fsdp2.compare(case, measured[case.label])["failures"] == []


@pytest.mark.parametrize("case", [CASES[0], fsdp2.Case("stablelm", mixed=False)], ids=lambda c: c.label)
def test_states_are_sharded_in_halves(case: fsdp2.Case, measured: dict[str, list[fsdp2.RankResult]]) -> None:
    """Each rank holds half the parameters, half the gradients and half of both AdamW moments, in fp32 under the
    mixed policy and bf16 in pure bf16 (every dim 0 of these models is even: no padding)."""
    width = 4 if case.mixed else 2
    half = _param_count(case) * width // fsdp2.WORLD
    predicted, _ = cmp.predicted_components(fsdp2.context(case), "cpu")
    for rank in measured[case.label]:
        assert rank.components == {"weights/params": half, "gradients": half, "optimizer/states": 2 * half}
    assert predicted["weights/params"] == predicted["gradients"] == half
    assert predicted["optimizer/adam_m"] + predicted["optimizer/adam_v"] == 2 * half


def _per_rank(case: fsdp2.Case, rank: int) -> dict[str, int]:
    """What rank ``rank`` holds under FSDP2's dim-0 rule, worked out from the built model's own shapes (torch, meta
    device): each parameter's storage is padded to chunk 0, c = ceil(d0 / 2) rows (``_init_sharded_param``), its
    gradient a view of the padded reduce-scatter output (``foreach_reduce``), its two AdamW moments ``zeros_like``
    the rank's rows min(c, max(0, d0 − rank·c)); persistent buffers are whole on every rank."""
    from memplan.measure import build

    cfg = fsdp2.context(case).cfg
    model = build.build_model(fsdp2.tiny_spec(case.family), cfg, attention=cfg.attention_impl, device="meta")
    width = 4 if case.mixed else 2
    padded = mine = 0
    for p in model.parameters():
        d0, rest = p.shape[0], p.numel() // p.shape[0]
        c = -(-d0 // fsdp2.WORLD)
        padded += c * rest
        mine += min(c, max(0, d0 - rank * c)) * rest
    names = {n for n, _ in model.named_parameters()}
    kept = sum(t.numel() for n, t in model.state_dict(keep_vars=True).items() if n not in names)
    return {"weights/params": (padded + kept) * width, "gradients": padded * width, "optimizer/states": 2 * mine * width}


@pytest.mark.parametrize("case", PADDED, ids=lambda c: c.label)
def test_states_exact_per_rank_with_padding(case: fsdp2.Case, measured: dict[str, list[fsdp2.RankResult]]) -> None:
    """Each rank's sharded states equal FSDP2's padding rule worked out from the model; memplan's rows are rank 0's
    (the largest), and the ranks differ where a dim 0 is odd (qwen2_moe) — the rule is checked, not assumed."""
    predicted, _ = cmp.predicted_components(fsdp2.context(case), "cpu")
    rows = {"weights/params": predicted["weights/params"], "gradients": predicted["gradients"],
            "optimizer/states": predicted["optimizer/adam_m"] + predicted["optimizer/adam_v"]}
    for rank in measured[case.label]:
        assert rank.components == _per_rank(case, rank.rank), (case.label, rank.rank)
    assert rows == _per_rank(case, 0)
    if case.family == "qwen2_moe":
        assert _per_rank(case, 1)["optimizer/states"] < _per_rank(case, 0)["optimizer/states"]
