"""Time `gpt2cloud --help` and `gpt2cloud estimate` against `sky --help` on this machine.

Goal: gpt2cloud answers at least 10x faster than SkyPilot's CLI (which imports ~3 s of modules).
Usage: python benchmarks/bench_cli.py [--repeat N]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def timed(cmd: list[str], repeat: int) -> float:
    """Median wall seconds of a whole process, start to exit."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    bindir = Path(sys.executable).parent
    exe = shutil.which("gpt2cloud") or str(bindir / "gpt2cloud")
    sky = shutil.which("sky") or str(bindir / "sky")
    cases = [
        ("gpt2cloud --help", [exe, "--help"]),
        ("gpt2cloud estimate gpt2-1558m", [exe, "estimate", "gpt2-1558m", "--gpus", "H100:8", "--price", "3"]),
        ("gpt2cloud estimate --compare", [exe, "estimate", "gpt2-124m", "--compare"]),
        ("sky --help", [sky, "--help"]),
    ]
    results = {name: timed(cmd, args.repeat) for name, cmd in cases}
    sky_s = results["sky --help"]
    print(f"{'command':<34} {'median s':>9} {'vs sky --help':>14}")
    for name, s in results.items():
        print(f"{name:<34} {s:>9.3f} {sky_s / s:>13.1f}x")


if __name__ == "__main__":
    main()
