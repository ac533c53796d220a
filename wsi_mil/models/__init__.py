"""MIL model zoo: one forward contract (`MILModel` -> `MILOutput`), a registry and a factory."""

# Model family modules register themselves on import; import each one explicitly here.
from wsi_mil.models import abmil as abmil
from wsi_mil.models import acmil as acmil
from wsi_mil.models import clam as clam
from wsi_mil.models import dsmil as dsmil
from wsi_mil.models import ins as ins
from wsi_mil.models import mamba_mil as mamba_mil
from wsi_mil.models import packmil_ads as packmil_ads
from wsi_mil.models import r2t_mil as r2t_mil
from wsi_mil.models import reference as reference
from wsi_mil.models import transmil as transmil
from wsi_mil.models.base import MILModel as MILModel
from wsi_mil.models.base import MILOutput as MILOutput
from wsi_mil.models.registry import create_model as create_model
from wsi_mil.models.registry import is_model as is_model
from wsi_mil.models.registry import list_models as list_models
from wsi_mil.models.registry import model_entry as model_entry
from wsi_mil.models.registry import model_options as model_options
from wsi_mil.models.registry import register_model as register_model
