"""Saved SNR files: a calibration or a rules file is read from a path by `partition(snr=...)` and by
`blockopt plan --snr`, told apart by its content; anything else is refused with one clear error."""

from __future__ import annotations

import json
import pathlib

import pytest

import blockopt
from blockopt.cli import main
from blockopt.models import build_model
from blockopt.partition.snr import SNRCalibration, SNRRules, load_snr

Q, O = "blocks.0.attn.q_proj.weight", "blocks.0.attn.o_proj.weight"


@pytest.fixture
def model():
    return build_model("llama-tiny", seed=0, n_layers=1, device="meta")


@pytest.fixture
def calibration(model):
    plan = blockopt.partition(model, warn=False)
    calib = SNRCalibration({e.name: e.shape for e in plan.entries}, source={"model": "llama-tiny, 1 layer"})
    calib.add(10, {Q: {"row": 4.0, "column": 0.4, "head": 1.7, "tensor": 0.3},
                   O: {"row": 1.4, "column": 5.0, "tensor": 0.9}})
    return calib


def _cli(args, capsys):
    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("as_path", [str, pathlib.Path], ids=["str", "PathLike"])
def test_partition_reads_a_calibration_file_like_the_calibration(model, calibration, tmp_path, as_path):
    calibration.save(tmp_path / "c.json")
    from_file = blockopt.partition(model, warn=False, snr=as_path(tmp_path / "c.json"))
    assert from_file == blockopt.partition(model, warn=False, snr=calibration)
    assert from_file[Q].kind == "row" and from_file[O].kind == "column"
    assert SNRCalibration.load(tmp_path / "c.json") == calibration


@pytest.mark.parametrize("written", ["saved", "rules key", "plain mapping"])
def test_partition_reads_a_rules_file_saved_or_written_by_hand(model, tmp_path, written):
    rules = {"query": "row", "attn_out": "column"}
    path = tmp_path / "r.json"
    if written == "saved":
        SNRRules(rules).save(path)
    else:
        path.write_text(json.dumps({"rules": rules} if written == "rules key" else rules))
    plan = blockopt.partition(model, warn=False, snr=str(path))
    assert plan == blockopt.partition(model, warn=False, snr=SNRRules(rules))
    assert plan[Q].kind == "row" and plan[O].kind == "column"
    assert plan[Q].snr_choice == "row"
    assert SNRRules.load(path).rules == rules
    assert isinstance(load_snr(path), SNRRules)


def _plan_file(model, tmp_path):
    blockopt.partition(model, warn=False).save(tmp_path / "p.json")
    return tmp_path / "p.json"


@pytest.mark.parametrize("case, content, words", [
    ("missing", None, ["no such file"]),
    ("not json", "{not json", ["cannot read", "as JSON"]),
    ("a list", "[1, 2]", ["is a JSON list", "not an SNR calibration or SNR rules"]),
    ("another kind", json.dumps({"kind": "something", "x": 1}), ["of kind 'something'"]),
    ("a plan", "plan", ["is a partition plan", "PartitionPlan.load"]),
    ("a bad rule kind", json.dumps({"query": "diagonal"}), ["Invalid rules['query']: 'diagonal'"]),
    ("a calibration without its data", json.dumps({"kind": "blockopt.snr_calibration", "format": 1}),
     ["lacks the key 'shapes'"]),
])
def test_a_file_that_is_neither_is_refused_naming_the_argument_the_path_and_what_it_must_be(
        model, tmp_path, case, content, words):
    path = tmp_path / "x.json"
    if content == "plan":
        path = _plan_file(model, tmp_path)
    elif content is not None:
        path.write_text(content)
    before = blockopt.partition(model, warn=False)
    with pytest.raises(ValueError) as info:
        blockopt.partition(model, warn=False, snr=str(path))
    msg = str(info.value)
    assert msg.startswith("Invalid snr: ") and repr(str(path)) in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    if case in ("missing", "not json", "a list", "another kind", "a plan"):
        assert "SNRCalibration.save" in msg and "SNRRules.save" in msg  # what the file must be
    assert "\n" not in msg and len(msg) < 600
    assert blockopt.partition(model, warn=False) == before


def test_a_string_that_is_not_builtin_nor_a_file_is_refused(model):
    with pytest.raises(ValueError, match=r"Invalid snr: 'bultin': no such file; expected 'builtin'"):
        blockopt.partition(model, warn=False, snr="bultin")
    with pytest.raises(ValueError, match="Invalid snr: expected an SNRCalibration, SNRRules, 'builtin' or the path"):
        blockopt.partition(model, warn=False, snr=3)


def test_cli_plan_snr_reads_a_rules_file_and_a_calibration(model, calibration, tmp_path, capsys):
    """`blockopt plan --snr rules.json` once called a rules file "not a blockopt SNR calibration"."""
    SNRRules({"query": "row", "attn_out": "column", "mlp_down": "column"}).save(tmp_path / "r.json")
    (tmp_path / "hand.json").write_text(json.dumps({"query": "row", "attn_out": "column"}))
    for name in ("r.json", "hand.json"):
        rc, out, err = _cli(["plan", "--model", "llama-small", "--snr", tmp_path / name], capsys)
        assert rc == 0, err
        assert "SNR rule 'query' -> row" in out and "SNR rule 'attn_out' -> column" in out
        assert "not a blockopt SNR calibration" not in out + err
    full = build_model("llama-tiny", seed=0, device="meta")  # the CLI's llama-tiny has 4 layers
    plan = blockopt.partition(full, warn=False)
    calib = SNRCalibration({e.name: e.shape for e in plan.entries})
    calib.add(10, {Q: {"row": 4.0, "column": 0.4}})
    calib.save(tmp_path / "c.json")
    rc, out, err = _cli(["plan", "--model", "llama-tiny", "--snr", tmp_path / "c.json"], capsys)
    assert rc == 0, err
    assert "SNR: row 4.00 > 1" in out


def test_cli_plan_snr_refuses_a_plan_file_in_one_line(model, tmp_path, capsys):
    path = _plan_file(model, tmp_path)
    rc, out, err = _cli(["plan", "--model", "llama-tiny", "--snr", path], capsys)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"blockopt plan: error: --snr: {str(path)!r} is a partition plan")
    assert "blockopt calibrate --out" in err and "--rules-out" in err
