"""benchmarks/finetune_forgetting.py runs end to end in --tiny mode and reports every row."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "finetune_forgetting.py"


def _load():
    spec = importlib.util.spec_from_file_location("finetune_forgetting", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _text(path: Path, seed: int, n: int = 60_000) -> Path:
    import random

    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "thou", "art", "lord", "king"][seed::2]
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(n // 60)))
    return path


def test_tiny_run_has_every_row(tmp_path, capsys):
    mod = _load()
    out = tmp_path / "result.json"
    a, b = _text(tmp_path / "a.txt", 0), _text(tmp_path / "b.txt", 1)
    assert mod.main(["--tiny", "--data-a", str(a), "--data-b", str(b), "--cache-dir", str(tmp_path / "cache"),
                     "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for label in ("pre-trained", "AdamW", "Adam-mini", "MoFO", "MoFO (block v)"):
        assert f"| {label} " in printed
    result = json.loads(out.read_text())
    assert [r["optimizer"] for r in result["rows"]] == list(mod.OPTIMIZERS)
    for r in result["rows"]:
        assert math.isfinite(r["loss_A"]) and math.isfinite(r["loss_B"])
        assert r["lr"] == mod.DEFAULT_LRS[r["optimizer"]]
    by = {r["optimizer"]: r for r in result["rows"]}
    # MoFO moves a share of the matrices' entries; AdamW moves them all (4 steps of 10 %: well under all)
    assert by["adamw"]["changed_share"] == 1.0
    assert by["mofo"]["changed_share"] < 0.6 and by["mofo-block"]["changed_share"] < 0.6
    assert math.isfinite(result["pretrained"]["loss_A"])
