"""The check names and run budgets, in a module without torch so the CLI can show them in its help."""

from __future__ import annotations

SINGLE_CONCEPT = "single-concept"
THRESHOLD_POISONED = "threshold-poisoned"
FALSE_FREQUENCY = "false-frequency"
#: the test names in their canonical order
CHECK_NAMES: tuple[str, ...] = (SINGLE_CONCEPT, THRESHOLD_POISONED, FALSE_FREQUENCY)

DEFAULT_EPOCHS = 40
#: the budget of `--fast`: half the epochs and 3 seeds. Fewer bags than 500 let the reference
#: models over-fit the background of tests 2-3 (test AUC ≈ 0.5-0.7 on some seeds at 200 bags).
FAST_EPOCHS = 20
FAST_SEEDS = 3
