"""`pipeline store ...`: look inside teacher logit stores."""

import json
from pathlib import Path

import click


@click.group()
def group():
    """Inspect teacher logit stores written by `pipeline teach`."""


@group.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def inspect(path, as_json):
    """Provenance, shape, bytes per stored view, top-k mass, teacher top-1 and completeness of PATH.

    PATH is a store ({root}/{teacher}-{key}.zarr) or a pointer file {out}/{teacher}.json.
    """
    from pipeline.store import open_pointer, open_store, summarize

    store = open_pointer(path) if path.suffix == ".json" else open_store(path, require_complete=False)
    info = summarize(store)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
        click.echo(f"{key:>24}: {value}")
