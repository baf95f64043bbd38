"""Print a results file of ``compare_methods.py`` (JSON lines) as the Markdown table the READMEs quote.

    python scripts/results_table.py docs/results/mr2ct_ibsi.jsonl

One row per line of the file, in its order: method and its knobs, paired fraction, budget and
iterations, then mean ± standard deviation over the held-out cases of masked MAE (HU), PSNR (dB)
and SSIM (SynthRAD2023 definitions). The machine and cases of the first row are printed under it.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

METRICS = (("mae_hu", "MAE (HU)", 1), ("psnr_db", "PSNR (dB)", 2), ("ssim", "SSIM", 3))


def describe(row: dict) -> str:
    """``method`` and the settings that distinguish it (sampler, overrides)."""
    config = row.get("config", {})
    parts = [row["method"]]
    if config.get("sampler"):
        parts.append(f"sampler {config['sampler']}")
    parts += [f"{key} {value}" for key, value in sorted(config.get("overrides", {}).items())]
    return ", ".join(parts)


def spread(row: dict, key: str, digits: int) -> str:
    values = row.get("per_case", {}).get(key)
    if not values or len(values) < 2:
        return f"{row[key]:.{digits}f}"
    return f"{row[key]:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(rows: list[dict]) -> str:
    header = "| method | paired | budget (s) / iterations | " + " | ".join(name for _, name, _ in METRICS) + " |"
    lines = [header, "|" + "---|" * (3 + len(METRICS))]
    for row in rows:
        metrics = " | ".join(spread(row, key, digits) for key, _, digits in METRICS)
        budget = f"{row.get('budget_seconds', round(row['train_seconds']))} / {row['iterations']}"
        lines.append(f"| {describe(row)} | {row['paired_fraction']:.0%} | {budget} | {metrics} |")
    first = rows[0]
    lines.append("")
    lines.append(f"Machine: {first.get('device', '?')}; held-out cases: {', '.join(first.get('cases', []))}.")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="a .jsonl file written by scripts/compare_methods.py")
    args = parser.parse_args(argv)
    rows = [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
    if not rows:
        parser.error(f"{args.results.name}: no results")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
