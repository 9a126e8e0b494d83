"""``plan`` takes estimate's option names (issue 11; closing note 3, "Noticed but left alone"): every option of
``memplan estimate`` is either an option of ``memplan plan`` too, or refused by plan with one sentence that names
it and says what plan does instead (``memplan.options.PLAN_DECIDES``), never click's bare "no such option".

The options come from the typer app itself, so a new estimate option is covered without an edit here.
"""

from __future__ import annotations

from pathlib import Path

import click
import pytest
import typer

from memplan.cli.app import app
from memplan.options import OPTS, PLAN_DECIDES
from tests.conftest import cli_json, run_cli

ROOT = Path(__file__).resolve().parents[1]
VALUES = {"--quant-map": "0-11=int8", "--offload-layers": "0-5", "--recompute-layers": "2",
          "--optimizer-gpu-layers": "2", "--grad-accum": "4"}
"""A valid value for each refused option that takes one (flags need none)."""


def command(name: str) -> click.Command:
    group = typer.main.get_command(app)
    return group.get_command(click.Context(group), name)  # type: ignore[attr-defined]


def visible(name: str) -> dict[str, click.Parameter]:
    """A command's options by their first flag, those ``--help`` shows."""
    return {p.opts[0]: p for p in command(name).params
            if p.param_type_name == "option" and not getattr(p, "hidden", False)}


ESTIMATE, PLAN = visible("estimate"), visible("plan")
ONLY_ESTIMATE = sorted(set(ESTIMATE) - set(PLAN))


def test_plan_takes_the_bitsandbytes_options_from_the_same_declarations():
    for name in ("bnb_version", "bnb_integration"):
        flag = OPTS[name].flags[0]
        assert flag in PLAN and flag in ESTIMATE
        assert PLAN[flag].help.startswith(OPTS[name].help)


@pytest.mark.parametrize("flag", ONLY_ESTIMATE)
def test_an_estimate_option_plan_lacks_is_refused_with_its_reason(flag, runner):
    names = [n for n, o in OPTS.items() if o.flags[0].split("/")[0] == flag]
    assert names and names[0] in PLAN_DECIDES, f"{flag}: estimate takes it, plan neither takes nor refuses it"
    param = ESTIMATE[flag]
    given = [flag] if getattr(param, "is_flag", False) else [flag, VALUES[flag]]
    result = run_cli(runner, "plan", "gpt2", "--gpu", "l4", *given, code=2)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert f"plan does not take {flag}:" in lines[0] and PLAN_DECIDES[names[0]] in lines[0], lines[0]
    assert "no such option" not in lines[0].lower()


def test_refused_options_stay_out_of_plan_help(runner):
    text = run_cli(runner, "plan", "--help").stdout
    for name in PLAN_DECIDES:
        assert OPTS[name].flags[0].split("/")[0] + " " not in text.replace("\n", " ")


def test_refusals_are_options_estimate_has():
    """A refusal for an option estimate lacks would refuse nothing anyone could carry over."""
    for name in PLAN_DECIDES:
        assert OPTS[name].flags[0].split("/")[0] in ESTIMATE, name


def components(doc: dict) -> dict[str, int]:
    return doc["best"]["memory"]["gpu"]["components"]


def test_plan_bnb_version_follows_the_release_rule(runner):
    """bitsandbytes up to 0.43.1 keeps each 4-bit matmul's input on ``ctx`` past backward (the
    ``activations/bnb_retained_inputs`` row); from 0.43.2 it keeps none. QLoRA's default format (nf4-dq) is a
    4-bit bitsandbytes format, so --quant need not be given (gpt2's Conv1D layers are not bitsandbytes linears)."""
    args = ("plan", "qwen2.5-0.5b", "--gpu", "l4", "--job", "qlora", "--batch", "1", "--top", "1", "--recompute", "none")
    old = components(cli_json(runner, *args, "--bnb-version", "0.42.0"))
    new = components(cli_json(runner, *args, "--bnb-version", "0.44.0"))
    assert old.get("activations/bnb_retained_inputs", 0) > 0
    assert "activations/bnb_retained_inputs" not in new


def test_plan_bnb_integration_lightning_quantizes_the_output_layer(runner):
    """Lightning's BitsandbytesPrecision replaces every nn.Linear, lm_head included: the 16-bit weights
    shrink by the output layer (gpt2 ties lm_head to the embeddings, so a model with its own head is used)."""
    args = ("plan", "qwen2.5-0.5b", "--gpu", "l4", "--job", "qlora", "--batch", "1", "--top", "1")
    hf = components(cli_json(runner, *args))
    lit = components(cli_json(runner, *args, "--bnb-integration", "lightning"))
    assert hf != lit


def test_plan_bnb_version_on_a_16_bit_job_is_one_sentence(runner):
    result = run_cli(runner, "plan", "gpt2", "--gpu", "l4", "--job", "lora", "--quant", "none", "--bnb-version",
                     "0.42.0", code=2)
    assert len(result.stderr.strip().splitlines()) == 1 and "bnb" in result.stderr, result.stderr


def test_check_takes_the_same_names_in_a_recipe(runner):
    """A recipe's ``fixed`` block (and ``check --set``) takes the JobConfig field names the options set: the
    shipped QLoRA recipe, planned, keeps bitsandbytes 0.42.0's retained inputs."""
    recipe = str(ROOT / "recipes" / "llama-3.1-8b-qlora-rtx4090.yaml")
    doc = cli_json(runner, "check", recipe, "--set", "fixed.bnb_version=0.42.0")
    rows = doc["recipes"][0]["estimate"]["memory"]["gpu"]["components"]
    assert rows.get("activations/bnb_retained_inputs", 0) > 0


def test_a_planned_recipe_refuses_what_the_plan_decides(runner):
    """A planned recipe's ``fixed.recompute_layers`` was dropped by the planner (each layer's recompute mode is
    its choice): now refused, as the command line refuses --recompute-layers."""
    recipe = str(ROOT / "recipes" / "llama-3.1-8b-qlora-rtx4090.yaml")
    result = run_cli(runner, "check", recipe, "--set", "fixed.recompute_layers=2", code=2)
    assert "recompute_layers: the plan chooses" in result.stderr, result.stderr


def test_a_fixed_optimizer_split_is_kept_only_where_the_plan_does_not_choose_it():
    """``optimizer_gpu_layers`` fixes how many layers keep their optimizer states on the GPU; the plan's per-layer
    placement chooses exactly that, so with it on the field is refused, and with it off the split is kept."""
    import memplan
    from memplan.errors import MemplanError

    args = dict(job="full", zero=3, offload_optimizer="cpu", micro_batch=(1,), recompute="full", top=1,
                optimizer_gpu_layers=2)
    space = {"zero": (3,), "offload_optimizer": ("cpu",), "offload_params": ("none",)}
    with pytest.raises(MemplanError, match="optimizer_gpu_layers: the plan chooses"):
        memplan.plan("llama-3.2-1b", "rtx-4060-ti-16gb", space=space, **args)
    kept = memplan.plan("llama-3.2-1b", "rtx-4060-ti-16gb", space={**space, "per_layer_offload": False}, **args)
    assert kept.best is not None and kept.best.config.optimizer_gpu_layers == 2


@pytest.mark.parametrize("search", [{"per_layer_quant": True}, {"objective": "max-quality"}])
def test_a_fixed_quant_map_is_refused_where_the_plan_picks_each_layers_format(search):
    import memplan
    from memplan.errors import MemplanError

    objective = search.pop("objective", "throughput")
    space = {"quant": ("int8", "nf4"), **search}
    with pytest.raises(MemplanError, match="quant_map: the plan chooses"):
        memplan.plan("gpt2", "l4", job="infer", quant_map=("int8",) * 12, space=space, objective=objective, top=1)
    kept = memplan.plan("gpt2", "l4", job="infer", quant_map=("int8",) * 12, space={"quant": ("int8",)}, top=1)
    assert kept.best is not None and kept.best.config.quant_map == ("int8",) * 12
