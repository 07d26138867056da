"""ServerApp: FedAvg over the clients, settings from the run config (see pyproject.toml)."""

from privdiff.federated.fedavg import quiet_telemetry, server_app

quiet_telemetry()
app = server_app()
