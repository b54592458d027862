import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from stages.cli import STAGES, main

REPO = Path(__file__).resolve().parent.parent


def test_help_lists_every_stage():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for name in ("shard", "teach", "student", "fuse", "evaluate", "report", "store"):
        assert name in result.output


def test_misspelt_params_key_is_refused_with_exit_2(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("teach:\n  nmu_views: 3\n")
    result = CliRunner().invoke(main, ["--params", str(params), "teach"])
    assert result.exit_code == 2
    assert "unknown option(s) nmu_views" in result.output


def test_params_section_gives_defaults_with_dashes_or_underscores(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("shard:\n  val-fraction: 0.5\n")
    result = CliRunner().invoke(main, ["--params", str(params), "shard", "--help"])
    assert result.exit_code == 0, result.output


def test_invalid_yaml_is_a_one_line_error(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("teach: [unclosed\n")
    result = CliRunner().invoke(main, ["--params", str(params), "report"])
    assert result.exit_code == 2
    assert "is not valid YAML" in result.output


HEAVY = ("torch", "timm", "zarr", "numpy", "webdataset", "onnxruntime", "matplotlib", "dvc", "PIL")
HELP_PROBE = f"""
import sys
HEAVY = {HEAVY!r}
from stages.cli import main
main(sys.argv[1:] + ["--help"], standalone_mode=False)
print("HEAVY", sorted({{m.split(".")[0] for m in sys.modules}} & set(HEAVY)))
"""


@pytest.mark.parametrize("command", ["", *STAGES, "store list", "store inspect"])
def test_help_imports_no_heavy_library(command):
    """--help stays fast (benchmarks/bench_help.py times it) because no stage imports torch & co. at load."""
    proc = subprocess.run([sys.executable, "-c", HELP_PROBE, *command.split()], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout, proc.stdout[-300:]


def test_constants_spelt_for_fast_help_match_their_owners():
    import stages.fuse
    import stages.shard
    import stages.teach
    from pipeline.data import sources
    from pipeline.fuse import CHECKPOINTS
    from pipeline.store import DEFAULT_TEMPERATURES, DEFAULT_VALUES

    assert stages.fuse.CHECKPOINTS == CHECKPOINTS and stages.teach.DEFAULT_VALUES == DEFAULT_VALUES
    assert stages.teach.DEFAULT_TEMPERATURES == DEFAULT_TEMPERATURES
    assert (stages.shard.SPEC_OPTIONS, stages.shard.RENDERED_SIZE) == (sources.SPEC_OPTIONS, sources.RENDERED_SIZE)


def test_help_names_where_a_default_comes_from_and_does_not_print_a_dict(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("teach:\n  k: 7\n  plan: {seed: 3, size: 64, scale: [0.5, 1.0]}\n")
    result = CliRunner().invoke(main, ["--params", str(params), "teach", "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert f"7 from {params} `teach:`" in result.output
    assert f"a mapping of 3 fields from {params} `teach:`" in result.output and "'seed'" not in result.output
    assert "[default: 64;" in result.output  # --batch-size: not in the section, the built-in default
