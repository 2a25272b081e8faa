"""The catalog: ``settings`` (which catalog: the DuckDB file or a shared DuckLake),
``schema`` (migrations, tables, views), ``store`` (transactional writes, lineage records),
``connections`` (opening either backend, retrying lock and write conflicts),
``extensions`` (DuckDB extensions from their packages), ``queries`` (read-only SQL for
people), ``present`` (tables/CSV/JSON for the command line), ``lookup`` (runs and the
runs that produced their stages' rows), ``rundata`` + ``compare`` (run-vs-run comparison).

Only the store and its settings are re-exported here, so code that writes the catalog (the
stages) does not import the presentation modules.
"""

from tasks.catalog.settings import CatalogArgs, CatalogSettings, S3Settings
from tasks.catalog.store import Catalog, checkpoint_digest, utcnow

__all__ = ["Catalog", "CatalogArgs", "CatalogSettings", "S3Settings", "checkpoint_digest", "utcnow"]
