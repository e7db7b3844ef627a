"""Plumbing shared by every llmmesh service: settings, telemetry, gRPC server lifecycle, errors."""
