"""``memplan estimate``: the memory of one configuration, per component and device, and whether it fits."""

from __future__ import annotations

from memplan.cli.convert import host, model_and_config
from memplan.cli.core import Command, command_app, handled
from memplan.cli.opts import Model, Opts, options

app = command_app()


@app.command(cls=Command)
@handled
@options("hardware", "job", "quant_integration", "parallelism", "memory", "finetune", "inference", "engine_knobs",
         "serving", "output", "virtual_stages",
         exclude=("global_batch", "global_batch_tokens", "per_layer_offload", "per_layer_quant", "shard_group"))
def estimate(model: Model, opts: Opts) -> None:
    """Memory of one fixed configuration, per component and per device, and whether it fits.

    Exit code 0 whether or not the job fits: the verdict is in the output (FITS / DOES NOT FIT, "fits" in
    JSON). Use 'memplan check' for an exit code that gates on fitting."""
    from memplan.estimator import estimate as run_estimate
    from memplan.report import emit

    emit.check_format(opts.fmt)
    emit.check_plot(opts.plot)
    spec, cfg = model_and_config(model, opts)
    est = run_estimate(spec, opts.gpu, cfg, host=host(opts))
    extra = {}
    if opts.max_context or opts.max_batch:
        from memplan.search import largest_fitting

        if opts.max_context:
            extra["max_context"] = largest_fitting(est, "context")
        if opts.max_batch:
            extra["max_batch"] = largest_fitting(est, "micro_batch")
    emit.estimate(est, opts.fmt, extra)
    emit.plot(est, opts.plot)
