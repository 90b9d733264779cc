"""Hugging Face ``Trainer``: build :class:`~blockopt.AdamMini` from ``TrainingArguments``.

Two ways in, both single-process and multi-process:

* ``optimizers=`` (every ``transformers`` version): build the optimizer
  yourself and let the Trainer build its scheduler around it::

      opt = adam_mini_from_training_args(model, args)
      trainer = Trainer(model=model, args=args, train_dataset=ds, optimizers=(opt, None))

* ``optimizer_cls_and_kwargs=`` (``transformers`` 5, which calls an
  optimizer *factory* with the model): the Trainer builds AdamMini itself,
  after it has placed (or, under FSDP, sharded) the model. This is the way
  to use AdamMini with the Trainer's FSDP support, which refuses
  ``optimizers=``::

      trainer = Trainer(model=model, args=args, train_dataset=ds,
                        optimizer_cls_and_kwargs=adam_mini_cls_and_kwargs(args))

Learning rate, betas, eps and weight decay come from the arguments
(``learning_rate``, ``adam_beta1``, ``adam_beta2``, ``adam_epsilon``,
``weight_decay``); ``args.optim`` and ``args.optim_args`` are not used. Which
tensors are decayed is the plan's decision (matrices and embeddings, not
biases and norms), not the Trainer's name list. Other keyword arguments go to
:class:`~blockopt.AdamMini` (``rules="official"``, ``state_budget=``, ``overrides=``,
head hints, ``foreach=``...).

The Trainer's LR scheduler drives AdamMini's param groups like any
``torch.optim`` optimizer's, and its checkpoints (``optimizer.pt``, read back
with ``torch.load(weights_only=True)``) carry the plan, so
``trainer.train(resume_from_checkpoint=...)`` restores the optimizer state and
refuses a state saved under a different plan.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..optim import AdamMini

__all__ = ["AdamMiniFactory", "adam_mini_cls_and_kwargs", "adam_mini_from_training_args", "adam_mini_kwargs"]

_INSTALL = "pip install 'blockopt[hf]'"
_FROM_ARGS = {"lr": "learning_rate", "betas": "adam_beta1/adam_beta2", "eps": "adam_epsilon",
              "weight_decay": "weight_decay"}


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as e:
        raise ImportError(f"blockopt.integrations.hf needs Hugging Face transformers: {_INSTALL}") from e
    return transformers


def adam_mini_kwargs(args: Any, **kwargs: Any) -> dict[str, Any]:
    """AdamMini's keyword arguments from ``transformers.TrainingArguments`` ``args``, plus ``kwargs``.

    ``kwargs`` may not repeat what the arguments set (``lr``, ``betas``,
    ``eps``, ``weight_decay``): set those in ``TrainingArguments``, so that
    what the Trainer logs and what the optimizer uses cannot differ. When the
    Trainer shards (``args.deepspeed`` or ``args.fsdp``) and neither ``rules``
    nor ``plan`` is given, ``rules="blocks"``: factored matrices (the default's)
    have no sharded step yet.
    """
    transformers = _transformers()
    if not isinstance(args, transformers.TrainingArguments):
        raise TypeError(f"Invalid args: expected a transformers.TrainingArguments, got {type(args).__name__}")
    clash = sorted(set(kwargs) & set(_FROM_ARGS))
    if clash:
        where = ", ".join(f"{k} -> TrainingArguments.{_FROM_ARGS[k]}" for k in clash)
        raise ValueError(f"Invalid keyword arguments {clash}: they are read from args; set them there ({where})")
    if (getattr(args, "deepspeed", None) or getattr(args, "fsdp", None)) and not {"rules", "plan"} & set(kwargs):
        kwargs = {**kwargs, "rules": "blocks"}
    return dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                weight_decay=args.weight_decay, **kwargs)


def adam_mini_from_training_args(model: nn.Module, args: Any, **kwargs: Any) -> AdamMini:
    """Build :class:`~blockopt.AdamMini` for ``model`` from ``TrainingArguments`` ``args``.

    Pass the result to ``Trainer(..., optimizers=(opt, None))``; the Trainer
    then builds its scheduler (``args.lr_scheduler_type``, warmup) on it.
    ``kwargs`` go to :class:`~blockopt.AdamMini` (see :func:`adam_mini_kwargs`).

    Example::

        >>> args = TrainingArguments("out", learning_rate=3e-4, weight_decay=0.1, report_to=[])
        >>> opt = adam_mini_from_training_args(model, args, state_budget=0.6)
        >>> Trainer(model=model, args=args, train_dataset=ds, optimizers=(opt, None)).train()
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Invalid model: expected an nn.Module, got {type(model).__name__}")
    return AdamMini(model, **adam_mini_kwargs(args, **kwargs))


class AdamMiniFactory:
    """An optimizer factory for ``Trainer(optimizer_cls_and_kwargs=(AdamMiniFactory, kwargs))``.

    ``transformers`` 5 instantiates it and calls it with the model the Trainer
    is about to train (placed on its device; under FSDP, already sharded) and
    the keyword arguments. Build the pair with :func:`adam_mini_cls_and_kwargs`.
    """

    def __call__(self, model: nn.Module, **kwargs: Any) -> AdamMini:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"Invalid model: AdamMiniFactory was called with {type(model).__name__}, not an nn.Module; "
                "this transformers version passes parameter groups, not the model, to optimizer_cls_and_kwargs. "
                "Pass optimizers=(adam_mini_from_training_args(model, args), None) instead"
            )
        return AdamMini(model, **kwargs)


def adam_mini_cls_and_kwargs(args: Any, **kwargs: Any) -> tuple[type[AdamMiniFactory], dict[str, Any]]:
    """``(AdamMiniFactory, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)`` (``transformers`` >= 5).

    Raises ``ImportError`` when the installed ``transformers`` has no
    optimizer-factory hook (then use ``optimizers=`` with
    :func:`adam_mini_from_training_args`).
    """
    transformers = _transformers()
    try:
        from transformers.trainer_optimizer import is_optimizer_factory
    except ImportError:
        raise ImportError(
            f"Trainer(optimizer_cls_and_kwargs=...) with an optimizer factory needs transformers >= 5 (found "
            f"{transformers.__version__}); pass optimizers=(adam_mini_from_training_args(model, args), None) "
            "instead"
        ) from None
    if not is_optimizer_factory(AdamMiniFactory):  # pragma: no cover - guards a change of the protocol
        raise ImportError(f"transformers {transformers.__version__} does not treat AdamMiniFactory as a factory")
    return AdamMiniFactory, adam_mini_kwargs(args, **kwargs)
