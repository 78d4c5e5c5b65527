"""Conversion: which weights become MoORE layers (targets), the SVD engine, and the convert pipeline
that writes a factored checkpoint; ``report`` renders one."""
