"""Integrations with training frameworks.

* :mod:`blockopt.integrations.hf`: Hugging Face ``Trainer`` (``pip install 'blockopt[hf]'``).
* PyTorch Lightning needs no helper: build :class:`blockopt.AdamMini` from the
  LightningModule in ``configure_optimizers`` (see README, "Integrations").
* torchtitan-style models need nothing either: ``AdamMini(model)`` reads the
  head counts from their ``Attention`` modules (``n_heads``, ``n_kv_heads``,
  ``head_dim``).

Importing this package imports neither ``transformers`` nor ``lightning``.
"""

__all__: list[str] = []
