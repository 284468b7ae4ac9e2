"""Token-reduction methods, one file each; :data:`REGISTRY` lists them by name.

Every module in this package is imported here, so a new method file registers itself with
``@register`` and needs no other edit.
"""

import importlib
import pkgutil

from .base import REGISTRY, Method, get_method, register
from .tome import ToMe

for _m in pkgutil.iter_modules(__path__):
    if _m.name not in ("base", "matching"):
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["REGISTRY", "Method", "ToMe", "get_method", "register"]
