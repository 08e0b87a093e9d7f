"""Distillation: the trainer that fits one student per layer from a trace store, and readiness."""
