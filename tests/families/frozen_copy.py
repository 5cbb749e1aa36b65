"""The Yi family with a frozen copy of its model beside it (what a DPO reference is): the same
build and initialisation rule, built in the same TP / PP layout, never trained; its weights
come from the run seed (equal to the trainable model's at step 0) or, with
``model.reference_source``, from a checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, replace

from fmtrain.config import Config, FamilySettings
from fmtrain.models.registry import PartSpec
from fmtrain.models.yi import family as yi
from fmtrain.models.yi.config import SETTINGS as YI_SETTINGS
from fmtrain.models.yi.config import YiModelConfig


@dataclass
class FrozenCopyConfig(YiModelConfig):
    reference_source: str = ""
    """Where the frozen copy's weights come from (an fmtrain checkpoint); empty: the run seed."""


SETTINGS = FamilySettings(
    model=FrozenCopyConfig,
    objectives=YI_SETTINGS.objectives,
    parallel=YI_SETTINGS.parallel,
    validate=YI_SETTINGS.validate,
)


def parts(cfg: Config) -> list[PartSpec]:
    (model,) = yi.parts(cfg)
    return [model, replace(model, name="reference", trainable=False, source=cfg.model.reference_source)]


FAMILY = replace(yi.FAMILY, name="tests.families.frozen_copy", parts=parts)
