"""Trace store: the capture of teacher attention tuples, the zarr store (the trace contract), its loader and inspection."""
