"""Integrations with training frameworks.

* :mod:`blockopt.integrations.hf`: Hugging Face ``Trainer`` (``pip install 'blockopt[hf]'``).
* :mod:`blockopt.integrations.deepspeed`: DeepSpeed ZeRO 1-3 (``pip install 'blockopt[deepspeed]'``):
  ``attach(engine)`` and ``trainer_callback()``.
* PyTorch Lightning needs no helper: build :class:`blockopt.AdamMini` from the
  LightningModule in ``configure_optimizers`` (see docs/integrations.md).
* torchtitan-style models need nothing either: ``AdamMini(model)`` reads the
  head counts from their ``Attention`` modules (``n_heads``, ``n_kv_heads``,
  ``head_dim``).

Importing this package imports neither ``transformers`` nor ``lightning`` nor ``deepspeed``; its
modules are attributes imported on first use, so ``import blockopt`` then
``blockopt.integrations.deepspeed.attach(engine)`` works.
"""

from ..utils import lazy_submodules

__all__: list[str] = []

_SUBMODULES = frozenset({"deepspeed", "hf"})


__getattr__, __dir__ = lazy_submodules(__name__, _SUBMODULES, globals())
