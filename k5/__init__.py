"""k5: distributed inference for Kandinsky 5.0 video models.

The code lives in the top-level folders engine/, parallel/, kernels/ and launch/, installed as
k5.engine, k5.parallel, k5.kernels and k5.launch.

In a plain checkout (no install, or an install of another checkout) the folders beside this package are the
subpackages: the checkout's root joins ``__path__``, so ``import k5.engine`` finds ``<checkout>/engine``. Installed as
a wheel, ``k5/engine`` and the others sit inside this package and the root is not added.
"""

import os as _os

__version__ = "0.1.0"

_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_checkout, "pyproject.toml")) and _os.path.isdir(_os.path.join(_checkout, "engine")):
    __path__.append(_checkout)  # after this package's own folder: an installed k5/engine would still win
