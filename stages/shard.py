"""`pipeline shard`: a dataset source -> webdataset shards per split + manifest.json."""

import click
from click.core import ParameterSource

from pipeline.defaults import RENDERED_SIZE, SPEC_OPTIONS
from pipeline.manifests import load_spec
from stages import options as shared  # `options` is the command's keyword dict below


@click.command(context_settings={"show_default": True})
@click.option("--dataset", default=None,
              help="A spec in manifests/datasets/ (digits, cifar10, imagenet) or a YAML path; it sets "
                   f"{', '.join(SPEC_OPTIONS)} unless given here, and its num_classes is checked.")
@click.option("--source", default=None,
              help="imagefolder:DIR (class sub-folders, or DIR/train [+ DIR/val]; DIR may be a .tar of such a "
                   "tree), webdataset:PATTERN (existing tars, brace patterns allowed), digits (the embedded "
                   "demo) or synthetic (tests).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Output directory for {split}-NNNNNN.tar and manifest.json (replaced atomically, but only if it "
                   "is new, empty or an earlier output of this command).")
@click.option("--name", default=None, help="Dataset name in the manifest [default: from the source].")
@click.option("--val-fraction", default=0.2, type=shared.Finite(0, 1, max_open=True),
              help="Fraction of each class held out as val when the source has no val split (0 = none).")
@click.option("--seed", default=0, type=int, help="Seed of the val split and of the fixed sample order.")
@click.option("--shard-size", default=10000, type=click.IntRange(min=1),
              help="Maximum number of images per shard (webdataset ShardWriter maxcount).")
@click.option("--on-bad-image", type=click.Choice(["error", "skip"]), default="error",
              help="A corrupt image stops with an error naming it, or is skipped and listed in the manifest.")
@click.option("--image-size", default=None, type=shared.PIXELS,
              help="Render every image once with its shorter side at this many pixels (bicubic; JPEGs re-encoded "
                   "at quality 95), e.g. 64 for 32-px CIFAR images: GhostNet students need >= 64 px. "
                   f"[default: original images; digits / synthetic: {RENDERED_SIZE}]")
@click.option("--crop-pct", default=1.0, type=shared.Finite(0.1, 1.0),
              help="The dataset's evaluation centre crop, recorded in the manifest for the students' val: 1.0 "
                   "(whole image) for small or object-centred images, 0.875 for ImageNet-like photos.")
@click.option("--num-classes", default=4, type=click.IntRange(min=1), help="Synthetic source: number of classes.")
@click.option("--per-class", default=32, type=click.IntRange(min=1), help="Synthetic source: images per class.")
@click.option("--image-format", type=click.Choice(["jpg", "png"]), default="jpg",
              help="Synthetic source: encoding of the images.")
@shared.quiet
@click.pass_context
def command(ctx, dataset, out, seed, on_bad_image, num_classes, per_class, image_format, quiet, **options):
    """Write a dataset as webdataset shards + manifest.json (same input -> byte-identical output)."""
    from pipeline.data import shards, sources

    if dataset:
        spec = load_spec("datasets", dataset)
        options = sources.dataset_options(spec, options,
                                          lambda key: ctx.get_parameter_source(key) != ParameterSource.DEFAULT)
    name, classes, splits = sources.read_source(options["source"], val_fraction=options["val_fraction"], seed=seed,
                                                image_size=options["image_size"], num_classes=num_classes,
                                                per_class=per_class, image_format=image_format)
    if dataset:
        sources.check_num_classes(spec, dataset, options["source"], classes)
    manifest = shards.write_shards(splits, out, options["name"] or name, classes, options["source"],
                                   maxcount=options["shard_size"], on_bad_image=on_bad_image, quiet=quiet,
                                   crop_pct=options["crop_pct"], inputs=sources.source_paths(options["source"]))
    if not quiet:
        counts = ", ".join(f"{k}={v['count']}" for k, v in manifest.splits.items())
        skipped = sum(len(v["skipped"]) for v in manifest.splits.values())
        click.echo(f"{out}: {manifest.dataset} {len(classes)} classes, {counts}"
                   + (f", {skipped} bad images skipped" if skipped else "")
                   + f", fingerprint {manifest.fingerprint}")
