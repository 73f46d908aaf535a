"""Test doubles that speak real HTTP (the fake vendor APIs)."""
