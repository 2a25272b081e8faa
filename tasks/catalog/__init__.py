"""The catalog: the :class:`Catalog` handle (``store``), where it lives (``settings``),
its schema, views and migrations, and the read side (queries, lookups, comparison).

Only the handle, its settings and value helpers are re-exported here, so code that writes
the catalog (the stages) does not import the presentation modules.
"""

from tasks.catalog.publish import catalog_session
from tasks.catalog.settings import CatalogArgs, CatalogSettings
from tasks.catalog.store import Catalog
from tasks.catalog.values import checkpoint_digest, utcnow

__all__ = [
    "Catalog",
    "CatalogArgs",
    "CatalogSettings",
    "catalog_session",
    "checkpoint_digest",
    "utcnow",
]
