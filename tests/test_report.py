"""pipeline report: a Table-9 style markdown table and a PNG from evaluate's metrics files."""

import json

import pytest
from click.testing import CliRunner

from pipeline.errors import UserError
from pipeline.report import collect_metrics
from stages.cli import main


def _metrics(student, top1, latency, **extra):
    return {"student": student, "stock_model": "ghostnetv2_050",
            "deploy": 'timm GhostNet(width=0.5, version="v2", cfgs from fuse.json)', "params": 1_500_000, "macs": 4_900_000,
            "latency_ms": {"torch": latency * 10, "onnx": latency}, "top1": top1, "top5": 99.5,
            "teachers": ["demo-resnet10t"], "teacher_agreement": {"demo-resnet10t": 97.25},
            "recipe_summary": "demo: KD a=0.5 tau=1, N=3+1x1, 6 ep lamb", "input_size": 64, "dataset": "digits",
            "latency_runs": 100, "training_form": {"params": 2_100_000, "macs": 10_400_000},
            "fused_check": {"max_abs_diff": 3.7e-7}, **extra}


def test_report_table_and_figure(tmp_path):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "a.json").write_text(json.dumps(_metrics("fast", 90.0, 1.5)))
    (tmp_path / "eval" / "b.json").write_text(json.dumps(_metrics("plain", 80.0, 1.2, teachers=[],
                                                                  teacher_agreement={})))
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
    with pytest.raises(UserError, match="lacks"):
        collect_metrics([tmp_path / "x.json"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no metrics files"):
        collect_metrics([tmp_path / "empty"])


def test_report_gives_latency_spread_and_says_runs_differ(tmp_path):
    (tmp_path / "eval").mkdir()
    spread = {"latency_p10_p90_ms": {"torch": [14.0, 16.5], "onnx": [1.4, 1.7]}}
    (tmp_path / "eval" / "a.json").write_text(json.dumps(_metrics("fast", 90.0, 1.5, **spread)))
    result = CliRunner().invoke(main, ["report", "--metrics", str(tmp_path / "eval"), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| 15.00 (14.00-16.50) | 1.50 (1.40-1.70) |" in md
    assert "interleaved" in md and "its own run" in md
    assert "Deploy with onnxruntime" in md and "10.0-10.0x" in md


def test_report_shows_each_teachers_top1_on_views_and_clean_val(tmp_path):
    figures = {"demo-resnet10t": {"views": 52.0, "clean_val": 83.25}}
    (tmp_path / "eval").mkdir()
    for name in ("a", "b"):
        (tmp_path / "eval" / f"{name}.json").write_text(json.dumps(_metrics(name, 90.0, 1.5, teacher_top1=figures)))
    result = CliRunner().invoke(main, ["report", "--metrics", str(tmp_path / "eval"), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    md = (tmp_path / "r" / "report.md").read_text()
    assert md.count("| demo-resnet10t | 52.00 | 83.25 |") == 1 and "Top-1 on stored views" in md
