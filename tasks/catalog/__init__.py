"""The catalog: ``settings`` (which catalog: the DuckDB file or a shared DuckLake),
``store`` (the :class:`Catalog` handle: transactions, reads, publishing), ``connections``
(opening either backend, retrying lock and write conflicts), ``publish`` (the live and
the published file), ``schema`` + ``migrate`` (tables and their migration steps),
``views`` (the derived views), ``tables`` (typed rows into a table), ``lineage`` (run,
stage, metric and checkpoint records), ``values`` (Python values as catalog values),
``extensions`` (DuckDB extensions from their packages), ``queries`` (read-only SQL for
people), ``present`` (tables/CSV/JSON for the command line), ``lookup`` (runs and the
runs that produced their stages' rows), ``status`` (run and stage summaries),
``rundata`` + ``compare`` (run-vs-run comparison).

Only the handle, its settings and value helpers are re-exported here, so code that writes
the catalog (the stages) does not import the presentation modules.
"""

from tasks.catalog.settings import CatalogArgs, CatalogSettings, S3Settings
from tasks.catalog.store import Catalog
from tasks.catalog.values import checkpoint_digest, utcnow

__all__ = ["Catalog", "CatalogArgs", "CatalogSettings", "S3Settings", "checkpoint_digest", "utcnow"]
