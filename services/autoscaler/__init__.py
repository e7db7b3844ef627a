"""Replica counts per pool from engine load and KV use."""
