"""Student layers: the HKR math, its landmark index math, the fused Triton kernels and their dispatch,
the distillation loss, the artifact file."""
