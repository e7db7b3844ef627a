"""Scheduling plugins, one per module; each is documented in a `<module>.md` beside it."""
