"""What every privdiff trainer shares (DESIGN.md 2): for now the one checkpoint unit.

Imports flow nodes -> pipelines -> (federated, transport) -> training -> (privacy, models, data).
"""
