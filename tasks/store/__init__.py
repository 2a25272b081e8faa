"""Where stage results live and how one computation per key is guaranteed: keys,
manifests, a folder store and an object store behind one interface, and leases.
"""
