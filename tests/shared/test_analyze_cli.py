"""`rlft analyze` end to end on a tiny run: analysis.json, plots, and known answers for identical checkpoints."""

from __future__ import annotations

import json

import pytest
import yaml

from shared.cli import main
from tests.helpers.tiny import tiny_config_dict


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from shared.config import validate_config
    from shared.loop import train

    tmp = tmp_path_factory.mktemp("analyze")
    d = tiny_config_dict(tmp, train={"steps": 2}, checkpoint={"every": 1, "keep_last": 3},
                         logging={"progress": False, "tensorboard": False, "plots": False})
    train(validate_config(d, "test"))
    cfg = tmp / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(d))
    return cfg, tmp / "runs" / "tiny" / "checkpoints"


def test_analyze_writes_every_analysis(run, tmp_path, capsys):
    cfg, ckpts = run
    out = tmp_path / "an"
    assert main(["analyze", str(cfg), f"base={ckpts / 'step_000001'}", "tuned=latest", "prompts=6", "samples=3",
                 "k=4", f"out={out}"]) == 0
    result = json.loads((out / "analysis.json").read_text())
    assert set(result) >= {"weights", "tokens", "tuco", "diversity"}
    assert result["weights"]["n_matrices"] > 0 and result["weights"]["summary"]["spectral_drift"] > 0
    assert 0 < result["tuco"]["tuco"] < 1
    assert result["tokens"]["mean"] > 0
    for key in ("score_base", "score_tuned", "score_base_with_tuned_top_js_tokens"):
        assert 0 <= result["tokens"][key] <= 1
    assert set(result["diversity"]) == {"base", "tuned"}
    assert (out / "weights.png").stat().st_size > 0 and (out / "tokens.png").stat().st_size > 0
    assert "tuco:" in capsys.readouterr().out


def test_identical_checkpoints_give_zero_change(run, tmp_path):
    cfg, ckpts = run
    same = ckpts / "step_000002"
    out = tmp_path / "same"
    assert main(["analyze", str(cfg), f"base={same}", f"tuned={same}", "prompts=4", "what=weights,tokens,tuco",
                 f"out={out}"]) == 0
    result = json.loads((out / "analysis.json").read_text())
    assert result["weights"]["summary"]["spectral_drift"] == 0
    assert result["weights"]["summary"]["update_frac"] == 0
    assert result["tuco"]["tuco"] == 0
    assert result["tokens"]["mean"] < 1e-6
    assert result["tokens"]["score_base"] == result["tokens"]["score_tuned"]


def test_analyze_usage_errors(run, capsys):
    cfg, ckpts = run
    assert main(["analyze", str(cfg), "tuned=latest"]) == 2
    assert "base=" in capsys.readouterr().err
    assert main(["analyze", str(cfg), "base=latest", "tuned=latest", "what=weights,vibes"]) == 2
    assert "vibes" in capsys.readouterr().err
