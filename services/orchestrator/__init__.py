"""Admission and replica choice across Triton replicas. Decides; never relays tokens."""
