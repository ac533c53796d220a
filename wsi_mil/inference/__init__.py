"""A trained model in use: its card, loading it, predicting bags, feature files and slides, heatmaps.

The layer between `models/` + `preprocessing/` below and `training/`, `service/` and `cli/` above::

    from wsi_mil.inference import load_model, predict_slide

    model = load_model("runs/abmil")            # a training run (best fold) or a model folder
    result = predict_slide("slide.svs", model)  # the card's tissue/tile/encoder settings, then the model
    print(result.prediction.predicted_class, result.prediction.class_probabilities)
    result.save_heatmap("slide_heatmap.png")    # attention over the slide thumbnail
"""

from wsi_mil.inference.card import FeatureContract as FeatureContract
from wsi_mil.inference.card import ModelCard as ModelCard
from wsi_mil.inference.card import read_model_card as read_model_card
from wsi_mil.inference.heatmaps import HeatmapOptions as HeatmapOptions
from wsi_mil.inference.heatmaps import TileScores as TileScores
from wsi_mil.inference.heatmaps import render_heatmap as render_heatmap
from wsi_mil.inference.loading import LoadedModel as LoadedModel
from wsi_mil.inference.loading import RunLayout as RunLayout
from wsi_mil.inference.loading import load_model as load_model
from wsi_mil.inference.predict import BagPrediction as BagPrediction
from wsi_mil.inference.predict import SlidePrediction as SlidePrediction
from wsi_mil.inference.predict import predict_bag as predict_bag
from wsi_mil.inference.predict import predict_features as predict_features
from wsi_mil.inference.predict import predict_slide as predict_slide
from wsi_mil.inference.predict import read_features as read_features
from wsi_mil.inference.predict import save_predictions as save_predictions
