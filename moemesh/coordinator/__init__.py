"""The coordinator lifecycle: `coordinator start` — find workers, profile them, plan, load, serve."""
