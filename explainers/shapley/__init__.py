"""Shapley values of any model function: exact enumeration, permutation and kernel samplers, the
closed form for affine functions, and `auto`, which picks among them."""
