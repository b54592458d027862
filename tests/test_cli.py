from click.testing import CliRunner

from stages.cli import main


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
