"""A gpu_check.sh results file -> `kind: measured` MFU calibration points for `gpt2cloud estimate`.

    python benchmarks/gpu_results_to_calibration.py RESULTS            # print the points (JSON lines)
    python benchmarks/gpu_results_to_calibration.py RESULTS --append   # and add them to the user calibration
                                                                       # file ($GPT2CLOUD_HOME/calibration.jsonl)

One point per AdamW step row (124M AdamW, 1558M AdamW) that finished on a GPU of a known type: its MFU by
the estimator's own formula (tokens/s x (6N + 12*L*d*T) / peak dense BF16), in the form
gpt2cloud/runs/calibrate.py writes for a finished run, so `default_mfu` interpolates with it. The Muon rows
are not MFU points: their step also holds Newton-Schulz, which the estimate adds on its own
(cost/optimizers.py); a dry run's rows (CPU stand-ins) and failed rows give none. A point is one GPU
(gpus: 1): no gradient all-reduce, which a node of 8 pays over NVLink inside its calibrated MFU, so it
reads a little high for a multi-GPU estimate. --append skips a point whose source is already there.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MFU_PARTS = ("124m-adamw", "1558m")  # AdamW rows: the model's FLOPs and nothing else


def points(rows: list[dict], results: str = "gpu_check") -> tuple[list[dict], list[str]]:
    """(calibration points, why each other row gave none)."""
    out, skipped = [], []
    for row in rows:
        part = row.get("part")
        if part not in MFU_PARTS:
            if part not in ("info", "small", None):
                skipped.append(f"{part}: not an MFU point (" + ("failed" if "failed" in row else
                               "Muon's step holds Newton-Schulz, which the estimate adds on its own") + ")")
            continue
        if "failed" in row:
            skipped.append(f"{part}: failed ({row['failed']})")
        elif row.get("dry") or row.get("gpu") in (None, "CPU"):
            skipped.append(f"{part}: " + ("a dry run on the CPU" if row.get("dry") else "a GPU not in gpus.yaml"))
        elif not row.get("mfu") or not 0 < row["mfu"] <= 1:
            skipped.append(f"{part}: MFU {row.get('mfu')} is not plausible")
        else:
            out.append({
                "gpu": row["gpu"], "params": int(row["params"]), "mfu": round(row["mfu"], 4), "kind": "measured",
                "nodes": 1, "gpus": 1, "basis": "per-step", "tokens_per_second": round(row["tokens_per_second"]),
                "source": (f"benchmarks/gpu_check.sh {part}: {row['recipe']}, micro-batch {row['micro_batch']} x "
                           f"{row['accum']}, {'compiled' if row.get('compile') else 'eager'}, 1 GPU ({row['device']}), "
                           f"{row['tokens_per_second']:,.0f} tokens/s ({results}, {row.get('time', '')})"),
                "date": (row.get("time") or "")[:10],
            })
    return out, skipped


def append_points(new: list[dict]) -> tuple[Path, int]:
    from gpt2cloud.home import user_calibration_path

    path = user_calibration_path()
    have = set()
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                have.add(json.loads(line).get("source"))
            except (json.JSONDecodeError, AttributeError):
                continue
    fresh = [p for p in new if p["source"] not in have]
    if fresh:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(p) + "\n" for p in fresh))
    return path, len(fresh)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, help="the JSON lines file gpu_check.sh wrote")
    p.add_argument("--append", action="store_true", help="add the points to the user calibration file")
    a = p.parse_args(argv)
    if not a.results.is_file():
        print(f"error: {a.results} not found; give the results file gpu_check.sh named", file=sys.stderr)
        return 2
    rows = []
    for line in a.results.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    new, skipped = points(rows, a.results.name)
    for pt in new:
        print(json.dumps(pt))
    for why in skipped:
        print(f"no point: {why}", file=sys.stderr)
    if a.append and new:
        path, n = append_points(new)
        print(f"appended {n} point(s) to {path}" + (f" ({len(new) - n} already there)" if n < len(new) else ""),
              file=sys.stderr)
    return 0 if new else 1


if __name__ == "__main__":
    sys.exit(main())
