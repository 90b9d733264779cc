"""Bad input and surprising output a new user met with modern models: one table of what they now read.

Each case produces a text (an exception's message, the one warning, a command's stderr or output)
and the table names the words it must contain, and for long outputs a bound on its length.
"""

from __future__ import annotations

import re
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import blockopt
from blockopt.cli import main
from blockopt.kernels.blocks import Geometry


def _error(fn) -> str:
    with pytest.raises((ValueError, TypeError)) as info:
        fn()
    return str(info.value)


def _frozen_parameter_on_load() -> str:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[1].bias.requires_grad_(False)
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = blockopt.AdamMini(trained, plan=blockopt.partition(model))
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    every = blockopt.AdamMini(model)  # one parameter more: the frozen bias
    return _error(lambda: every.load_state_dict(opt.state_dict()))


def _moe_warning() -> str:
    class Weird(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Parameter(torch.zeros(3, 4, 5, 6))

    class Big(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(Weird() for _ in range(48))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = blockopt.partition(Big())
    ours = [str(w.message) for w in caught if "blockopt.partition" in str(w.message)]
    assert len(ours) == 1  # once
    assert plan.warnings[0] in ours[0]
    return ours[0]


def _cli(args: list[str], capsys) -> str:
    capsys.readouterr()
    rc = main(args)
    out, err = capsys.readouterr()
    return f"rc={rc}\n{out}{err}"


def _module_run() -> str:
    done = subprocess.run([sys.executable, "-m", "blockopt", "--help"], capture_output=True, text=True, timeout=120, check=False)
    return f"rc={done.returncode}\n{done.stdout}{done.stderr}"


CASES = [
    # (id, producer(capsys) -> text, words it must contain, longest allowed length)
    ("one frozen parameter more when loading", lambda c: _frozen_parameter_on_load(),
     ["has 3 parameters", "has 4", "only here: ['1.bias']", "frozen"], 400),
    ("a module without parameters", lambda c: _error(lambda: blockopt.AdamMini(nn.ReLU())),
     ["ReLU has no parameters", "empty parameter list"], 200),
    ("hf config that fails its own validation",
     lambda c: _cli(["plan", "--hf-config", ('{"model_type": "llama", "hidden_size": 64, "num_attention_heads": 5, '
                     '"num_hidden_layers": 1, "intermediate_size": 32}')], c),
     ["rc=2", "blockopt plan: error: --hf-config", "multiple of the number of attention heads (5)"], 400),
    ("unknown tensors of a large model", lambda c: _moe_warning(),
     ["48 tensor(s)", "layers.*.table [3, 4, 5, 6]", "(x48)", "overrides"], 400),
    ("a flattened geometry with many blocks",
     lambda c: blockopt.PlanEntry("w", (4, 6), Geometry(-1, ((24, 3),)), "other", "r", True).describe(),
     ["group of 3 x8"], 40),
    ("python -m blockopt", lambda c: _module_run(), ["rc=0", "usage: blockopt", "bench", "plan"], 4000),
    ("head hints with an attention module but no query that fits",
     lambda c: _hint_warning(), ["1 attention module(s) were found", "not used"], 400),
]


@pytest.mark.parametrize("command", ["plan", "bench"])
def test_an_unknown_hf_model_type_is_one_short_line_that_says_how_to_list_the_types(command, tmp_path, capsys):
    """It once printed transformers' whole model list: one line of about 15,000 characters."""
    pytest.importorskip("transformers")
    extra = []
    if command == "bench":
        (tmp_path / "t.txt").write_text("def f(x):\n    return x + 1\n" * 400)
        extra = ["--data", str(tmp_path / "t.txt"), "--cache-dir", str(tmp_path / "cache"),
                 "--out", str(tmp_path / "out"), "--dry-run"]
    for model_type, near in (("nope", None), ("lama", "did you mean 'llama'")):
        capsys.readouterr()
        rc = main([command, "--hf-config", f'{{"model_type": "{model_type}"}}', *extra])
        out, err = capsys.readouterr()
        assert rc == 2 and out == "", err
        assert err.count("\n") == 1 and len(err) <= 320, err
        assert err.startswith(f"blockopt {command}: error: --hf-config: '<inline JSON>': unknown model_type "
                              f"'{model_type}'"), err
        assert (near in err) if near else ("did you mean" not in err), err
    assert not (tmp_path / "out").exists()
    listing = re.search(r'python -c "([^"]+)"', err)
    assert listing, err
    done = subprocess.run([sys.executable, "-c", listing.group(1)], capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    types = done.stdout.split()
    assert "llama" in types and "gpt2" in types and "nope" not in types


def _hint_warning() -> str:
    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.only = nn.Linear(8, 8)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        blockopt.partition(Attention(), num_heads=2, warn=False)
    return " ".join(str(w.message) for w in caught)


@pytest.mark.parametrize("produce, words, longest", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_table(produce, words, longest, capsys):
    text = produce(capsys)
    for w in words:
        assert w in text, (w, text)
    assert len(text) <= longest, text
    assert "Traceback" not in text
