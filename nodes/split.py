"""Split-learning ControlNet: a local server (child process), the client that trains through it, the
apply node for generation with a hint image, and the server's attacks on the traffic."""

from comfy_api.latest import io

from .datasets import Dataset

SplitServer = io.Custom("PRIVDIFF_SPLIT_SERVER")
_MODES = ("hardened", "paper")


def _base_inputs(role: str):
    return [io.Model.Input("model", tooltip=f"the public base model ({role})"),
            io.Clip.Input("clip", tooltip="the base model's text encoder"),
            io.Vae.Input("vae", tooltip="the base model's autoencoder (the client's frozen encoder)")]


def _privacy_inputs():
    return [
        io.Combo.Input("mode", options=list(_MODES), default="hardened",
                       tooltip="hardened: privdiff's default, which closes the reference design's leak; paper: the "
                               "reference design, which gives every image away (for reproduction only)"),
        io.Float.Input("snr_bound", default=0.01, min=1e-6, max=1000.0, step=0.001,
                       tooltip="hardened: only timesteps with signal-to-noise ratio at or below this are sent"),
        io.Float.Input("sigma_label", default=1.0, min=0.0, max=100.0, step=0.1,
                       tooltip="hardened: Gaussian noise on the training label"),
        io.Float.Input("sigma_hint", default=0.0, min=0.0, max=100.0, step=0.1,
                       tooltip="hardened: Gaussian noise on the hint latent (hint privacy against hint-following)"),
        io.Int.Input("draws_per_image", default=1, min=0, max=10000,
                     tooltip="hardened: different noisings one image ever gets over the run (0: a fresh one every epoch)"),
        io.Int.Input("epochs", default=2, min=1, max=100000, tooltip="passes over the private images"),
        io.Int.Input("batch_size", default=4, min=1, max=4096, tooltip="images per message"),
        # Kept so that saved workflows keep their widget order; the noise never comes from a typed seed.
        io.Int.Input("seed", default=0, min=0, max=2**31 - 1,
                     tooltip="not used for the noise: every draw comes from this ComfyUI's secret "
                             "(user/privdiff/split-client.split-secret), which never leaves this machine"),
    ]


def _split_config(mode, snr_bound, sigma_label, sigma_hint, draws_per_image):
    from ..pipelines.split_client import SplitConfig

    return SplitConfig(mode=mode, snr_bound=snr_bound, sigma_label=sigma_label, sigma_hint=sigma_hint,
                       draws_per_image=draws_per_image or None)


def _check_mode(mode):
    # ComfyUI checks V3 combo values only in the frontend; a posted graph is checked here.
    return True if mode in _MODES else f"mode={mode!r} is not one of {', '.join(_MODES)}."


class PrivDiffSplitServer(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PrivDiffSplitServer",
            display_name="Split ControlNet server (local)",
            category="privdiff/split",
            description="Starts `privdiff split serve` on this machine in its own process (CurveZMQ on 127.0.0.1, "
                        "keys made for you), or reuses the one already running under this name, and hands its "
                        "address to the client node. The server trains the ControlNet from what clients send and "
                        "never sends gradients back. For a remote GPU server, run `privdiff split serve` there.",
            inputs=[
                *_base_inputs("the server's own copy"),
                io.String.Input("name", default="privdiff-split",
                                tooltip="the job: output/privdiff/<name>/server holds its keys, base model and checkpoints "
                                        "(a job there resumes)"),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1.0, step=1e-5, tooltip="the server's AdamW step size"),
                io.Int.Input("checkpoint_every", default=20, min=1, max=100000, tooltip="server steps between checkpoints"),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="the ControlNet's initialisation"),
            ],
            outputs=[SplitServer.Output(display_name="server", tooltip="the server's address and keys, for the client node")],
            not_idempotent=True,
        )

    @classmethod
    def execute(cls, model, clip, vae, name, learning_rate, checkpoint_every, seed):
        from ..pipelines.split_run import start_split_server
        from .comfy_objects import pipeline_from_comfy, run_folder

        connection = start_split_server(base_pipeline=lambda: pipeline_from_comfy(model=model, clip=clip, vae=vae),
                                        out=run_folder(name) / "server", learning_rate=learning_rate,
                                        checkpoint_every=checkpoint_every, seed=seed)
        return io.NodeOutput(connection, ui={"text": [f"serving on {connection.endpoint}"]})


class PrivDiffSplitClientTrain(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PrivDiffSplitClientTrain",
            display_name="Split ControlNet train (client)",
            category="privdiff/split",
            description="The client of split learning: images, hints and prompts stay here; each batch leaves only "
                        "as noised latents, the privacy-activated hint and a noised label. At the end it downloads "
                        "the trained ControlNet to models/controlnet/<name>.safetensors (use it with the split "
                        "apply node). Stop: queue again and the server skips the batches it already trained.",
            inputs=[
                *_base_inputs("the client's copy"),
                Dataset.Input("dataset", tooltip="the private images with hints (control images)"),
                SplitServer.Input("server", tooltip="from the split server node"),
                io.String.Input("name", default="privdiff-split", tooltip="file name in models/controlnet (no extension)"),
                *_privacy_inputs(),
                io.Boolean.Input("stop_server", default=True, tooltip="stop the local server once the ControlNet is downloaded"),
            ],
            outputs=[io.String.Output(display_name="controlnet_name", tooltip="the file in models/controlnet")],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
            not_idempotent=True,
        )

    @classmethod
    def validate_inputs(cls, name, mode):
        from .training import check_release_name_input

        return check_release_name_input(name) if mode in _MODES else _check_mode(mode)

    @classmethod
    def execute(cls, model, clip, vae, dataset, server, name, mode, snr_bound, sigma_label, sigma_hint,
                draws_per_image, epochs, batch_size, seed, stop_server):
        from ..pipelines.split_run import train_split_controlnet
        from .comfy_objects import NodeProgress, pipeline_from_comfy, publish_to_comfy, run_folder, split_secret_file

        progress = NodeProgress(node_id=cls.hidden.unique_id)
        result = train_split_controlnet(
            pipeline=pipeline_from_comfy(model=model, clip=clip, vae=vae), dataset=dataset, connection=server,
            config=_split_config(mode, snr_bound, sigma_label, sigma_hint, draws_per_image), epochs=epochs,
            batch_size=batch_size, out=run_folder(name) / "client", stop_server=stop_server,
            secret_file=split_secret_file(),
            should_stop=progress.stop_requested,
            progress=lambda sent, total, applied: progress.step(step=sent, total=total, unit="batch",
                                                                note=f"{applied} trained"))
        progress.raise_if_stopped()
        path = publish_to_comfy(source=result.controlnet_file, kind="controlnet", name=name)
        return io.NodeOutput(path.name, ui={"text": [f"{path.name}: {result.steps} batches trained ({mode})"]})


class PrivDiffSplitControlNetApply(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PrivDiffSplitControlNetApply",
            display_name="Apply split ControlNet",
            category="privdiff/split",
            description="Guides generation with a split-learning ControlNet and a hint image, like Apply ControlNet: "
                        "the hint is encoded by the VAE and mixed with the current latents at every step, as in "
                        "training.",
            inputs=[
                io.Conditioning.Input("positive", tooltip="the prompt's conditioning (CLIP Text Encode)"),
                io.Conditioning.Input("negative", tooltip="the negative prompt's conditioning"),
                io.String.Input("controlnet", default="privdiff-split.safetensors",
                                tooltip="a split ControlNet in models/controlnet (from the split train node), or a full path"),
                io.Image.Input("image", tooltip="the hint (control image)"),
                io.Vae.Input("vae", tooltip="the base model's autoencoder: it encodes the hint"),
                io.Float.Input("strength", default=1.0, min=0.0, max=10.0, step=0.01, tooltip="how strongly the hint steers"),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001, tooltip="where in sampling it starts"),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001, tooltip="where it stops"),
            ],
            outputs=[io.Conditioning.Output(display_name="positive", tooltip="with the ControlNet attached"),
                     io.Conditioning.Output(display_name="negative", tooltip="with the ControlNet attached")],
        )

    @classmethod
    def execute(cls, positive, negative, controlnet, image, vae, strength, start_percent, end_percent):
        from .comfy_objects import apply_split_controlnet, find_artifact

        return io.NodeOutput(*apply_split_controlnet(positive=positive, negative=negative, path=find_artifact(controlnet),
                                                     image=image, vae=vae, strength=strength,
                                                     start_percent=start_percent, end_percent=end_percent))


class PrivDiffSplitAttack(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PrivDiffSplitAttack",
            display_name="privdiff split attack audit",
            category="privdiff/privacy",
            description="Measures what a split-learning server can rebuild: trains a short job on loopback with your "
                        "settings, keeps every message as the server receives it, and runs the server's attacks. "
                        "PSNR near the mean-image guess means the images stay hidden. The figures come from "
                        "private data and are shown here, never saved.",
            inputs=[*_base_inputs("the public model the attacker also has"),
                    Dataset.Input("dataset", tooltip="images with hints, like the ones you would train on"),
                    *_privacy_inputs(),
                    io.Int.Input("optimisation_steps", default=0, min=0, max=100000,
                                 tooltip="steps of the total-variation inversion attack (0: skip it; slow)")],
            outputs=[io.String.Output(display_name="report", tooltip="each attack's PSNR / SSIM, one per line")],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
            not_idempotent=True,
        )

    @classmethod
    def validate_inputs(cls, mode):
        return _check_mode(mode)

    @classmethod
    def execute(cls, model, clip, vae, dataset, mode, snr_bound, sigma_label, sigma_hint, draws_per_image, epochs,
                batch_size, seed, optimisation_steps):
        import tempfile

        import torch

        from ..pipelines.split_run import audit_split_training
        from .comfy_objects import NodeProgress, pipeline_from_comfy

        progress = NodeProgress(node_id=cls.hidden.unique_id)
        # The loopback job trains; its keys and throwaway noise secret live in a scratch folder.
        with torch.inference_mode(False), tempfile.TemporaryDirectory() as scratch:
            report, steps = audit_split_training(
                pipeline=pipeline_from_comfy(model=model, clip=clip, vae=vae), dataset=dataset,
                config=_split_config(mode, snr_bound, sigma_label, sigma_hint, draws_per_image), epochs=epochs,
                batch_size=batch_size, folder=scratch, optimisation_steps=optimisation_steps,
                progress=lambda sent, total: progress.step(step=sent, total=total, unit="batch"))
        text = "\n".join([f"{mode} mode, {len(dataset)} images, {steps} server steps:", *report.lines()])
        return io.NodeOutput(text, ui={"text": [text]})


SPLIT_NODES = [PrivDiffSplitServer, PrivDiffSplitClientTrain, PrivDiffSplitControlNetApply, PrivDiffSplitAttack]
