"""transformers < 4.36 generate: the tuple ``past_key_values`` keeps the previous step's whole cache alive next to
the new one (modeling_llama.py 4.32 ``torch.cat([past_key_value[0], key_states], dim=2)``; generation/utils.py holds
the old tuple until ``_update_model_kwargs_for_generation``)."""

from __future__ import annotations

from memplan import estimate
from memplan.memory.breakdown import Phase, Tier

LLAMA2_13B = dict(layers=40, hidden=5120)


def gen(cache: str, *, batch: int = 4, context: int = 1024, prompt: int | None = 512) -> object:
    return estimate("llama-2-13b", "a100-sxm-80gb", job="infer", dtype="fp16", micro_batch=batch, engine="transformers",
                    infer={"context": context, "prefill_chunk": prompt}, serve={"cache_implementation": cache},
                    allocator_reserve_pct=0)


def components(est: object) -> dict[str, int]:
    return {r.component: r.bytes for r in est.rows if r.tier is Tier.GPU}  # type: ignore[attr-defined]


def test_legacy_decode_holds_the_previous_whole_cache() -> None:
    got = components(gen("legacy"))
    per_token = 2 * LLAMA2_13B["layers"] * LLAMA2_13B["hidden"] * 2  # K and V, every layer, fp16
    assert got["kv_cache"] == 4 * 1024 * per_token
    assert got["kv_cache/legacy_previous"] == 4 * 1023 * per_token
    assert "kv_cache/dynamic_growth" not in got


def test_legacy_binds_in_decode_and_adds_the_old_cache_to_it() -> None:
    legacy, dynamic = gen("legacy"), gen("dynamic")
    assert legacy.peak_phase(Tier.GPU) is Phase.DECODE
    grown = components(legacy)["kv_cache/legacy_previous"] - components(dynamic)["kv_cache/dynamic_growth"]
    assert legacy.phases(Tier.GPU)[Phase.DECODE] - dynamic.phases(Tier.GPU)[Phase.DECODE] == grown


def test_one_new_token_is_made_by_the_prefill_forward_alone() -> None:
    assert "kv_cache/legacy_previous" not in components(gen("legacy", context=513))
