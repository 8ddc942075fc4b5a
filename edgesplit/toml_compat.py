"""One place that picks the TOML reader: ``tomllib`` on Python 3.11+, the ``tomli`` backport
(a declared dependency there) on Python 3.10.

Import it as ``from edgesplit.toml_compat import tomllib``; the standard-library API is the same.
"""

from __future__ import annotations

import sys

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: pyproject.toml installs tomli for it
    import tomli as tomllib

__all__ = ["tomllib"]
