"""Data: Datum records, LMDB, HDF5, list files, transforms, the prefetch pipeline, converters."""
