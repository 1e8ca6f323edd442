"""Reproducible benchmarks behind `edgemeta bench ...`."""
