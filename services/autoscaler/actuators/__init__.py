"""Actuators: what turns a pool's desired replica count into running replicas."""
