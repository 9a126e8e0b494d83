"""The training ILP's GPU bytes for engine fsdp2 against ``estimate``'s, stage by stage: the pipeline's stage outputs
and receive buffers (``memory.pp_stage_buffers``), the gradients accumulated at the in-flight peak and in the cool-down
(``engine_buffers.fsdp2_pipeline_rows``, ``fsdp2_cooldown_rows``) and the no-reshard all-gather kept through the loss
(``engine_fsdp2_backward.kept_at_loss_rows``) are in the ILP's linear model (``planner.train_pipeline``), so the bytes
the solver counts for a layout are at least what the exact re-check then reports.

The ILP's figure for a stage is its own arithmetic (``planner.ilp_fast``: terms in KiB rounded up, the allocator
reserve as a scale on the demand, the CUDA context and margin off the capacity); the exact one is ``estimate``'s
largest phase total of that stage (``components.stage_rows``).
"""

from __future__ import annotations

import pytest

from memplan import load_model
from memplan.arch.build import build_architecture
from memplan.catalog.schema import HostSpec
from memplan.catalog.store import catalog_gpu
from memplan.config import JobConfig
from memplan.memory import components
from memplan.memory.breakdown import TRAIN_PHASES, Tier
from memplan.memory.context import Context
from memplan.planner import train
from memplan.planner.ilp_cooldown import fast_units
from memplan.planner.ilp_fast import _factor_units, cheapest_modes, row_units
from memplan.planner.ilp_model import UNIT
from memplan.planner.ilp_moments import ROWS as MOMENT_ROWS
from memplan.planner.setting import TrainSetting

HOST = HostSpec()
MODEL = "llama-3.2-1b"  # 16 layers
GPU = "h100-sxm-80gb"


def _dims(cfg: JobConfig, modes: list[str]) -> dict[str, tuple]:
    return {"tp": (cfg.tp,), "pp": (cfg.pp,), "placement": ((cfg.zero, cfg.offload_optimizer, cfg.offload_params),),
            "optimizer": (cfg.optimizer,), "quant": (cfg.quant,), "micro_batch": (cfg.micro_batch,),
            "seq_len": (cfg.seq_len,), "recompute": tuple(sorted(set(modes)))}


BLOCK_ROWS = ("activations/layers", "activations/recompute_workspace", "activations/layer_kwargs")
"""``estimate``'s rows that the ILP's per-layer recompute block stands for."""

MARGIN = 32 * 2**20
"""How far the ILP may count above ``estimate`` here: its KiB rounding per term, and under the paper's layout with the
interleaved schedule the receive buffers the saved activations already hold (their count depends on the recompute
modes, so the ILP keeps them all: ``train_pipeline._stage_buffer_rows``; 4-6 buffers of 4 MiB in these cases)."""


def ilp_and_exact(cfg: JobConfig, modes: list[str]) -> list[tuple[int, str, int, int, int, int]]:
    """Per stage and phase: (stage, phase, the ILP's bytes, ``estimate``'s bytes, the same two without the per-layer
    block's rows) of ``cfg`` with per-layer ``modes``.

    The exact figure of a phase is its allocated bytes (rows outside ``runtime/``) scaled by the allocator reserve, plus
    the fixed runtime rows (CUDA context, NCCL's buffers): the reserve row itself is sized by the step's peak phase."""
    spec, gpu = load_model(MODEL), catalog_gpu(GPU)
    arch = build_architecture(spec)
    global_batch = cfg.micro_batch * cfg.grad_accum * cfg.dp
    setting = TrainSetting(arch=arch, gpu=gpu, host=HOST, base=cfg, global_batch=global_batch)
    problem, _ = train.build_problem(setting, _dims(cfg, modes), "min_seconds")
    context, pct = train.runtime_terms(setting)
    ctx = Context(arch, train.config_for(cfg, {}, global_batch=global_batch, modes=modes), gpu, HOST)
    key = (cfg.tp, cfg.pp, cfg.micro_batch, cfg.seq_len)

    def scaled(units: int) -> int:
        return int(units * UNIT * (1 + pct / 100)) + context

    inner = BLOCK_ROWS + (MOMENT_ROWS if problem.moments else ())  # the moment rows hold the in-flight ends too
    chosen = [(lb, modes if i == 0 else cheapest_modes(lb)) for i, lb in enumerate(problem.blocks)]
    out = []
    for s in range(cfg.pp):
        rows, _ = components.stage_rows(ctx.at_stage(s))
        for ph in TRAIN_PHASES:
            rest = _factor_units(problem, s, ph.value) + fast_units(problem, problem.layers, modes, cfg.pp, s,
                                                                    ph.value, key)
            alive = [r for r in rows if r.tier is Tier.GPU and (r.phases is None or ph in r.phases)]
            fixed = sum(r.bytes for r in alive if r.component.startswith("runtime/")
                        and r.component != "runtime/allocator_reserve")
            allocated = sum(r.bytes for r in alive if not r.component.startswith("runtime/"))
            outside = sum(r.bytes for r in alive if not r.component.startswith("runtime/") and r.component
                          not in inner)
            out.append((s, ph.value, scaled(row_units(problem, chosen, cfg.pp, s, ph.value, key)),
                        int(allocated * (1 + pct / 100)) + fixed, scaled(rest), int(outside * (1 + pct / 100)) + fixed))
    return out


def _fsdp2(**kw) -> JobConfig:
    base = {"job": "pretrain", "engine": "fsdp2", "micro_batch": 1, "recompute": "none"}
    return JobConfig(**{**base, **kw})


CASES = {
    # torch pipelining's default: stage outputs and receive buffers kept; 16 layers over pp 3 (uneven stages)
    "1f1b-uneven-buffers": (_fsdp2(gpus_per_node=6, pp=3, grad_accum=8, seq_len=2048), "none"),
    # the base asks for full recompute of every layer, but a plan carries a per-layer map: no input counted as saved
    "1f1b-full-base": (_fsdp2(gpus_per_node=6, pp=3, grad_accum=8, seq_len=2048, recompute="full"), "full"),
    # interleaved, v = 2, m = 8: the at-peak gradients of the steady phase
    "interleaved-at-peak": (_fsdp2(gpus_per_node=8, pp=4, grad_accum=8, seq_len=256,
                                   perf={"virtual_stages": 2}), "none"),
    # interleaved, v = 4, m = 4, short sequences: the cool-down's gradients outweigh what its backwards free
    "interleaved-cooldown": (_fsdp2(gpus_per_node=8, pp=4, grad_accum=4, seq_len=256,
                                    perf={"virtual_stages": 4}), "none"),
    "interleaved-cooldown-mixed": (_fsdp2(gpus_per_node=8, pp=4, grad_accum=4, seq_len=256,
                                          perf={"virtual_stages": 4}), "none,full"),
    # interleaved with uneven chunks (16 layers, pp 2, v 3: 8 layers a stage in chunks of 3, 3, 2), paper layout
    "interleaved-uneven-paper": (_fsdp2(gpus_per_node=4, pp=2, grad_accum=12, seq_len=1024,
                                        activation_accounting="paper", perf={"virtual_stages": 3}), "full"),
    # Llama 3's FSDP: units kept gathered, pipeline outputs deallocated; m = 16 grows the at-peak gradients
    "no-reshard-pp": (_fsdp2(gpus_per_node=8, pp=2, grad_accum=16, seq_len=512,
                             engine_config={"reshard_after_forward": False, "deallocate_pipeline_outputs": True}),
                      "selective"),
    # named torch schedules (engine_config.pp_schedule): every chunk's gradients at the peak, no cool-down row
    "named-interleaved-zb": (_fsdp2(gpus_per_node=8, pp=4, grad_accum=8, seq_len=256, perf={"virtual_stages": 2},
                                    engine_config={"pp_schedule": "InterleavedZeroBubble"}), "none"),
    "named-looped-bfs": (_fsdp2(gpus_per_node=8, pp=4, grad_accum=4, seq_len=256, perf={"virtual_stages": 4},
                                engine_config={"pp_schedule": "LoopedBFS"}), "none"),
    # no pipeline: the last all-gather output kept through the loss
    "no-reshard-kept-at-loss": (_fsdp2(gpus_per_node=8, seq_len=128, engine_config={"reshard_after_forward": False}),
                                "none"),
}

PER_CHUNK = {
    # V schedules: rank s holds stages s and 7 − s (rank 0 both ends), the zero-bubble I-to-W bytes
    "zbv": (_fsdp2(gpus_per_node=8, pp=4, grad_accum=8, seq_len=1024, engine_config={"pp_schedule": "ZBVZeroBubble"},
                   perf={"virtual_stages": 2}), "none,full"),
    "dualpipev": (_fsdp2(gpus_per_node=8, pp=4, grad_accum=8, seq_len=1024, engine_config={"pp_schedule": "DualPipeV"},
                         perf={"virtual_stages": 2}), "none,full"),
    # torch's interleaved schedules, uneven stages (16 layers over pp 3, two chunks each)
    "interleaved1f1b-uneven": (_fsdp2(gpus_per_node=6, pp=3, grad_accum=6, seq_len=1024,
                                      engine_config={"pp_schedule": "Interleaved1F1B"}, perf={"virtual_stages": 2}),
                               "none"),
    "interleaved-zero-bubble": (_fsdp2(gpus_per_node=4, pp=2, grad_accum=4, seq_len=1024,
                                       engine_config={"pp_schedule": "InterleavedZeroBubble"},
                                       perf={"virtual_stages": 2}), "none,full"),
    # Megatron's interleaved schedule, uneven chunks (16 layers over pp 3, v 3: chunks of 2, 2, 1 and 2, 2, 2 layers)
    "megatron-interleaved-uneven": (JobConfig(job="pretrain", engine="megatron", gpus_per_node=6, pp=3, grad_accum=6,
                                              seq_len=1024, micro_batch=1, recompute="none",
                                              perf={"virtual_stages": 3}), "none,full"),
}
ROUNDING = 2**20
"""The ILP's KiB rounding, per term (a few dozen terms a row) and of the allocator reserve's scale."""


@pytest.mark.parametrize("case", list(CASES))
def test_ilp_counts_at_least_what_estimate_reports(case: str) -> None:
    """Each stage's peak (its largest phase) in full; and every phase outside the per-layer block's rows (and the
    in-flight rows the moment rows hold, ``planner.ilp_moments``)."""
    cfg, mode = CASES[case]
    modes = (mode.split(",") * 16)[:16]  # "a,b": alternating per layer
    got = ilp_and_exact(cfg, modes)
    for s in range(cfg.pp):
        ilp, exact = (max(row[i] for row in got if row[0] == s) for i in (2, 3))
        assert ilp >= exact - 1, f"{case}: stage {s}: the ILP counts {ilp:,} bytes at its peak, estimate {exact:,}"
        assert ilp - exact <= MARGIN, f"{case}: stage {s}: the ILP over by {ilp - exact:,} bytes"
    for s, phase, _, _, ilp, exact in got:
        assert ilp >= exact - 1, f"{case}: stage {s}, {phase}: the ILP counts {ilp:,} bytes, estimate {exact:,}"
        assert ilp - exact <= MARGIN, f"{case}: stage {s}, {phase}: the ILP over by {ilp - exact:,} bytes"


@pytest.mark.parametrize("case", list(PER_CHUNK))
def test_ilp_per_chunk_rows_equal_estimate(case: str) -> None:
    """Interleaved and named pipelining schedules: the ILP writes one row per moment of the per-chunk in-flight counts
    (``planner.ilp_moments``), with the layers placed as the schedule places them (the V) and the I-to-W bytes, so
    its bytes equal ``estimate``'s in every stage and phase, up to its KiB rounding."""
    cfg, mode = PER_CHUNK[case]
    modes = (mode.split(",") * 16)[:16]
    for s, phase, ilp, exact, _, _ in ilp_and_exact(cfg, modes):
        assert exact - 1 <= ilp <= exact + ROUNDING, f"{case}: stage {s}, {phase}: the ILP {ilp:,} bytes, estimate {exact:,}"


@pytest.mark.parametrize("case", ["megatron-interleaved-uneven", "zbv", "interleaved-zero-bubble"])  # 8k: activations lead
def test_least_memory_plan_meets_every_moment(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The MIP starts with a few moment rows and adds the ones a solution exceeds (``ilp_moments.cut``): under the
    least-memory objective the peak it reports is the largest row over every moment of every stage and phase, as the
    ILP's own arithmetic counts them with the chosen modes (``ilp_fast.row_units``), not only over the rows it holds.
    Here the MIP starts from each stage's first moment alone (one forward in flight), so every other row is cut in."""
    from memplan.planner import ilp_moments
    from memplan.planner.ilp import IlpBuilder

    monkeypatch.setattr(ilp_moments, "_seeds", lambda *_: [0])

    cfg = PER_CHUNK[case][0].model_copy(update={"seq_len": 8192})
    spec, gpu = load_model(MODEL), catalog_gpu(GPU)
    arch = build_architecture(spec)
    setting = TrainSetting(arch=arch, gpu=gpu, host=HOST, base=cfg, global_batch=cfg.grad_accum * cfg.dp)
    problem, _ = train.build_problem(setting, _dims(cfg, ["none", "full"]), "min_gpu_bytes")
    sol = IlpBuilder(problem).solve()
    key = (cfg.tp, cfg.pp, cfg.micro_batch, cfg.seq_len)
    chosen = [(lb, sol.block_modes[lb.name]) for lb in problem.blocks]
    rows = [row_units(problem, chosen, cfg.pp, s, ph.value, key) for s in range(cfg.pp) for ph in TRAIN_PHASES]
    assert sol.status == "optimal" and sol.objective == pytest.approx(max(rows), abs=1)


def test_v_schedule_layers_sit_in_a_v():
    """Under a V schedule the ILP's stage of each layer is its rank in the V (torch's ``generate_stage_to_rank_mapping``
    style "v": rank s runs stages s and 2p − 1 − s): along the layers the ranks go 0, 1, 2, 3 and back to 0, so rank 0
    holds the first and the last layers (not the contiguous stages the ILP placed them on before)."""
    cfg, _ = PER_CHUNK["zbv"]
    spec, gpu = load_model(MODEL), catalog_gpu(GPU)
    arch = build_architecture(spec)
    setting = TrainSetting(arch=arch, gpu=gpu, host=HOST, base=cfg, global_batch=cfg.grad_accum * cfg.dp)
    problem, _ = train.build_problem(setting, _dims(cfg, ["none"]), "min_seconds")
    ranks = problem.stage_map[4]
    runs = [r for i, r in enumerate(ranks) if i == 0 or r != ranks[i - 1]]
    assert runs == [0, 1, 2, 3, 2, 1, 0]


def test_a_gpu_the_buffers_fill_gets_a_plan_that_recomputes():
    """torch pipelining's receive and stage-output buffers on a GPU sized between "every layer keeps its activations"
    (over by half those buffers) and "every layer recomputes" (fits): without the buffers in its model the ILP chose no
    recompute, the re-check rejected it and cut the only layout, and plan said infeasible; with them it recomputes
    some layers and the plan fits."""
    from test_planner import gpu_with

    from memplan.config import Offload, Recompute
    from memplan.estimator import estimate
    from memplan.planner.plan import PlanRequest, plan
    from memplan.planner.space import SearchSpace

    spec = load_model(MODEL)
    # torchtitan's step(return_outputs=False): the last stage's returned logits (memory.pp_outputs) recompute cannot free
    base = _fsdp2(gpus_per_node=6, pp=3, grad_accum=8, seq_len=2048, engine_config={"pp_return_outputs": False})
    roomy = gpu_with(40_000)
    keep = estimate(spec, roomy, base)
    buffers = sum(r.bytes for r in keep.rows if r.component.startswith("activations/pp_"))
    assert buffers > 0
    gpu = gpu_with((keep.peak(Tier.GPU) - buffers // 2) // 2**20)
    assert not estimate(spec, gpu, base).fits
    assert estimate(spec, gpu, base.model_copy(update={"recompute": Recompute.FULL})).fits
    space = SearchSpace(tp=(1,), pp=(3,), micro_batch=(1,), zero=(0,), offload_optimizer=(Offload.NONE,),
                        offload_params=(Offload.NONE,), recompute=("none", "full"), global_batch=16)
    result = plan(PlanRequest(model=spec, gpu=gpu, host=HOST, base=base, space=space, top_k=1, suggest=False))
    assert result.best is not None, result.status
    assert result.best.estimate.fits
    assert "full" in {m.value for m in result.best.config.recompute_map}
