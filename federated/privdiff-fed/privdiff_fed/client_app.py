"""ClientApp: local training of this node's partition (its `partition-id` node config)."""

from privdiff.federated.apps import client_app
from privdiff.federated.fedavg import quiet_telemetry

quiet_telemetry()
app = client_app()
