"""Options that several commands share: one decorator each, so each has one name, default, help and check.

tests/test_cli.py checks that every command spells them through these decorators (identical help and
default) and that no command uses a retired alias (e.g. --views for --num-views).
"""

import math
from pathlib import Path

import click

class Finite(click.FloatRange):
    """A FloatRange that also refuses nan and inf: NaN compares false, so a NaN tolerance would disable its check."""

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        if not math.isfinite(value):
            self.fail(f"{value} is not a finite number", param, ctx)
        return value


# a side in pixels that an image is rendered to or a model run at: 4096 px is 50 MB per RGB image
PIXELS = click.IntRange(16, 4096)


class PlanParam(click.ParamType):
    """A view plan (ViewPlan.load): a YAML file of ViewPlan fields, or (from params.yaml) the mapping itself."""

    name = "plan"

    def convert(self, value, param, ctx):
        from pipeline.data.views import ViewPlan

        return ViewPlan.load(value, f"--plan {value}" if isinstance(value, (str, Path)) else "params `teach: plan:`")


SHARDS = "data/shards"  # where dvc.yaml's shard stage writes

shards = click.option("--shards", default=SHARDS, show_default=True, type=click.Path(file_okay=False, path_type=Path),
                      help="Shard directory written by `pipeline shard` (manifest.json + {split}-NNNNNN.tar).")
workers = click.option("--workers", default=0, show_default=True, type=click.IntRange(min=0),
                       help="DataLoader worker processes (per rank; 0 = decode in the main process).")
quiet = click.option("--quiet", is_flag=True, help="No progress bar or per-epoch/summary lines.")
threads = click.option("--threads", default=None, type=click.IntRange(min=1),
                       help="CPU threads of torch (and onnxruntime), recorded in the outputs; 1 = steady, and "
                            "often faster on a shared machine [default: the libraries' choice, all cores].")
resume = click.option("--resume/--no-resume", default=False, show_default=True,
                      help="Continue an interrupted run from OUT/checkpoint.safetensors after its last finished epoch "
                           "(one written with other settings is refused); without it the run starts over.")
device = click.option("--device", default="auto", show_default=True,
                      help="auto, cpu, cuda or cuda:N (under torchrun: cuda:LOCAL_RANK).")
