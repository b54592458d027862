"""`pipeline shard`: a dataset source -> webdataset shards per split + manifest.json."""

import click

from pipeline.data import shards, sources
from pipeline.errors import UserError


def _read_source(source, val_fraction, seed, image_size, num_classes, per_class, image_format):
    kind, _, arg = source.partition(":")
    if kind == "imagefolder" and arg:
        return sources.imagefolder(arg, val_fraction, seed)
    if kind == "webdataset" and arg:
        return sources.webdataset_shards(arg, val_fraction, seed)
    if kind == "digits" and not arg:
        return sources.digits(image_size, val_fraction, seed)
    if kind == "synthetic" and not arg:
        return sources.synthetic(num_classes, per_class, image_size, image_format, val_fraction, seed)
    raise UserError(f"unknown --source '{source}'; use imagefolder:DIR, webdataset:PATTERN, digits or synthetic")


@click.command(context_settings={"show_default": True})
@click.option("--source", required=True,
              help="imagefolder:DIR (class sub-folders, or DIR/train + DIR/val), webdataset:PATTERN "
                   "(existing tars, brace patterns allowed), digits (the embedded demo) or synthetic (tests).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Output directory for {split}-NNNNNN.tar and manifest.json (replaced atomically).")
@click.option("--name", default=None, help="Dataset name in the manifest [default: from the source].")
@click.option("--val-fraction", default=0.2, type=float,
              help="Fraction of each class held out as val when the source has no val split (0 = none).")
@click.option("--seed", default=0, type=int, help="Seed of the val split and of the fixed sample order.")
@click.option("--shard-size", default=10000, type=click.IntRange(min=1),
              help="Maximum number of images per shard (webdataset ShardWriter maxcount).")
@click.option("--on-bad-image", type=click.Choice(["error", "skip"]), default="error",
              help="A corrupt image stops with an error naming it, or is skipped and listed in the manifest.")
@click.option("--image-size", default=64, type=click.IntRange(min=8),
              help="Side in pixels of the rendered digits / synthetic images.")
@click.option("--num-classes", default=4, type=click.IntRange(min=1), help="Synthetic source: number of classes.")
@click.option("--per-class", default=32, type=click.IntRange(min=1), help="Synthetic source: images per class.")
@click.option("--image-format", type=click.Choice(["jpg", "png"]), default="jpg",
              help="Synthetic source: encoding of the images.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def command(source, out, name, val_fraction, seed, shard_size, on_bad_image, image_size, num_classes,
            per_class, image_format, quiet):
    """Write a dataset as webdataset shards + manifest.json (same input -> byte-identical output)."""
    dataset, classes, splits = _read_source(source, val_fraction, seed, image_size, num_classes, per_class,
                                            image_format)
    manifest = shards.write_shards(splits, out, name or dataset, classes, source, maxcount=shard_size,
                                   on_bad_image=on_bad_image, quiet=quiet)
    if not quiet:
        counts = ", ".join(f"{k}={v['count']}" for k, v in manifest["splits"].items())
        skipped = sum(len(v["skipped"]) for v in manifest["splits"].values())
        click.echo(f"{out}: {manifest['dataset']} {len(classes)} classes, {counts}"
                   + (f", {skipped} bad images skipped" if skipped else "")
                   + f", fingerprint {manifest['fingerprint']}")
