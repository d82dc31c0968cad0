"""A multi-device instance: per device an HMM process that owns memory and executor
processes that compute on it; a coordinator in front.

Pure core: `reconfig` (every scale and recovery as `step(state, event) -> (state, actions)`),
with its vocabulary in `reconfig_events` and `reconfig_state`, and `reconfig_loss` (the plan
after a lost device: surviving copies, else the checkpoint).
Shells: `transport` (the CURVE-authenticated control channel and its I/O thread),
`rendezvous` (collectives meet over that channel), `routing` (data-parallel routing, the
`EngineClient` face), `membership` and `fleet` (which workers exist and live), `coordinator`
(wires them and executes reconfig's actions). Per device: `hmm`, `memory`, `transition`
(peer-to-peer transfers), `executor`, `ep` (expert-parallel all-to-all).
"""
