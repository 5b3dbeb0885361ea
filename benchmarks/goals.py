"""Issue 6's performance goals against one results folder: each goal, the figure measured, and whether it is met.

Reads the JSON the benchmarks wrote (throughput-cifar10-32.json, end-to-end.json, auditor-overhead.json, and
throughput-celebahq-256.json when there) and prints one line per goal, then the throughput rows as Markdown for the
README. The goals are set for one H100: on any other device the verdicts are printed but say which device it was.

    python benchmarks/goals.py benchmarks/results/h100-2026-11-28
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

GOAL_IMG_STEPS_PER_S = 20_000
GOAL_SPEEDUP = 12.0
GOAL_E2E_S = {"ddpm": 90.0, "ddim-50": 20.0}
GOAL_CAPTURE_PCT = 2.0
GOAL_SHADOW_BLOCKING_MS = 5.0
DEFAULT_VARIANT = "(default)"  # the reconstruct default's row name ends with it


def _load(folder: Path, name: str) -> dict | None:
    path = folder / name
    return json.loads(path.read_text()) if path.is_file() else None


def goal_lines(folder: Path) -> list[tuple[str, str, bool | None]]:
    """``(goal, measured, met)`` per goal; ``met`` is None where the figure is missing from the folder."""
    lines: list[tuple[str, str, bool | None]] = []
    throughput = _load(folder, "throughput-cifar10-32.json")
    rows = [r for r in (throughput or {}).get("rows", []) if r["variant"].endswith(DEFAULT_VARIANT)]
    if rows:
        row = rows[0]
        lines.append((f">= {GOAL_IMG_STEPS_PER_S:,} img-steps/s at cifar10-32",
                      f"{row['img_steps_per_s']:,.0f} ({row['variant'].split(': ', 1)[-1]})",
                      row["img_steps_per_s"] >= GOAL_IMG_STEPS_PER_S))
        lines.append((f">= {GOAL_SPEEDUP:g}x the naive fp32 loop, same run", f"x{row['speedup_vs_naive']:.2f}",
                      row["speedup_vs_naive"] >= GOAL_SPEEDUP))
    else:
        lines.append((f">= {GOAL_IMG_STEPS_PER_S:,} img-steps/s and >= {GOAL_SPEEDUP:g}x naive at cifar10-32",
                      "not measured", None))
    end_to_end = {r["sampler"]: r for r in (_load(folder, "end-to-end.json") or {}).get("rows", [])}
    for sampler, goal in GOAL_E2E_S.items():
        row = end_to_end.get(sampler)
        name = f"5,000 images, {sampler} from t* = 300, < {goal:g} s"
        if row is None:
            lines.append((name, "not measured", None))
        elif row.get("partial"):  # the run was cut short: past the goal already is a verdict, short of it is not
            lines.append((name, f"cut short: {row['images_done']:,} of {row['images']:,} images in "
                                f"{row['seconds_so_far']:.0f} s", False if row["seconds_so_far"] >= goal else None))
        else:
            full = row["images"] >= 5000  # a smaller run guards against regressions but says nothing of the goal
            lines.append((name, f"{row['seconds']:.1f} s" + ("" if full else f" for {row['images']:,} images"),
                          row["seconds"] < goal if full else None))
    overhead = {r["variant"]: r for r in (_load(folder, "auditor-overhead.json") or {}).get("rows", [])}
    inline, shadow = overhead.get("inline", {}), overhead.get("shadow", {})
    lines.append((f"inline capture <= {GOAL_CAPTURE_PCT:g}% of a DP-SGD step",
                  f"{inline['capture_pct_of_step']:.2f}%" if "capture_pct_of_step" in inline else "not measured",
                  inline["capture_pct_of_step"] <= GOAL_CAPTURE_PCT if "capture_pct_of_step" in inline else None))
    lines.append((f"shadow audits block training <= {GOAL_SHADOW_BLOCKING_MS:g} ms each",
                  f"{shadow['blocking_ms_per_audit']:.2f} ms" if "blocking_ms_per_audit" in shadow else "not measured",
                  shadow["blocking_ms_per_audit"] <= GOAL_SHADOW_BLOCKING_MS if "blocking_ms_per_audit" in shadow
                  else None))
    return lines


def health_lines(folder: Path) -> list[str]:
    """What went wrong on the way: speed options that fell back, audits that failed or were dropped."""
    out = []
    for path in sorted(folder.glob("*.json")):
        for row in json.loads(path.read_text()).get("rows", []):
            name = row.get("variant") or row.get("sampler")
            out += [f"{path.stem}: {name}: {note}" for note in row.get("fallbacks", [])]
            if row.get("errors") or row.get("dropped"):
                out.append(f"{path.stem}: {name}: {row.get('errors')} audits failed, {row.get('dropped')} dropped")
    return out


def memory_lines(folder: Path) -> list[str]:
    """The auditor's CUDA memory: each overhead row's peak reserved memory against the run without an auditor."""
    rows = (_load(folder, "auditor-overhead.json") or {}).get("rows", [])
    base = next((r.get("peak_reserved_gib") for r in rows if r["variant"] == "no auditor"), None)
    if base is None:
        return []
    return ["CUDA memory reserved at its peak during training (what the auditor adds to training's own):"] + [
        f"  {r['variant']:<25} {r['peak_reserved_gib']:.2f} GiB ({r['peak_reserved_gib'] - base:+.2f})"
        for r in rows if "peak_reserved_gib" in r]


def rng_hazard_lines(folder: Path) -> list[str]:
    """``cuda_graph_rng_hazard.py``'s scenarios: what RNG-free CUDA graphs on one thread did to another's noise."""
    result = _load(folder, "cuda-graph-rng-hazard.json")
    if result is None:
        return []
    out = [f"CUDA graphs beside DP noise draws (torch {result['torch']}; the package treats this torch as "
           f"{'safe' if result['leaves_generator_alone'] else 'unsafe'}):"]
    for row in result["rows"]:
        clean = not (row["failed_draws"] or row["lost_increments"] or row["repeated_draws"])
        out.append(f"  {'clean' if clean else 'HAZARD':<8} {row['scenario']:<32} {row['draws']:,} draws: "
                   f"{row['failed_draws']} failed, {row['lost_increments']} increments lost, "
                   f"{row['repeated_draws']} repeated")
    return out


def markdown_rows(folder: Path) -> list[str]:
    """Each throughput file's rows as ``| arch | variant | img-steps/s | TFLOP/s | % of peak | x naive |``."""
    out = []
    for path in sorted(folder.glob("throughput-*.json")):
        result = json.loads(path.read_text())
        for row in result["rows"]:
            pct = row.get("pct_of_bf16_spec_peak")
            rate = row["img_steps_per_s"]
            rate = f"{rate:,.0f}" if rate >= 100 else f"{rate:.3g}"
            out.append(f"| {result['arch']} | {row['variant']} | {rate} | {row['tflops']:.3g} | "
                       f"{f'{pct:.1f}%' if pct else '-'} | ×{row['speedup_vs_naive']:.2f} |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    devices = {json.loads(p.read_text()).get("device") for p in args.folder.glob("*.json")}
    print(f"goals (set for one H100) against {args.folder}, measured on {', '.join(sorted(map(str, devices)))}:")
    for goal, measured, met in goal_lines(args.folder):
        verdict = {True: "MET", False: "NOT MET", None: "-"}[met]
        print(f"  {verdict:<8} {goal:<58} {measured}")
    for line in health_lines(args.folder):
        print(f"  WARNING  {line}")
    for line in memory_lines(args.folder) + rng_hazard_lines(args.folder):
        print(line)
    rows = markdown_rows(args.folder)
    if rows:
        print("\n| arch | variant | img-steps/s | TFLOP/s | % of bf16 peak | × naive |\n|---|---|---|---|---|---|")
        print("\n".join(rows))


if __name__ == "__main__":
    main()
