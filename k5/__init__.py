"""k5: distributed inference for Kandinsky 5.0 video and image models.

The code lives in the top-level folders engine/, parallel/, kernels/ and launch/, installed as
k5.engine, k5.parallel, k5.kernels and k5.launch.

In a plain checkout (no install, or an install of another checkout) the folders beside this package are the
subpackages: the checkout's root joins ``__path__``, so ``import k5.engine`` finds ``<checkout>/engine``. Installed as
a wheel, ``k5/engine`` and the others sit inside this package and the root is not added.

The public API (``from k5 import Kandinsky5Pipeline, resolve_model, MagCache, setup_parallel, ...``) is re-exported
here lazily; ``python -m k5`` and the ``k5`` command are k5.launch.cli.
"""

import os as _os

__version__ = "0.1.0"

_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_checkout, "pyproject.toml")) and _os.path.isdir(_os.path.join(_checkout, "engine")):
    __path__.append(_checkout)  # after this package's own folder: an installed k5/engine would still win

# The public API, imported on first use so that ``import k5`` stays cheap (no torch until a name is asked for):
# ``from k5 import Kandinsky5Pipeline, resolve_model, setup_parallel``. name -> (module, attribute).
_EXPORTS = {
    # the pipeline
    "Kandinsky5Pipeline": ("k5.engine.pipelines.video", "Kandinsky5Pipeline"),
    "Request": ("k5.engine.pipelines.video", "Request"),
    "Result": ("k5.engine.pipelines.video", "Result"),
    "write_mp4": ("k5.engine.media.mp4", "write_mp4"),
    "tiny_checkpoint": ("k5.engine.catalogue.tiny", "tiny_checkpoint"),
    # Image Lite (T2I, I2I)
    "ImagePipeline": ("k5.engine.pipelines.image", "ImagePipeline"),
    "ImageRequest": ("k5.engine.pipelines.image_request", "ImageRequest"),
    "pipeline_class": ("k5.engine.pipelines.image", "pipeline_class"),
    "write_png": ("k5.engine.media.png", "write_png"),
    # the DiT
    "Kandinsky5DiT": ("k5.engine.model.dit", "Kandinsky5DiT"),
    "DiTConfig": ("k5.engine.model.config", "DiTConfig"),
    "PRESETS": ("k5.engine.model.config", "PRESETS"),
    # the catalogue, model resolution and the step cache
    "VARIANTS": ("k5.engine.catalogue.variants", "VARIANTS"),
    "Variant": ("k5.engine.catalogue.variants", "Variant"),
    "get_variant": ("k5.engine.catalogue.variants", "get"),
    "variant_table": ("k5.launch.catalogue", "table"),
    "VariantError": ("k5.engine.catalogue.variants", "VariantError"),
    "resolve_model": ("k5.engine.catalogue.resolve", "resolve_model"),
    "Resolved": ("k5.engine.catalogue.resolve", "Resolved"),
    "ResolveError": ("k5.engine.catalogue.resolve", "ResolveError"),
    "MagCache": ("k5.engine.sampling.magcache", "MagCache"),
    # the parallel setup
    "setup_parallel": ("k5.parallel.plan", "setup_parallel"),
    "build_parallel": ("k5.parallel.plan", "build_parallel"),
    "plan_parallel": ("k5.parallel.plan", "plan_parallel"),
    "ParallelSetup": ("k5.parallel.plan", "ParallelSetup"),
    "ParallelDims": ("k5.parallel.mesh", "ParallelDims"),
    "LayoutError": ("k5.parallel.mesh", "LayoutError"),
}
__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'k5' has no attribute {name!r}")
    import importlib

    module, attr = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # the next access is a plain attribute
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
