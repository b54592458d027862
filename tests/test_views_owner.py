"""ViewPlan alone owns the view settings: adding one touches pipeline/data/views.py and its test only.

A plan with one more field (as a new augmentation setting would add) reaches every place that takes views
(recipe, --set, the student's --plan, a labels-only student, a teacher store's plan, teach's and
finetune-teacher's --plan) without any of their code changing; and none of that code spells a view setting.
"""

import ast
import dataclasses
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from click.testing import CliRunner

import pipeline.data.views as views
import pipeline.finetune
import pipeline.recipes
import pipeline.train
import stages.finetune_teacher
import stages.options
import stages.student
from pipeline.data.views import ViewPlan
from pipeline.recipes import load_recipe
from stages.cli import main

REPO = Path(__file__).resolve().parent.parent
MODULES = sorted(str(p.relative_to(REPO)) for p in [*(REPO / "pipeline").rglob("*.py"), *(REPO / "stages").glob("*.py")])
OWNER = "pipeline/data/views.py"
# Names that are a view setting's but mean something else there, or read a plan without loading or
# checking it (nothing to change when a setting is added).
ELSEWHERE = {"pipeline/data/sources.py": {"scale"},  # the resize factor of a small image
             "pipeline/models/rep.py": {"scale"},  # the 1x1 "scale" branch
             "pipeline/report.py": {"scale"},  # a unit divisor
             "pipeline/teach.py": {"scale", "auto_augment", "re_prob"}}  # the poor-teacher warning's advice
# What a run gives a plan it builds itself (a labels-only student: its seed, size and interpolation); the
# other fields are the augmentation settings.
RUN_FIELDS = {"seed", "size", "interpolation"}


@pytest.fixture
def extended(monkeypatch):
    """ViewPlan with one new setting, put wherever the name ViewPlan is bound."""
    plan_class = dataclasses.make_dataclass("ViewPlan", [("blur_prob", float, 0.0)], bases=(ViewPlan,), frozen=True)
    for module in list(sys.modules.values()):
        if module.__name__.split(".")[0] in ("pipeline", "stages") and getattr(module, "ViewPlan", None) is ViewPlan:
            monkeypatch.setattr(module, "ViewPlan", plan_class)
    assert views.ViewPlan is plan_class
    return plan_class


def test_a_new_view_setting_reaches_every_consumer_untouched(extended, tmp_path, monkeypatch):
    # recipe and --set: one field, the plan
    recipe = load_recipe("demo", ["alpha=0", "plan={blur_prob: 0.3}"])
    assert recipe.plan == {"blur_prob": 0.3}
    # a labels-only student builds its plan from it
    plan, _ = pipeline.train.resolve_views(recipe, [], "fp", 3, 64, "bicubic")
    assert isinstance(plan, extended) and (plan.blur_prob, plan.size) == (0.3, 64)
    # a store's plan holds it
    store = SimpleNamespace(plan={**plan.to_dict(), "blur_prob": 0.7}, path="s.zarr", provenance={}, num_classes=3,
                            num_views=2, check_compatible=lambda fingerprint, plan_hash: None)
    assert pipeline.train.resolve_views(load_recipe("demo"), [store], "fp", 3, 64, "bicubic")[0].blur_prob == 0.7
    # the student's --plan (YAML text) and params.yaml's mapping reach the recipe
    seen = {}
    monkeypatch.setattr(pipeline.train, "train", lambda spec, recipe, *a, **k: seen.setdefault("recipe", recipe))
    args = ["student", "--student", "mobilenetv2-100", "--recipe", "demo", "--alpha", "0", "--out", str(tmp_path)]
    result = CliRunner().invoke(main, [*args, "--plan", "{blur_prob: 0.3}"])
    assert result.exit_code == 0, result.output
    assert seen.pop("recipe").plan == {"blur_prob": 0.3}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"student": {"plan": {"blur_prob": 0.4}},
                                      "teach": {"plan": {"size": 64, "blur_prob": 0.5}}}))
    result = CliRunner().invoke(main, ["--params", str(params), *args])
    assert result.exit_code == 0, result.output
    assert seen.pop("recipe").plan == {"blur_prob": 0.4}
    # teach's --plan (a file) and finetune-teacher's (teach's by default, or a file)
    (tmp_path / "plan.yaml").write_text("blur_prob: 0.6\n")
    assert stages.options.PlanParam().convert(str(tmp_path / "plan.yaml"), None, None).blur_prob == 0.6
    scores = {"clean": 0.0, "views": 0.0}
    metrics = {"teacher": "t", "name": "t-ft", "before": scores, "after": scores, "epochs": 1, "init": "scratch",
               "seconds": 0}
    monkeypatch.setattr(pipeline.finetune, "finetune_teacher",
                        lambda *a, plan, **k: seen.setdefault("plan", plan) and metrics)
    for extra, want in (((), 0.5), (("--plan", str(tmp_path / "plan.yaml")), 0.6)):
        result = CliRunner().invoke(main, ["--params", str(params), "finetune-teacher", "--teacher", "t", "--out",
                                           str(tmp_path / "t"), *extra])
        assert result.exit_code == 0, result.output
        assert seen.pop("plan").blur_prob == want


def _spelt_names(path: Path) -> set[str]:
    """Identifiers, attributes, keywords and whole string constants (option names without dashes) of a module."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.keyword) and node.arg:
            names.add(node.arg)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.add(node.value.lstrip("-").replace("-", "_"))
    return names


def test_no_module_but_views_spells_a_view_setting():
    """The recipe, the CLI and every loader take a plan as a whole: none names a setting."""
    settings = {f.name for f in dataclasses.fields(ViewPlan)} - RUN_FIELDS
    assert OWNER in MODULES and "pipeline/recipes.py" in MODULES and "stages/finetune_teacher.py" in MODULES
    spelt = {path: sorted(settings & _spelt_names(REPO / path) - ELSEWHERE.get(path, set()))
             for path in MODULES if path != OWNER}
    assert not {path: names for path, names in spelt.items() if names}
