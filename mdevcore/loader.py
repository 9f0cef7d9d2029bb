"""Load ``module:attr.attr`` references (parents, devices, plug-ins)."""

from __future__ import annotations

import errno
import importlib
from typing import Any


def load_object(target: str) -> Any:
    """The object ``module:attr[.attr...]`` names; ENOENT says what is missing."""
    module_name, sep, attrs = target.partition(":")
    if not (sep and module_name and attrs):
        raise OSError(errno.EINVAL, f"{target!r} is not module:attribute")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise OSError(errno.ENOENT, f"cannot import {module_name}: {e}") from None
    for attr in attrs.split("."):
        try:
            obj = getattr(obj, attr)
        except AttributeError:
            raise OSError(errno.ENOENT, f"{module_name} has no {attrs}") from None
    return obj
