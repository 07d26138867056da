"""The Flower app around privdiff.federated (thin: all logic lives in the installed privdiff)."""
