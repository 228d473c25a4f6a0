"""Render workers and the pieces they are built from: models, rendering, results tooling."""
