"""A multi-device instance: per device an HMM process that owns memory and an executor
process that computes on it; a coordinator in front (OpenAI API, DP routing)."""
