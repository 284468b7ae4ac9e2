"""Token-reduction methods, one file each; :data:`REGISTRY` lists them by name."""

from .base import REGISTRY, Method, get_method, register
from .tome import ToMe

__all__ = ["REGISTRY", "Method", "ToMe", "get_method", "register"]
