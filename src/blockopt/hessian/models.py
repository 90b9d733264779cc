"""Built-in problems for the Hessian toolkit: tiny models with their data and loss.

Three architectures, small enough that a full block-heterogeneity run and a
dense Hessian of a query weight take well under a minute on two CPU cores:

* ``tiny-transformer``: the library's Llama-style decoder
  (:func:`blockopt.models.build_model`, RMSNorm, RoPE, SwiGLU, tied
  embeddings) with 2 layers, ``d_model=32``, 4 heads of 8; byte-level tokens
  (vocabulary 256), next-token loss.
* ``tiny-cnn``: VGG-style, four 3x3 convolutions (16 channels) with ReLU,
  global average pooling, a linear classifier, He initialisation as
  torchvision's VGG; cross-entropy loss. (``TinyCNN(batch_norm=True)`` is the
  ResNet-style variant the benchmark also measures.)
* ``tiny-mlp``: three linear layers (768-64-64-10) with ReLU on the flattened
  image, He initialisation; cross-entropy loss.

Data without ``--data``: for the Transformer, the source text of a fixed list
of Python standard-library modules (no download; it depends on the Python
version, which the report records); for the CNN and MLP, real images: the
1,797 handwritten digits (1x8x8, 10 classes) that scikit-learn ships (no
download; ``pip install 'blockopt[vision]'``), intensities in [0, 1]. ``--data
synthetic`` gives the older seeded synthetic set instead (3x16x16: each class a
smooth random prototype image, each example that prototype plus smooth and
pixel noise), which needs nothing but torch.

With ``--data``: a text file or a folder of text files (language models;
bytes are the tokens), a ``.npy``/``.pt`` file of token ids, or, for the image
models, a ``.pt`` file holding ``{"x": [N, C, H, W] float, "y": [N] int}`` (or
an ``(x, y)`` tuple) or an ``.npz`` with arrays ``x`` and ``y``.

The toolkit's core (hvp, lanczos, slq, heterogeneity, dense) does not import
this module; it is the CLI's and the benchmark's source of problems and is
the only place in :mod:`blockopt.hessian` that uses :mod:`blockopt.bench`
(the model definitions, which import nothing but torch).
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .hvp import HessianInputError

__all__ = [
    "BUILTIN_MODELS",
    "Problem",
    "TinyCNN",
    "TinyMLP",
    "build_hf_problem",
    "build_problem",
    "classification_loss",
    "digit_images",
    "hf_lm_loss",
    "lm_loss",
]

BUILTIN_MODELS = ("tiny-transformer", "tiny-cnn", "tiny-mlp")
_STDLIB_MODULES = ("textwrap", "string", "argparse", "json.decoder", "json.encoder", "calendar", "fractions",
                   "difflib", "heapq", "bisect", "shlex", "csv")
_MAX_TEXT_BYTES = 4 * 1024 * 1024


@dataclass
class Problem:
    """A model, its loss and one batch: everything a :class:`~blockopt.hessian.hvp.HessianOperator` needs."""

    name: str
    model: nn.Module
    loss_fn: Callable[[nn.Module, Any], torch.Tensor]
    batch: Any
    data: str
    info: dict[str, Any] = field(default_factory=dict)
    #: parameter the dense heatmap looks at by default, and its head size (if attention)
    dense_param: str | None = None
    head_dim: int | None = None
    #: more data for short warm-up training (``train_batches(n)``), or None
    train_batches: Callable[[int], list[Any]] | None = None


def lm_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy of a blockopt :class:`~blockopt.models.TransformerLM`,
    computed from the logits in the model's own precision (its ``forward(x, y)`` casts to float32)."""
    x, y = batch
    logits = model(x)  # [B, T, V]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def hf_lm_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy of a Hugging Face causal LM (logits shifted here, labels given)."""
    x, y = batch
    logits = model(input_ids=x).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


def classification_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def _he_init(model: nn.Module, mode: str) -> None:
    """He (Kaiming normal, ReLU gain) weights and zero biases, as torchvision's VGG (``fan_out``)
    and the usual MLP initialisation (``fan_in``). PyTorch's default (Kaiming uniform with
    ``a=sqrt(5)``) shrinks the signal layer by layer, which by itself makes the layers' curvatures
    differ by orders of magnitude."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode=mode, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class TinyCNN(nn.Module):
    """VGG-style: four 3x3 convolutions with ReLU (the second with stride 2), global average pool,
    a linear classifier; He initialisation (``fan_out``). ``batch_norm=True`` adds a BatchNorm2d
    after every convolution (ResNet-style normalisation; then the convolutions have no bias)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 16, batch_norm: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(4):
            layers.append(nn.Conv2d(in_channels if i == 0 else width, width, 3, stride=2 if i == 1 else 1,
                                    padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(width))
            layers.append(nn.ReLU())
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(width, num_classes)
        _he_init(self, "fan_out")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # [B, w, H/2, W/2]
        return self.fc(x.mean((2, 3)))  # [B, classes]


class TinyMLP(nn.Module):
    """Flatten, linear-ReLU-linear-ReLU-linear; He initialisation (``fan_in``)."""

    def __init__(self, in_features: int = 768, num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, width)
        self.fc2 = nn.Linear(width, width)
        self.fc3 = nn.Linear(width, num_classes)
        _he_init(self, "fan_in")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)  # [B, C*H*W]
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


# ---------------------------------------------------------------------------
# data


def _stdlib_text() -> tuple[bytes, str]:
    chunks = []
    for mod in _STDLIB_MODULES:
        spec = importlib.util.find_spec(mod)
        if spec is None or not spec.origin or not os.path.isfile(spec.origin):
            continue
        with open(spec.origin, "rb") as f:
            chunks.append(f.read())
    if not chunks:
        raise HessianInputError("--data: not given, and no standard-library source was found for the default text")
    import sys

    return b"\n".join(chunks), f"Python {sys.version_info[0]}.{sys.version_info[1]} stdlib sources ({len(chunks)} modules)"


def _read_text(path: Path) -> tuple[bytes, str]:
    if path.is_file():
        data = path.read_bytes()[:_MAX_TEXT_BYTES]
        desc = str(path)
    elif path.is_dir():
        parts, total = [], 0
        for p in sorted(path.rglob("*")):
            if p.is_file() and not any(s.startswith(".") for s in p.relative_to(path).parts):
                b = p.read_bytes()
                if b"\0" in b[:4096]:
                    continue
                parts.append(b)
                total += len(b)
                if total >= _MAX_TEXT_BYTES:
                    break
        data = b"\n".join(parts)[:_MAX_TEXT_BYTES]
        desc = f"{path}/ ({len(parts)} text files)"
    else:
        raise HessianInputError(f"--data: {str(path)!r} does not exist; expected a text file, a folder or a token file")
    if not data:
        raise HessianInputError(f"--data: {str(path)!r} holds no text")
    return data, desc


def _tokens(data: str | os.PathLike | None, vocab_size: int) -> tuple[torch.Tensor, str]:
    if data is None:
        raw, desc = _stdlib_text()
    else:
        path = Path(data).expanduser()
        if path.suffix in (".npy", ".pt") and path.is_file():
            if path.suffix == ".npy":
                import numpy as np

                toks = torch.from_numpy(np.load(path)).reshape(-1).long()
            else:
                obj = torch.load(path, map_location="cpu", weights_only=True)
                if not isinstance(obj, torch.Tensor):
                    raise HessianInputError(f"--data: {str(path)!r} holds {type(obj).__name__}, expected a tensor of token ids")
                toks = obj.reshape(-1).long()
            if toks.numel() == 0 or int(toks.min()) < 0 or int(toks.max()) >= vocab_size:
                raise HessianInputError(f"--data: token ids in {str(path)!r} must lie in [0, {vocab_size})")
            return toks, str(path)
        raw, desc = _read_text(path)
    toks = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
    if vocab_size < 256:
        toks = toks % vocab_size
    return toks, desc + " (bytes as tokens)"


def _lm_batches(tokens: torch.Tensor, batch_size: int, seq_len: int, seed: int) -> Callable[[int], list[Any]]:
    if tokens.numel() < seq_len + 2:
        raise HessianInputError(f"--data: {tokens.numel()} tokens are fewer than --seq-len + 2 = {seq_len + 2}")

    def make(n: int, offset: int = 0) -> list[Any]:
        g = torch.Generator().manual_seed(seed + 7919 * (offset + 1))
        out = []
        for _ in range(n):
            starts = torch.randint(0, tokens.numel() - seq_len - 1, (batch_size,), generator=g)
            x = torch.stack([tokens[s:s + seq_len] for s in starts.tolist()])  # [B, T]
            y = torch.stack([tokens[s + 1:s + 1 + seq_len] for s in starts.tolist()])
            out.append((x, y))
        return out

    return make


def synthetic_images(n: int, *, classes: int = 10, channels: int = 3, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded synthetic image classification data (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)

    def smooth(k: int, coarse: int) -> torch.Tensor:
        z = torch.randn(k, channels, coarse, coarse, generator=g)
        return F.interpolate(z, size=(size, size), mode="bilinear", align_corners=False)

    protos = smooth(classes, 4)
    y = torch.randint(0, classes, (n,), generator=g)
    x = protos[y] + 0.6 * smooth(n, 8) + 0.2 * torch.randn(n, channels, size, size, generator=g)
    x = (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True)
    return x, y


def digit_images() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,797 8x8 handwritten digits scikit-learn ships (``sklearn.datasets.load_digits``; no
    download), as ``[N, 1, 8, 8]`` intensities scaled to [0, 1] (as torchvision's ``ToTensor`` scales
    pixels), with labels ``[N]``. The heterogeneity of the CNN depends on this choice: standardised
    pixels give a higher one (docs/findings.md)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise HessianInputError(
            "The default images of tiny-cnn/tiny-mlp are scikit-learn's digits, and scikit-learn is not installed: "
            "pip install 'blockopt[vision]' (or pass --data synthetic for seeded synthetic images)"
        ) from None
    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32).unsqueeze(1)  # [N, 1, 8, 8], values 0..16
    return x / 16.0, torch.as_tensor(d.target, dtype=torch.long)


def _images(data: str | os.PathLike | None, seed: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    if data is None:
        x, y = digit_images()
        return x, y, "scikit-learn's handwritten digits, 1,797 images 1x8x8, 10 classes (real data)"
    if str(data) == "synthetic":
        x, y = synthetic_images(2048, seed=seed)
        return x, y, "synthetic 10-class images 3x16x16 (seeded)"
    path = Path(data).expanduser()
    if not path.is_file():
        raise HessianInputError(f"--data: {str(path)!r} is not a file; image models take a .pt or .npz with x and y")
    if path.suffix == ".npz":
        import numpy as np

        with np.load(path) as z:
            if "x" not in z or "y" not in z:
                raise HessianInputError(f"--data: {str(path)!r} lacks arrays 'x' and 'y' (has {list(z.keys())})")
            x, y = torch.from_numpy(z["x"]), torch.from_numpy(z["y"])
    elif path.suffix == ".pt":
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, dict) and "x" in obj and "y" in obj:
            x, y = obj["x"], obj["y"]
        elif isinstance(obj, (tuple, list)) and len(obj) == 2:
            x, y = obj
        else:
            raise HessianInputError(f"--data: {str(path)!r} must hold {{'x': images, 'y': labels}} or (x, y)")
    else:
        raise HessianInputError(f"--data: {str(path)!r}; image models take a .pt or .npz file with x and y")
    x, y = torch.as_tensor(x).float(), torch.as_tensor(y).long().reshape(-1)
    if x.dim() != 4 or x.shape[0] != y.shape[0] or x.shape[0] < 2:
        raise HessianInputError(
            f"--data: images must be [N, C, H, W] with N labels (N >= 2); got x {list(x.shape)}, y {list(y.shape)}"
        )
    if int(y.min()) < 0:
        raise HessianInputError("--data: labels must be non-negative class ids")
    return x, y, str(path)


def _image_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int) -> Callable[[int], list[Any]]:
    def make(n: int, offset: int = 0) -> list[Any]:
        g = torch.Generator().manual_seed(seed + 7919 * (offset + 1))
        out = []
        for _ in range(n):
            i = torch.randperm(x.shape[0], generator=g)[:batch_size]
            out.append((x[i], y[i]))
        return out

    return make


# ---------------------------------------------------------------------------
# problems


def build_problem(
    name: str,
    *,
    data: str | os.PathLike | None = None,
    batch_size: int | None = None,
    seq_len: int = 32,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Problem:
    """A built-in problem (``tiny-transformer``, ``tiny-cnn``, ``tiny-mlp``) with its default data
    (or ``data``), one measurement batch and a seeded initialisation."""
    if name not in BUILTIN_MODELS:
        raise HessianInputError(f"Invalid model: {name!r}; built-in models: {', '.join(BUILTIN_MODELS)}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise HessianInputError(f"Invalid batch_size: {batch_size!r}; expected an int >= 1")
    if name == "tiny-transformer":
        from ..models import build_model

        if seq_len < 2 or seq_len > 256:
            raise HessianInputError(f"Invalid seq_len: {seq_len}; allowed 2..256 for tiny-transformer")
        bs = batch_size or 8
        tokens, desc = _tokens(data, 256)
        model = build_model("llama-tiny", vocab_size=256, n_layers=2, d_model=32, n_heads=4, n_kv_heads=4,
                            d_ff=64, max_seq_len=256, seed=seed).to(dtype)
        make = _lm_batches(tokens, bs, seq_len, seed)
        info = {"architecture": "llama-style decoder", "layers": 2, "d_model": 32, "heads": 4, "head_dim": 8,
                "vocab_size": 256, "batch_size": bs, "seq_len": seq_len, "tokens": int(tokens.numel())}
        return Problem(name, model, lm_loss, make(1)[0], desc, info, "blocks.0.attn.q_proj.weight", 8,
                       lambda n: make(n, offset=1))
    x, y, desc = _images(data, seed)
    bs = batch_size or 256
    if bs > x.shape[0]:
        raise HessianInputError(f"Invalid batch_size: {bs}; the data has only {x.shape[0]} examples")
    classes = int(y.max()) + 1
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if name == "tiny-cnn":
            model = TinyCNN(x.shape[1], classes)
            dense = "features.2.weight"
        else:
            model = TinyMLP(math.prod(x.shape[1:]), classes)
            dense = "fc2.weight"
    model = model.to(dtype)
    x = x.to(dtype)
    make = _image_batches(x, y, bs, seed)
    info = {"architecture": type(model).__name__, "examples": int(x.shape[0]), "image_shape": list(x.shape[1:]),
            "classes": classes, "batch_size": bs}
    return Problem(name, model, classification_loss, make(1)[0], desc, info, dense, None, lambda n: make(n, offset=1))


def build_hf_problem(
    config_path: str | os.PathLike,
    *,
    data: str | os.PathLike | None = None,
    batch_size: int = 4,
    seq_len: int = 32,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Problem:
    """A Hugging Face causal LM built (randomly initialised, seeded) from a ``config.json``, a folder
    holding one, or inline JSON (``'{"model_type": "gpt2", ...}'``); tokens are bytes (modulo the vocabulary size). Attention runs in the eager
    implementation, which is differentiable twice."""
    from ..utils import load_hf_config

    cfg, path = load_hf_config(config_path, HessianInputError)  # also says when transformers is missing
    import transformers

    model_type = cfg.model_type
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        try:
            model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
        except (TypeError, ValueError):
            model = transformers.AutoModelForCausalLM.from_config(cfg)
    model = model.to(dtype)
    vocab = int(getattr(cfg, "vocab_size", 256))
    tokens, desc = _tokens(data, vocab)
    make = _lm_batches(tokens, batch_size, seq_len, seed)
    info = {"architecture": type(model).__name__, "model_type": model_type, "config": str(path),
            "batch_size": batch_size, "seq_len": seq_len, "vocab_size": vocab}
    heads = getattr(cfg, "num_attention_heads", None)
    hidden = getattr(cfg, "hidden_size", None)
    head_dim = getattr(cfg, "head_dim", None) or (hidden // heads if heads and hidden else None)
    return Problem(f"hf:{model_type}", model, hf_lm_loss, make(1)[0], desc, info, None, head_dim,
                   lambda n: make(n, offset=1))
