"""Gather every evaluated student into one table (like the paper's Table 9) and one figure.

The inputs are the metrics JSON files written by `pipeline evaluate`; nothing is recomputed here,
so the report is cheap to regenerate whenever one student changes.
"""

import io
import json
from pathlib import Path

from pipeline.errors import UserError
from pipeline.io import atomic_write_bytes

COLUMNS = (
    ("Student", lambda m: m["student"]),
    ("Deploy model (fuse.json `deploy`)", lambda m: m["deploy"]),
    ("Params (M)", lambda m: f"{m['params'] / 1e6:.2f}"),
    ("MACs (M)", lambda m: f"{m['macs'] / 1e6:.1f}"),
    ("Latency torch (ms)", lambda m: _latency(m, "torch")),
    ("Latency ONNX (ms)", lambda m: _latency(m, "onnx")),
    ("Top-1 (%)", lambda m: f"{m['top1']:.2f}"),
    ("Top-5 (%)", lambda m: f"{m['top5']:.2f}"),
    ("Teacher (top-1 agreement %)", lambda m: _teachers(m)),
    ("Recipe", lambda m: m.get("recipe_summary") or "-"),
)


def _fmt(value, spec, scale=1.0):
    return "-" if value is None else format(value / scale, spec)


def _teachers(metrics):
    teachers = metrics.get("teachers") or []
    if not teachers:
        return "none"
    agreement = metrics.get("teacher_agreement", {})
    return ", ".join(
        f"{t} ({agreement[t]:.1f})" if agreement.get(t) is not None else t for t in teachers
    )


def collect_metrics(paths) -> list[dict]:
    """Read evaluate's JSON files; a directory contributes every `*.json` directly inside it."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files.extend(sorted(path.glob("*.json")))
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"no evaluation metrics at {path}; run `pipeline evaluate` first")
    rows = []
    for file in files:
        try:
            metrics = json.loads(file.read_text())
            missing = [k for k in ("student", "deploy", "params", "macs", "top1", "top5", "latency_ms")
                       if k not in metrics]
        except (json.JSONDecodeError, AttributeError, TypeError):
            raise UserError(f"{file} is not a metrics file written by `pipeline evaluate`; remove it") from None
        if missing:
            raise UserError(f"{file} lacks {', '.join(missing)}; re-run `pipeline evaluate` for it")
        rows.append(metrics)
    if not rows:
        raise UserError(f"no metrics files found in {', '.join(map(str, paths))}; run `pipeline evaluate` first")
    return sorted(rows, key=lambda m: (m["latency_ms"].get("onnx") or m["latency_ms"].get("torch") or 0,
                                       m["student"]))


def markdown_table(rows: list[dict]) -> str:
    header = "| " + " | ".join(name for name, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    lines = ["| " + " | ".join(str(cell(m)) for _, cell in COLUMNS) + " |" for m in rows]
    return "\n".join([header, rule, *lines]) + "\n"


def fusion_table(rows: list[dict]) -> str:
    """Training form -> deployed form: what re-parameterization costs in training and saves at deploy."""
    lines = ["| Student | Training params (M) | Deploy params (M) | Training MACs (M) | Deploy MACs (M) | "
             "Fused max abs diff | ONNX max abs diff |", "|---|---|---|---|---|---|---|"]
    for m in rows:
        train = m.get("training_form") or {}
        fused, onnx = m.get("fused_check") or {}, m.get("onnx_check") or {}
        lines.append(f"| {m['student']} | {_fmt(train.get('params'), '.2f', 1e6)} | "
                     f"{m['params'] / 1e6:.2f} | {_fmt(train.get('macs'), '.1f', 1e6)} | "
                     f"{m['macs'] / 1e6:.1f} | {_fmt(fused.get('max_abs_diff'), '.1e')} | "
                     f"{_fmt(onnx.get('max_abs_diff'), '.1e')} |")
    return "\n".join(lines) + "\n"


def _latency(m: dict, engine: str) -> str:
    """'median (p10-p90)' of one engine's batch-1 latency."""
    median, spread = m["latency_ms"].get(engine), (m.get("latency_p10_p90_ms") or {}).get(engine)
    if median is None or not spread:
        return _fmt(median, ".2f")
    return f"{median:.2f} ({spread[0]:.2f}-{spread[1]:.2f})"


def _runtime_advice(rows: list[dict]) -> str:
    """Which runtime to deploy with: eager torch at batch 1 is several times slower than onnxruntime on CPU
    (benchmarks/bench_latency.py: 4.5x at 1 thread; 26x at 2 threads on a loaded 2-core machine, where
    OpenMP threads wait for busy cores in every small kernel)."""
    ratios = [m["latency_ms"]["torch"] / m["latency_ms"]["onnx"] for m in rows
              if m["latency_ms"].get("torch") and m["latency_ms"].get("onnx")]
    if not ratios:
        return ""
    return (f"Deploy with onnxruntime (`model.onnx`): at batch 1 eager torch took {min(ratios):.1f}-{max(ratios):.1f}x "
            "its time here. With torch, set its threads to the cores you really have (1 on a shared machine).\n\n")


def teacher_table(rows: list[dict]) -> str:
    """Each teacher once: its top-1 on the stored (augmented) views and on clean val. A large gap means
    noisy targets (see `pipeline teach`'s warning)."""
    teachers = {}
    for m in rows:
        teachers.update(m.get("teacher_top1") or {})
    if not teachers:
        return ""
    lines = ["| Teacher | Top-1 on stored views (%) | Top-1 on clean val (%) |", "|---|---|---|"]
    lines += [f"| {name} | {_fmt(t.get('views'), '.2f')} | {_fmt(t.get('clean_val'), '.2f')} |"
              for name, t in sorted(teachers.items())]
    return "\n## Teachers\n\n" + "\n".join(lines) + "\n"


def render_markdown(rows: list[dict], figure_name: str) -> str:
    first = rows[0]
    size = first.get("input_size", "?")
    dataset = first.get("dataset", "the validation split")
    return (
        "# Students: accuracy vs cost\n\n"
        f"Validation split of {dataset}, {size}x{size} px, deployed (fused) models. Latency is the median (p10-p90) "
        f"of {first.get('latency_runs', '?')} single-image runs on this machine's CPU, torch and ONNX interleaved "
        "within one evaluate run; each student was timed in its own run, so on a shared machine compare "
        "students' latencies with care. MACs counted at the input size.\n\n"
        + _runtime_advice(rows)
        + markdown_table(rows)
        + f"\n![accuracy vs latency]({figure_name})\n\n## Training form vs deployed form\n\n"
        + fusion_table(rows)
        + teacher_table(rows)
    )


def plot_accuracy_latency(rows: list[dict], path) -> None:
    """Top-1 against CPU latency, one labelled point per student (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engine = "onnx" if all(m["latency_ms"].get("onnx") is not None for m in rows) else "torch"
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for m in rows:
        x, y = m["latency_ms"][engine], m["top1"]
        ax.scatter([x], [y], s=30 + m["macs"] / 2e6)
        ax.annotate(m["student"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel(f"CPU latency, batch 1, {engine} (ms)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("Accuracy vs latency (marker area ~ MACs)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def write_report(metric_paths, out_dir) -> Path:
    """report.md + report.png in `out_dir`; returns the markdown path."""
    rows = collect_metrics(metric_paths)
    out_dir = Path(out_dir)
    plot_accuracy_latency(rows, out_dir / "report.png")
    md = out_dir / "report.md"
    atomic_write_bytes(md, render_markdown(rows, "report.png").encode())
    return md
