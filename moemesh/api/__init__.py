"""The OpenAI-compatible HTTP API, /metrics and the dashboard, over a model served by the coordinator or one machine."""
