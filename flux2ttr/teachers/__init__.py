"""Teachers: the FLUX.2 transformers students learn from (tiny, diffusers), their sampler, prompts and attention router."""
