"""Rewrite the README's benchmark table from the JSON results of `make bench` (benchmarks/results/*.json).

Why: the README's performance figures must be the measured ones, not hand-copied numbers that drift from the
code. Every benchmark script writes its own JSON (with a machine description); this script turns whatever
results exist into one markdown table and replaces the README text between `<!-- bench:start -->` and
`<!-- bench:end -->`, leaving everything outside the markers byte for byte as it was.

Layouts read (one adapter per benchmark, a generic one for the rest):
- logprobs.json (bench_logprobs.py): rows per (vocab, tokens, variant, chunk) with extra peak MiB and
  seconds of variant and baseline; the "checkpoint" variant is the previous implementation, kept in the JSON
  only for comparison, so it is not listed as ours.
- packing.json (bench_packing.py): rows per (model, batch) with padded_s / packed_s / speedup; the target
  (and its verdict, `headline.target_met`) applies to the first, headline row only.
- the generic layout, used by diffusion.json, grpo_step.json (one row per configuration of ours against TRL:
  the default forward and train.shared_prompt), rollout.json, shared_prompt.json and any other benchmark that
  follows it: {"machine", "rows": [{"benchmark", "baseline", "ours_s", "baseline_s" | "ours_value",
  "baseline_value", "unit", "ratio", "ratio_definition"?, "target", "target_met"?, "skipped"?}]}.
  Without `ratio_definition` the ratio is identified from the seconds (ours/baseline or baseline/ours);
  without `target_met` the verdict is read from the target ("<= 1.10", ">= 1.5").
bench_sandbox.py prints its figures and writes no JSON; a sandbox.json in the generic layout would be listed.

    python scripts/bench_readme.py [--results benchmarks/results] [--readme README.md]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
ORDER = ["grpo_step", "rollout", "vlm_rollout", "logprobs", "packing", "shared_prompt", "diffusion", "sandbox"]  # then any other, by name
HEADER = ("| benchmark | baseline | ours | baseline figure | ratio | target | met? |\n"
          "|---|---|---|---|---|---|---|")


class BenchReadmeError(ValueError):
    """A README without usable markers, or a result file this script cannot read."""


@dataclass
class Row:
    benchmark: str
    baseline: str
    ours: str
    baseline_figure: str
    ratio: str
    target: str
    met: str

    def markdown(self) -> str:
        cells = [self.benchmark, self.baseline, self.ours, self.baseline_figure, self.ratio, self.target, self.met]
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def _verdict(met: bool | None) -> str:
    return "—" if met is None else ("yes" if met else "no")


def _met_from_target(ratio: float, target: str) -> bool | None:
    """ratio against a target such as '<= 1.10' or '>= 1.5'; None when the target has no such bound."""
    m = re.search(r"(<=|>=|<|>)\s*([0-9]*\.?[0-9]+)", target or "")
    if m is None or not math.isfinite(ratio):
        return None
    op, bound = m.group(1), float(m.group(2))
    return {"<=": ratio <= bound, ">=": ratio >= bound, "<": ratio < bound, ">": ratio > bound}[op]


def _figure(value: float, unit: str) -> str:
    if unit == "s":
        return f"{value:.3f} s"
    return f"{value:,.0f} {unit}" if abs(value) >= 100 else f"{value:.3g} {unit}"


def rows_logprobs(data: dict) -> list[Row]:
    out = []
    for r in data["rows"]:
        if r["variant"] == "checkpoint":  # the previous implementation, not ours
            continue
        chunk = f", chunk {r['chunk']}" if r.get("chunk") else ""
        out.append(Row(
            benchmark=f"selective log-probs fwd+bwd, vocab {r['vocab']}, {r['tokens']} tokens ({r['variant']}{chunk})",
            baseline="log_softmax + gather",
            ours=f"{r['variant_extra_mib']:.0f} MiB, {r['variant_s']:.2f} s",
            baseline_figure=f"{r['baseline_extra_mib']:.0f} MiB, {r['baseline_s']:.2f} s",
            ratio=f"{r['memory_ratio']:.1f}x less memory, {r['time_ratio']:.2f}x time",
            target=data.get("target", ""), met=_verdict(r.get("target_met"))))
    return out


def rows_packing(data: dict) -> list[Row]:
    out = []
    for i, r in enumerate(data["rows"]):
        headline = i == 0
        met = data.get("headline", {}).get("target_met") if headline else None
        out.append(Row(
            benchmark=(f"packed sequences fwd+bwd, {r['model']} model, batch {r['batch']} x {r['seq_len']}, "
                       f"{r['padding']:.0%} padding"),
            baseline="padded batch", ours=_figure(r["packed_s"], "s"), baseline_figure=_figure(r["padded_s"], "s"),
            ratio=f"{r['speedup']:.2f}x faster",
            target=data.get("target", "") if headline else "— (headline row only)", met=_verdict(met)))
    return out


PREFIX = {"vlm_rollout": "VLM "}  # result files whose row names do not say which benchmark they belong to


def rows_generic(data: dict, name: str) -> list[Row]:
    out = []
    prefix = PREFIX.get(name.removesuffix(".json"), "")
    for r in data["rows"]:
        if not {"benchmark", "baseline"} <= r.keys():
            raise BenchReadmeError(f"{name}: a row lacks 'benchmark'/'baseline': {sorted(r)}")
        if r.get("skipped"):
            out.append(Row(prefix + r["benchmark"], r["baseline"], "—", "—", f"skipped: {r['skipped']}",
                           r.get("target", ""), "skipped"))
            continue
        if "ours_value" in r and "baseline_value" in r:
            unit = r.get("unit", "")
            ours, base = _figure(r["ours_value"], unit), _figure(r["baseline_value"], unit)
        elif "ours_s" in r and "baseline_s" in r:
            ours, base = _figure(r["ours_s"], "s"), _figure(r["baseline_s"], "s")
        else:
            raise BenchReadmeError(f"{name}: row {r['benchmark']!r} has neither ours_s/baseline_s nor "
                                   "ours_value/baseline_value")
        ratio = float(r["ratio"])
        definition = r.get("ratio_definition")
        if definition is None and "ours_s" in r and "baseline_s" in r:
            if math.isclose(ratio, r["ours_s"] / r["baseline_s"], rel_tol=1e-6):
                definition = "ours s / baseline s"
            elif math.isclose(ratio, r["baseline_s"] / r["ours_s"], rel_tol=1e-6):
                definition = "baseline s / ours s"
        target = str(r.get("target", ""))
        met = r.get("target_met")
        met = _met_from_target(ratio, target) if met is None else bool(met)
        out.append(Row(prefix + r["benchmark"], r["baseline"], ours, base, f"{ratio:.2f}",
                       f"{definition} {target}".strip() if definition else target, _verdict(met)))
    return out


ADAPTERS = {"logprobs": rows_logprobs, "packing": rows_packing}


def load_results(results_dir: Path) -> list[tuple[str, dict]]:
    """(name, data) of every *.json in `results_dir`, in README order (ORDER first, then by name)."""
    files = sorted(Path(results_dir).glob("*.json"))
    rank = {n: i for i, n in enumerate(ORDER)}
    files.sort(key=lambda p: (rank.get(p.stem, len(ORDER)), p.stem))
    out = []
    for p in files:
        try:
            out.append((p.stem, json.loads(p.read_text())))
        except json.JSONDecodeError as e:
            raise BenchReadmeError(f"{p}: not valid JSON ({e})") from None
    return out


def table_rows(name: str, data: dict) -> list[Row]:
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise BenchReadmeError(f"{name}.json: unknown result layout (expected an object with a 'rows' list)")
    try:
        return ADAPTERS[name](data) if name in ADAPTERS else rows_generic(data, f"{name}.json")
    except KeyError as e:
        raise BenchReadmeError(f"{name}.json: missing field {e} for its layout (see scripts/bench_readme.py)") from None


def render(results: list[tuple[str, dict]]) -> str:
    """The markdown between the markers: the table and one line per distinct machine description."""
    if not results:
        return "No benchmark results yet: run `make bench`."
    lines = [HEADER]
    machines: dict[str, list[str]] = {}
    for name, data in results:
        lines += [r.markdown() for r in table_rows(name, data)]
        machines.setdefault(str(data.get("machine", "machine not recorded")), []).append(name)
    lines.append("")
    for machine, names in machines.items():
        lines.append(f"Machine ({', '.join(names)}): {machine}.")
    return "\n".join(lines)


def replace_section(readme: str, body: str) -> str:
    """`readme` with the text between the markers replaced by `body` (markers kept, outside untouched)."""
    n_start, n_end = readme.count(START), readme.count(END)
    if n_start != 1 or n_end != 1:
        raise BenchReadmeError(f"README needs exactly one {START} and one {END} marker "
                               f"(found {n_start} and {n_end}); add them around the benchmark table")
    i, j = readme.index(START), readme.index(END)
    if j < i:
        raise BenchReadmeError(f"README: {END} comes before {START}")
    note = "<!-- generated by scripts/bench_readme.py from benchmarks/results/*.json: edit those, not this -->"
    return readme[: i + len(START)] + "\n" + note + "\n" + body + "\n" + readme[j:]


def update_readme(results_dir: Path, readme_path: Path) -> bool:
    """Rewrite the section of `readme_path` from `results_dir`; True if the file changed."""
    text = Path(readme_path).read_text()
    new = replace_section(text, render(load_results(Path(results_dir))))
    if new != text:
        Path(readme_path).write_text(new)
    return new != text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = ap.parse_args(argv)
    try:
        changed = update_readme(args.results, args.readme)
    except (BenchReadmeError, OSError) as e:
        print(f"bench_readme: {e}", file=sys.stderr)
        return 2
    print(f"{args.readme}: benchmark table {'updated' if changed else 'already up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
