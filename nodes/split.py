"""Split-learning ControlNet: a local server (child process), the client that trains through it, the
apply node for generation with a hint image, the server's attacks on the traffic, and the privacy
activation family: one settings node that drives the graph, what leaves the machine, and what the
server rebuilds from it."""

from comfy_api.latest import io

from .datasets import Dataset

SplitServer = io.Custom("PRIVDIFF_SPLIT_SERVER")
SplitPrivacy = io.Custom("PRIVDIFF_SPLIT_PRIVACY")
_MODES = ("hardened", "paper")


def _base_inputs(role: str):
    return [io.Model.Input("model", tooltip=f"the public base model ({role})"),
            io.Clip.Input("clip", tooltip="the base model's text encoder"),
            io.Vae.Input("vae", tooltip="the base model's autoencoder (the client's frozen encoder)")]


def _noise_inputs():
    return [
        io.Combo.Input("mode", options=list(_MODES), default="hardened",
                       tooltip="hardened: privdiff's default, which closes the reference design's leak; paper: the "
                               "reference design, which gives every image away (for reproduction only)"),
        io.Float.Input("snr_bound", default=0.014, min=1e-6, max=1000.0, step=0.001,
                       tooltip="hardened: only timesteps with signal-to-noise ratio at or below this are sent"),
        io.Float.Input("sigma_label", default=1.0, min=0.0, max=100.0, step=0.1,
                       tooltip="hardened: Gaussian noise on the training label"),
        io.Float.Input("sigma_hint", default=0.5, min=0.0, max=100.0, step=0.05,
                       tooltip="hardened: Gaussian noise on the hint latent (hint privacy against hint-following; "
                               "0 gives the hints away)"),
        io.Int.Input("draws_per_image", default=1, min=0, max=10000,
                     tooltip="hardened: different noisings one image ever gets over the run (0: a fresh one every epoch)"),
    ]


def _privacy_inputs():
    return [
        *_noise_inputs(),
        io.Int.Input("epochs", default=2, min=1, max=100000, tooltip="passes over the private images"),
        io.Int.Input("batch_size", default=4, min=1, max=4096, tooltip="images per message"),
        # Kept so that saved workflows keep their widget order; the noise never comes from a typed seed.
        io.Int.Input("seed", default=0, min=0, max=2**31 - 1,
                     tooltip="not used for the noise: every draw comes from this ComfyUI's secret "
                             "(user/privdiff/split-client.split-secret), which never leaves this machine"),
    ]


def _split_config(mode, snr_bound, sigma_label, sigma_hint, draws_per_image, privacy=None):
    """The settings node's config when one is linked (it drives the whole graph), else the widgets'."""
    from ..pipelines.split_client import SplitConfig

    if privacy is not None:
        return privacy
    return SplitConfig(mode=mode, snr_bound=snr_bound, sigma_label=sigma_label, sigma_hint=sigma_hint,
                       draws_per_image=draws_per_image or None)


def _privacy_link():
    # Last, and optional: saved workflows without it keep their inputs and widget order.
    return SplitPrivacy.Input("privacy", optional=True,
                              tooltip="from the split privacy settings node: when linked, it replaces this node's "
                                      "mode, snr_bound, sigma_label, sigma_hint and draws_per_image")


def _preview_inputs(role: str, *, min_count: int):
    return [*_base_inputs(role), Dataset.Input("dataset", tooltip="the private images with hints"),
            io.Int.Input("count", default=8, min=min_count, max=4096,
                         tooltip="how many items, from the first (the attacks use the set's statistics)")]


def _comfy_images(pictures):
    """[B, 3, H, W] in [0, 1] -> ComfyUI IMAGE [B, H, W, 3]."""
    return pictures.float().clamp(0, 1).permute(0, 2, 3, 1).contiguous().cpu()


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
            hidden=[io.Hidden.unique_id],
            not_idempotent=True,
        )

    @classmethod
    def execute(cls, model, clip, vae, name, learning_rate, checkpoint_every, seed):
        from ..pipelines.split_run import start_split_server
        from .comfy_objects import NodeProgress, pipeline_from_comfy, run_folder

        NodeProgress(node_id=cls.hidden.unique_id, doing="starting the server")  # its heartbeat
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
                _privacy_link(),
            ],
            outputs=[io.String.Output(display_name="controlnet_name", tooltip="the file in models/controlnet")],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
            not_idempotent=True,
        )

    @classmethod
    def validate_inputs(cls, name):
        # One input per check (ComfyUI lists an error under each argument); the config checks mode.
        from .training import check_release_name_input

        return check_release_name_input(name)

    @classmethod
    def execute(cls, model, clip, vae, dataset, server, name, mode, snr_bound, sigma_label, sigma_hint,
                draws_per_image, epochs, batch_size, seed, stop_server, privacy=None):
        from ..pipelines.split_run import SplitTrainConfig, train_split_controlnet
        from .comfy_objects import NodeProgress, claim_run, pipeline_from_comfy, publish_to_comfy, split_secret_file

        progress = NodeProgress(node_id=cls.hidden.unique_id)
        config = SplitTrainConfig(connection=server, epochs=epochs, batch_size=batch_size, stop_server=stop_server,
                                  secret_file=split_secret_file(), privacy=_split_config(
                                      mode, snr_bound, sigma_label, sigma_hint, draws_per_image, privacy))
        result = train_split_controlnet(base=pipeline_from_comfy(model=model, clip=clip, vae=vae), data=dataset,
                                        out=claim_run(name, kind="controlnet", resume=False, part="client",
                                                      resumable=False),  # the server keeps the job: queue again
                                        config=config, progress=progress.report, should_stop=progress.stop_requested)
        progress.raise_if_stopped()
        path = publish_to_comfy(source=result.files["controlnet"], kind="controlnet", name=name)
        return io.NodeOutput(path.name, ui={"text": [f"{path.name}: {result.figures['steps']} batches trained "
                                                     f"({config.privacy.mode})"]})


class PrivDiffSplitControlNetApply(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        import folder_paths

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
                io.Combo.Input("controlnet", options=folder_paths.get_filename_list("controlnet"),
                               tooltip="a split ControlNet in models/controlnet (made by the split train node)"),
                io.Image.Input("image", tooltip="the hint (control image)"),
                io.Vae.Input("vae", tooltip="the base model's autoencoder: it encodes the hint"),
                io.Float.Input("strength", default=1.0, min=0.0, max=10.0, step=0.01, tooltip="how strongly the hint steers"),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001, tooltip="where in sampling it starts"),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001, tooltip="where it stops"),
                io.String.Input("controlnet_name", optional=True, force_input=True,
                                tooltip="linked from a split train node in the same graph: its file (the list above "
                                        "shows files that existed when the page loaded)"),
            ],
            outputs=[io.Conditioning.Output(display_name="positive", tooltip="with the ControlNet attached"),
                     io.Conditioning.Output(display_name="negative", tooltip="with the ControlNet attached")],
        )

    @classmethod
    def execute(cls, positive, negative, controlnet, image, vae, strength, start_percent, end_percent,
                controlnet_name=None):
        from .comfy_objects import apply_split_controlnet, find_artifact

        path = find_artifact(controlnet_name or controlnet)
        return io.NodeOutput(*apply_split_controlnet(positive=positive, negative=negative, path=path,
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
                        "settings and this ComfyUI's noise secret (so its messages are the ones your training will "
                        "send), keeps every message as the server receives it, and runs the server's attacks. "
                        "PSNR near the mean-image guess means the images stay hidden. The figures come from "
                        "private data and are shown here, never saved.",
            inputs=[*_base_inputs("the public model the attacker also has"),
                    Dataset.Input("dataset", tooltip="images with hints, like the ones you would train on"),
                    *_privacy_inputs(),
                    io.Int.Input("optimisation_steps", default=0, min=0, max=100000,
                                 tooltip="steps of the total-variation inversion attack (0: skip it; slow)"),
                    _privacy_link()],
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
                batch_size, seed, optimisation_steps, privacy=None):
        import tempfile

        import torch

        from ..pipelines.split_run import audit_split_training
        from .comfy_objects import NodeProgress, pipeline_from_comfy, split_client_secret

        progress = NodeProgress(node_id=cls.hidden.unique_id)
        config = _split_config(mode, snr_bound, sigma_label, sigma_hint, draws_per_image, privacy)
        # The loopback job trains; its keys and ledger live in a scratch folder (this ComfyUI's ledger is
        # not touched: nothing leaves the machine).
        with torch.inference_mode(False), tempfile.TemporaryDirectory() as scratch:
            report, steps = audit_split_training(
                pipeline=pipeline_from_comfy(model=model, clip=clip, vae=vae), dataset=dataset,
                config=config, epochs=epochs, batch_size=batch_size, folder=scratch,
                optimisation_steps=optimisation_steps, secret=split_client_secret(),
                progress=lambda sent, total: progress.step(step=sent, total=total, unit="batch", note=(
                    "then the server's attacks on the recorded traffic" if sent == total else "")))
        text = "\n".join([f"{config.mode} mode, {len(dataset)} images, {steps} server steps:", *report.lines()])
        return io.NodeOutput(text, ui={"text": [text]})


class PrivDiffSplitPrivacy(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PrivDiffSplitPrivacy",
            display_name="Split privacy settings",
            category="privdiff/split",
            description="One place for the split client's noise settings: link its output to the client-train, "
                        "attack-audit, privacy-activation and server-view nodes and they all use it, so the "
                        "settings you audit are the settings you train with.",
            inputs=[*_noise_inputs(),
                    # Optional and last: saved graphs without it keep loading and running.
                    io.Float.Input("target_margin_db", default=0.0, min=0.0, max=100.0, step=0.5, optional=True,
                                   tooltip="above 0: the planner chooses k and σ_hint (the typed ones are ignored): "
                                           "the most hint-following whose predicted image and hint attack margins "
                                           "over the mean guess stay within this many dB")],
            outputs=[SplitPrivacy.Output(display_name="privacy", tooltip="the settings, for the split nodes")],
        )

    @classmethod
    def validate_inputs(cls, mode):
        return _check_mode(mode)

    @classmethod
    def execute(cls, mode, snr_bound, sigma_label, sigma_hint, draws_per_image, target_margin_db=0.0):
        from ..pipelines.split_plan import planned_settings

        config, text = planned_settings(mode=mode, snr_bound=snr_bound, sigma_label=sigma_label, sigma_hint=sigma_hint,
                                        draws_per_image=draws_per_image, target_margin_db=target_margin_db)
        return io.NodeOutput(config, ui={"text": [text]})


class PrivDiffSplitActivation(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PrivDiffSplitActivation",
            display_name="Split privacy activation (what is sent)",
            category="privdiff/split",
            description="For your own images and hints, exactly what the split client would send in its first "
                        "epoch under these settings and this ComfyUI's noise secret: the noised latents z_t and "
                        "the privacy-activated hint h = fp16(symsigmoid(hint latent + z_t)), each latent channel "
                        "a grey tile (black -3, white +3). Nothing is sent.",
            inputs=[*_preview_inputs("the client's copy", min_count=1), _privacy_link()],
            outputs=[io.Image.Output(display_name="z_t", tooltip="the noised image latents, as sent"),
                     io.Image.Output(display_name="h", tooltip="the privacy-activated hints, as sent")],
        )

    @classmethod
    def execute(cls, model, clip, vae, dataset, count, privacy=None):
        import torch

        from ..pipelines.split_attacks import client_messages, latent_picture
        from ..pipelines.split_client import SplitConfig, split_tensors
        from .comfy_objects import pipeline_from_comfy, split_client_secret

        pixels, hints = split_tensors(dataset, count=count)
        with torch.inference_mode(False):
            message = client_messages(pipeline=pipeline_from_comfy(model=model, clip=clip, vae=vae), pixels=pixels,
                                      hint_pixels=hints, config=privacy or SplitConfig(),
                                      secret=split_client_secret())[0]
        size = tuple(pixels.shape[-2:])
        return io.NodeOutput(_comfy_images(latent_picture(message["z_t" if "z_t" in message else "conv_in_z_t"],
                                                          size=size)),
                             _comfy_images(latent_picture(message["h"], size=size)))


class PrivDiffSplitServerView(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PrivDiffSplitServerView",
            display_name="Split server view (what it rebuilds)",
            category="privdiff/split",
            description="The server's best reconstruction of your images and hints from exactly the messages the "
                        "client would send (these settings, this ComfyUI's noise secret, the epochs linked), with "
                        "its PSNR next to guessing the mean image: look before you send. The figures are those "
                        "of the attack audit for the same settings; nothing is sent or saved.",
            inputs=[*_preview_inputs("the public model the server also has", min_count=2),
                    io.Int.Input("epochs", default=2, min=1, max=1000,
                                 tooltip="epochs of messages the server links (with one noising per image, more add nothing)"),
                    io.Int.Input("optimisation_steps", default=0, min=0, max=100000,
                                 tooltip="steps of the total-variation inversion attack (0: skip it; slow)"),
                    _privacy_link()],
            outputs=[io.Image.Output(display_name="images", tooltip="the server's best reconstruction of the images"),
                     io.Image.Output(display_name="hints", tooltip="the server's reconstruction of the hints"),
                     io.String.Output(display_name="report", tooltip="the attacks' PSNR / SSIM, one per line")],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, clip, vae, dataset, count, epochs, optimisation_steps, privacy=None):
        import torch

        from ..pipelines.split_attacks import server_view
        from ..pipelines.split_client import SplitConfig, split_tensors
        from .comfy_objects import NodeProgress, pipeline_from_comfy, split_client_secret

        config = privacy or SplitConfig()
        pixels, hints = split_tensors(dataset, count=count)
        NodeProgress(node_id=cls.hidden.unique_id, doing="rebuilding what the server would see")  # its heartbeat
        with torch.inference_mode(False):
            view = server_view(pipeline=pipeline_from_comfy(model=model, clip=clip, vae=vae), pixels=pixels,
                               hint_pixels=hints, config=config, secret=split_client_secret(), epochs=epochs,
                               optimisation_steps=optimisation_steps)
        report = view.report
        text = "\n".join([f"{config.mode} mode, {len(pixels)} images, {epochs} epochs linked: image PSNR "
                          f"{report.image_psnr:.2f} dB ({report.gain_over_mean_guess:+.2f} over the mean image), "
                          f"hint PSNR {report.hint_psnr:.2f} dB ({report.hint_psnr - report.hint_mean_psnr:+.2f})",
                          *report.lines()])
        return io.NodeOutput(_comfy_images(view.images), _comfy_images(view.hints), text, ui={"text": [text]})


SPLIT_NODES = [PrivDiffSplitServer, PrivDiffSplitClientTrain, PrivDiffSplitControlNetApply, PrivDiffSplitAttack,
               PrivDiffSplitPrivacy, PrivDiffSplitActivation, PrivDiffSplitServerView]
