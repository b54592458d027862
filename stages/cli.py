"""The `pipeline` console command: a click group over the stage modules.

Stage modules are imported only when their command runs, so `pipeline --help` stays fast.
Every option can also come from params.yaml: the section named after the command (e.g. `teach:`,
`finetune-teacher:`) is click's default_map for that command, and command-line options override it.
Keys are spelt as the options are typed (`num-views: 4` for --num-views), like the per-student options
that dvc.yaml unpacks into flags: one spelling in the whole file.
"""

import copy
import errno
import importlib
import importlib.util
import os
import sys
from pathlib import Path

import click
import yaml

from pipeline.errors import UserError

# command name -> (module, attribute, one-line help)
STAGES = {
    "shard": ("stages.shard", "command", "Write a dataset as webdataset shards + manifest.json."),
    "finetune-teacher": ("stages.finetune_teacher", "command", "Fine-tune a teacher on the train shards."),
    "teach": ("stages.teach", "command", "Run a teacher once over the views; store top-k logits."),
    "store": ("stages.store", "group", "Inspect teacher logit stores."),
    "student": ("stages.student", "command", "Train a student against stored teacher logits."),
    "fuse": ("stages.fuse", "command", "Fold a trained student into its stock inference model."),
    "evaluate": ("stages.evaluate", "command", "Evaluate a fused student on the validation split."),
    "report": ("stages.report", "command", "Table + figure of every evaluated student."),
}


class StageGroup(click.Group):
    def list_commands(self, ctx):
        return [name for name, (module, _, _) in STAGES.items() if importlib.util.find_spec(module)]

    def get_command(self, ctx, name):
        """The stage's command; within an invocation, one copy of it, which --help's sources may annotate
        without changing the module-level command that the next invocation gets."""
        if name not in STAGES:
            return None
        module, attr, _ = STAGES[name]
        command = getattr(importlib.import_module(module), attr)
        if ctx is None or isinstance(command, click.Group):
            return command
        key = f"{__name__}.command.{name}"
        if key not in ctx.meta:
            ctx.meta[key] = _own_copy(command)
        return ctx.meta[key]

    def format_commands(self, ctx, formatter):
        rows = [(name, STAGES[name][2]) for name in self.list_commands(ctx)]
        if not rows:
            return
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as err:  # a bad option of `pipeline` itself
            usage_error(err)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as err:  # a bad command, option or value: one line, like ours (no Usage/Try lines)
            usage_error(err)
        except UserError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)
        except OSError as err:
            if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            where = f" writing {err.filename}" if err.filename else ""
            click.echo(f"error: disk full{where} ({err.strerror}); every output is written as a temp file + rename, "
                       "so what was already there is unchanged: free space and re-run the same command", err=True)
            sys.exit(2)


def _own_copy(command: click.Command) -> click.Command:
    own = copy.copy(command)
    own.params = [copy.copy(param) for param in command.params]
    return own


def usage_error(err: click.UsageError):
    where = f"`{err.ctx.command_path}`: " if err.ctx is not None else ""
    click.echo(f"error: {where}{' '.join(err.format_message().split())} (see --help)", err=True)
    sys.exit(2)


def load_params(path: Path, explicit: bool = False) -> dict:
    """Sections of params.yaml keyed by command name, keys as written (option names: see `default_map`).

    The default params.yaml may be absent; a file named with --params must exist. A section named after
    a command must be a mapping (other top-level keys are dvc.yaml's and are left alone)."""
    if not path.is_file():
        if explicit:
            raise UserError(f"--params {path}: file not found; give an existing YAML file")
        return {}
    try:
        params = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        detail = " ".join(str(err).split())
        raise UserError(f"{path} is not valid YAML ({detail}); fix the file or pass --params") from None
    if not isinstance(params, dict):
        raise UserError(f"{path} must be a mapping of sections (e.g. `teach:`), not a {type(params).__name__}")
    for section, options in params.items():
        if str(section).replace("_", "-") not in STAGES:
            continue
        if "_" in str(section):
            raise UserError(f"{path}: section '{section}' is spelt '{section.replace('_', '-')}' (the command's name)")
        if not isinstance(options, dict):
            raise UserError(f"{path}: section '{section}' must be a mapping of option: value, "
                            f"not {type(options).__name__}")
    return {section: options for section, options in params.items() if section in STAGES}


def default_map(path: Path, name: str, command: click.Command, section: dict) -> dict:
    """A section's keys are the option names as typed (`num-views` for --num-views): -> click's param names.

    A misspelt key would silently be ignored by click, and a second spelling would make two names for one
    setting: refuse both, naming the right key. A null where the option has a default is refused too: click
    passes it on as None, past the option's type and range."""
    by_option = {opt.lstrip("-"): param.name for param in command.params for opt in param.opts if opt.startswith("--")}
    defaults = {param.name: param.default for param in command.params}
    unknown = []
    for key, value in section.items():
        if value is None and defaults.get(by_option.get(key)) is not None:
            raise UserError(f"{path}: section '{name}' key '{key}' is null; give a value, or remove the key for the "
                            f"default ({_brief(defaults[by_option[key]])})")
        if key not in by_option and str(key).replace("_", "-") in by_option:
            raise UserError(f"{path}: section '{name}' key '{key}' is spelt '{key.replace('_', '-')}' "
                            f"(as the option --{key.replace('_', '-')} is typed)")
        if key not in by_option:
            unknown.append(str(key))
    if unknown:
        raise UserError(
            f"{path}: section '{name}' has unknown option(s) {', '.join(sorted(unknown))}; "
            f"`pipeline {name} --help` lists the valid ones"
        )
    return {by_option[key]: value for key, value in section.items()}


@click.group(cls=StageGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--params", "params_path", type=click.Path(dir_okay=False, path_type=Path),
              default="params.yaml", show_default=True,
              help="YAML file whose section per command (e.g. `teach:`) gives that command's defaults.")
@click.pass_context
def main(ctx, params_path):
    """Offline teacher-logit distillation: shard -> finetune-teacher (optional) -> teach -> student -> fuse ->
    evaluate -> report.

    A command's --help shows the defaults in effect: "from params.yaml `SECTION:`" marks a value from
    the --params file, the others are built in.
    """
    explicit = ctx.get_parameter_source("params_path") != click.core.ParameterSource.DEFAULT
    ctx.default_map = load_params(params_path, explicit)
    name = ctx.invoked_subcommand
    if os.environ.get("DVC_STAGE") and name in STAGES:  # under `dvc repro`: say which stage this is, first
        click.echo(f"{os.environ['DVC_STAGE']}: {STAGES[name][2]}", err=True)
    command = ctx.command.get_command(ctx, name) if name else None
    if command is not None and not isinstance(command, click.Group):
        section = default_map(params_path, name, command, ctx.default_map.get(name, {}))
        ctx.default_map[name] = section
        show_default_sources(command, section, f"{params_path} `{name}:`")


def _brief(value) -> str:
    """A default as --help shows it: a mapping is named, not printed."""
    if isinstance(value, dict):
        return f"a mapping of {len(value)} fields"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def show_default_sources(command: click.Command, section: dict, where: str) -> None:
    """--help shows the effective default and where it comes from: a value from params.yaml's section says
    so; the others are the built-in defaults."""
    for param in command.params:
        if isinstance(param, click.Option) and param.name in section and not param.hidden:
            param.show_default = f"{_brief(section[param.name])} from {where}"
