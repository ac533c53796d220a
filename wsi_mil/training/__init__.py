"""Training: a cohort of feature files -> cross-validated MIL models in a run folder.

`train_cohort(config, run_dir)` trains every fold, `evaluate_run(run_dir)` recomputes the
metrics from the saved checkpoints, `predict(run_dir, feature_paths)` serves a run's model and
`load_model_from_run(run_dir, fold)` rebuilds one fold's model with its card.
"""

from wsi_mil.training.config import TrainConfig as TrainConfig
from wsi_mil.training.config import load_config as load_config
from wsi_mil.training.run import ModelCard as ModelCard
from wsi_mil.training.run import Prediction as Prediction
from wsi_mil.training.run import evaluate_run as evaluate_run
from wsi_mil.training.run import load_model_from_run as load_model_from_run
from wsi_mil.training.run import predict as predict
from wsi_mil.training.run import train_cohort as train_cohort
