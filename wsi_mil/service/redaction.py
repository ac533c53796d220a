"""Server paths kept out of what clients see.

Library messages name files by their full path, which helps a user at a terminal; a service must not
hand its folder layout to anyone who asks. `redact_paths` writes the service's own folders as
`<data_dir>`, `<slide_root>`, `<models_dir>` (the settings that hold them) and the home folder as
`~`, and cuts any other absolute file path down to its last component.
"""

from __future__ import annotations

import re
from pathlib import Path

from wsi_mil.service.settings import ServiceSettings

#: an absolute file path of two or more components that is not one of the service's own URLs
_OTHER_ABSOLUTE_PATH = re.compile(
    r"(?<![\w.:/<>~-])/(?!v1/|static/|vendor/)(?:[^\s'\"()\[\]{},;:/]+/)+(?P<name>[^\s'\"()\[\]{},;:/]*)"
)


def _spellings(folder: Path) -> set[str]:
    """The ways a folder may appear in a message: as configured, absolute and resolved."""
    return {str(folder), str(folder.absolute()), str(folder.resolve())} - {".", "/"}


def redact_paths(text: str, settings: ServiceSettings) -> str:
    """`text` with every server path replaced (see the module docstring)."""
    labels = {"<data_dir>": settings.data_dir, "<models_dir>": settings.models_dir, "~": Path.home()}
    if settings.slide_root is not None:
        labels["<slide_root>"] = settings.slide_root
    replacements = sorted(
        ((spelling, label) for label, folder in labels.items() for spelling in _spellings(folder)),
        key=lambda pair: len(pair[0]),
        reverse=True,
    )
    for spelling, label in replacements:
        text = text.replace(spelling, label)
    return _OTHER_ABSOLUTE_PATH.sub(lambda match: "…/" + match["name"], text)
