"""Federated diffusion: a Flower simulation of several sites, run as a child process."""

from comfy_api.latest import io

from ..training.trainable import TRAINABLE_SETS
from .training import check_release_name_input


class PrivDiffFederatedSimulate(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PrivDiffFederatedSimulate",
            display_name="Federated simulate (FedAvg on Flower)",
            category="privdiff/federated",
            description="Simulates sites that each fine-tune the model on their own share of the data and send only "
                        "weights; Flower averages them (FedAvg) every round. Optional client-level DP (each site's "
                        "update clipped, noise added to the average) and secure aggregation. Runs in its own "
                        "process (Flower's simulation engine); the global model lands in models/loras/<name>"
                        ".safetensors with its privacy record. Stop keeps the finished rounds: queue again with "
                        "resume on to continue.",
            inputs=[
                io.Model.Input("model", tooltip="the base model every site starts from"),
                io.Clip.Input("clip", tooltip="the base model's text encoder"),
                io.Vae.Input("vae", tooltip="the base model's autoencoder"),
                io.String.Input("name", default="privdiff-federated",
                                tooltip="file name in models/loras (no extension) and of the run folder output/privdiff/<name>"),
                io.String.Input("data", default="digits",
                                tooltip="a procedural set's name (digits has labels for non-IID splits) or an image "
                                        "folder (absolute or relative to ComfyUI's input folder), shared among the sites"),
                io.Int.Input("num_items", default=64, min=2, max=1000000, tooltip="examples shared among the sites"),
                io.Int.Input("heldout_items", default=32, min=1, max=100000,
                             tooltip="the set's next examples: the server's held-out loss after every round"),
                io.Int.Input("num_clients", default=2, min=1, max=64, tooltip="simulated sites (one CPU each)"),
                io.Int.Input("rounds", default=2, min=1, max=10000, tooltip="FedAvg rounds"),
                io.Float.Input("beta", default=0.0, min=0.0, max=1000.0, step=0.1,
                               tooltip="non-IID split: Dirichlet(β) over labels (small: each site sees few labels); 0: IID"),
                io.Combo.Input("trainable", options=list(TRAINABLE_SETS), default="attention",
                               tooltip="what trains and travels: attention, cross_attention, transformer, lora, full"),
                io.Float.Input("local_epochs", default=1.0, min=0.01, max=1000.0, step=0.5,
                               tooltip="passes over its own data each site makes per round"),
                io.Int.Input("batch_size", default=16, min=1, max=65536, tooltip="each site's batch size"),
                io.Float.Input("learning_rate", default=1e-3, min=1e-7, max=1.0, step=1e-4, tooltip="each site's AdamW step size"),
                io.Float.Input("client_noise_multiplier", default=0.0, min=0.0, max=100.0, step=0.1,
                               tooltip="client-level DP: noise multiplier z on the average (0: off, no guarantee)"),
                io.Float.Input("client_clip_norm", default=0.1, min=1e-6, max=100.0, step=0.01,
                               tooltip="client-level DP: each site's update is clipped to this L2 norm"),
                io.Boolean.Input("secure_aggregation", default=False,
                                 tooltip="Flower's SecAgg+: the server sees only the sum of the sites' models"),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="data split and local training order"),
                io.Boolean.Input("resume", default=False,
                                 tooltip="continue the stopped run of the same name (same settings; rounds may grow)"),
            ],
            outputs=[io.Model.Output(tooltip="the base model with the global model applied"),
                     io.String.Output(display_name="lora_name", tooltip="the file in models/loras")],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
            not_idempotent=True,
        )

    @classmethod
    def validate_inputs(cls, name):
        # One input per check: ComfyUI lists a validate_inputs error under each of its arguments.
        # Combos (trainable) are checked by the config as the node starts, before any training.
        return check_release_name_input(name)

    @classmethod
    def execute(cls, model, clip, vae, name, data, num_items, heldout_items, num_clients, rounds, beta, trainable,
                local_epochs, batch_size, learning_rate, client_noise_multiplier, client_clip_norm, secure_aggregation, seed,
                resume):
        from ..federated.fedavg import FederatedConfig
        from ..pipelines.federated_run import train_federated
        from .comfy_objects import NodeProgress, data_source, model_with_weight_file, pipeline_from_comfy, preview, \
            publish_to_comfy, claim_run

        config = FederatedConfig(num_items=num_items, heldout_items=heldout_items,
                                 num_clients=num_clients, rounds=rounds, beta=beta or None, trainable=trainable,
                                 local_epochs=local_epochs, batch_size=batch_size, learning_rate=learning_rate,
                                 client_noise_multiplier=client_noise_multiplier or None, client_clip_norm=client_clip_norm,
                                 secure_aggregation=secure_aggregation, seed=seed)
        progress = NodeProgress(node_id=cls.hidden.unique_id, total=rounds)
        result = train_federated(base=pipeline_from_comfy(model=model, clip=clip, vae=vae), data=data_source(data),
                                 out=claim_run(name, kind="loras", resume=resume), config=config, resume=resume,
                                 progress=progress.report,
                                 should_stop=progress.stop_requested)
        progress.raise_if_stopped()
        lora = publish_to_comfy(source=result.files.get("lora") or result.files["comfyui"], kind="loras", name=name)
        chart = result.figures.get("loss_chart")
        return io.NodeOutput(model_with_weight_file(model=model, path=lora), lora.name,
                             ui=preview([chart]) if chart is not None else None)


FEDERATED_NODES = [PrivDiffFederatedSimulate]
