"""`blockopt calibrate` and `blockopt plan --snr`: files, tables, and one-line errors."""

# ruff: noqa: F811
from __future__ import annotations

import json

import pytest
from bench_helpers import cache_dir, cli, corpus, keep_torch_threads  # noqa: F401 - fixtures

from blockopt.partition.snr import SNRCalibration, SNRRules


def _args(corpus, cache_dir, *extra):
    return ["calibrate", "--data", str(corpus), "--cache-dir", str(cache_dir), "--steps", "4", "--points", "2",
            "--batch-size", "2", "--context", "16", *extra]


def test_calibrate_writes_the_calibration_and_rules_and_plan_reads_them(tmp_path, corpus, cache_dir, cli):
    calib, rules = tmp_path / "c.json", tmp_path / "r.json"
    rc, out, err = cli(_args(corpus, cache_dir, "--out", str(calib), "--rules-out", str(rules)))
    assert rc == 0, err
    assert "measured at steps [3, 4]" in out and "choice (cutoff 1)" in out
    assert "second-moment values" in out  # the plan it gives, with totals
    c = SNRCalibration.load(calib)
    assert c.steps == [3, 4] and "blocks.0.attn.q_proj.weight" in c.values
    r = SNRRules.load(rules)
    assert "query/q_proj" in r.rules
    rc, out, err = cli(["plan", "--model", "llama-tiny", "--snr", str(calib)])
    assert rc == 0, err
    assert "snr" in out.splitlines()[1] and "SNR: " in out
    rc, out, err = cli(["plan", "--model", "llama-small", "--snr", str(rules), "--json"])
    assert rc == 0, err
    assert json.loads(out)["options"]["snr"]["method"] == "rules"
    # another model: one line, exit 2
    rc, out, err = cli(["plan", "--model", "gpt2-tiny", "--snr", str(calib)])
    assert rc == 2 and out == "" and err.count("\n") == 1 and "measured on another model" in err


@pytest.mark.parametrize("extra, msg", [
    (["--cutoff", "0"], "--cutoff: Invalid snr_cutoff: 0.0"),
    (["--cutoff", "nan"], "--cutoff: Invalid snr_cutoff: nan"),
    (["--steps", "0"], "--steps: 0; expected a positive integer"),
    (["--points", "9"], "--points: 9; expected at most --steps (4)"),
    (["--lr", "-1"], "--lr: -1.0; expected a positive number"),
    (["--model", "nope"], "--model: unknown model 'nope'"),
])
def test_calibrate_bad_input_is_one_line_exit_2(extra, msg, tmp_path, corpus, cache_dir, cli):
    rc, out, err = cli(_args(corpus, cache_dir, "--out", str(tmp_path / "c.json"), *extra))
    assert rc == 2 and out == "" and err.count("\n") == 1, err
    assert err.startswith("blockopt calibrate: error: ") and msg in err, err
    assert not (tmp_path / "c.json").exists()


def test_plan_snr_file_errors(tmp_path, cli):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    rc, _, err = cli(["plan", "--model", "llama-tiny", "--snr", str(bad)])
    assert rc == 2 and "--snr: cannot read" in err
    rules = tmp_path / "r.json"
    rules.write_text(json.dumps({"kind": "blockopt.snr_rules", "format": 1, "rules": {"mlp_up/gate_proj": "row"}}))
    rc, _, err = cli(["plan", "--model", "gpt2-tiny", "--snr", str(rules)])
    assert rc == 2 and "name no tensor of this model" in err
    rc, out, err = cli(["plan", "--model", "gpt2-tiny", "--snr", "builtin", "--snr-cutoff", "2"])
    assert rc == 0 and "SNR rule" in out


def test_plan_with_a_state_budget_prints_adam_minis_default_plan(cli):
    import blockopt
    from blockopt.models import build_model

    rc, out, err = cli(["plan", "--model", "llama-tiny", "--snr", "builtin", "--factored", "--state-budget", "0.55", "--json"])
    assert rc == 0, err
    default = blockopt.AdamMini(build_model("llama-tiny", seed=0)).plan
    assert blockopt.PartitionPlan.from_json(out).entries == default.entries
    rc, _, err = cli(["plan", "--model", "llama-tiny", "--state-budget", "0.501"])
    assert rc == 2 and "--state-budget 0.501: Invalid state_budget: 0.501; this model's plan needs at least" in err
