import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from stages.cli import STAGES, main
from tests.conftest import EMPTY_PARAMS

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


def test_params_section_gives_defaults_with_dashes(tmp_path):
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


def test_help_names_where_a_default_comes_from_and_does_not_print_a_dict(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("teach:\n  k: 7\n  plan: {seed: 3, size: 64, scale: [0.5, 1.0]}\n")
    result = CliRunner().invoke(main, ["--params", str(params), "teach", "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert f"7 from {params} `teach:`" in result.output
    assert f"a mapping of 3 fields from {params} `teach:`" in result.output and "'seed'" not in result.output
    assert "[default: 64;" in result.output  # --batch-size: not in the section, the built-in default


def test_a_params_file_annotates_only_its_own_invocation(tmp_path):
    """The sources shown by --help belong to one run: a later run with another file shows its own defaults
    (the module-level command is not edited in place)."""
    params = tmp_path / "params.yaml"
    params.write_text("teach:\n  k: 7\n")
    CliRunner().invoke(main, ["--params", str(params), "teach", "--help"], terminal_width=200)
    result = CliRunner().invoke(main, ["--params", EMPTY_PARAMS, "teach", "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert f"from {params}" not in result.output, result.output


def _all_commands():
    """(name, click command) of every leaf command, store subcommands included."""
    group = main
    for name in group.list_commands(None):
        command = group.get_command(None, name)
        if isinstance(command, click.Group):
            yield from ((f"{name} {sub}", command.commands[sub]) for sub in command.commands)
        else:
            yield name, command


# a concept -> the one option name for it, and the names that once spelt it in some command (the views: the
# student's and finetune-teacher's per-setting flags, now fields of the one --plan)
ALIASES = {"--img-size": ("--size", "--image-px"),
           "--plan": ("--scale", "--scale-min", "--scale-max", "--hflip", "--auto-augment", "--re-prob", "--re-mode"),
           "--num-views": ("--views", "-V"), "--latency-batch": ("--batch",),
           "--finetune-dir": ("--teacher-dir",), "--shards": ("--shard-dir",), "--workers": ("--num-workers",),
           "--threads": ("--num-threads",)}


def test_no_command_spells_a_concept_by_a_retired_alias():
    used = {opt: name for name, command in _all_commands() for param in command.params for opt in param.opts}
    retired = {alias: (right, used[alias]) for right, aliases in ALIASES.items() for alias in aliases if alias in used}
    assert not retired, f"retired alias -> (the one name, the command using it): {retired}"


@pytest.mark.parametrize("name", ["shards", "workers", "quiet", "threads", "device", "resume"])
def test_shared_options_are_one_definition_in_every_command(name):
    """--shards, --workers, --quiet, --threads, --device, --resume: one decorator each (stages/options.py): the same
    param name, default, type and help wherever a command has the option."""
    def spelling(param):
        return param.name, param.default, param.help, param.show_default, repr(param.type)

    found = {cmd: spelling(p) for cmd, command in _all_commands() for p in command.params if f"--{name}" in p.opts}
    assert len(found) >= 2, found
    assert len(set(found.values())) == 1, found

    import stages.options

    assert set(found.values()) == {spelling(getattr(stages.options, name)(lambda: None).__click_params__[0])}


def test_params_keys_have_one_spelling_and_the_other_is_refused_naming_the_right_key(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("teach:\n  num_views: 3\n")
    result = CliRunner().invoke(main, ["--params", str(params), "teach", "--help"])
    assert result.exit_code == 2 and "key 'num_views' is spelt 'num-views'" in result.output, result.output
    params.write_text("finetune_teacher:\n  epochs: 1\n")
    result = CliRunner().invoke(main, ["--params", str(params), "report", "--help"])
    assert result.exit_code == 2 and "is spelt 'finetune-teacher'" in result.output, result.output
    for shipped in ("params.yaml", "params-imagenet.yaml"):  # the files we ship use the one spelling
        result = CliRunner().invoke(main, ["--params", str(REPO / shipped), "teach", "--help"])
        assert result.exit_code == 0, (shipped, result.output)


def test_top_level_help_describes_the_whole_chain():
    result = CliRunner().invoke(main, ["--help"], terminal_width=200)
    assert "shard -> finetune-teacher (optional) -> teach -> student -> fuse -> evaluate -> report" in result.output


def test_teach_store_root_default_is_where_dvc_yaml_puts_the_stores():
    import stages.teach
    from pipeline.defaults import STORE_ROOT

    default = next(p.default for p in stages.teach.command.params if p.name == "store_root")
    assert default == STORE_ROOT == "outputs/stores" and "--store-root outputs/stores/" in (REPO / "dvc.yaml").read_text()
