"""Read the declarative specs users edit under manifests/ (teachers, students, recipes, datasets)."""

from pathlib import Path

import yaml

from pipeline.errors import UserError

MANIFEST_ROOT = Path(__file__).resolve().parent.parent / "manifests"


def spec_path(kind: str, name_or_path, root: Path = MANIFEST_ROOT) -> Path:
    """`manifests/{kind}/{name}.yaml` for a name, else the YAML path itself."""
    path = Path(name_or_path)
    return path if path.suffix in (".yaml", ".yml") else root / kind / f"{name_or_path}.yaml"


def load_spec(kind: str, name_or_path: str, root: Path = MANIFEST_ROOT) -> dict:
    """Load `manifests/{kind}/{name}.yaml`, or a YAML file given by path."""
    path = spec_path(kind, name_or_path, root)
    if not path.is_file():
        known = sorted(p.stem for p in (root / kind).glob("*.yaml"))
        raise UserError(
            f"no {kind[:-1]} spec '{name_or_path}' ({path} not found); known: {', '.join(known) or 'none'}"
            f"; add manifests/{kind}/{name_or_path}.yaml or pass a path to a YAML file"
        )
    try:
        with open(path) as f:
            spec = yaml.safe_load(f) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        detail = " ".join(str(err).split())
        raise UserError(f"{path} is not valid YAML ({detail[:200]}); fix the file") from None
    if not isinstance(spec, dict):
        raise UserError(f"{path}: expected a YAML mapping at the top level")
    spec.setdefault("name", path.stem)
    return spec
