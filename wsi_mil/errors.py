"""The exception hierarchy of wsi_mil: each message names the setting or flag that fixes it."""

from __future__ import annotations


class WsiMilError(Exception):
    """Base class for every error wsi_mil raises on purpose (bad input, missing setup)."""


class SlideOpenError(WsiMilError):
    """A file could not be opened or read as a whole-slide image."""


class MissingMppError(WsiMilError):
    """A slide has no microns-per-pixel in its metadata and no override was given."""


class NoTissueError(WsiMilError):
    """Tissue segmentation or tiling kept no tile; reported as the status ``no_tissue``."""


class WeightsNotFoundError(WsiMilError):
    """Encoder or model weights are not available locally and cannot be downloaded."""


class UnknownEncoderError(WsiMilError, KeyError):
    """An encoder name that is not in the encoder registry."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class UnknownModelError(WsiMilError, ValueError):
    """A model name that is not in the model registry."""


class FeatureFileError(WsiMilError):
    """A feature file is missing datasets or attributes, or holds inconsistent shapes."""


class CohortError(WsiMilError):
    """A cohort (feature files + labels) is inconsistent."""


class MilCheckError(WsiMilError, ValueError):
    """An algorithmic MIL check was set up wrongly (unknown test name, a model off the contract)."""


class TrainingConfigError(WsiMilError, ValueError):
    """A training config or a training method is set up wrongly (bad value, unknown method)."""


class RunFolderError(WsiMilError):
    """A training run folder is missing files, or holds a run made with a different config."""


class FeatureContractError(WsiMilError):
    """Features do not match what a trained model expects (encoder, feature dimension, mpp, tile px)."""


class TilingError(WsiMilError):
    """Tiling settings cannot be applied to a slide (a tile would cover less than one pixel)."""


class ModelConfigError(WsiMilError, ValueError):
    """A model option has a value the model cannot use; the message names the option."""


class SlidePathError(WsiMilError, ValueError):
    """A slide path a client named lies outside the service's slide root or does not exist there."""


class UploadTooLargeError(WsiMilError):
    """An upload exceeds the service's size limit (`WSI_MIL_MAX_UPLOAD_MB`)."""


class JobStateError(WsiMilError):
    """A job is in a state that does not allow the request (its results are not ready, it finished)."""


class JobCancelledError(WsiMilError):
    """A slide job stopped because it was cancelled or the service is shutting down."""


class HeatmapRequestError(WsiMilError, ValueError):
    """A heatmap was asked for with a map, class, scale or colormap the job's scores do not have."""


class TileNotFoundError(WsiMilError, LookupError):
    """A Deep Zoom level or tile address outside a slide's pyramid."""
