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
    for label in ("pre-trained", "AdamW", "AdamMini default", "MoFO", "MoFO (block v)"):
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


def test_forgetting_at_the_target_is_interpolated_on_the_low_lr_side():
    mod = _load()
    # (lr, loss_B, loss_A): best on B at 3e-3; the target 1.5 lies between 1e-3 (1.6) and 3e-3 (1.4)
    pts = [(3e-4, 1.9, 1.0), (1e-3, 1.6, 1.2), (3e-3, 1.4, 1.6), (1e-2, 1.5, 2.5)]
    assert math.isclose(mod.at_target(pts, 1.5), 1.4)  # halfway from 1.2 to 1.6, not the 1e-2 run's 2.5
    assert mod.at_target(pts, 1.4) == 1.6  # the best point itself
    assert mod.at_target(pts, 2.5) is None  # no lr is that bad on the low side: not bracketed
    seed_runs = {0: [{"optimizer": "a", "lr": lr, "loss_B": b, "loss_A": a} for lr, b, a in pts]
                 + [{"optimizer": "m", "lr": 1e-3, "loss_B": 1.7, "loss_A": 1.1},
                    {"optimizer": "m", "lr": 3e-3, "loss_B": 1.5, "loss_A": 1.3}]}
    got = mod.matched(seed_runs, ["a", "m"])[0]
    assert got["target_B"] == 1.5 and math.isclose(got["loss_A"]["a"], 1.4) and got["loss_A"]["m"] == 1.3


def test_seeds_and_a_sweep_print_the_matched_table(tmp_path, capsys):
    mod = _load()
    out = tmp_path / "m.json"
    a, b = _text(tmp_path / "a.txt", 0), _text(tmp_path / "b.txt", 1)
    assert mod.main(["--tiny", "--data-a", str(a), "--data-b", str(b), "--cache-dir", str(tmp_path / "cache"),
                     "--optimizers", "adamw,mofo", "--sweep", "1e-3,3e-3", "--seeds", "0,1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Forgetting at matched learning (2 seeds)" in printed and "| mean |" in printed
    result = json.loads(out.read_text())
    assert result["seeds"] == [0, 1] and set(result["matched"]) == {"0", "1"}
    for seed, per in zip((0, 1), result["per_seed"]):
        assert per["seed"] == seed and len(per["runs"]) == 4
        target = result["matched"][str(seed)]["target_B"]
        assert target == max(min(r["loss_B"] for r in per["runs"] if r["optimizer"] == n) for n in ("adamw", "mofo"))
