"""flux2ttr: distil FLUX.2 single-stream attention into HKR students, routed by a learned controller."""

__version__ = "0.1.0"
