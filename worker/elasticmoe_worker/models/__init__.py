"""Model families (Qwen3-MoE, DeepSeek-V2 with MLA and shared experts, Mixtral) as plain
tensor functions over weights loaded by name from safetensors.

`config` (the model spec from config.json), `weights` (streamed, sharded loading), `layers`
(attention, MoE routing, expert MLPs), `model` (the forward pass over a paged KV cache),
`registry` (family name -> builder). Experts can be computed locally or through an
expert-parallel function (`instance.ep`) that the executor installs.
"""
