"""Wall time of `pipeline [CMD] --help` for every command (a new process each, as a user types it).

Heavy libraries (torch, timm, zarr, dvc, ...) are imported inside the command bodies, so --help only
pays for Python, click and yaml. Prints one JSON object: seconds per command (median of --repeat runs),
the slowest, and the floor (a bare `python -c 'import click, yaml'`) on the same machine.

    python benchmarks/bench_help.py [--repeat 5]
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

from stages.cli import STAGES

STORE_COMMANDS = ["store list", "store inspect"]
CLI = "import sys; from stages.cli import main; sys.argv[0] = 'pipeline'; main()"


def _time(args: list[str], repeat: int, code: str = CLI) -> float:
    runs = []
    for _ in range(repeat):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True)
        runs.append(time.perf_counter() - started)
    return round(statistics.median(runs), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    commands = [""] + list(STAGES) + STORE_COMMANDS
    seconds = {name or "pipeline": _time([*name.split(), "--help"], args.repeat) for name in commands}
    slowest = max(seconds, key=seconds.get)
    floor = _time([], args.repeat, "import click, yaml")  # what any click + params.yaml CLI pays
    print(json.dumps({"repeat": args.repeat, "seconds": seconds, "slowest": slowest, "max_s": seconds[slowest],
                      "python_click_yaml_s": floor}))


if __name__ == "__main__":
    main()
