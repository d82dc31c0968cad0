"""The HTTP face of a server: OpenAI-compatible API, Prometheus metrics and the admin API.

`api` (completions, chat, SSE streaming, health; one refusal path for every engine), `protocol`
(request/response models, OpenAI-style errors), `metrics` (the series the autoscaler reads),
`admin` (bearer-token `GET /admin/status`, `POST /admin/scale`, bodies from `contract.admin`),
`autoscale` (`serve --autoscale`: the operator's SLO policy on this server's own histograms).
Talks to an engine only through `EngineClient` and the instance's public methods.
"""
