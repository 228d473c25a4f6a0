"""Settings, topics, client factories, the object store and the embedded stack."""
