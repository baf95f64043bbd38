"""Print a results file of ``compare_methods.py`` (JSON lines) as the Markdown table the READMEs quote.

    python scripts/results_table.py docs/results/mr2ct_ibsi.jsonl

One row per line of the file, in its order, one table per task: method and its knobs (with the
sampler that ran, when the row records it), paired fraction, budget and iterations (per stage where
they differ, as for a noise network from a shared prior; none for ``input``, the held-out input
scored as it is), then mean ± standard deviation over the
held-out cases of MAE (HU), PSNR (dB), SSIM and, where the rows have it (low-dose CT), RMSE (HU).
The metric definitions, machine and cases of the first row are printed under it.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

METRICS = (("mae_hu", "MAE (HU)", 1), ("psnr_db", "PSNR (dB)", 2), ("ssim", "SSIM", 3), ("rmse_hu", "RMSE (HU)", 1))


def _value(value) -> str:
    """An override's value; a network definition by its channels (the full JSON is in the row's command)."""
    if isinstance(value, dict):
        channels = [f"{name} channels {'/'.join(map(str, part['channels']))}"
                    for name, part in value.items() if isinstance(part, dict) and "channels" in part]
        return "(" + "; ".join(channels) + ")" if channels else json.dumps(value)
    if isinstance(value, str) and "/" in value:  # a file (a prior's weights...): its name; the row keeps the path
        return Path(value).name
    return str(value)


def _sampler(used: dict) -> str:
    """The sampler that ran, in a few words: DRDD's steps, start and fixed noise level, or DDIM's steps and prediction."""
    if used.get("sampler") == "ddim":
        return f"DDIM {used['steps']} steps, predicts {used['prediction']}"
    level = f", fixed noise step {used['fixed_noise_step']}" if "fixed_noise_step" in used else ""
    return f"{used['residual_steps']}+{used['noise_steps']} steps, start scale {used['start_scale']:g}{level}"


def describe(row: dict) -> str:
    """``method`` and the settings that distinguish it (sampler, overrides)."""
    config = row.get("config", {})
    parts = [row["method"]]
    if config.get("sampler"):
        parts.append(f"sampler {config['sampler']}")
    parts += [f"+ {Path(fragment).stem}" for fragment in config.get("fragments", [])]
    parts += [f"{key} {_value(value)}" for key, value in sorted(config.get("overrides", {}).items())]
    if row.get("sampler_used"):
        parts.append(f"[{_sampler(row['sampler_used'])}]")
    return ", ".join(parts)


def spread(row: dict, key: str, digits: int) -> str:
    """Mean ± std over the cases where the metric is finite, with how many were not (a perfect case's PSNR
    is +inf; the results file spells it "inf", the mean leaves it out: ``compare_methods.summarise``)."""
    values = [float(v) for v in row.get("per_case", {}).get(key, [])]
    finite = [v for v in values if math.isfinite(v)]
    text = f"{float(row[key]):.{digits}f}"
    if len(finite) >= 2:
        text += f" ± {statistics.stdev(finite):.{digits}f}"
    if len(finite) < len(values):
        others = ", ".join(sorted({f"{v:g}" for v in values if not math.isfinite(v)}))
        text += f" ({len(values) - len(finite)} of {len(values)} cases {others})"
    return text


def table(rows: list[dict]) -> str:
    metrics_shown = [m for m in METRICS if all(m[0] in row for row in rows)]
    header = "| method | paired | budget (s) / iterations | " + " | ".join(name for _, name, _ in metrics_shown) + " |"
    lines = [header, "|" + "---|" * (3 + len(metrics_shown))]
    for row in rows:
        metrics = " | ".join(spread(row, key, digits) for key, _, digits in metrics_shown)
        budget = ("none (the input itself)" if row["method"] == "input"
                  else f"{row.get('budget_seconds', round(row['train_seconds']))} / {row['iterations']}")
        stages = row.get("trained_iterations") or {}
        if len(set(stages.values())) > 1:  # e.g. a noise network from a shared prior, trained elsewhere
            budget += " (" + ", ".join(f"{stage} {count}" for stage, count in stages.items()) + ")"
        lines.append(f"| {describe(row)} | {row['paired_fraction']:.0%} | {budget} | {metrics} |")
    first = rows[0]
    lines.append("")
    if first.get("metrics"):
        lines.append(f"Metrics: {first['metrics']}.")
    lines.append(f"Machine: {first.get('device', '?')}; held-out cases: {', '.join(first.get('cases', []))}.")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="a .jsonl file written by scripts/compare_methods.py")
    args = parser.parse_args(argv)
    rows = [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
    if not rows:
        parser.error(f"{args.results.name}: no results")
    tasks = list(dict.fromkeys(row.get("task") for row in rows))
    if len(tasks) == 1:
        print(table(rows))
    else:  # one table per task: their metrics are defined differently
        print("\n\n".join(f"### {task}\n\n" + table([row for row in rows if row.get("task") == task]) for task in tasks))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
