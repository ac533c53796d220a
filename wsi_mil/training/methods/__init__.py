"""Training methods and their registry: `create_method(name, **kwargs)` -> `TrainingMethod`.

Built in: `plain` (bag cross-entropy + the model's own auxiliary losses), `acmil`, `aem`, `ins`,
`mhim`, `packmil` and `scmil`. Each method module registers its names on import; every one is imported here
explicitly, like the model families in `wsi_mil.models`.
"""

from wsi_mil.training.methods import acmil as acmil
from wsi_mil.training.methods import aem as aem
from wsi_mil.training.methods import ins as ins
from wsi_mil.training.methods import mhim as mhim
from wsi_mil.training.methods import packmil as packmil
from wsi_mil.training.methods import scmil as scmil
from wsi_mil.training.methods.base import Batch as Batch
from wsi_mil.training.methods.base import StepResult as StepResult
from wsi_mil.training.methods.base import TrainingMethod as TrainingMethod
from wsi_mil.training.methods.registry import create_method as create_method
from wsi_mil.training.methods.registry import list_methods as list_methods
from wsi_mil.training.methods.registry import register_method as register_method
