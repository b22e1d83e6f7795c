"""The GPU benchmark in one command: Gemma 3-1B's shape in bf16 and fp32, and Gemma 3 270M, then the README
rows.

    python -m part3_attribution_graphs.tools.gpu_bench              # on a CUDA machine
    python -m part3_attribution_graphs.tools.gpu_bench --dry-run    # anywhere: the same path, CPU-sized

Each case runs `bench.run_case` (seed loop sampled, ours, circuit-tracer at its default batch size
and a sweep) and its table is printed; the README's benchmark table then gets one row per case, dated
and naming the device, in place of the earlier GPU rows. `--dry-run` swaps in CPU stand-ins (the
1B shape shrunk with `--tiny`, the toy world for 270M) and writes to `--readme` all the same, so the
code path is tested without a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch

from . import bench

__all__ = ["GPU_CASES", "readme_row", "update_readme", "main"]

# (label in the README, bench case, dtype)
GPU_CASES = [
    ("Gemma 3-1B shape", "gemma1b-shape", "bfloat16"),
    ("Gemma 3-1B shape", "gemma1b-shape", "float32"),
    ("Gemma 3 270M (real weights)", "gemma270m", "float32"),
]
ROW_PREFIXES = ("| Gemma 3-1B shape", "| Gemma 3 270M (real weights)")  # the rows this script owns


def _seconds(value: float) -> str:
    return f"{value:.3g} s" if value >= 0.01 else f"{value * 1000:.3g} ms"


def readme_row(label: str, res: dict, device_name: str, date: str) -> str:
    """One row of the README's table: case | (a) | (b) | (c) best | a/b | c/b."""
    rows = {r["method"][:3]: r for r in res["rows"]}
    ct = [r for r in res["rows"] if r["method"].startswith("(c)")]
    best = min(ct, key=lambda r: r["seconds"]) if ct else None
    a = _seconds(rows["(a)"]["seconds"]) if "(a)" in rows else "-"
    c = _seconds(best["seconds"]) if best else "-"
    a_b = f"{res['a_over_b']:.0f}x" if res.get("a_over_b") else ""
    c_b = f"{res['c_best_over_b']:.1f}x" if res.get("c_best_over_b") else ""
    what = f"{label}, {res['dtype']}, {res['n_tokens']} tokens, {rows['(b)']['n_nodes']:,} nodes"
    return (
        f"| {what}; {device_name}, {date} | {a} | **{_seconds(rows['(b)']['seconds'])}** | "
        f"{c} | {a_b} | {c_b} |"
    )


def update_readme(path: Path, new_rows: list[str]) -> None:
    """Put `new_rows` where this script's earlier rows (or the 'pending' GPU row) were in the README table."""
    lines = path.read_text().splitlines()
    owned = [i for i, line in enumerate(lines) if line.startswith(ROW_PREFIXES)]
    if not owned:
        raise ValueError(
            f"{path} has no benchmark row starting with {ROW_PREFIXES}: add one to the table first."
        )
    lines[owned[0] : owned[-1] + 1] = new_rows
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="CPU stand-ins for every case (tests the path)"
    )
    parser.add_argument("--readme", type=Path, default=Path("README.md"))
    parser.add_argument("--json", type=Path, default=None, help="also write every case's results here")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no GPU is visible to torch: run on a CUDA machine, or pass --dry-run to test the path.")
    device = "cpu" if args.dry_run else "cuda"
    device_name = "CPU dry run" if args.dry_run else torch.cuda.get_device_name(0)
    date = datetime.date.today().isoformat()
    results, rows = [], []
    for label, case, dtype in GPU_CASES:
        if args.dry_run:  # small stand-ins that take the same code path
            case = "toy" if case == "gemma270m" else case
            res = bench.run_case(
                case,
                device,
                getattr(torch, dtype),
                ct_batch_sizes=(64, 512),
                repeats=1,
                seed_max_batches=3,
                tiny=True,
            )
        else:
            sweep = (64, 128, 256, bench.CT_DEFAULT_BATCH)
            res = bench.run_case(
                case, device, getattr(torch, dtype), ct_batch_sizes=sweep, repeats=3, autograd_row=True
            )
        print(bench.format_table(res), "\n", flush=True)
        results.append(res)
        rows.append(readme_row(label, res, device_name, date))
    update_readme(args.readme, rows)
    print(f"wrote {len(rows)} rows to {args.readme}:\n" + "\n".join(rows))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
