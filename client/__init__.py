"""The HTTP API's client."""
