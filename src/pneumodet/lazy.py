"""Names of a package loaded on first use (PEP 562), for packages whose light parts (configs, options) are
read by the command line before anything heavy (torch, highdicom, FastAPI) is needed."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, homes: Mapping[str, str],
                 renamed: Mapping[str, str] | None = None) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` that imports the home of ``name`` on its first access and keeps
    the value in the package's namespace, so the next access costs nothing.

    ``homes[name]`` is a submodule of ``package`` (``"engine"``) or a full module name (``"pneumodet.boxes"``);
    ``renamed[name]``, where given, is the name the value has in its home.
    """
    renamed = dict(renamed or {})

    def __getattr__(name: str) -> Any:
        if name not in homes:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        home = homes[name]
        module = importlib.import_module(home if home.startswith("pneumodet.") else f"{package}.{home}")
        value = getattr(module, renamed.get(name, name))
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
