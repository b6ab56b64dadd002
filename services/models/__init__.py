"""Real models for hetserve, built locally from what the package registry ships (no hub)."""
