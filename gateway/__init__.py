"""The HTTP gateway: the job API in front of the pipeline (routes, API keys, the event hub,
the job store and its indexer)."""
