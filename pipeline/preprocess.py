"""How a model's input images are prepared: one frozen record for teachers, students and the records they hand on.

A timm model's preprocessing is timm's data config of its pretrained_cfg (timm.data.resolve_data_config), with
what its spec states over it. Views are rendered from the view plan at `input_size` and normalised with `mean`
and `std`; `crop_pct` and `interpolation` are the clean eval render's (timm's eval transform).

This module imports nothing heavy: stages read specs through it before any model loads (a fast --help).
"""

import dataclasses
from dataclasses import dataclass

from pipeline.errors import UserError
from pipeline.io import finite_number


@dataclass(frozen=True)
class Preprocess:
    """Input size, normalisation and the eval resize + centre crop of one model."""

    input_size: int                 # px, square
    mean: tuple                     # (R, G, B), of pixels in [0, 1]
    std: tuple
    crop_pct: float | None          # eval: resize to input_size / crop_pct, centre crop; None: the dataset's
    interpolation: str              # of that resize (views use the plan's)

    @classmethod
    def from_dict(cls, data: dict, where: str, fix: str, data_crop: bool = False) -> "Preprocess":
        """The preprocessing keys of a spec or record (its other keys are not looked at), checked: a bad value is
        one line naming `where` and `fix`. `data_crop`: crop_pct may be null, for the dataset's."""
        from pipeline.data.views import INTERPOLATIONS  # views import timm and PIL: not at this module's import

        def bad(key, want):
            raise UserError(f"{where}: `{key}: {data[key]!r}` must be {want}; {fix}")

        size = data["input_size"]
        size = size[-1] if isinstance(size, (list, tuple)) and size else size  # timm style (3, H, W)
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            bad("input_size", "a positive number of pixels")
        for key in ("mean", "std"):
            values = data[key]
            if (not isinstance(values, (list, tuple)) or len(values) != 3 or not all(map(finite_number, values))
                    or (key == "std" and min(values) <= 0)):
                bad(key, "three numbers (R, G, B)" + (", each > 0" if key == "std" else ""))
        crop = data["crop_pct"]
        if not (crop is None and data_crop) and not (finite_number(crop) and 0 < crop <= 1):
            bad("crop_pct", "a number in (0, 1]" + (" or null (the dataset's)" if data_crop else ""))
        if data["interpolation"] not in INTERPOLATIONS:
            bad("interpolation", f"one of {', '.join(INTERPOLATIONS)}")
        return cls(input_size=size, mean=tuple(map(float, data["mean"])), std=tuple(map(float, data["std"])),
                   crop_pct=None if crop is None else float(crop), interpolation=data["interpolation"])

    def to_dict(self) -> dict:
        """The keys a spec or record file spells (lists, as YAML and JSON write them)."""
        return {**dataclasses.asdict(self), "mean": list(self.mean), "std": list(self.std)}


KEYS = tuple(field.name for field in dataclasses.fields(Preprocess))


def timm_defaults(cfg) -> dict:
    """The preprocessing keys of timm's data config for a pretrained_cfg (None: a model registered without one
    gets timm's defaults)."""
    from timm.data import resolve_data_config
    from timm.models import PretrainedCfg

    config = resolve_data_config(pretrained_cfg=(cfg or PretrainedCfg()).to_dict())
    return {key: config[key] for key in KEYS}
