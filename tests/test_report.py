"""pipeline report: a Table-9 style markdown table and a PNG from evaluate's metrics files."""

import json

import pytest
from click.testing import CliRunner

from pipeline.errors import UserError
from pipeline.report import collect_metrics, share_latency, write_report
from stages.cli import main
from tests._chain_helpers import metrics


def test_report_table_and_figure(tmp_path):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "a.json").write_text(json.dumps(metrics("fast", 90.0, 1.5)))
    (tmp_path / "eval" / "b.json").write_text(json.dumps(metrics("plain", 80.0, 1.2, teachers=[], macs=4_000_000,
                                                                  teacher_agreement={})))  # another architecture
    result = CliRunner().invoke(main, ["report", "--metrics", str(tmp_path / "eval"), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    md = (tmp_path / "r" / "report.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| Student | Deploy model (fuse.json `deploy`) | Params (M) | MACs (M)")
    assert "| timm GhostNet(width=0.5" in rows[1] and "ghostnetv2_050" not in md  # not a timm model name
    assert rows[1].startswith("| plain |") and rows[2].startswith("| fast |")  # sorted by latency
    assert "| 1.50 | 4.9 |" in rows[2] and "demo-resnet10t (97.2)" in rows[2] and "| none |" in rows[1]
    assert "| fast | 2.10 | 1.50 | 10.4 | 4.9 | 3.7e-07 | - |" in md
    assert (tmp_path / "r" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_inputs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="pipeline evaluate"):
        collect_metrics([tmp_path / "missing"])
    (tmp_path / "x.json").write_text(json.dumps({"student": "x"}))
    with pytest.raises(UserError, match="no model, stock_model"):
        collect_metrics([tmp_path / "x.json"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no metrics files"):
        collect_metrics([tmp_path / "empty"])


def test_report_gives_latency_spread_and_says_runs_differ(tmp_path):
    (tmp_path / "eval").mkdir()
    spread = {"latency_p10_p90_ms": {"torch": [14.0, 16.5], "onnx": [1.4, 1.7]}}
    (tmp_path / "eval" / "a.json").write_text(json.dumps(metrics("fast", 90.0, 1.5, **spread)))
    result = CliRunner().invoke(main, ["report", "--metrics", str(tmp_path / "eval"), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| 15.00 (14.00-16.50) | 1.50 (1.40-1.70) |" in md
    assert "interleaved" in md and "its own run" in md
    assert "Deploy with onnxruntime" in md and "10.0-10.0x" in md


def test_report_shows_each_teachers_top1_on_views_and_clean_val(tmp_path):
    figures = {"demo-resnet10t": {"views": 52.0, "clean_val": 83.25, "weights_digest": "ab" * 32}}
    (tmp_path / "eval").mkdir()
    for name in ("a", "b"):
        (tmp_path / "eval" / f"{name}.json").write_text(json.dumps(metrics(name, 90.0, 1.5, teacher_top1=figures)))
    result = CliRunner().invoke(main, ["report", "--metrics", str(tmp_path / "eval"), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    md = (tmp_path / "r" / "report.md").read_text()
    assert md.count("| demo-resnet10t | abababababab | 52.00 | 83.25 | a, b |") == 1 and "Top-1 on stored views" in md


def test_teachers_table_keys_teachers_by_weights_digest(tmp_path):
    """Students of an unfitted and of a fitted teacher of one name: two rows, each with its own figures."""
    (tmp_path / "eval").mkdir()
    for student, views, digest in (("unfitted", 45.3, "a" * 64), ("fitted", 72.5, "b" * 64)):
        figures = {"resnet56-cifar": {"views": views, "clean_val": 83.0, "weights_digest": digest}}
        metrics_file = json.dumps(metrics(student, 50.0, 1.5, teacher_top1=figures))
        (tmp_path / "eval" / f"{student}.json").write_text(metrics_file)
    md = write_report([tmp_path / "eval"], tmp_path / "r").read_text()
    teachers = md.split("## Teachers", 1)[1]
    assert "| resnet56-cifar | aaaaaaaaaaaa | 45.30 | 83.00 | unfitted |" in teachers
    assert "| resnet56-cifar | bbbbbbbbbbbb | 72.50 | 83.00 | fitted |" in teachers


def test_students_of_one_deployed_architecture_share_one_latency(tmp_path):
    (tmp_path / "eval").mkdir()
    runs = (("recipe", 45.6, 1.86, [1.80, 1.95]), ("kd", 52.4, 2.17, [2.0, 2.4]), ("plain", 47.5, 2.05, [1.9, 2.2]))
    for student, top1, onnx, spread in runs:
        m = metrics(student, top1, onnx,
                     latency_p10_p90_ms={"onnx": spread, "torch": [10 * s for s in spread]})
        (tmp_path / "eval" / f"{student}.json").write_text(json.dumps(m))
    other = metrics("mnv2", 55.0, 4.1, deploy="torchvision MobileNetV2", params=2_300_000, macs=9_000_000)
    (tmp_path / "eval" / "mnv2.json").write_text(json.dumps(other))
    rows = share_latency(collect_metrics([tmp_path / "eval"]))
    latency = {m.student: m.latency_ms["onnx"] for m in rows}
    assert latency["recipe"] == latency["kd"] == latency["plain"] == 2.05 and latency["mnv2"] == 4.1
    assert [m.student for m in rows] == ["kd", "plain", "recipe", "mnv2"]  # by latency, then best top-1 first
    md = write_report([tmp_path / "eval"], tmp_path / "r").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ") and "GhostNet" in line]
    assert len(table) == 3 and all("| 2.05 (1.80-2.40, 3 runs) |" in line for line in table)
    assert "| 4.10 |" in md  # one run, no spread: its own figure


def test_report_shows_each_students_training_curve(tmp_path):
    from PIL import Image

    (tmp_path / "eval").mkdir()
    curve = [{"epoch": 1, "top1": 27.4, "ema_top1": 20.0, "val_images": 500},
             {"epoch": 2, "top1": 41.0, "ema_top1": 43.25, "val_images": 2000}]
    (tmp_path / "eval" / "a.json").write_text(json.dumps(metrics("recipe", 41.0, 1.5, val_curve=curve)))
    (tmp_path / "eval" / "b.json").write_text(json.dumps(metrics("old", 40.0, 1.5)))  # a student without a curve
    md = write_report([tmp_path / "eval"], tmp_path / "r").read_text()
    curves = md.split("## Training curves", 1)[1].split("##", 1)[0]
    assert "| Student | ep 1 | ep 2 |" in curves and "| recipe | 27.4 / 20.0* | 41.0 / 43.2 |" in curves
    assert "| old |" not in curves
    with_curves = Image.open(tmp_path / "r" / "report.png").size
    (tmp_path / "eval" / "a.json").unlink()
    write_report([tmp_path / "eval"], tmp_path / "r2")
    assert with_curves[0] > 1.5 * Image.open(tmp_path / "r2" / "report.png").size[0]  # the curves panel beside
