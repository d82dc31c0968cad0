"""Benchmarks: commands that run side-by-side comparisons and write JSON, a table and a plot.

`serve_bench` (`elasticmoe bench serve`): serving throughput of one engine against
`transformers` generate (sequential and static batch). `scaling_bench` (`elasticmoe bench
scaling`): elastic scaling against cold restart, "extravagant" and horizontal scaling under
open-loop load. Timings live here, never in tests.
"""
