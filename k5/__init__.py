"""k5: distributed inference for Kandinsky 5.0 video models.

The code lives in the top-level folders engine/, parallel/, kernels/ and launch/, installed as
k5.engine, k5.parallel, k5.kernels and k5.launch.
"""

__version__ = "0.1.0"
