"""ClientApp: local training of this node's partition (its `partition-id` node config)."""

from privdiff.federated.fedavg import client_app, quiet_telemetry

quiet_telemetry()
app = client_app()
