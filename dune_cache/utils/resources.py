"""Data files shipped inside installed packages (offline weights, videos), found without importing them."""
from __future__ import annotations

import importlib.util
from pathlib import Path


def installed_package_file(package: str, relative: str, install_hint: str) -> Path:
    """Path of data file ``relative`` inside installed ``package``, found without importing the package.

    Raises ``FileNotFoundError`` telling how to install it when the package or the file is missing.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package} is not installed: run `{install_hint}`")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {package}: reinstall with `{install_hint}`")
    return path
