"""Presenting a plan: the best plan as ``estimate`` shows it, ranked alternatives, suggestions."""

from __future__ import annotations

from typing import Any

from memplan.memory.kv_cache import kv_label
from memplan.planner.plan import Candidate, PlanResult
from memplan.report.flags import flag_options, render_flags
from memplan.report.json_out import SCHEMA_VERSION, estimate_dict
from memplan.units import GiB, counted

SERVING_KEYS = ("ttft_s", "tpot_s", "tokens_per_s_replica", "replicas", "concurrent_sequences")
"""Plan extras that describe serving latency/throughput (JSON ``serving``), not per-layer decisions."""


def candidate_dict(c: Candidate) -> dict[str, Any]:
    out = estimate_dict(c.estimate)
    out.update({
        "step_time_s": round(c.step_time_s, 6),
        "tokens_per_s": round(c.tokens_per_s, 3),
        "objective_value": round(c.objective_value, 9),
        "layer_map": c.layer_map,
        "layer_plan": {k: v for k, v in c.extras.items() if k not in SERVING_KEYS},
        **({"serving": {k: c.extras[k] for k in SERVING_KEYS if k in c.extras}}
           if any(k in c.extras for k in SERVING_KEYS) else {}),
    })
    cost = plan_cost(c)
    if cost is not None:
        out["cost"] = cost
    if c.global_batch is not None:
        out["global_batch"] = c.global_batch
        out["global_batch_tokens"] = c.global_batch * c.config.seq_len
    if c.train_budget is not None:
        out["train_budget"] = {k: round(v, 6) for k, v in c.train_budget.items()}
    if c.config.pp > 1:
        from memplan.planner.stages import stage_table

        out["stages"] = stage_table(c.estimate)
    return out


def plan_cost(c: Candidate) -> dict[str, float | None] | None:
    """The plan's price (``report.cost.cost_of``) at its GPU's ``price_per_hour_usd`` (the catalog's, or
    ``--usd-per-hour``): per GPU-hour, per hour of the whole job, per step, per 1M trained or served tokens;
    None when the price is unknown."""
    from memplan.report.cost import cost_of

    price = c.estimate.gpu.price_per_hour_usd
    cost = cost_of(price, c.config, c.step_time_s, c.tokens_per_s)
    if price is None or cost is None:
        return None
    return {"usd_per_gpu_hour": price, "usd_per_hour": cost.usd_per_hour, "usd_per_step": cost.usd_per_step,
            "usd_per_m_trained_tokens": cost.usd_per_m_trained_tokens,
            "usd_per_m_served_tokens": cost.usd_per_m_served_tokens}


def plan_dict(result: PlanResult) -> dict[str, Any]:
    """The plan JSON contract: the estimate contract of the best plan, extended (schema_version 1)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "status": result.status,
        "objective": result.objective.value,
        "solver_status": result.solver_status,
        "best": candidate_dict(result.best) if result.best else None,
        "alternatives": [candidate_dict(c) for c in result.candidates[1:]],
        "binding": result.binding,
        "suggestions": [suggestion_dict(s) for s in result.suggestions],
        "excluded": result.excluded,
        "assumptions": dict(result.assumptions),
    }


CONFIG_WRAP = 52
"""Characters of the ranked alternatives' configuration column per line in a pipe: 80 columns less the rank, the
GPU memory (``1,234.56 GiB``) and tokens/s columns and the gaps between them."""


def suggestion_dict(s: dict[str, Any]) -> dict[str, Any]:
    """A planner suggestion for output: its ``flags`` rendered from its ``changes`` (``report.flags``), so the
    command line shown is the change the re-solve verified."""
    return {"change": s["change"], "flags": render_flags(s["changes"]), **{k: v for k, v in s.items() if k != "change"}}


def suggestion_lines(s: dict[str, Any]) -> str:
    """One suggestion for people, folded to ``PIPE_WIDTH``: the change, its flags (folded between options, never
    inside one), and the verified plan's GPU memory and speed."""
    from memplan.report.table import PIPE_WIDTH, folded

    lines = ["   "]
    for option in flag_options(s["changes"]):
        if len(lines[-1]) > 3 and len(lines[-1]) + 1 + len(option) > PIPE_WIDTH:
            lines.append("   ")
        lines[-1] += " " + option
    fits = f"    fits: {s['gpu_total_bytes'] / GiB:,.2f} GiB per GPU, {s['tokens_per_s']:,.0f} tokens/s"
    return "\n".join([folded(f"- {s['change']}"), *lines, fits])


def _choice(c: Candidate) -> str:
    """The configuration in one line, the engine that runs it last (fields are only ever added at the end: ``check``'s
    JSON carries this line as ``configuration``)."""
    cfg = c.config
    parts = [f"tp={cfg.tp}", f"pp={cfg.pp}", f"dp={cfg.batch_dp}"]
    parts += [f"ep={cfg.ep}"] if cfg.ep > 1 else []
    parts += [f"cp={cfg.cp} ({cfg.cp_comm.value})"] if cfg.cp > 1 else []
    if cfg.job.trains:
        parts += [f"zero={int(cfg.zero)}", f"offload(opt={cfg.offload_optimizer.value}, params={cfg.offload_params.value})",
                  f"micro-batch={cfg.micro_batch}", f"grad-accum={cfg.grad_accum}", f"seq={cfg.seq_len}",
                  f"optimizer={cfg.optimizer.value}"]
    else:
        parts += [f"batch={cfg.micro_batch}", f"context={cfg.infer.context}",
                  f"kv={kv_label(cfg)}"]
    if cfg.quant:
        parts.append(f"quant={cfg.quant}")
    parts.append(f"engine={cfg.effective_engine.value}")
    if cfg.pp > 1 and cfg.engine_config.pp_schedule:  # a named torch.distributed.pipelining schedule
        v = cfg.perf.virtual_stages
        parts.append(f"pp-schedule={cfg.engine_config.pp_schedule}" + (f" (v={v})" if v > 1 else ""))
    return " ".join(parts)


def choice_line(c: Candidate) -> str:
    """The configuration line with its per-layer map, as the ranked alternatives show it (and the CSV's
    ``configuration`` column: the one place a CSV row names the engine memplan chose)."""
    return _choice(c) + (f"; {c.layer_map}" if c.layer_map else "")


def render_plan(result: PlanResult, console: Any) -> None:
    from memplan.report.table import Table, folded, render_estimate

    def say(text: str) -> None:
        console.print(folded(text))

    if result.best is None:
        if result.lean_fits:  # the search missed a configuration the exact estimate accepts (suggest.binding)
            console.print("[red]INFEASIBLE[/red]: the planner found no plan.")
            say(f"Why: {result.binding}.")
        else:
            console.print("[red]INFEASIBLE[/red]: no configuration in the search space fits.")
            if result.binding:
                say(f"Binding constraint: {result.binding}.")
        if result.suggestions:
            console.print("Smallest changes that fit, each verified by a re-solve:")
            for s in result.suggestions:
                console.print(suggestion_lines(s))
        return
    best = result.best
    line = folded(f"Best plan ({result.objective.value}, solver: {result.solver_status}): {_choice(best)}")
    console.print(line.replace("Best plan", "[bold]Best plan[/bold]", 1))
    if best.layer_map:
        say(f"Per-layer: {best.layer_map}")
    if best.config.perf.virtual_stages > 1 and best.config.pp == 1:
        say(f"Interleaving (--virtual-stages {best.config.perf.virtual_stages}) applies to plans with pp > 1; "
            "this plan has pp = 1, so nothing is interleaved.")
    if "deepspeed_ratio" in best.extras:
        say(f"DeepSpeed: zero_optimization.sub_group_size {best.extras['deepspeed_sub_group_size']:,}, "
            f"offload_optimizer.ratio {best.extras['deepspeed_ratio']:.4f} "
            "(keeps at most these layers' states on the GPU).")
    if "weights_sqnr_db" in best.extras:
        sqnr = best.extras["weights_sqnr_db"]
        say("Weight quantization: none (every weight in 16 bits)." if sqnr is None else
            f"Weight quantization: SQNR {sqnr:.2f} dB (relative MSE {best.extras['weights_relative_mse']:.3g}, "
            "Gaussian round-to-nearest proxy).")
    if "tpot_s" in best.extras:
        x = best.extras
        say(f"Serving: TTFT {x['ttft_s'] * 1e3:,.1f} ms, TPOT {x['tpot_s'] * 1e3:,.2f} ms, "
            f"{x['tokens_per_s_replica']:,.0f} tokens/s per replica × {counted(x['replicas'], 'replica')}.")
    say(f"Estimated step time {best.step_time_s:,.3f} s, {best.tokens_per_s:,.0f} tokens/s.")
    cost = plan_cost(best)
    if cost is not None:
        per_m = cost["usd_per_m_trained_tokens"] if best.config.job.trains else cost["usd_per_m_served_tokens"]
        say(f"Cost: ${cost['usd_per_hour']:,.2f} per hour ({counted(best.config.world_size, 'GPU')} at "
            f"${cost['usd_per_gpu_hour']:,.2f}), ${cost['usd_per_step']:,.4f} per step"
            + (f", ${per_m:,.4f} per 1M {'trained' if best.config.job.trains else 'served'} tokens."
               if per_m is not None else "."))
    render_estimate(best.estimate, console)
    if len(result.candidates) > 1:
        table = Table(title="Ranked alternatives", title_justify="left")
        for col in ("#", "configuration", "GPU memory", "tokens/s"):
            table.add_column(col, justify="right" if col != "configuration" else "left",
                             wrap=CONFIG_WRAP if col == "configuration" else None)
        for i, c in enumerate(result.candidates, 1):
            from memplan.memory.breakdown import Tier

            table.add_row(str(i), choice_line(c),
                          f"{c.estimate.peak(Tier.GPU) / GiB:,.2f} GiB", f"{c.tokens_per_s:,.0f}")
        console.print(table)
