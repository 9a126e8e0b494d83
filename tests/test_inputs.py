"""No input silently ignored (issue 14 parts 4 and 8): each flag, recipe key, ``--set`` value and API
argument is used, rejected with one sentence (exit 2), or answered with a visible warning. The rules live
below the CLI (``memplan.config``, ``memplan.preflight``, ``memplan.recipe*``, ``memplan.planner``), so
the API and recipes are checked here directly, and the command line through the same declarations."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from conftest import cli_json, run_cli

from memplan import estimate
from memplan.catalog.schema import HostSpec
from memplan.config import JobConfig
from memplan.errors import MemplanError
from memplan.recipe_load import load_recipe, parse_set

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SERVE = RECIPES / "qwen2.5-72b-serve-32k.yaml"


def one_line_error(runner, *args: str) -> str:
    """Run the CLI, expect exit 2 and exactly one line on stderr; return it."""
    result = run_cli(runner, *args, code=2)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def write_recipe(tmp_path: Path, data: dict, name: str = "r") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


SMALL = {"model": "gpt2", "hardware": {"gpu": "h100-sxm-80gb"}, "job": {"type": "full", "seq_len": 512}}


# -- part 1: what does not apply to the job ------------------------------------------------------

@pytest.mark.parametrize("job, field, value", [
    ("full", "lora", {"paged_optimizer": True}),
    ("full", "infer", {"context": 8192}),
    ("infer", "seq_len", 4096),
    ("infer", "optimizer", "sgd"),
    ("infer", "zero", 1),
    ("lora", "galore", {"rank": 8}),
    ("pretrain", "lora", {"rank": 8}),
])
def test_a_field_the_job_does_not_read_is_an_error_naming_it(job, field, value):
    with pytest.raises(MemplanError, match=rf"{field}.*does not apply to an? {job} job"):
        estimate("llama-3.2-1b", "h100", job=job, **{field: value})


def test_paged_optimizer_with_a_full_job_is_exit_2(runner):
    line = one_line_error(runner, "estimate", "llama-3.2-1b", "--job", "full", "--paged-optimizer")
    assert "paged_optimizer" in line and "full" in line


def test_paged_optimizer_is_used_by_qlora():
    """The flag that full rejects changes a QLoRA answer: the states move to CPU RAM."""
    off = estimate("llama-3.2-1b", "h100", job="qlora", optimizer="adamw")
    on = estimate("llama-3.2-1b", "h100", job="qlora", optimizer="adamw", lora={"paged_optimizer": True})
    assert on.total(on.binding_tier.__class__("cpu")) > off.total(off.binding_tier.__class__("cpu"))


def test_context_above_max_position_embeddings_is_a_warning_naming_the_limit(runner):
    """GPT-2's config.json has n_positions 1024; phi-3-mini-4k has 4096 (their Hugging Face configs)."""
    for model, limit in (("gpt2", 1024), ("phi-3-mini", 4096)):
        doc = cli_json(runner, "estimate", model, "--job", "infer", "--context", "8192")
        assert len(doc["warnings"]) == 1 and f"{limit:,}" in doc["warnings"][0], doc["warnings"]
    assert cli_json(runner, "estimate", "gpt2", "--job", "infer", "--context", "1024")["warnings"] == []
    table = run_cli(runner, "estimate", "gpt2", "--job", "infer", "--context", "8192").stdout
    assert "Warning" in table and "1,024" in table


def test_bf16_on_a_gpu_without_bf16_is_an_error_and_the_default_becomes_fp16(runner):
    """T4 (Turing) and V100 (Volta) have no bf16 (NVIDIA datasheets; the catalog's supports_bf16)."""
    for gpu in ("t4", "v100-sxm2-32gb"):
        line = one_line_error(runner, "estimate", "llama-3.2-1b", "--gpu", gpu, "--dtype", "bf16")
        assert "bf16" in line and "fp16" in line
        doc = cli_json(runner, "estimate", "llama-3.2-1b", "--gpu", gpu)
        assert doc["config"]["dtype"] == "fp16" and doc["assumptions"]["dtype"] == "fp16"
    with pytest.raises(MemplanError, match="fp8"):
        estimate("llama-3.2-1b", "a100-sxm-80gb", dtype="fp8", job="infer")


def test_fp16_default_and_explicit_bf16_cost_the_same_bytes():
    t4 = estimate("llama-3.2-1b", "t4", job="infer")
    fp16 = estimate("llama-3.2-1b", "t4", job="infer", dtype="fp16")
    assert [r.bytes for r in t4.rows] == [r.bytes for r in fp16.rows]


def test_assumed_host_ram_and_nvme_are_in_the_answer(runner):
    doc = cli_json(runner, "estimate", "llama-3.2-1b")
    assert doc["assumptions"] == {"cpu_ram_bytes": 1024 * 2**30, "nvme_bytes": 0}
    doc = cli_json(runner, "estimate", "llama-3.2-1b", "--cpu-ram", "64GiB")
    assert doc["assumptions"] == {"nvme_bytes": 0}
    given = estimate("llama-3.2-1b", "h100", host=HostSpec(cpu_ram_bytes=2**36, nvme_bytes=2**40))
    assert given.assumptions == {}
    assert "Assumed" in run_cli(runner, "estimate", "llama-3.2-1b").stdout


def test_concurrency_in_a_planned_recipe_is_not_ignored(runner):
    """The serve recipe searches batch [1..16]; job.concurrency=64 used to report PASS at batch 8."""
    line = one_line_error(runner, "check", str(SERVE), "--set", "job.concurrency=64")
    assert "job.concurrency" in line and "search.batch" in line


def test_concurrency_pins_the_search_when_the_recipe_does_not_search_batch(tmp_path):
    data = yaml.safe_load(SERVE.read_text())
    del data["search"]["batch"]
    data["job"]["concurrency"] = 2
    assert load_recipe(write_recipe(tmp_path, data)).space.batch == (2,)


@pytest.mark.parametrize("key, needle", [("job.nope", "valid keys here"), ("fixed.zeroo", "did you mean zero"),
                                         ("nope", "unknown key"), ("hardware.gpuu", "unknown key")])
def test_set_keys_that_do_not_exist_are_errors(runner, key, needle):
    line = one_line_error(runner, "check", str(SERVE), "--set", f"{key}=1")
    assert needle in line and key.split(".")[-1] in line


# -- part 2: recipes and --set validated as the flags are ------------------------------------------

@pytest.mark.parametrize("item, needle", [
    ("search.tp=[0]", "positive"), ("search.pp=[0]", "positive"), ("search.micro_batch=[0]", "positive"),
    ("search.tp=[-1]", "positive"), ("search.zero=[4]", "ZeRO stages"), ("search.zero=[true]", "boolean"),
    ("search.batch=[]", "at least one"), ("job.context=[0]", "integer"), ("fixed.tp=-1", "greater than 0"),
    ("hardware.cpu_ram=0GiB", "positive"), ("job.global_batch=1000000000000000000000", "less than"),
])
def test_bad_set_values_are_one_sentence_and_exit_2(runner, item, needle):
    line = one_line_error(runner, "check", str(SERVE), "--set", item)
    assert needle in line, line
    assert "Traceback" not in line and "internal error" not in line


@pytest.mark.parametrize("args, needle", [
    (("llama-3.1-8b", "--job", "qlora", "--bnb-version", "abc"), "bitsandbytes release like 0.43.1, not 'abc'"),
    (("llama-3.1-8b", "--job", "lora", "--engine", "transformers", "--transformers-version", "5.0"),
     "transformers release from 4.37 to 4.40"),
])
def test_a_malformed_release_is_one_plain_sentence_not_a_regex(runner, args, needle):
    """A release string that does not parse names the form it takes (pydantic's pattern text is for no user)."""
    line = one_line_error(runner, "estimate", *args, "--gpu", "rtx-4090")
    assert needle in line, line
    assert "pattern" not in line and "\\d" not in line and "^" not in line, line


def test_release_fields_in_recipes_and_the_api_name_the_form():
    """The serve section's vLLM release, and a release YAML read as a number (``bnb_version: 0.43``)."""
    with pytest.raises(ValueError, match=r"vLLM release like 0\.8\.4, not 'latest'") as err:
        JobConfig(job="infer", serve={"vllm_release": "latest"})
    assert "pattern" not in str(err.value)
    with pytest.raises(ValueError, match=r"as text .*'0\.43'") as err:
        JobConfig(job="qlora", bnb_version=0.43)
    assert "valid string" not in str(err.value)
    assert JobConfig(job="qlora", bnb_version="0.43.1").bnb_version == "0.43.1"


def test_bools_are_not_numbers_in_the_api_and_recipes(tmp_path):
    with pytest.raises(MemplanError, match=r"seq_len.*boolean"):
        estimate("gpt2", "h100", seq_len=True)
    with pytest.raises(ValueError, match="boolean"):
        JobConfig(micro_batch=True)
    recipe = write_recipe(tmp_path, {**SMALL, "search": {"zero": [True]}})
    with pytest.raises(MemplanError, match=r"zero.*boolean"):
        load_recipe(recipe)
    recipe = write_recipe(tmp_path, {**SMALL, "hardware": {"gpu": "h100", "nodes": True}})
    with pytest.raises(MemplanError, match=r"nodes.*boolean"):
        load_recipe(recipe)


def test_duplicate_yaml_keys_are_rejected(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("model: gpt2\nhardware: {gpu: h100}\njob: {type: full}\njob: {type: infer}\n")
    with pytest.raises(MemplanError, match=r"'job' is given twice.*line 4"):
        load_recipe(path)


@pytest.mark.parametrize("text, needle", [("1-", "open range"), ("5-3", "runs backwards"), ("-3", "open range"),
                                          ("3-99", "outside")])
def test_offload_layer_ranges_get_true_messages(runner, text, needle):
    line = one_line_error(runner, "estimate", "llama-3.2-1b", "--job", "infer", f"--offload-layers={text}")
    assert needle in line, line


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0"])
def test_time_limit_must_be_a_finite_positive_number(runner, value):
    assert "time-limit" in one_line_error(runner, "plan", "gpt2", "--time-limit", value)


def test_full_fine_tuning_of_quantized_weights_is_rejected(runner):
    for cmd in ("estimate", "plan"):
        line = one_line_error(runner, cmd, "llama-3.2-1b", "--job", "full", "--quant", "nf4")
        assert "qlora" in line and "full" in line
    assert "did you mean nf4" in one_line_error(runner, "estimate", "gpt2", "--quant", "nf5").lower()


def test_lora_targets_the_model_lacks_are_rejected_naming_its_projections(runner):
    """GPT-2 has c_attn (q,k,v), c_proj (o), c_fc (up) and mlp.c_proj (down): no gate (HF GPT2MLP)."""
    line = one_line_error(runner, "estimate", "gpt2", "--job", "lora", "--lora-targets", "gate")
    assert "gate" in line and "q, k, v, o, up, down" in line


def test_min_gpus_with_tp_2_skips_one_gpu_instead_of_aborting(runner):
    doc = cli_json(runner, "plan", "gpt2", "--objective", "min-gpus", "--tp", "2", "--gpus", "4", "--zero", "0",
                   "--recompute", "none", "--batch", "1", "--top", "1")
    assert doc["best"]["config"]["tp"] == 2 and doc["best"]["config"]["gpus_per_node"] == 2


def test_qlora_with_quant_none_is_the_same_error_in_estimate_and_plan(runner):
    lines = [one_line_error(runner, cmd, "llama-3.2-1b", "--job", "qlora", "--quant", "none")
             for cmd in ("estimate", "plan")]
    assert all("job lora" in line for line in lines), lines


def test_inference_plan_offloads_layers_by_default_as_the_help_says(runner):
    """Llama-3.1-8B in fp16 is 16 GB of weights (8.03e9 × 2 bytes, the model card's count) against the
    T4's 15 GiB: only per-layer weight offload, on by default, makes it fit."""
    doc = cli_json(runner, "plan", "llama-3.1-8b", "--gpu", "t4", "--job", "infer", "--context", "1024",
                   "--batch", "1", "--top", "1")
    assert doc["status"] == "optimal", doc.get("binding")
    assert doc["best"]["memory"]["cpu"]["total_bytes"] > 0
    cli_json(runner, "plan", "llama-3.1-8b", "--gpu", "t4", "--job", "infer", "--context", "1024", "--batch", "1",
             "--no-per-layer-offload", code=1)


def test_unknown_listing_filters_exit_2_alike(runner):
    assert "vendor" in one_line_error(runner, "gpus", "--vendor", "intel")
    assert "family" in one_line_error(runner, "models", "--family", "nope")


# -- part 3: messages ---------------------------------------------------------------------------------

def test_an_empty_placement_space_says_why(runner):
    line = one_line_error(runner, "plan", "gpt2", "--zero", "0", "--offload-optimizer", "cpu")
    assert "valid:." not in line and "ZeRO" in line


def test_invalid_reasons_are_deduplicated_and_capped():
    from memplan.planner.train import MAX_REASON_CHARS, invalid_reasons

    reasons = [f"tp={t} zero={z}: the same problem" for t in (1, 2, 4) for z in range(4)]
    text = invalid_reasons({"tp": (1,)}, reasons)
    assert text.count("the same problem") == 1
    long = invalid_reasons({"tp": (1,)}, [f"c{i}: reason number {i} " + "x" * 40 for i in range(50)])
    assert len(long) <= MAX_REASON_CHARS


def test_a_huge_global_batch_is_an_input_error_not_a_time_limit(runner):
    line = one_line_error(runner, "plan", "gpt2", "--global-batch", str(10**21))
    assert "global_batch" in line and "time limit" not in line


def test_cpu_bound_full_fine_tuning_suggests_more_cpu_ram(runner):
    """8B full fine-tuning with ZeRO-Offload keeps fp32 master weights and two Adam moments in CPU RAM:
    8.03e9 × 12 bytes = 96.4 GB > 64 GiB (ZeRO-Offload, Ren et al. 2021, Sec. 4), so the host binds."""
    doc = cli_json(runner, "plan", "llama-3.1-8b", "--gpu", "rtx-4090", "--job", "full", "--cpu-ram", "64GiB",
                   "--zero", "3", "--offload-optimizer", "cpu", "--offload-params", "cpu", "--batch", "1",
                   "--recompute", "full", "--top", "1", code=1)
    ram = [s for s in doc["suggestions"] if s["flags"].startswith("--cpu-ram")]
    assert ram, doc["suggestions"]
    size = int(ram[0]["flags"].split()[1].removesuffix("GiB"))
    assert size * 2**30 >= 8.03e9 * 12 and math.log2(size).is_integer()


def test_parse_set_rejects_a_missing_equals_sign():
    with pytest.raises(MemplanError, match="KEY=VALUE"):
        parse_set(["job.context"])


def test_estimate_json_carries_warnings_and_assumptions_fields(runner):
    doc = json.loads(run_cli(runner, "estimate", "gpt2", "--format", "json").stdout)
    assert isinstance(doc["warnings"], list) and isinstance(doc["assumptions"], dict)


def test_an_infeasible_405b_plan_gets_a_verified_zero3_way_out(runner):
    """ZeRO (Rajbhandari et al. 2020, Sec. 5): mixed-precision Adam holds 16 bytes per parameter, at best all
    partitioned (ZeRO-3, or tensor × pipeline parallelism), so N RTX 4090s (23.99 GiB each) need
    N ≥ 405e9 × 16 / (23.99 × 2^30) ≈ 252. The fastest layout at the fewest GPUs may be ZeRO-3 or tp × pp
    (the step-time model prefers pipelines across nodes); the label names the ZeRO stage when it takes one."""
    args = ("plan", "llama-3.1-405b", "--gpu", "rtx-4090", "--job", "full", "--offload-optimizer", "none",
            "--offload-params", "none")
    doc = cli_json(runner, *args, code=1)
    scale = [s for s in doc["suggestions"] if s["flags"].startswith("--gpus")]
    assert scale and scale[0]["verified"], doc["suggestions"]
    gpn, nodes = (int(x) for x in scale[0]["flags"].split()[1::2])
    assert scale[0]["changes"] == {"hardware.gpus_per_node": gpn, "hardware.nodes": nodes}  # the flags, as data
    assert gpn * nodes >= 405e9 * 16 / (23.99 * 2**30)
    fitted = cli_json(runner, *args, "--gpus", str(gpn), "--nodes", str(nodes), "--top", "1")
    assert fitted["status"] == "optimal"
    zero = fitted["best"]["config"]["zero"]
    assert (f"ZeRO-{zero}" in scale[0]["change"]) == (zero > 0), scale[0]["change"]
    # one node fewer does not fit: the same request through the API, without diagnosing it a second time
    from memplan.catalog.store import catalog_gpu, catalog_model
    from memplan.config import Offload
    from memplan.planner.plan import PlanRequest, plan
    from memplan.planner.space import SearchSpace

    none = (Offload.NONE,)
    fewer = plan(PlanRequest(model=catalog_model("llama-3.1-405b"), gpu=catalog_gpu("rtx-4090"), host=HostSpec(),
                             base=JobConfig(job="full", gpus_per_node=gpn, nodes=nodes - 1),
                             space=SearchSpace(offload_optimizer=none, offload_params=none), top_k=1, suggest=False))
    assert fewer.status == "infeasible"


def test_plan_json_carries_its_assumptions_even_when_nothing_fits(runner):
    doc = cli_json(runner, "plan", "llama-3.1-8b", "--gpu", "t4", "--job", "full", "--zero", "0",
                   "--offload-optimizer", "none", "--offload-params", "none", "--top", "1", code=1)
    assert doc["assumptions"] == {"cpu_ram_bytes": 1024 * 2**30, "nvme_bytes": 0, "dtype": "fp16"}


@pytest.mark.parametrize("repo", ["../..", "a/..", "org--x/name", "-x/y", "a/b/c"])
def test_a_malformed_hub_id_is_named_before_any_network_access(runner, repo):
    line = one_line_error(runner, "estimate", f"hf:{repo}")
    assert "not a valid repository id" in line and "reach" not in line


def test_a_symlink_loop_is_reported_as_unreadable_not_as_an_unknown_name(runner, tmp_path, monkeypatch):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    monkeypatch.chdir(tmp_path)
    line = one_line_error(runner, "estimate", "a")
    assert "cannot read a" in line and "unknown model" not in line


def test_the_time_limit_bounds_the_whole_plan_not_each_solve():
    """A request whose deadline has passed solves nothing more: with no plan found yet, that is the
    time-limit error (exit 2), however many solves the objective would have run."""
    import time

    from memplan.catalog.resolve import load_model
    from memplan.catalog.store import catalog_gpu
    from memplan.planner.plan import PlanRequest, plan, seconds_left
    from memplan.planner.space import Objective

    req = PlanRequest(model=load_model("gpt2"), gpu=catalog_gpu("h100"), host=HostSpec(), base=JobConfig(),
                      objective=Objective.MIN_COST, time_limit_s=30.0, deadline=time.monotonic() - 1)
    assert seconds_left(req) < 0
    with pytest.raises(MemplanError, match="time limit"):
        plan(req)
    assert seconds_left(PlanRequest(model=req.model, gpu=req.gpu, host=req.host, base=req.base)) == 30.0


def test_an_infeasible_plan_past_its_time_limit_says_it_was_not_diagnosed():
    import time

    from memplan.catalog.resolve import load_model
    from memplan.catalog.store import catalog_gpu
    from memplan.planner.plan import PlanRequest, PlanResult, explain_infeasible
    from memplan.planner.space import Objective

    req = PlanRequest(model=load_model("gpt2"), gpu=catalog_gpu("h100"), host=HostSpec(), base=JobConfig(),
                      time_limit_s=2.0, deadline=time.monotonic() - 1)
    result = PlanResult(status="infeasible", objective=Objective.THROUGHPUT)
    explain_infeasible(req, result)
    assert "time limit (2 s)" in result.binding and result.suggestions == []


def test_a_pattern_mismatch_without_its_own_sentence_does_not_quote_the_regex():
    """A future field with a bare ``pattern`` still gets words, not the regular expression."""
    from pydantic import BaseModel, Field, ValidationError

    from memplan.catalog.store import format_validation_error

    class Versioned(BaseModel):
        version: str = Field(pattern=r"^\d+\.\d+$")

    with pytest.raises(ValidationError) as err:
        Versioned(version="x")
    text = format_validation_error(err.value)
    assert text == "version: 'x' is not in the form this field takes", text
