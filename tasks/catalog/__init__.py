"""The DuckDB catalog: ``schema`` (migrations, tables, views), ``store`` (connections,
transactional writes, lineage records), ``queries`` (read-only SQL for people),
``present`` (tables/CSV/JSON for the command line), ``lookup`` (runs and the runs that
produced their stages' rows), ``rundata`` + ``compare`` (run-vs-run comparison).

Only the store is re-exported here, so code that writes the catalog (the stages) does not
import the presentation modules.
"""

from tasks.catalog.store import Catalog, checkpoint_digest, utcnow

__all__ = ["Catalog", "checkpoint_digest", "utcnow"]
