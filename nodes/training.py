"""Training nodes: DP-LDM (a LoRA / weight-difference file) and DP Textual Inversion (an embedding)."""

from comfy_api.latest import io

from ..training.trainable import TRAINABLE_SETS
from .datasets import Dataset


def check_release_name_input(name: str):
    """True, or what is wrong with a release's file name (validate_inputs' answer)."""
    from ..pipelines.release import check_release_name

    try:
        check_release_name(name)
    except ValueError as error:
        return str(error)
    return True


def base_and_data_inputs():
    return [
        io.Model.Input("model", tooltip="the base model, e.g. from Load Checkpoint (SD1.5) or Load privdiff-tiny"),
        io.Clip.Input("clip", tooltip="the base model's text encoder"),
        io.Vae.Input("vae", tooltip="the base model's autoencoder"),
        Dataset.Input("dataset", tooltip="the private training images and captions"),
    ]


def dp_ldm_settings_inputs():
    """What a DP-LDM run trains and how: the training node's inputs, and the canary audit's (which
    audits a run with a training node's settings, so both take them from here)."""
    return [
        io.Combo.Input("trainable", options=list(TRAINABLE_SETS), default="attention",
                       tooltip="which weights train: attention (DP-LDM's choice), cross_attention, transformer, "
                               "lora (a small adapter), full"),
        io.Float.Input("epochs", default=10.0, min=0.01, max=10000.0, step=0.5,
                       tooltip="passes over the data; more steps spend more of ε, so the noise grows"),
        io.Int.Input("batch_size", default=32, min=1, max=65536,
                     tooltip="expected examples per step (Poisson sampling: the sample rate is batch_size / N)"),
        io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1.0, step=1e-5,
                       tooltip="at batch size 32, scaled linearly with the batch size"),
        io.Float.Input("clip_norm", default=0.01, min=1e-6, max=100.0, step=0.001,
                       tooltip="C: each example's gradient is clipped to this L2 norm before the noise is added"),
    ]


ADJACENCIES = ("add-remove", "replace-one")


def _adjacency_input():
    # Last and optional: workflows saved before it keep their widget order and run as add-remove.
    return io.Combo.Input("adjacency", options=list(ADJACENCIES), default="add-remove", optional=True,
                          tooltip="which datasets the guarantee calls neighbours: one image added or removed "
                                  "(add-remove), or one replaced by another (replace-one: the noise is calibrated "
                                  "for it, and the record says so)")


def _progress(cls, total: int = 1, note: str = ""):
    from .comfy_objects import NodeProgress

    return NodeProgress(node_id=cls.hidden.unique_id, total=total, note=note)


class PrivDiffDPLDMTrain(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PrivDiffDPLDMTrain",
            display_name="DP-LDM train (private fine-tune)",
            category="privdiff/training",
            description="Fine-tunes the attention layers (or a LoRA) with DP-SGD: Poisson sampling, per-example "
                        "clipping and Gaussian noise calibrated to your ε. Writes models/loras/<name>.safetensors "
                        "(load it with LoraLoaderModelOnly) carrying its privacy record, and returns the model with "
                        "it applied. Stop keeps a checkpoint: queue again with resume on to continue.",
            inputs=[
                *base_and_data_inputs(),
                io.String.Input("name", default="privdiff-dp-ldm",
                                tooltip="file name in models/loras (no extension) and of the run folder output/privdiff/<name>"),
                io.Float.Input("epsilon", default=10.0, min=0.01, max=1000.0, step=0.1,
                               tooltip="the privacy budget ε for each training example (smaller: more private, less learnt); "
                                       "δ is 1/(10·N)"),
                *dp_ldm_settings_inputs(),
                io.Int.Input("lora_rank", default=4, min=1, max=256, tooltip="adapter rank, for trainable = lora"),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1,
                             tooltip="sampling and initialisation (the DP noise always comes from the OS)"),
                io.Boolean.Input("resume", default=False,
                                 tooltip="continue the stopped run of the same name from its checkpoint"),
                io.Int.Input("num_samples", default=8, min=0, max=64,
                             tooltip="sample images from the released model (public prompts; covered by ε), 0 for none"),
                _adjacency_input(),
                # After adjacency and optional: workflows saved before it keep their widget order.
                io.Int.Input("noise_draws", default=1, min=1, max=16, optional=True,
                             tooltip="noise multiplicity: each image's loss is averaged over this many (timestep, "
                                     "noise) draws before clipping; K times the compute per step, the same ε; "
                                     "1 is plain DP-LDM"),
            ],
            outputs=[io.Model.Output(tooltip="the base model with the private fine-tune applied"),
                     io.String.Output(display_name="lora_name", tooltip="the file in models/loras")],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
            not_idempotent=True,
        )

    @classmethod
    def validate_inputs(cls, name):
        # One input per check: ComfyUI lists a validate_inputs error under each of its arguments.
        # Combos (trainable, adjacency) are checked by the config as the node starts, before training.
        return check_release_name_input(name)

    @classmethod
    def execute(cls, model, clip, vae, dataset, name, epsilon, trainable, epochs, batch_size, learning_rate,
                clip_norm, lora_rank, seed, resume, num_samples, adjacency="add-remove", noise_draws=1):
        import torch

        from ..pipelines.dp_ldm import DPLDMConfig, train_dp_ldm
        from .comfy_objects import (make_room_for_training, model_with_weight_file, pipeline_from_comfy,
                                    publish_to_comfy, training_device, training_previews, claim_run)

        config = DPLDMConfig(trainable=trainable, epsilon=epsilon, epochs=epochs, batch_size=batch_size,
                             learning_rate=learning_rate, clip_norm=clip_norm, lora_rank=lora_rank, seed=seed,
                             num_samples=num_samples, adjacency=adjacency, noise_draws=noise_draws,
                             device=training_device())
        progress = _progress(cls)
        make_room_for_training()
        with torch.inference_mode(False):  # ComfyUI runs nodes under inference mode; training needs autograd
            result = train_dp_ldm(base=pipeline_from_comfy(model=model, clip=clip, vae=vae), data=dataset,
                                  out=claim_run(name, kind="loras", resume=resume), config=config, resume=resume,
                                  progress=progress.report,
                                  should_stop=progress.stop_requested)
        progress.raise_if_stopped()
        lora = publish_to_comfy(source=result.files.get("lora") or result.files["comfyui"], kind="loras", name=name)
        return io.NodeOutput(model_with_weight_file(model=model, path=lora), lora.name,
                             ui=training_previews(losses=progress.losses, samples=result.files.get("samples"),
                                                  title="DP-LDM"))


class _TextualInversionNode(io.ComfyNode):
    """What both DP-TI nodes share: the embedding's name and where it lands."""

    @staticmethod
    def _ti_inputs():
        return [
            *base_and_data_inputs(),
            io.String.Input("name", default="privdiff-style",
                            tooltip="the embedding's file name in models/embeddings: use it in prompts as embedding:<name>"),
            io.String.Input("init_word", default="painting",
                            tooltip="a single-token word the embedding starts from (public, never from your captions)"),
            io.Int.Input("num_vectors", default=1, min=1, max=16, tooltip="token vectors in the embedding"),
            io.String.Input("template", default="a picture in the style of {token}",
                            tooltip="the public training prompt; {token} is where the embedding goes"),
            io.Float.Input("epsilon", default=1.0, min=0.01, max=1000.0, step=0.1,
                           tooltip="the privacy budget ε for each training image; δ is 1/(10·N)"),
        ]

    @classmethod
    def _schema(cls, *, node_id: str, display_name: str, description: str, method_inputs: list):
        return io.Schema(
            node_id=node_id, display_name=display_name, category="privdiff/training", description=description,
            inputs=[*cls._ti_inputs(), *method_inputs,
                    io.Float.Input("learning_rate", default=5e-3, min=1e-6, max=1.0, step=1e-4, tooltip="Adam's step size"),
                    io.Int.Input("seed", default=0, min=0, max=2**31 - 1,
                                 tooltip="the order of training steps (the DP noise always comes from the OS)"),
                    io.Boolean.Input("resume", default=False,
                                     tooltip="continue the stopped run of the same name from its checkpoint"),
                    _adjacency_input()],
            outputs=[io.String.Output(display_name="prompt_text",
                                      tooltip="the training template with the embedding in it, e.g. 'a picture in the "
                                              "style of embedding:<name>': a prompt that uses it as it was trained"),
                     io.String.Output(display_name="embedding", tooltip="embedding:<name>, to put in your own prompts")],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
            not_idempotent=True,
        )

    @classmethod
    def validate_inputs(cls, name):
        # One input per check (ComfyUI lists an error under each argument); the config checks the
        # template and adjacency as the node starts, before any training.
        return check_release_name_input(name)

    @classmethod
    def _train(cls, *, trainer, config, model, clip, vae, dataset, name, resume: bool):
        """A stop leaves a checkpoint in output/privdiff/<name>; resume=True continues it."""
        import torch

        from .comfy_objects import claim_run, make_room_for_training, pipeline_from_comfy, publish_to_comfy, \
            training_device

        out = claim_run(name, kind="embeddings", resume=resume)
        # DPAgg-TI spends all of ε at its one release; DP-SGD TI plans it in advance.
        progress = _progress(cls, note=f"ε = {config.epsilon:g} when released")
        make_room_for_training()
        # ComfyUI runs nodes under inference mode; weights made there cannot take part in autograd.
        with torch.inference_mode(False):
            pipeline = pipeline_from_comfy(model=model, clip=clip, vae=vae).to(training_device())
            result = trainer(base=pipeline, data=dataset, out=out, config=config, progress=progress.report,
                             should_stop=progress.stop_requested, resume=resume)
        progress.raise_if_stopped()
        path = publish_to_comfy(source=result.files["comfyui"], kind="embeddings", name=name)
        token = f"embedding:{path.stem}"
        return io.NodeOutput(config.template.format(token=token), token,
                             ui={"text": [f"{token} · ε = {result.epsilon:.4g}, δ = {result.record.delta:.3g}"]})


class PrivDiffDPAggTITrain(_TextualInversionNode):
    @classmethod
    def define_schema(cls):
        return cls._schema(
            node_id="PrivDiffDPAggTITrain",
            display_name="DPAgg-TI train (private embedding)",
            description="DPAgg-TI: one embedding per image, each clipped, then averaged with Gaussian noise: one "
                        "private release. Writes models/embeddings/<name>.safetensors with its privacy record; "
                        "the per-image embeddings are never released (a stop keeps them in a checkpoint, deleted "
                        "at release: queue again with resume on to continue).",
            method_inputs=[
                io.Int.Input("steps", default=100, min=1, max=100000, tooltip="optimisation steps of every per-image embedding"),
                io.Float.Input("clip_norm", default=0.5, min=1e-4, max=100.0, step=0.01,
                               tooltip="C: each embedding's distance from the init word is clipped to this norm"),
            ],
        )

    @classmethod
    def execute(cls, model, clip, vae, dataset, name, init_word, num_vectors, template, epsilon, steps, clip_norm,
                learning_rate, seed, resume, adjacency="add-remove"):
        from ..pipelines.dp_ti import DPAggConfig, train_dpagg_ti

        config = DPAggConfig(token=f"<{name}>", init_word=init_word, num_vectors=num_vectors, template=template,
                             epsilon=epsilon, steps=steps, clip_norm=clip_norm,
                             learning_rate=learning_rate, seed=seed, adjacency=adjacency)
        return cls._train(trainer=train_dpagg_ti, config=config, model=model, clip=clip, vae=vae, dataset=dataset,
                          name=name, resume=resume)


class PrivDiffDPSGDTITrain(_TextualInversionNode):
    @classmethod
    def define_schema(cls):
        return cls._schema(
            node_id="PrivDiffDPSGDTITrain",
            display_name="DP-SGD TI train (private embedding)",
            description="The DP-SGD Textual Inversion baseline: one embedding trained with per-example clipping "
                        "and noise. Writes models/embeddings/<name>.safetensors with its privacy record. Stop keeps "
                        "a checkpoint: queue again with resume on to continue.",
            method_inputs=[
                io.Float.Input("epochs", default=20.0, min=0.01, max=10000.0, step=0.5, tooltip="passes over the data"),
                io.Int.Input("batch_size", default=16, min=1, max=65536, tooltip="expected examples per step (Poisson)"),
                io.Float.Input("clip_norm", default=0.01, min=1e-6, max=100.0, step=0.001,
                               tooltip="C: each example's gradient is clipped to this L2 norm"),
            ],
        )

    @classmethod
    def execute(cls, model, clip, vae, dataset, name, init_word, num_vectors, template, epsilon, epochs, batch_size,
                clip_norm, learning_rate, seed, resume, adjacency="add-remove"):
        from ..pipelines.dp_ti import DPSGDTIConfig, train_dpsgd_ti

        config = DPSGDTIConfig(token=f"<{name}>", init_word=init_word, num_vectors=num_vectors, template=template,
                               epsilon=epsilon, epochs=epochs, batch_size=batch_size, clip_norm=clip_norm,
                               learning_rate=learning_rate, seed=seed, adjacency=adjacency)
        return cls._train(trainer=train_dpsgd_ti, config=config, model=model, clip=clip, vae=vae, dataset=dataset,
                          name=name, resume=resume)


TRAINING_NODES = [PrivDiffDPLDMTrain, PrivDiffDPAggTITrain, PrivDiffDPSGDTITrain]
