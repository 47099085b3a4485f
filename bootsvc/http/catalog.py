"""The image catalog a node serves, opened so that a bad one degrades the
node instead of stopping it: no catalog or a broken one serves without
images (discovery and installs are then unavailable, and say so)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lpmos.catalog import Catalog, CatalogError, default_catalog_path, load_catalog

log = logging.getLogger(__name__)


def open_catalog(path: Any) -> Catalog:
    """The catalog at ``path`` (default: the source tree's), or an empty one
    when there is none or it does not load; missing files are logged."""
    chosen = Path(path) if path else default_catalog_path()
    if chosen is None:
        log.warning("no image catalog: installs and discovery are unavailable")
        return Catalog()
    try:
        catalog = load_catalog(chosen)
    except CatalogError as exc:
        log.error("%s; serving without a catalog", exc)
        return Catalog()
    for problem in catalog.check_files(verify_checksums=False):
        log.warning("catalog: %s", problem)
    return catalog
