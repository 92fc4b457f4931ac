"""Benchmarks: throughput of a config (`mssr bench`); the estimator efficiency study lives in mssr_megatron.study."""
