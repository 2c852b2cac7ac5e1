"""vLLM serving: the serving environment, server processes, health checks, rollout state."""
