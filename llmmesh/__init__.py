"""llmmesh shared package: settings, telemetry, gRPC server plumbing, KV block identity, and the
stubs generated from protos/ (llmmesh.<service>.v1)."""
