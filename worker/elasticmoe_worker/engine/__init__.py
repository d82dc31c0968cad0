"""The single-device serving engine: continuous batching over a paged KV cache.

`engine.LLMEngine` (schedule, run, sample, detokenise one step at a time; export and adopt
running sequences for a switch), `scheduler` (admission, chunked prefill, preemption),
`kv_cache` (the block pool, external when an HMM owns it), `runner` (one forward pass),
`sampling`, `output` (incremental detokenisation, stop strings), `async_engine` (the loop in a
background thread behind the `EngineClient` protocol of `types`). Knows nothing of devices,
processes or scaling.
"""
