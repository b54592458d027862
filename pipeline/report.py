"""Gather every evaluated student into one table (like the paper's Table 9) and one figure.

The inputs are the metrics JSON files written by `pipeline evaluate`; nothing is recomputed here,
so the report is cheap to regenerate whenever one student changes.

Latency is a property of the deployed architecture, not of the student: each evaluate run times its own
student, so students that deploy the same network would get different figures from load noise alone. The
report pools them: every student of one
architecture shows the same latency, the median of their runs' medians, with the spread of those runs; so
the figure's only difference between such students is accuracy.
"""

import io
import statistics
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import UserError
from pipeline.io import atomic_write_bytes
from pipeline.scores import Metrics


@dataclass(frozen=True, kw_only=True)
class Row(Metrics):
    """A student as the report shows it: latency_ms and latency_p10_p90_ms are its architecture's (share_latency)."""

    latency_runs_pooled: int        # how many evaluate runs that shared latency pools


COLUMNS = (
    ("Student", lambda m: m.student),
    ("Deploy model (fuse.json `deploy`)", lambda m: m.deploy),
    ("Params (M)", lambda m: f"{m.params / 1e6:.2f}"),
    ("MACs (M)", lambda m: f"{m.macs / 1e6:.1f}"),
    ("Latency torch (ms)", lambda m: _latency(m, "torch")),
    ("Latency ONNX (ms)", lambda m: _latency(m, "onnx")),
    ("Top-1 (%)", lambda m: f"{m.top1:.2f}"),
    ("Top-5 (%)", lambda m: f"{m.top5:.2f}"),
    ("Teacher (top-1 agreement %)", lambda m: _teachers(m)),
    ("Recipe", lambda m: m.recipe_summary or "-"),
)


def _fmt(value, spec, scale=1.0):
    return "-" if value is None else format(value / scale, spec)


def _teachers(m: Metrics):
    if not m.teachers:
        return "none"
    agreement = m.teacher_agreement
    return ", ".join(
        f"{t} ({agreement[t]:.1f})" if agreement.get(t) is not None else t for t in m.teachers
    )


def collect_metrics(paths) -> list[Metrics]:
    """Read evaluate's JSON files; a directory contributes every `*.json` directly inside it."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files.extend(sorted(path.glob("*.json")))
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"no evaluation metrics at {path}; run `pipeline evaluate` first")
    rows = [Metrics.read(file) for file in files]
    if not rows:
        raise UserError(f"no metrics files found in {', '.join(map(str, paths))}; run `pipeline evaluate` first")
    return rows


def by_architecture(rows: list[Metrics]) -> list[list[Metrics]]:
    """The rows grouped by what fixes a deployed student's speed: its deployed network, input size, params, MACs."""
    groups: dict[tuple, list[Metrics]] = {}
    for m in rows:
        groups.setdefault((m.deploy, m.input_size, m.params, m.macs), []).append(m)
    return list(groups.values())


def share_latency(rows: list[Metrics]) -> list[Row]:
    """The rows with one latency per architecture: for each engine, the median of its students' medians,
    spread from their lowest p10 to their highest p90 (one student keeps its own figures); `latency_runs_pooled`
    says how many evaluate runs were pooled. Sorted by that latency, then by top-1 (best first)."""
    shared = []
    for members in by_architecture(rows):
        latency, spread = {}, {}
        for engine in {e for m in members for e, v in m.latency_ms.items() if v is not None}:
            medians = [m.latency_ms[engine] for m in members if m.latency_ms.get(engine) is not None]
            spreads = [s for m in members if (s := m.latency_p10_p90_ms.get(engine))]
            latency[engine] = statistics.median(medians)
            if spreads or len(medians) > 1:
                spread[engine] = [min(medians + [s[0] for s in spreads]), max(medians + [s[1] for s in spreads])]
        shared += [Row(**{**vars(m), "latency_ms": latency, "latency_p10_p90_ms": spread},
                       latency_runs_pooled=len(members)) for m in members]
    return sorted(shared, key=lambda m: (_speed(m), -m.top1, m.student))


def _speed(m: Metrics) -> float:
    return m.latency_ms.get("onnx") or m.latency_ms.get("torch") or 0


def markdown_table(rows: list[Row]) -> str:
    header = "| " + " | ".join(name for name, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    lines = ["| " + " | ".join(str(cell(m)) for _, cell in COLUMNS) + " |" for m in rows]
    return "\n".join([header, rule, *lines]) + "\n"


def fusion_table(rows: list[Row]) -> str:
    """Training form -> deployed form: what re-parameterization costs in training and saves at deploy."""
    lines = ["| Student | Training params (M) | Deploy params (M) | Training MACs (M) | Deploy MACs (M) | "
             "Fused max abs diff | ONNX max abs diff |", "|---|---|---|---|---|---|---|"]
    for m in rows:
        train, fused, onnx = m.training_form, m.fused_check, m.onnx_check or {}
        lines.append(f"| {m.student} | {_fmt(train.get('params'), '.2f', 1e6)} | "
                     f"{m.params / 1e6:.2f} | {_fmt(train.get('macs'), '.1f', 1e6)} | "
                     f"{m.macs / 1e6:.1f} | {_fmt(fused.get('max_abs_diff'), '.1e')} | "
                     f"{_fmt(onnx.get('max_abs_diff'), '.1e')} |")
    return "\n".join(lines) + "\n"


def _latency(m: Row, engine: str) -> str:
    """'median (p10-p90)' of one engine's batch-1 latency; 'median (low-high, N runs)' when N students'
    runs were pooled."""
    median, spread = m.latency_ms.get(engine), m.latency_p10_p90_ms.get(engine)
    if median is None or not spread:
        return _fmt(median, ".2f")
    pooled = m.latency_runs_pooled
    return f"{median:.2f} ({spread[0]:.2f}-{spread[1]:.2f}{f', {pooled} runs' if pooled > 1 else ''})"


def _runtime_advice(rows: list[Row]) -> str:
    """Which runtime to deploy with: eager torch at batch 1 is several times slower than onnxruntime on CPU
    (benchmarks/bench_latency.py: 4.5x at 1 thread; 26x at 2 threads on a loaded 2-core machine, where
    OpenMP threads wait for busy cores in every small kernel)."""
    ratios = [m.latency_ms["torch"] / m.latency_ms["onnx"] for m in rows
              if m.latency_ms.get("torch") and m.latency_ms.get("onnx")]
    if not ratios:
        return ""
    return (f"Deploy with onnxruntime (`model.onnx`): at batch 1 eager torch took {min(ratios):.1f}-{max(ratios):.1f}x "
            "its time here. With torch, set its threads to the cores you really have (1 on a shared machine).\n\n")


def teacher_table(rows: list[Row]) -> str:
    """Each teacher once, keyed by its weights digest (a fine-tuned teacher and its source are two rows even
    under one name): its top-1 on the stored (augmented) views and on clean val, and the students that
    learned from it. A large gap means noisy targets (see `pipeline teach`'s warning)."""
    teachers: dict[str, dict] = {}
    for m in rows:
        for name, t in m.teacher_top1.items():
            digest = t.get("weights_digest") or f"name:{name}"  # metrics of an older evaluate carry no digest
            entry = teachers.setdefault(digest, {**t, "name": name, "students": []})
            entry["students"].append(m.student)
    if not teachers:
        return ""
    lines = ["| Teacher | Weights sha256 | Top-1 on stored views (%) | Top-1 on clean val (%) | Students |",
             "|---|---|---|---|---|"]
    lines += [f"| {t['name']} | {t.get('weights_digest', '-')[:12]} | {_fmt(t.get('views'), '.2f')} | "
              f"{_fmt(t.get('clean_val'), '.2f')} | {', '.join(t['students'])} |"
              for t in sorted(teachers.values(), key=lambda t: (t["name"], t.get("weights_digest", "")))]
    return "\n## Teachers\n\n" + "\n".join(lines) + "\n"


def curve_table(rows: list[Row]) -> str:
    """Each student's val top-1 per validated epoch (raw / EMA), as `pipeline student` measured it; `*`: that
    epoch scored a fixed subset of val (student --val-samples), the last epoch always the whole split."""
    curves = {m.student: m.val_curve for m in rows if m.val_curve}
    if not curves:
        return ""
    epochs = sorted({r["epoch"] for curve in curves.values() for r in curve})
    lines = ["| Student | " + " | ".join(f"ep {e}" for e in epochs) + " |", "|---" * (len(epochs) + 1) + "|"]
    for student, curve in curves.items():
        full = max(r.get("val_images", 0) for r in curve)
        by_epoch = {r["epoch"]: r for r in curve}
        cells = [_curve_cell(by_epoch[e], full) if e in by_epoch else "-" for e in epochs]
        lines.append(f"| {student} | " + " | ".join(cells) + " |")
    return ("\n## Training curves\n\nVal top-1 (%) per epoch while training, raw / EMA weights (`*`: a fixed "
            "subset of val).\n\n" + "\n".join(lines) + "\n")


def _curve_cell(row: dict, full: int) -> str:
    cell = f"{row['top1']:.1f}" + (f" / {row['ema_top1']:.1f}" if row.get("ema_top1") is not None else "")
    return cell + ("*" if row.get("val_images", full) < full else "")


def render_markdown(rows: list[Row], figure_name: str) -> str:
    first = rows[0]
    size = first.input_size
    return (
        "# Students: accuracy vs cost\n\n"
        f"Validation split of {first.dataset}, {size}x{size} px, deployed (fused) models. Latency is the median "
        f"(p10-p90) of {first.latency_runs} single-image runs on this machine's CPU, torch and ONNX interleaved "
        "within one evaluate run; each student was timed in its own run, so on a shared machine compare "
        "different architectures' latencies with care. Students that deploy the same architecture share one "
        "latency: the median of their runs' medians, from the lowest p10 to the highest p90 (N runs). MACs "
        "counted at the input size.\n\n"
        + _runtime_advice(rows)
        + markdown_table(rows)
        + f"\n![accuracy vs latency, and each student's val top-1 per epoch]({figure_name})\n"
        + curve_table(rows)
        + "\n## Training form vs deployed form\n\n"
        + fusion_table(rows)
        + teacher_table(rows)
    )


def plot_report(rows: list[Row], path) -> None:
    """Left: top-1 against the shared latency, one column of points per architecture with its latency spread
    as a band; right: each student's val top-1 per epoch. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [m for m in rows if m.val_curve]
    fig, axes = plt.subplots(1, 2 if curves else 1, figsize=(12 if curves else 6.5, 4.6), dpi=120, squeeze=False)
    colours = {}
    for m in rows:
        colours.setdefault(m.student, f"C{len(colours) % 10}")
    _accuracy_latency(axes[0][0], rows, colours)
    if curves:
        _curves(axes[0][1], curves, colours)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _accuracy_latency(ax, rows, colours) -> None:
    from matplotlib.transforms import offset_copy

    beside = offset_copy(ax.transData, fig=ax.figure, x=7, units="points")  # labels start just right of a point
    engine = "onnx" if all(m.latency_ms.get("onnx") is not None for m in rows) else "torch"
    top1 = [m.top1 for m in rows]
    gap = max(0.06 * (max(top1) - min(top1)), 0.4)  # least vertical room between two labels, in points of top-1
    for members in by_architecture(rows):
        x = members[0].latency_ms[engine]
        lo, hi = members[0].latency_p10_p90_ms.get(engine) or (x, x)
        ys = sorted(m.top1 for m in members)
        ax.axvspan(lo, hi, color="0.5", alpha=0.12, linewidth=0)
        ax.plot([x, x], [ys[0], ys[-1]], color="0.75", linewidth=1, zorder=1)
        label_y = None
        for m in sorted(members, key=lambda m: -m.top1):
            ax.scatter([x], [m.top1], s=36, color=colours[m.student], zorder=3)
            label_y = m.top1 if label_y is None else min(m.top1, label_y - gap)
            ax.text(x, label_y, f"{m.student} {m.top1:.1f}%", transform=beside, fontsize=8, va="center",
                    bbox={"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.7})
    ax.set_xlabel(f"CPU latency, batch 1, {engine} (ms): one per architecture, band = spread of its runs")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("Accuracy vs latency of the deployed students")
    ax.margins(x=0.35, y=0.15)
    ax.grid(alpha=0.3)


def _curves(ax, rows, colours) -> None:
    for m in rows:
        curve = m.val_curve
        epochs = [r["epoch"] for r in curve]
        ax.plot(epochs, [r["top1"] for r in curve], marker="o", markersize=3, color=colours[m.student],
                label=m.student)
        ema = [(r["epoch"], r["ema_top1"]) for r in curve if r.get("ema_top1") is not None]
        if ema:
            ax.plot(*zip(*ema), linestyle="--", linewidth=1, color=colours[m.student])
    ax.set_xlabel("epoch")
    ax.set_ylabel("val top-1 (%)")
    ax.set_title("Training curves (solid: weights, dashed: EMA)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def write_report(metric_paths, out_dir) -> Path:
    """report.md + report.png in `out_dir`; returns the markdown path."""
    rows = share_latency(collect_metrics(metric_paths))
    out_dir = Path(out_dir)
    plot_report(rows, out_dir / "report.png")
    md = out_dir / "report.md"
    atomic_write_bytes(md, render_markdown(rows, "report.png").encode())
    return md
