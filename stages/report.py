"""`pipeline report`: one markdown table + one accuracy/latency figure over every evaluated student."""

from pathlib import Path

import click


@click.command("report")
@click.option("--metrics", "metric_paths", multiple=True, default=("outputs/eval",), show_default=True,
              type=click.Path(path_type=Path),
              help="Metrics JSON written by `pipeline evaluate`, or a directory of them; repeatable.")
@click.option("--out", "out_dir", default="outputs/report", show_default=True, type=click.Path(path_type=Path),
              help="Directory for report.md and report.png.")
def command(metric_paths, out_dir):
    """Write report.md (params, MACs, latency, top-1/top-5, teacher, recipe) and report.png."""
    from pipeline.report import write_report

    md = write_report(metric_paths, out_dir)
    click.echo(f"wrote {md} and {out_dir / 'report.png'}")
