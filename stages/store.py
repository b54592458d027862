"""`pipeline store ...`: look inside teacher logit stores."""

import json
from pathlib import Path

import click

from pipeline.defaults import STORE_ROOT
from stages import options


@click.group()
def group():
    """Inspect and audit teacher logit stores written by `pipeline teach`."""


@group.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.option("--verify", is_flag=True, help="Re-hash every array's file of every finished shard against the checksum "
                                              "recorded when it was written; exit 2 naming the shard if any is missing or "
                                              "changed (`pipeline teach` recomputes those).")
def inspect(path, as_json, verify):
    """Provenance, shape, bytes per stored view, top-k mass, teacher top-1 (overall and per class, on the
    stored views) and completeness of PATH.

    PATH is a store ({root}/{teacher}-{key}.zarr) or a pointer file {out}/{teacher}.json.
    """
    from pipeline.inspection import summarize
    from pipeline.store import open_pointer, open_store

    if path.suffix != ".json" and path.is_dir() and not (path / "zarr.json").is_file():
        path = _the_store_under(path)
    store = open_pointer(path) if path.suffix == ".json" else open_store(path, require_complete=False)
    store.check_intact(full=verify)
    info = summarize(store)
    if verify:
        info["verified_shards"] = int(store.done_mask().sum())
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        if key in FRACTIONS:
            value = f"{100 * value:.2f}%"
        elif key in PERCENTS and value is not None:
            value = f"{value:.2f}%"
        elif key == "teacher_top1_per_class":
            value = _lowest_classes(value)
        elif isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
        elif isinstance(value, list) and key == "problems":
            value = "; ".join(value)
        click.echo(f"{key:>24}: {value}")


@group.command()
@click.argument("path", type=click.Path(path_type=Path))
@options.shards
@click.option("--samples", default="64", show_default=True, type=click.UNPROCESSED, callback=lambda c, p, v: _samples(v),
              help="Distinct random stored (sample, view) pairs to re-render and re-run (drawn without replacement), "
                   "or `all`: every view of the finished shards.")
@click.option("--teacher", default=None,
              help="Teacher spec (name or YAML) when the store's provenance spec cannot be loaded here "
                   "(e.g. a fine-tuned teacher: outputs/teachers/NAME/teacher.yaml). Default: the provenance's.")
@click.option("--weights", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Teacher weights file overriding the spec's; must match the store's weights digest.")
@options.device
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1), help="Views per forward.")
@click.option("--seed", default=0, show_default=True, help="Seed of the sample drawn.")
@click.option("--max-kl", default=None, type=options.Finite(min=0),
              help="Tolerance on the largest KL(stored || fresh) over the top-k + rest buckets, nats [default: 0.01].")
@click.option("--max-lse-diff", default=None, type=options.Finite(min=0),
              help="Tolerance on the largest |logsumexp| difference [default: 0.05].")
def audit(path, shards, samples, teacher, weights, device, batch_size, seed, max_kl, max_lse_diff):
    """Re-render SAMPLES stored views of PATH from their stored params, re-run the teacher, compare.

    Prints one JSON object (top-1 agreement, mean/max KL, lse difference, whether this environment
    re-derives the stored view params); exits 2 when a figure is beyond its tolerance.
    """
    from pipeline.audit import MAX_KL, MAX_LSE_DIFF, audit_store
    from pipeline.errors import UserError
    from pipeline.store import open_pointer, open_store

    store = open_pointer(path) if path.suffix == ".json" else open_store(path, require_complete=False)
    if teacher is None:  # the store's own spec: it may name a model, never grant trust
        from pipeline.teachers import artifact_spec

        teacher = artifact_spec(store.provenance["teacher"], f"store {store.path}")
    result = audit_store(store, shards, teacher=teacher, weights=weights, samples=samples, batch_size=batch_size,
                         device=device, seed=seed, max_kl=MAX_KL if max_kl is None else max_kl,
                         max_lse_diff=MAX_LSE_DIFF if max_lse_diff is None else max_lse_diff)
    click.echo(json.dumps(result, indent=2))
    if not result["ok"]:
        raise UserError(f"store {store.path} fails the replay audit (max KL {result['max_kl']}, max lse difference "
                        f"{result['max_lse_diff']}, params re-derived: {result['params_rederived']}): its views or "
                        "teacher are not what this environment reproduces; re-run `pipeline teach` here")


@group.command()
@click.argument("path", type=click.Path(path_type=Path))
@options.shards
@click.option("--n", default=32, show_default=True, type=click.IntRange(min=1), help="Views in the grid.")
@click.option("--worst", is_flag=True,
              help="Show the views where the label's stored probability is lowest: first those whose label is not "
                   "in the stored top-k, by its upper bound min(rest mass, smallest top-k probability), lowest "
                   "first; then the rest by the label's stored probability. Default: a fixed seeded sample.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="PNG to write.")
def show(path, shards, n, worst, out):
    """A grid of N stored views of PATH, replayed from the stored params at the teacher's input size, each
    captioned with the label and the teacher's stored top-3; a red frame where the teacher's top-1 is wrong.

    PATH is a store, a folder holding one, or a pointer file {out}/{teacher}.json.
    """
    from pipeline.gallery import show as draw
    from pipeline.store import open_pointer, open_store

    if path.suffix != ".json" and path.is_dir() and not (path / "zarr.json").is_file():
        path = _the_store_under(path)
    store = open_pointer(path) if path.suffix == ".json" else open_store(path, require_complete=False)
    shown = draw(store, shards, out, n=n, worst=worst)
    click.echo(f"wrote {out}: {len(shown['views'])} views, the teacher's top-1 wrong on {shown['wrong']}")


def _samples(value):
    """--samples: a count >= 1 or `all`."""
    from pipeline.errors import UserError

    if str(value).strip().lower() == "all":
        return "all"
    try:
        count = int(str(value))
    except ValueError:
        count = 0
    if count < 1:
        raise UserError(f"--samples {value}: give a number of views >= 1, or `all`")
    return count


# summarize() gives this as a fraction (JSON); the text shows it as a percent, like the top-1 figures.
FRACTIONS = ("mean_topk_mass",)
PERCENTS = ("teacher_top1_views", "teacher_top1_clean_val")


def _lowest_classes(per_class: dict, show: int = 10) -> str:
    """The classes whose views the teacher gets least right first (all of them with --json)."""
    lowest = sorted(per_class.items(), key=lambda item: (item[1], item[0]))
    text = ", ".join(f"class {c} {top1:.2f}%" for c, top1 in lowest[:show])
    return text + (f" (lowest {show} of {len(lowest)} classes; --json for all)" if len(lowest) > show else "")


def _the_store_under(folder: Path) -> Path:
    """A folder holding exactly one store stands for it (e.g. a --store-root); otherwise say what to pass."""
    from pipeline.errors import UserError
    from pipeline.inspection import find_stores

    stores = find_stores(folder)
    if len(stores) == 1:
        click.echo(f"{folder} holds one store: {stores[0]}", err=True)
        return stores[0]
    if not stores:
        raise UserError(f"{folder} holds no teacher logit store; run `pipeline teach` to make one")
    raise UserError(f"{folder} holds {len(stores)} stores; pass one of them (`pipeline store list {folder}` "
                    "lists them)")


@group.command("list")
@click.argument("root", default=STORE_ROOT)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
def list_stores(root, as_json):
    """Every store under ROOT, a folder or an fsspec URL like `teach --store-root` (s3://bucket/prefix) [default:
    outputs/stores, where dvc.yaml puts them]: teacher, dataset, plan hash, K, V, samples, complete shards, size."""
    from pipeline.inspection import find_stores, list_row
    from pipeline.store import open_store

    rows = [list_row(open_store(path, require_complete=False)) for path in find_stores(root)]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(f"no teacher logit store under {root}", err=True)
        return
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    for line in [dict(zip(columns, columns)), *rows]:
        click.echo("  ".join(str(line[c]).ljust(widths[c]) for c in columns).rstrip())
