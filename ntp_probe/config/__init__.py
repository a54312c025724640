"""modules.yaml: the schema and its loader."""
