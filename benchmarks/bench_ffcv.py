"""ffcv's JPEG decode + crop path side by side with the fast renderer's, on the same images and crop boxes.

ffcv (in the design card) does not install from the README's commands: it ships no wheel and its build
needs OpenCV and libjpeg-turbo development files from the system (`apt-get install pkg-config
libopencv-dev libturbojpeg0-dev`) and numpy < 2. So it runs in its own interpreter (`--ffcv-python`),
fed the boxes our plan draws: its full decode + crop-resize (what its RandomResizedCrop decoder does)
and its crop-region decode (`enable_crop`, the crop rounded out to JPEG blocks). Ours: Source.pixels +
the fast renderer's resize of the box. ImageNet-like JPEGs (benchmarks/bench_scale.py's), 224 px,
1 thread, CPU ms per view. Prints one JSON object.

    python benchmarks/bench_ffcv.py [--views 512] [--ffcv-python /path/to/ffcv-env/bin/python]
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SIZE = 224


def ours(pool, boxes) -> float:
    from pipeline.data.images import Source, opencv

    cv2 = opencv()
    start = time.process_time()
    for j, (left, top, right, bottom) in enumerate(boxes):
        src = Source(pool[j % len(pool)], "pool").pixels()
        cv2.resize(src[top:bottom, left:right], (SIZE, SIZE), interpolation=cv2.INTER_LINEAR)
    return (time.process_time() - start) / len(boxes) * 1e3


def ffcv_part(path: Path) -> dict:
    """Runs under the ffcv interpreter: numpy, OpenCV and ffcv only."""
    import cv2
    from ffcv import libffcv

    cv2.setNumThreads(1)
    data = np.load(path)
    pool = [data[f"img{i}"] for i in range(int(data["count"]))]
    boxes, shapes = data["boxes"], data["shapes"]
    out = np.empty((SIZE, SIZE, 3), np.uint8)
    buf = np.empty((int(shapes[:, 0].max()), int(shapes[:, 1].max()), 3), np.uint8)
    timings = {}
    start = time.process_time()
    for j, (left, top, right, bottom) in enumerate(boxes):
        h, w = shapes[j % len(pool)]
        libffcv.imdecode(pool[j % len(pool)], buf, h, w, h, w, 0, 0, 1, 1, False, False)
        image = buf.reshape(-1)[:h * w * 3].reshape(h, w, 3)
        libffcv.resize_crop(image, top, bottom, left, right, out)
    timings["ffcv_full_decode_resize_ms"] = (time.process_time() - start) / len(boxes) * 1e3
    start = time.process_time()
    for j, (left, top, right, bottom) in enumerate(boxes):
        h, w = shapes[j % len(pool)]
        x0, y0 = left // 16 * 16, top // 16 * 16  # the crop decode starts on a JPEG block (4:2:0: 16 px)
        ch, cw = bottom - y0, right - x0
        libffcv.imdecode(pool[j % len(pool)], buf, h, w, ch, cw, x0, y0, 1, 1, True, False)
        image = buf.reshape(-1)[:ch * cw * 3].reshape(ch, cw, 3)
        libffcv.resize_crop(image, top - y0, ch, left - x0, cw, out)
    timings["ffcv_crop_decode_resize_ms"] = (time.process_time() - start) / len(boxes) * 1e3
    return timings


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--views", type=int, default=512)
    parser.add_argument("--ffcv-python", help="an interpreter with ffcv installed")
    parser.add_argument("--ffcv-part", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ffcv_part:
        print(json.dumps(ffcv_part(args.ffcv_part)))
        return
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_scale import _pool
    from pipeline.data.images import Source
    from pipeline.data.views import ViewPlan, crop_box, view_params

    torch.set_num_threads(1)
    pool = _pool(64)
    sizes = [Source(b, "pool").size for b in pool]
    plan = ViewPlan(renderer="fast")
    boxes = np.array([crop_box(view_params(plan, f"k{j}", 0), plan, sizes[j % len(pool)]) for j in range(args.views)])
    result = {"views": args.views, "size": SIZE, "ours_decode_resize_ms": ours(pool, boxes)}
    if args.ffcv_python:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "views.npz"
            np.savez(path, count=len(pool), boxes=boxes, shapes=np.array([(h, w) for w, h in sizes]),
                     **{f"img{i}": np.frombuffer(b, np.uint8) for i, b in enumerate(pool)})
            proc = subprocess.run([args.ffcv_python, __file__, "--ffcv-part", str(path)], check=True,
                                  stdout=subprocess.PIPE, text=True)
            result.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()
