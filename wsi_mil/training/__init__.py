"""Training: a cohort of feature files -> cross-validated MIL models in a run folder.

`train_cohort(config, run_dir)` trains every fold (`cross_validation`) and `evaluate_run(run_dir)`
recomputes the run's metrics, predictions and plots from the saved checkpoints (`reporting`). Using
a trained model (loading it, predicting slides) is `wsi_mil.inference`.
"""

from wsi_mil.training.config import TrainConfig as TrainConfig
from wsi_mil.training.config import load_config as load_config
from wsi_mil.training.cross_validation import train_cohort as train_cohort
from wsi_mil.training.reporting import evaluate_run as evaluate_run
