"""Run at the start of every Python process whose PYTHONPATH holds this folder (k5_faults.child_env): when
K5_TEST_FAIL is set, the fault injection is installed as soon as k5.launch.supervisor is imported, so processes
that never import it (torchrun's agent) do not pay for importing torch here."""

import os
import sys

if os.environ.get("K5_TEST_FAIL"):
    import importlib.abc

    class _InstallAfterImport(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "k5.launch.supervisor":
                return None
            sys.meta_path.remove(self)
            import importlib.util

            spec = importlib.util.find_spec(name)
            load = spec.loader.exec_module

            def exec_module(module):
                load(module)
                sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
                import k5_faults

                k5_faults.install()

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _InstallAfterImport())
