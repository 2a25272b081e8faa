"""What runs did, kept beside the artifacts as well as in the catalog: run records and
their state, a stage's rows, gate results, and the rebuild of a catalog from them.
"""
