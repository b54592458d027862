"""`pipeline teach`: run one teacher over the views of a split and store its top-k logits."""

from pathlib import Path

import click

from pipeline.defaults import DEFAULT_TEMPERATURES, DEFAULT_VALUES, STORE_ROOT
from pipeline.errors import UserError
from stages import options

TEMPERATURES = (0.1, 100.0)  # the range of a KD temperature: beyond it exp(z / tau) leaves what f16 offsets hold


def _temperatures(value) -> list[float]:
    """'1,2,4' or [1, 2, 4] (params.yaml) -> [1.0, 2.0, 4.0], each in TEMPERATURES."""
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    low, high = TEMPERATURES
    try:
        taus = [float(t) for t in items if str(t).strip()]
    except (TypeError, ValueError):
        taus = None
    if taus is None or not all(low <= t <= high for t in taus):  # NaN fails every comparison
        raise UserError(f"--temperatures must be numbers in [{low:g}, {high:g}] like 1,2,4, got {value!r}")
    return taus


def _store_root(ctx, param, value):
    """--store-root checked where it is parsed (pipeline.store.check_root): a folder, or a URL naming a bucket."""
    from pipeline.store import check_root

    return check_root(value)


@click.command(context_settings={"show_default": True})
@click.option("--teacher", required=True, help="Teacher spec: a name under manifests/teachers/ or a YAML path.")
@options.shards
@click.option("--split", default="train", help="Split of the shards to run over.")
@click.option("--plan", "plan", type=options.PlanParam(), default=None,
              help="View plan: a YAML file of ViewPlan fields (pipeline/data/views.py; those left out take "
                   "ViewPlan's defaults); in params.yaml a mapping under `teach: plan:`. Default: ViewPlan's defaults.")
@click.option("--num-views", default=4, type=click.IntRange(1, 1000),
              help="Views per sample (V; the paper's ImageNet runs store 50).")
@click.option("--k", default=10, type=click.IntRange(min=1), help="Top-k logits kept per view.")
@click.option("--batch-size", default=64, type=click.IntRange(min=1), help="Views per teacher forward.")
@options.device
@click.option("--amp", default="none", type=click.Choice(["none", "bf16", "fp16"]), help="Autocast dtype.")
@click.option("--channels-last/--no-channels-last", default=False, help="channels_last memory format (GPU CNNs).")
@options.workers
@click.option("--store-root", default=STORE_ROOT, callback=_store_root,
              help="Directory or fsspec URL (s3://bucket/prefix, gs://..., a shared path) holding the stores; "
                   "each lives at {root}/{teacher}-{key}.zarr.")
@click.option("--out", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for the pointer file {out}/{teacher}.json that names the store (what DVC tracks).")
@click.option("--weights", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Weights file (.safetensors or a plain checkpoint) overriding the spec's weights.")
@click.option("--values", default=DEFAULT_VALUES,
              help="Value encoding: logp-sN (log-probabilities in int16 steps of 1/N, N = 16..1024) or f16 "
                   "(plain f16 log-probabilities, ~2.5 B/view more at K=10).")
@click.option("--temperatures", default=",".join(f"{t:g}" for t in DEFAULT_TEMPERATURES),
              help="Comma-separated KD temperatures tau whose logsumexp(z / tau) over all classes is stored "
                   "(2 bytes per view each): the student's KD is the exact top-k + rest KL at these tau only.")
@click.option("--shard-rows", default=256, type=click.IntRange(1, 65536),
              help="Samples per store shard: the unit of writing, resuming and splitting across ranks "
                   "(rounded up to a whole number of batches).")
@click.option("--verify-shards", is_flag=True,
              help="Re-hash every shard file in full, not trusting the hash cache (which trusts a file whose size and "
                   "mtime are unchanged: it guards against accidents, not against an edit that keeps both).")
@options.threads
@options.quiet
def command(teacher, shards, split, plan, num_views, k, batch_size, device, amp, channels_last, workers, store_root,
            out, weights, values, temperatures, shard_rows, verify_shards, threads, quiet):
    """Run TEACHER once over every (sample, view) of a split; keep its top-k logits in a zarr store.

    Resumable: rerun the same command after an interruption. A finished store is reported as up to
    date without running the teacher. Under torchrun, ranks share the work.
    """
    from pipeline.data.views import ViewPlan
    from pipeline.runtime import set_threads
    from pipeline.teach import teach

    set_threads(threads)

    teach(teacher=teacher, shards=shards, split=split, plan=plan or ViewPlan(), num_views=num_views, k=k,
          batch_size=batch_size, device=device, amp=amp, workers=workers, store_root=store_root, out=out,
          weights=weights, values=values, shard_rows=shard_rows, channels_last=channels_last,
          temperatures=_temperatures(temperatures), verify_shards=verify_shards, quiet=quiet,
          log=click.echo)
