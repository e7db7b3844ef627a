"""Setup-time tools run by the Makefile."""
