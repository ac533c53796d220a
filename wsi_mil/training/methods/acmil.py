"""The `acmil` method: plain supervised MIL for the `acmil` model, whose branch and diversity losses
arrive as auxiliary losses (`MILOutput.aux_losses` / `MILModel.aux_losses`).

`aux_weights={"<term>": w}` rescales a term; unnamed terms weigh 1, as in the official code.
"""

from __future__ import annotations

import logging

from wsi_mil.models.base import MILModel
from wsi_mil.training.methods.base import Batch, StepResult, TrainingMethod
from wsi_mil.training.methods.registry import register_method

log = logging.getLogger(__name__)


@register_method("acmil")
class ACMILMethod(TrainingMethod):
    """Plain supervised MIL for the `acmil` model: its branch/diversity losses arrive as aux losses.

    Warns once when the model returns no auxiliary loss, since `acmil` then trains exactly as
    `plain` (use `--model acmil` with more than one branch).
    """

    name = "acmil"

    def __init__(self, *, aux_weights: dict[str, float] | None = None) -> None:
        super().__init__(aux_weights=aux_weights)
        self._checked_aux = False

    def compute_loss(self, model: MILModel, batch: Batch, *, progress: float) -> StepResult:
        result = super().compute_loss(model, batch, progress=progress)
        if not self._checked_aux:
            self._checked_aux = True
            if set(result.terms) == {"bag"}:
                log.warning(
                    "method 'acmil': %s returns no auxiliary loss, so this trains as 'plain'; "
                    "use --model acmil with several branches",
                    type(model).__name__,
                )
        return result
