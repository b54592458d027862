"""`pipeline evaluate`: accuracy, teacher agreement, size and CPU speed of one fused student."""

from pathlib import Path

import click

from stages import options


@click.command("evaluate")
@click.option("--fused-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output directory of `pipeline fuse` (fused.safetensors, model.onnx, fuse.json).")
@options.shards
@click.option("--teach-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory of the teacher pointer files (pipeline teach --out), for top-1 agreement with each "
                   "teacher; a teacher that cannot be loaded (e.g. offline) is skipped with a note.")
@click.option("--finetune-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output root of `pipeline finetune-teacher` ({dir}/{teacher}/teacher.yaml): where fine-tuned "
                   "teachers' weights are found; other teachers are rebuilt from their store's provenance.")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Metrics JSON to write (DVC metrics; `pipeline report` reads it).")
@click.option("--latency-runs", default=100, show_default=True, type=click.IntRange(min=1),
              help="Batch-1 forward passes whose median is the reported latency (ms).")
@click.option("--latency-batch", default=32, show_default=True, type=click.IntRange(min=1),
              help="Batch size of the throughput measurement (images/s).")
@click.option("--batch-size", default=128, show_default=True, type=click.IntRange(min=1),
              help="Batch size of the accuracy pass.")
@options.threads
@options.quiet
def command(fused_dir, shards, out_path, finetune_dir, latency_batch, **kwargs):
    """Score FUSED_DIR on the val split; write top-1/top-5, agreement, params, MACs, latency to OUT."""
    from pipeline.evaluate import evaluate_fused

    m = evaluate_fused(fused_dir, shards, teacher_dir=finetune_dir, batch=latency_batch, **kwargs)
    m.write(out_path)
    click.echo(f"{m.student}: top-1 {m.top1:.2f}% top-5 {m.top5:.2f}%, {m.params / 1e6:.2f}M params, "
               f"{m.macs / 1e6:.1f}M MACs, latency " + ", ".join(f"{k} {v:.2f} ms" for k, v in m.latency_ms.items())
               + f"; wrote {out_path}")
