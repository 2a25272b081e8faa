"""The pipeline's stages, one module each (``tasks.stages.<stage>``), built on the
contract in :mod:`tasks.stages.base`. This package imports none of them, so that a
stage's code fingerprint covers its own module and what it imports, not its siblings."""
