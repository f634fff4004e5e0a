"""The `budgetlab` command. Each module of this package registers its commands on `main`;
the commands only parse and print, the work is done by the library modules they call."""

import importlib
import pkgutil

from budgetlab.cli.common import main

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "common":
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["main"]
