"""fastlayers: C++/CUDA-accelerated drop-in layers for PyTorch.

    import fastlayers
    fastlayers.info()                       # what was built, what runs here
    fastlayers.functional.bias_act(x, b, "relu")
    with fastlayers.use_backend("reference"):
        ...                                 # the pure-PyTorch reference of every op
"""

__version__ = "0.1.0"

import torch  # noqa: F401  (loads libtorch before the extension)

from fastlayers import _extension, functional, models, nn, ops  # noqa: F401
from fastlayers.backend import get_backend, set_backend, use_backend
from fastlayers.conversion import convert, revert
from fastlayers.info import format_info, info

__all__ = [
    "__version__",
    "functional",
    "nn",
    "models",
    "convert",
    "revert",
    "get_backend",
    "set_backend",
    "use_backend",
    "info",
    "format_info",
]
