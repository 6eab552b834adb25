"""scripts/bench_readme.py: the README's benchmark table is generated from result JSONs.

Two small fake result files (the generic layout with a target verdict to infer, and one with an explicit
verdict, a ratio definition and a skipped row) go into a tmp dir; the generated table must list their rows,
the README text outside the markers must stay byte for byte, and missing or misplaced markers must give a
clear error (exit code 2 from the command line). No benchmark runs here.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("bench_readme", ROOT / "scripts" / "bench_readme.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is created
    spec.loader.exec_module(mod)
    return mod


br = _load()

BEFORE = "# project\n\nIntro text.\n\n## Performance\n\nProse kept as is.\n\n"
AFTER = "\n\nMore text after the table.\n"
README = BEFORE + br.START + "\nold table\n" + br.END + AFTER


@pytest.fixture
def results(tmp_path: Path) -> Path:
    d = tmp_path / "results"
    d.mkdir()
    (d / "diffusion.json").write_text(json.dumps({
        "machine": "test-cpu, 1 thread",
        "rows": [{"benchmark": "sampling with log-probs", "baseline": "pipeline sampling", "baseline_s": 2.0,
                  "ours_s": 2.1, "ratio": 1.05, "target": "<= 1.10"},
                 {"benchmark": "guided sampling", "baseline": "one model", "baseline_s": 1.0, "ours_s": 2.5,
                  "ratio": 2.5, "target": "<= 2.05"}]}))
    (d / "grpo_step.json").write_text(json.dumps({
        "machine": "other-cpu, 2 threads",
        "rows": [{"benchmark": "GRPO step", "baseline": "TRL GRPOTrainer", "ours_s": 0.5, "baseline_s": 0.6,
                  "ratio": 1.2, "ratio_definition": "baseline s / ours s", "target": ">= 1.5", "target_met": False},
                 {"benchmark": "GRPO step, big", "baseline": "TRL GRPOTrainer", "skipped": "trl not installed",
                  "target": ">= 1.5"}]}))
    return d


def test_table_rows_and_untouched_outside(results: Path, tmp_path: Path):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    assert br.main(["--results", str(results), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith(BEFORE + br.START + "\n") and text.endswith(br.END + AFTER)
    assert "old table" not in text
    section = text[text.index(br.START) : text.index(br.END)]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    assert lines[0] == "| benchmark | baseline | ours | baseline figure | ratio | target | met? |"
    # grpo_step comes first (README order), then diffusion
    assert lines[2] == "| GRPO step | TRL GRPOTrainer | 0.500 s | 0.600 s | 1.20 | baseline s / ours s >= 1.5 | no |"
    assert lines[3] == "| GRPO step, big | TRL GRPOTrainer | — | — | skipped: trl not installed | >= 1.5 | skipped |"
    # no ratio definition or verdict in the file: both are inferred from the seconds and the target
    assert lines[4] == ("| sampling with log-probs | pipeline sampling | 2.100 s | 2.000 s | 1.05 "
                        "| ours s / baseline s <= 1.10 | yes |")
    assert lines[5] == "| guided sampling | one model | 2.500 s | 1.000 s | 2.50 | ours s / baseline s <= 2.05 | no |"
    assert len(lines) == 6
    assert "Machine (grpo_step): other-cpu, 2 threads." in section
    assert "Machine (diffusion): test-cpu, 1 thread." in section
    # regenerating from the same results changes nothing
    assert br.update_readme(results, readme) is False
    assert readme.read_text() == text


@pytest.mark.parametrize("broken", [
    "# no markers at all\n",
    f"only a start {br.START}\n",
    f"{br.END} before {br.START}\n",
    f"{br.START} twice {br.START} {br.END}\n",
])
def test_bad_markers_are_clear_errors(results: Path, tmp_path: Path, broken: str, capsys):
    with pytest.raises(br.BenchReadmeError, match="bench:"):
        br.replace_section(broken, "table")
    readme = tmp_path / "README.md"
    readme.write_text(broken)
    assert br.main(["--results", str(results), "--readme", str(readme)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bench_readme: README") and ("marker" in err or "comes before" in err)
    assert readme.read_text() == broken  # nothing written on error


def test_unknown_layout_names_the_file(tmp_path: Path):
    d = tmp_path / "results"
    d.mkdir()
    (d / "mystery.json").write_text(json.dumps({"numbers": [1, 2, 3]}))
    with pytest.raises(br.BenchReadmeError, match="mystery.json"):
        br.render(br.load_results(d))
