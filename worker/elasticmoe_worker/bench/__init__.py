"""Benchmarks: commands that run side-by-side comparisons and write JSON, a table and a plot.

`serve_bench` (`elasticmoe bench serve`): serving throughput of one engine against
`transformers` generate (sequential and static batch). `scaling_bench` (`elasticmoe bench
scaling`): elastic scaling against cold restart, "extravagant" and horizontal scaling under
open-loop load. `autoscale_bench` (`elasticmoe bench autoscale`): one trace against four scaling
policies on CPU devices under a quota; `profile_bench` (`elasticmoe bench profile`) measures the
service profile the simulator runs on. `simulate` (`elasticmoe simulate`): the scaling policies (`controllers`) on a
model of an instance (`sim`) built from a measured `profile`, replaying a `workload` trace;
`report` counts and draws real and simulated runs alike. Timings live here, never in tests.
"""
