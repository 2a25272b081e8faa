"""Where stage results live and how one computation per key is guaranteed.

``keys`` (what a key hashes) and ``fingerprint`` (the code part of it); ``manifest``
(the one manifest of a stage folder: build, write, read, verify); ``folder`` (the stage
store on a file system, and the interface) and ``object_store`` (the same on an object
store, through ``objects``, an S3 prefix with conditional writes); ``lease`` (the lease
protocol and its file backend) and ``object_lease`` (its object backend); ``roots``
(which store an artifacts root opens).
"""
