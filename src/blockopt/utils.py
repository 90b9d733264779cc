"""Small helpers shared by the library and the bench (torch-free)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "fmt_bytes", "load_hf_config", "one_line"]


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write(f)`` on a temporary binary file next to ``path``, then ``os.replace`` it onto
    ``path``: readers see the old file or the whole new one, never half of it. On any error
    (or interruption) the temporary file is removed and ``path`` is left as it was.

    ``write`` may be e.g. ``lambda f: torch.save(obj, f)`` or ``lambda f: fig.savefig(f, format="png")``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``: never half-written."""
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file and ``os.replace``: never half-written."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def fmt_bytes(n: float | None) -> str:
    """``3.1 MiB``: bytes in binary units, one decimal (``-`` for None)."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover - the loop returns


def load_hf_config(spec: str, error: type[Exception] = ValueError) -> tuple[Any, str]:
    """A ``transformers.PretrainedConfig`` from a ``config.json``, a folder holding one, or inline JSON
    (nothing is downloaded), and where it came from. Every problem, the config's own validation
    included, raises ``error`` with a one-line message that starts with ``--hf-config``."""
    try:
        import transformers
    except ImportError:
        raise error("--hf-config needs the package 'transformers': pip install 'blockopt[hf]'") from None
    text = os.fspath(spec).strip()
    if text.startswith("{"):
        where = "<inline JSON>"
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise error(f"--hf-config: inline JSON does not parse: {e}") from None
    else:
        path = Path(text).expanduser()
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise error(f"--hf-config: no such file {str(path)!r}; expected a config.json, a folder holding one, "
                        "or an inline JSON object (nothing is downloaded)")
        where = str(path)
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise error(f"--hf-config: {where!r} is not readable JSON: {e}") from None
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise error(f"--hf-config: {where!r} needs a JSON object with a 'model_type' (e.g. \"llama\", \"gpt2\")")
    raw = dict(raw)
    model_type = raw.pop("model_type")
    raw.pop("architectures", None)
    if not isinstance(model_type, str) or model_type not in transformers.CONFIG_MAPPING:
        raise error(_unknown_model_type(model_type, where, transformers))
    try:
        return transformers.AutoConfig.for_model(model_type, **raw), where
    except (ValueError, KeyError, TypeError, *_config_validation_errors()) as e:
        raise error(f"--hf-config: model_type {model_type!r}: {one_line(e)}") from None


def _unknown_model_type(model_type: Any, where: str, transformers: Any) -> str:
    """One short line for a ``model_type`` transformers does not know (its own error lists all 800 types)."""
    import difflib

    near = difflib.get_close_matches(str(model_type), list(transformers.CONFIG_MAPPING.keys()), n=3)
    hint = f"did you mean {', '.join(repr(n) for n in near)}? " if near else ""
    return (f"--hf-config: {where!r}: unknown model_type {model_type!r} for transformers {transformers.__version__}; "
            f"{hint}list the causal-LM types with: python -c \"import transformers.models.auto.modeling_auto as a; "
            "print(*sorted(a.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES))\"")


def one_line(e: BaseException) -> str:
    """The first two lines of an exception's message, joined (config validation errors are long)."""
    lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()]
    return " ".join(lines[:2]) if lines else type(e).__name__


def _config_validation_errors() -> tuple[type[BaseException], ...]:
    """huggingface_hub's strict-dataclass validation errors (not ValueError subclasses)."""
    try:
        from huggingface_hub import errors
    except ImportError:
        return ()
    return tuple(getattr(errors, n) for n in ("StrictDataclassClassValidationError",
                                              "StrictDataclassFieldValidationError") if hasattr(errors, n))


def lazy_submodules(package: str, names: frozenset[str], namespace: dict[str, Any]) \
        -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A package's module ``__getattr__`` and ``__dir__`` that import the submodules ``names`` on first use
    (PEP 562), so that ``import package`` does not import them or their optional dependencies."""
    import importlib

    def __getattr__(name: str) -> Any:
        if name in names:
            return importlib.import_module(f"{package}.{name}")
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(namespace) | names)

    return __getattr__, __dir__

