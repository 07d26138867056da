"""Privacy nodes: what a privdiff artifact guarantees."""

from comfy_api.latest import io


def _released_files() -> list[str]:
    """Every safetensors file in the folders privdiff releases into, as <folder>/<name>."""
    import folder_paths

    return [f"{kind}/{name}" for kind in ("loras", "embeddings", "controlnet")
            for name in folder_paths.get_filename_list(kind) if name.endswith(".safetensors")]


class PrivDiffPrivacyReport(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PrivDiffPrivacyReport",
            display_name="privdiff privacy report",
            category="privdiff/privacy",
            description="Shows the privacy record every privdiff artifact carries: ε, δ, the mechanism and the "
                        "settings it rests on (or, for split learning, the measured attack figures).",
            inputs=[io.String.Input("artifact", default="",
                                    tooltip="linked from a training node (its file name or embedding), or typed: a "
                                            "file in models/loras, models/embeddings or models/controlnet, or a path"),
                    io.Combo.Input("file", options=["", *_released_files()], default="", optional=True,
                                   tooltip="or pick a file here (used when artifact is empty)")],
            outputs=[io.String.Output(display_name="report", tooltip="the record, one fact per line")],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, artifact, file=""):
        # The same name can hold a new file (a retrained model): report again when the file changes.
        from .comfy_objects import find_artifact

        if not isinstance(artifact, str):
            return float("nan")  # linked and not yet computed: run (a report is cheap)
        try:
            stat = find_artifact(artifact or file).stat()
        except FileNotFoundError:
            return None
        return (stat.st_mtime_ns, stat.st_size)

    @classmethod
    def execute(cls, artifact, file=""):
        from ..privacy.record import read_record
        from .comfy_objects import find_artifact

        path = find_artifact(artifact or file)
        report = "\n".join([path.name, *read_record(path).summary_lines()])
        return io.NodeOutput(report, ui={"text": [report]})



class PrivDiffMembershipAudit(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        from .datasets import Dataset

        return io.Schema(
            node_id="PrivDiffMembershipAudit",
            display_name="privdiff membership audit",
            category="privdiff/privacy",
            description="Measures what a fine-tuned model gives away: a loss-threshold membership-inference attack "
                        "tells training images from held-out ones of the same source. AUC near 0.5 means the "
                        "attacker cannot tell. The figures come from private data and are not covered by ε.",
            inputs=[
                io.Model.Input("model", tooltip="the fine-tuned model (e.g. DP-LDM train's MODEL output)"),
                io.Clip.Input("clip", tooltip="its text encoder"),
                io.Vae.Input("vae", tooltip="its autoencoder"),
                Dataset.Input("members", tooltip="the images the model was trained on"),
                Dataset.Input("nonmembers", tooltip="held-out images from the same source, never trained on"),
                io.Int.Input("num_examples", default=64, min=1, max=100000,
                             tooltip="how many members (and as many non-members) the attack scores"),
            ],
            outputs=[io.String.Output(display_name="report", tooltip="AUC and TPR at 1% FPR, one per line")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, clip, vae, members, nonmembers, num_examples):
        import torch

        from ..pipelines.membership import audit_membership
        from .comfy_objects import pipeline_from_comfy, training_device

        with torch.inference_mode(False):
            pipeline = pipeline_from_comfy(model=model, clip=clip, vae=vae).to(training_device())
        result = audit_membership(pipeline=pipeline, data=members, num_members=num_examples, nonmember_data=nonmembers)
        report = "\n".join(result.summary_lines())
        return io.NodeOutput(report, ui={"text": [report]})



PRIVACY_NODES = [PrivDiffPrivacyReport, PrivDiffMembershipAudit]
