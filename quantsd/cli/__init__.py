"""Command-line interface: parse arguments, call the library, print. No logic lives here.

One module per command; each registers itself on the ``main`` group when imported.
"""

from ._base import main
from . import blocks  # noqa: F401  (registers `quantsd blocks`)
from . import sensitivity  # noqa: F401
from . import search  # noqa: F401
from . import export  # noqa: F401  (registers `quantsd export`)
from . import inspect  # noqa: F401  (registers `quantsd inspect`)
from . import generate  # noqa: F401  (registers `quantsd generate`)
from . import bench  # noqa: F401  (registers `quantsd bench`)
from . import eval  # noqa: F401  (registers `quantsd eval`, `quantsd eval-table`)

__all__ = ["main"]
