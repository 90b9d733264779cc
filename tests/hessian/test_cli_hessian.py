"""``blockopt hessian`` (``blockopt.hessian.cli``): outputs, and one-line errors with exit status 2.

Runs the sub-command through ``add_parser``/``run`` exactly as ``blockopt.cli`` wires it, with
small SLQ settings so that each run takes a second or two.
"""

from __future__ import annotations

import argparse
import csv
import json

import pytest
import torch
from hessian_helpers import one_thread  # noqa: F401 - fixture

from blockopt.hessian.cli import add_parser, run

FAST = ["--probes", "2", "--steps", "8", "--deflate", "2", "--top-k", "2", "--dense-max", "128",
        "--progress", "none"]


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="blockopt")
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    args = parser.parse_args(["hessian", *argv])
    return run(args)


def test_tiny_mlp_writes_every_output(tmp_path, capsys):
    out = tmp_path / "h"
    threads = torch.get_num_threads()
    assert _cli(["--model", "tiny-mlp", "--out", str(out), "--batch-size", "64", *FAST]) == 0
    assert torch.get_num_threads() == threads  # the run's thread setting is undone
    for f in ("summary.json", "js_matrix.csv", "densities.csv", "spectra.png", "js_matrix.png", "report.md",
              "hessian_fc2.weight.png"):
        assert (out / f).exists(), f
    s = json.loads((out / "summary.json").read_text())
    blocks = ["fc1.weight", "fc2.weight", "fc3.weight"]
    assert 0 <= s["heterogeneity"] <= 1 and s["noise_floor"] is not None
    assert list(s["top_eigenvalues"]) == blocks and all(len(v) == 2 for v in s["top_eigenvalues"].values())
    assert s["js_matrix"]["blocks"] == blocks
    J = torch.tensor(s["js_matrix"]["values"])
    assert torch.equal(J, J.T) and s["heterogeneity"] == pytest.approx(float(J.sum()) / 6)
    parts = {p["partition"]: p for p in s["dense"][0]["partitions"]}
    assert {"per-tensor", "plan", "per-row"} <= set(parts) and parts["per-tensor"]["score"] == 1.0
    with open(out / "densities.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["t", "eigenvalue", *blocks] and len(rows) > 100
    assert "heterogeneity" in capsys.readouterr().out
    report = (out / "report.md").read_text()
    assert "Block heterogeneity" in report and "fc2.weight" in report


def test_json_on_stdout_and_hf_config(tmp_path, capsys):
    cfg = '{"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2, "vocab_size": 64, "n_positions": 32}'
    pytest.importorskip("transformers")
    assert _cli(["--hf-config", cfg, "--out", str(tmp_path / "hf"), "--json", "--no-plots", *FAST,
                 "--dense-max", "256"]) == 0  # two query heads of 16 x 8
    s = json.loads(capsys.readouterr().out)
    names = s["js_matrix"]["blocks"]
    # GPT-2's fused c_attn is split into its parts by the plan
    assert "transformer.h.0.attn.c_attn.weight[query]" in names and "transformer.h.0.attn.c_attn.weight[value]" in names
    dense = s["dense"][0]
    assert dense["param"] == "transformer.h.0.attn.c_attn.weight"
    parts = {p["partition"]: p for p in dense["partitions"]}
    assert parts["per-head"]["score"] > parts["input-groups"]["score"]
    assert not (tmp_path / "hf" / "spectra.png").exists()


@pytest.mark.parametrize("argv, message", [
    (["--model", "tiny-mlp", "--params", r"blocks\.9\..*"], "matches no parameter"),
    (["--model", "tiny-mlp", "--max-memory", "64KiB"], "examples would need about"),
    (["--model", "tiny-cnn", "--data", "/nonexistent/images.pt"], "--data: '/nonexistent/images.pt' is not a file"),
    (["--model", "tiny-mlp", "--params", "fc1.weight"], "at least two"),
    (["--model", "tiny-mlp", "--dense", "nope"], "--dense: 'nope' matches none"),
    (["--hf-config", "{not json"], "inline JSON does not parse"),
])
def test_bad_input_is_one_line_and_status_2(tmp_path, capsys, argv, message):
    out = tmp_path / "o"
    assert _cli([*argv, "--out", str(out), *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("blockopt hessian: error:") and message in err[0], err
    assert not (out / "summary.json").exists()


def test_image_data_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 1, 8, 8, generator=g)
    y = torch.randint(0, 4, (40,), generator=g)
    torch.save({"x": x, "y": y}, tmp_path / "d.pt")
    out = tmp_path / "o"
    assert _cli(["--model", "tiny-cnn", "--data", str(tmp_path / "d.pt"), "--batch-size", "16", "--out", str(out),
                 "--no-plots", *FAST]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["model"]["info"]["image_shape"] == [1, 8, 8] and s["model"]["info"]["classes"] == 4


def test_image_models_default_to_real_digits_and_synthetic_is_a_choice(tmp_path):
    pytest.importorskip("sklearn")
    out = tmp_path / "d"
    assert _cli(["--model", "tiny-cnn", "--batch-size", "32", "--out", str(out), "--no-plots", *FAST]) == 0
    s = json.loads((out / "summary.json").read_text())
    info = s["model"]["info"]
    assert info["examples"] == 1797 and info["image_shape"] == [1, 8, 8] and info["classes"] == 10
    assert "digits" in s["data"]
    out = tmp_path / "s"
    assert _cli(["--model", "tiny-mlp", "--data", "synthetic", "--batch-size", "32", "--out", str(out),
                 "--no-plots", *FAST]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["model"]["info"]["image_shape"] == [3, 16, 16] and "synthetic" in s["data"]


def test_digits_are_scaled_to_the_unit_interval():
    pytest.importorskip("sklearn")
    from blockopt.hessian.models import digit_images

    x, y = digit_images()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32 and y.shape == (1797,)
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0 and set(y.tolist()) == set(range(10))


def test_missing_scikit_learn_names_the_extra(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    assert _cli(["--model", "tiny-cnn", "--out", str(tmp_path / "x"), *FAST]) == 2
    err = capsys.readouterr().err
    assert "pip install 'blockopt[vision]'" in err and "--data synthetic" in err
    assert not (tmp_path / "x" / "summary.json").exists()
