"""Network families: the attacker fine-tunes the released network itself.

- ``finetune-immunized``: the parameters the immunization trained, plus the head;
- ``finetune-all``: every parameter, plus the head;
- ``lora``: LoRA adapters (``peft``) on the conv/linear layers of the trained blocks, plus
  the head.

The families that leave the first blocks frozen (``finetune-immunized``, ``lora``) compute
those blocks' output once per model, data and BatchNorm choice, and train the rest on it.
"""

from __future__ import annotations

import copy

from torch import nn

from lightning_immunize.attacks.families.base import (
    AttackerFamily,
    Prepared,
    register_family,
)
from lightning_immunize.attacks.families.preparation import (
    memoised,
    prefix_outputs,
    recalibrated,
    split_frozen_prefix,
)

#: LoRA adapters' rank and scale (``lora_alpha``), fixed for every model compared.
LORA_RANK = 8
LORA_ALPHA = 16


def trained_parameter_names(extractor: nn.Module) -> list[str]:
    """Names of the parameters the immunization trained (``requires_grad``)."""
    return [n for n, p in extractor.named_parameters() if p.requires_grad]


def lora_target_modules(extractor: nn.Module) -> list[str]:
    """Names of the ``nn.Conv2d``/``nn.Linear`` layers whose weights the immunization trained."""
    trained = set(trained_parameter_names(extractor))
    return [
        name
        for name, module in extractor.named_modules()
        if isinstance(module, (nn.Conv2d, nn.Linear)) and f"{name}.weight" in trained
    ]


class NetworkFamily(AttackerFamily):
    """A family that trains a copy of the network; subclasses say which parameters
    (:meth:`trainable_copy`) and whether the frozen first blocks can be computed once
    (``frozen_prefix``)."""

    network = True
    frozen_prefix = False

    def trainable_copy(self, extractor: nn.Module) -> nn.Module:
        """A copy of ``extractor`` with what this family trains set to ``requires_grad``."""
        return copy.deepcopy(extractor)

    def prepare(self, extractor, data, attacker, cache) -> Prepared:
        model = self.trainable_copy(recalibrated(extractor, data, attacker.batchnorm, cache))
        split = split_frozen_prefix(model, data.train_x[:2]) if self.frozen_prefix else None
        if split is None:
            return Prepared(model, data.train_x, data.eval_x, data.score_x)
        prefix, rest = split

        def make():
            score = None if data.score_x is None else prefix_outputs(prefix, data.score_x)
            return prefix_outputs(prefix, data.train_x), prefix_outputs(prefix, data.eval_x), score

        key = ("prefix", id(extractor), id(data), attacker.batchnorm, len(prefix))
        return Prepared(rest, *memoised(cache, key, data, make))


@register_family
class FinetuneImmunized(NetworkFamily):
    """Fine-tune the blocks the immunization trained (and a fresh head)."""

    name = "finetune-immunized"
    frozen_prefix = True

    def check(self, extractor: nn.Module, name: str = "given") -> None:
        super().check(extractor, name)
        if not trained_parameter_names(extractor):
            raise ValueError(
                f"attacker family {self.name!r} trains the blocks the immunization trained, "
                f"but {type(extractor).__name__} has no parameter with requires_grad; expected "
                "at least one."
            )


@register_family
class FinetuneAll(NetworkFamily):
    """Fine-tune every parameter (and a fresh head)."""

    name = "finetune-all"

    def trainable_copy(self, extractor: nn.Module) -> nn.Module:
        model = copy.deepcopy(extractor)
        for p in model.parameters():
            p.requires_grad_(True)
        return model


@register_family
class Lora(FinetuneImmunized):
    """LoRA adapters on the conv/linear layers of the blocks the immunization trained."""

    name = "lora"

    def check(self, extractor: nn.Module, name: str = "given") -> None:
        super().check(extractor, name)
        if not lora_target_modules(extractor):
            raise ValueError(
                f"attacker family 'lora' needs conv or linear layers in the trained blocks of "
                f"{type(extractor).__name__}; found none."
            )

    def trainable_copy(self, extractor: nn.Module) -> nn.Module:
        from peft import LoraConfig, inject_adapter_in_model

        targets = lora_target_modules(extractor)
        model = copy.deepcopy(extractor)
        for p in model.parameters():
            p.requires_grad_(False)
        config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=targets)
        model = inject_adapter_in_model(config, model)
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
        return model
