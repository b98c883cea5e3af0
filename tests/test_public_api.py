"""Every name ``from k5 import ...`` documents (k5/__init__.py's lazy exports, the README's Python API) resolves:
a module moved between rooms must take its exports along."""

import importlib

import pytest

import k5


@pytest.mark.parametrize("name", sorted(k5._EXPORTS))
def test_the_export_resolves_to_its_module_attribute(name):
    module, attribute = k5._EXPORTS[name]
    assert getattr(k5, name) is getattr(importlib.import_module(module), attribute)


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError):
        k5.NoSuchName  # noqa: B018
