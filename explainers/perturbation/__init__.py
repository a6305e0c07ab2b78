"""Perturbation methods that are not Shapley values: occlusion windows and LIME surrogates."""
