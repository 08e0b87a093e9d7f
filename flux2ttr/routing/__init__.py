"""Routing: the controller, its reward and training, teacher rollouts, student rollouts, quality terms and evaluation."""
