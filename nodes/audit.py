"""The canary audit node: a DP-LDM run with canaries, and the ε it shows next to the ε it records."""

from comfy_api.latest import io

from .training import base_and_data_inputs, dp_ldm_settings_inputs

GUESSES = ("grid", "planned")  # as `privdiff audit canary --guesses`; "grid" is the library's guesses=None
MAX_RUNS = 50


class PrivDiffCanaryAudit(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PrivDiffCanaryAudit",
            display_name="privdiff canary audit (DP-LDM)",
            category="privdiff/privacy",
            description="Checks that DP-LDM keeps its promise: runs the fine-tune with your settings plus gradient "
                        "canaries (each put in with probability 1/2, far above the clip) and shows the lower bound "
                        "on ε they reveal next to the ε the run records. A correct run stays below it; a bound above "
                        "it means the mechanism is broken. Nothing of the run is kept: it is an audit. "
                        "batch_size = N (full batches) gives the tightest audit.",
            inputs=[
                *base_and_data_inputs(),
                io.Float.Input("epsilon", default=10.0, min=0.01, max=1000.0, step=0.1,
                               tooltip="the audited run's target ε, as in the training node"),
                *dp_ldm_settings_inputs(),
                io.Int.Input("num_canaries", default=1000, min=32, max=50000,
                             tooltip="canaries added to the run (more: a tighter bound, at most 1/(2δ))"),
                io.Float.Input("delta", default=1e-5, min=1e-12, max=0.01, step=1e-6,
                               tooltip="δ of the audited (ε, δ); the audit needs 2 × canaries × δ <= 1"),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1,
                             tooltip="the canaries, their inclusion and the noise (seeded: the audit is repeatable)"),
                # Last and optional: workflows saved before them keep their widget order and run one run, grid.
                io.Int.Input("runs", default=1, min=1, max=MAX_RUNS, optional=True,
                             tooltip="independent runs whose canaries are audited together as one set: a tighter "
                                     "bound at R times the time (each run is the full fine-tune with its own "
                                     "canaries); canaries × runs must stay at most 1/(2δ)"),
                io.Combo.Input("guesses", options=list(GUESSES), default="grid", optional=True,
                               tooltip="grid: the best of several guess counts, paying a union bound over them; "
                                       "planned: one guess pair chosen before the run from the recorded ε and the "
                                       "number of canaries, so no union bound is paid (usually tighter)"),
            ],
            outputs=[io.String.Output(display_name="report",
                                      tooltip="the audited lower bound on ε, the recorded ε and the Gaussian fit's "
                                              "estimate (tighter, under a model of the scores), one per line")],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
            not_idempotent=True,
        )

    @classmethod
    def execute(cls, model, clip, vae, dataset, epsilon, trainable, epochs, batch_size, learning_rate, clip_norm,
                num_canaries, delta, seed, runs=1, guesses="grid"):
        import torch

        from ..pipelines.canary_audit import audit_dp_ldm
        from ..training.fine_tune import DPLDMConfig
        from .comfy_objects import NodeProgress, make_room_for_training, pipeline_from_comfy, training_device

        config = DPLDMConfig(trainable=trainable, epsilon=epsilon, delta=delta, epochs=epochs, batch_size=batch_size,
                             learning_rate=learning_rate, clip_norm=clip_norm, seed=seed, secure_noise=False,
                             num_samples=0, device=training_device())
        progress = NodeProgress(node_id=cls.hidden.unique_id, note=f"{num_canaries} canaries")
        make_room_for_training()
        with torch.inference_mode(False):  # ComfyUI runs nodes under inference mode; training needs autograd
            # A stop ends the audit at once (raise_if_stopped raises ComfyUI's interrupt): it has nothing to save.
            result = audit_dp_ldm(base=pipeline_from_comfy(model=model, clip=clip, vae=vae), data=dataset,
                                  config=config, num_canaries=num_canaries, runs=runs,
                                  guesses=None if guesses == "grid" else guesses,
                                  progress=progress.report,
                                  should_stop=progress.raise_if_stopped)
        text = "\n".join(result.summary_lines())
        return io.NodeOutput(text, ui={"text": [text]})


AUDIT_NODES = [PrivDiffCanaryAudit]
