"""Every code snippet of the README runs, so the README cannot drift from the code.

Python blocks run in a fresh interpreter WITHOUT this project on the path (they are what a deployment
does), bash blocks through bash with the `pipeline` command, both in a folder holding tiny outputs
laid out as the demo's (a fused `ghostnetv3`, a teacher store). Skipped, and reported as skipped: the
README's first block (the two set-up lines, which CI itself runs) and any block whose first line is
tagged [long] (the whole chain: tests/test_chain.py runs it), [GPU] or [example] (needs files you bring).
A python block that imports `pipeline` may use this project; the others (deployment) must not.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.fuse import fuse_student
from tests._chain_helpers import fake_student, tiny_shards
from tests.test_store import make_store

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
BLOCKS = re.findall(r"^```(bash|python)\n(.*?)^```", README, re.S | re.M)
TAGS = ("[long]", "[GPU]", "[example]")
NOT_OURS = """
import sys
assert not [m for m in sys.modules if m.split(".")[0] in ("pipeline", "stages")], "the snippet used our code"
"""


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme")
    shards = tiny_shards(root / "data")
    student = fake_student(root / "outputs" / "students" / "ghostnetv3")
    fuse_student(student, shards, root / "outputs" / "fused" / "ghostnetv3", check_images=4)
    make_store(root / "outputs" / "stores" / "demo-resnet10t-ft" / "demo-resnet10t-ft-k1.zarr")
    return root


def test_readme_opens_with_its_two_setup_lines():
    lang, code = BLOCKS[0]
    assert lang == "bash" and len(code.splitlines()) == 2 and all("pip install" in line for line in code.splitlines())


@pytest.mark.parametrize("index", range(1, len(BLOCKS)), ids=lambda i: f"{BLOCKS[i][0]}-block-{i}")
def test_readme_snippet_runs(index, outputs):
    lang, code = BLOCKS[index]
    first = code.splitlines()[0]
    tags = [tag for tag in TAGS if tag in first]
    if tags:
        pytest.skip(f"tagged {tags[0]}: {first.strip()}")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if lang == "python":
        ours = re.search(r"^\s*(import|from)\s+pipeline\b|import .*\bpipeline\.", code, re.M)
        if ours:
            env["PYTHONPATH"] = str(REPO)
        proc = subprocess.run([sys.executable, "-c", code + ("" if ours else NOT_OURS)], cwd=outputs, env=env,
                              capture_output=True, text=True)
        assert proc.returncode == 0, f"README python block {index} failed:\n{code}\n{proc.stderr[-3000:]}"
        return
    env.update(PYTHONPATH=str(REPO), PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    for line in code.splitlines():
        command = line.split("#", 1)[0].strip() if not line.lstrip().startswith("#") else ""
        if command:
            proc = subprocess.run(["bash", "-c", command], cwd=outputs, env=env, capture_output=True, text=True)
            assert proc.returncode == 0, f"README line failed: {command}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"


def test_readme_deploy_params_are_the_stock_models():
    """The README's deploy counts are what the deployed (stock) model holds, not the folded training form."""
    import timm

    from pipeline.models import count_params_macs, to_stock

    line = re.search(r"GhostNetV3\s+0\.5x / 1\.0x / 1\.3x / 1\.6x = ([\d,/ ]+) params", README)
    assert line, "the README states no deploy parameter counts of GhostNetV3 0.5x-1.6x"
    stated = [int(v.replace(",", "")) for v in line.group(1).split("/")]
    counted = [count_params_macs(to_stock(timm.create_model(f"rep_ghostnetv3_{w}", num_classes=1000)))[0]
               for w in ("050", "100", "130", "160")]
    assert stated == counted
