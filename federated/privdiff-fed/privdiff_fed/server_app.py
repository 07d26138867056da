"""ServerApp: FedAvg over the clients, settings from the run config (see pyproject.toml)."""

from privdiff.federated.apps import server_app
from privdiff.federated.fedavg import quiet_telemetry

quiet_telemetry()
app = server_app()
