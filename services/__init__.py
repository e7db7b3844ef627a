"""llmmesh services: gateway, orchestrator, kv_registry, autoscaler."""
