"""`pipeline store show`: a picture of what the teacher saw, replayed from its store.

The teacher's top-1 on its views says that a view plan is too strong only as a number; a grid of the
stored views, each captioned with its label and the teacher's stored top-3, shows at a glance whether
the views still show the class and whether the teacher still sees it. Every tile is rendered from the
params READ FROM THE STORE at the teacher's input size (pipeline.data.loaders.replay_views: what the
teacher saw, pixel for pixel), then enlarged by a whole factor (nearest) so small images stay readable;
a red frame marks a view whose stored top-1 is not the label.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.data.loaders import replay_views
from pipeline.data.shards import ShardManifest
from pipeline.data.views import ViewPlan
from pipeline.errors import UserError
from pipeline.io import atomic_write_bytes

TILE_MIN = 96   # px: a smaller view is enlarged by the smallest whole factor that reaches this
COLUMNS = 8
FRAME = 3       # px around each tile: red where the teacher is wrong
PAD = 6
FONT_PX = 11
CAPTION_LINES = 4  # the label, then the teacher's top-3
WRONG, RIGHT = (220, 30, 30), (210, 210, 210)
LABEL_INK, HIT_INK, MISS_INK = (0, 0, 0), (20, 120, 40), (90, 90, 90)


def view_scores(store) -> tuple[np.ndarray, np.ndarray]:
    """Per stored view of the finished shards: (rows int64 [M, 2] of (index, view), sort key [M, 2]).

    The key orders views from the label's lowest stored probability up: first every view whose label
    is not in the stored top-k (its probability is only bounded: at most min(rest mass, smallest top-k
    probability); those come by that bound, lowest first), then the others by the label's stored
    log-probability. Read one store shard at a time, as pipeline.inspection.top1_vs_labels does.
    """
    g, rows, keys = store.arrays, [], []
    for shard in np.flatnonzero(store.done_mask()):
        part = store.shard_rows_range(int(shard))
        values = g["values"][part.start:part.stop].astype(np.float64)
        indices = g["indices"][part.start:part.stop]
        labels = g["labels"][part.start:part.stop].astype(np.int64)
        hit = indices == labels[:, None, None]
        in_topk = hit.any(-1)
        rest = np.clip(1 - np.exp(values).sum(-1), 1e-12, None)
        bound = np.minimum(np.log(rest), values.min(-1))
        logp = np.where(in_topk, np.where(hit, values, 0).sum(-1), bound)
        index, view = np.meshgrid(np.arange(part.start, part.stop), np.arange(store.num_views), indexing="ij")
        rows.append(np.stack([index.ravel(), view.ravel()], 1))
        keys.append(np.stack([in_topk.ravel().astype(np.float64), logp.ravel()], 1))
    if not rows:
        raise UserError(f"teacher store {store.path} has no finished shard to show; run `pipeline teach` first")
    return np.concatenate(rows), np.concatenate(keys)


def pick_views(store, n: int, worst: bool = False, seed: int = 0) -> np.ndarray:
    """int64 [n, 2] (index, view) rows: the `n` views lowest in view_scores' order (`worst`), else a fixed
    seeded sample of the finished views in store order."""
    rows, keys = view_scores(store)
    n = min(n, len(rows))
    if worst:
        return rows[np.lexsort((keys[:, 1], keys[:, 0]))[:n]]
    return rows[np.sort(np.random.default_rng(seed).choice(len(rows), n, replace=False))]


def captions(store, rows: np.ndarray, classes: list[str]) -> list[dict]:
    """Label and the teacher's stored top-3 (class, probability) of each (index, view) row."""
    g, out = store.arrays, []
    for i, v in rows:
        values, indices = g["values"][i, v].astype(np.float64), g["indices"][i, v]
        label = int(g["labels"][i])
        order = np.argsort(-values, kind="stable")[:3]
        top = [(int(indices[j]), float(np.exp(values[j]))) for j in order]
        out.append({"index": int(i), "view": int(v), "label": label, "label_name": classes[label],
                    "top3": [(c, classes[c], p) for c, p in top], "wrong": top[0][0] != label})
    return out


def render_tiles(store, shards, rows: np.ndarray) -> np.ndarray:
    """uint8 [n, S, S, 3]: each row's view rendered from its STORED params at the teacher's input size."""
    p = store.provenance
    plan = ViewPlan.load(store.plan, f"teacher store {store.path}")
    size = int(p["teacher"]["input_size"])
    stored = store.read_views(rows[:, 0], rows[:, 1], ("params",))
    images = replay_views(shards, p["split"], plan, rows, stored, size)
    return images.permute(0, 2, 3, 1).numpy()


def draw_grid(tiles: np.ndarray, notes: list[dict], title: str) -> tuple[Image.Image, list[tuple]]:
    """The gallery image and each tile's box (x0, y0, x1, y1) in it."""
    size = tiles.shape[1]
    zoom = max(1, math.ceil(TILE_MIN / size))
    tile = size * zoom
    font = ImageFont.load_default(size=FONT_PX)
    line = FONT_PX + 3
    cols = min(COLUMNS, len(tiles))
    cell_w, cell_h = tile + 2 * FRAME + PAD, tile + 2 * FRAME + CAPTION_LINES * line + PAD
    top = PAD + 2 * line
    canvas = Image.new("RGB", (PAD + cols * cell_w, top + math.ceil(len(tiles) / cols) * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    for k, text in enumerate(title.split("\n")[:2]):
        draw.text((PAD, PAD + k * line), text, fill=LABEL_INK, font=font)
    boxes = []
    for j, (pixels, note) in enumerate(zip(tiles, notes)):
        x, y = PAD + (j % cols) * cell_w, top + (j // cols) * cell_h
        edge = tile + 2 * FRAME - 1
        draw.rectangle([x, y, x + edge, y + edge], fill=WRONG if note["wrong"] else RIGHT)
        big = np.repeat(np.repeat(pixels, zoom, 0), zoom, 1)
        canvas.paste(Image.fromarray(np.ascontiguousarray(big)), (x + FRAME, y + FRAME))
        boxes.append((x + FRAME, y + FRAME, x + FRAME + tile, y + FRAME + tile))
        lines = [(f"label {note['label_name']}  #{note['index']} v{note['view']}", LABEL_INK)]
        lines += [(f"{100 * prob:4.1f}% {name}", HIT_INK if c == note["label"] else MISS_INK)
                  for c, name, prob in note["top3"]]
        for k, (text, ink) in enumerate(lines):
            draw.text((x, y + tile + 2 * FRAME + 1 + k * line), _fit(text, font, tile + 2 * FRAME), fill=ink, font=font)
    return canvas, boxes


def _fit(text: str, font, width: int) -> str:
    """`text`, cut with an ellipsis to fit `width` px."""
    while len(text) > 1 and font.getlength(text) > width:
        text = text[:-2] + "…"
    return text


def show(store, shards, out, n: int = 32, worst: bool = False) -> dict:
    """Write the gallery of `n` stored views of `store` to the PNG `out` (atomically); returns what it shows."""
    p = store.provenance
    manifest = ShardManifest.read(shards)
    store.check_compatible(manifest.fingerprint, p["plan_hash"])
    rows = pick_views(store, n, worst)
    notes = captions(store, rows, [str(c) for c in manifest.classes])
    wrong = sum(note["wrong"] for note in notes)
    how = "lowest stored p(label) first" if worst else "a fixed sample"
    title = (f"teacher {p['teacher']['name']} on its stored views ({p['dataset']}/{p['split']}, plan "
             f"{p['plan_hash'][:8]}): {len(rows)} views, {how}\nlabel, then the teacher's stored top-3; red frame: top-1 wrong "
             f"({wrong} of {len(rows)})")
    image, boxes = draw_grid(render_tiles(store, shards, rows), notes, title)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(out, buf.getvalue())
    for note, box in zip(notes, boxes):
        note["box"] = box
    return {"out": str(out), "views": notes, "wrong": wrong}
