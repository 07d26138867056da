"""Privacy nodes: what a privdiff artifact guarantees."""

from comfy_api.latest import io


class PrivDiffPrivacyReport(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PrivDiffPrivacyReport",
            display_name="privdiff privacy report",
            category="privdiff/privacy",
            description="Shows the privacy record every privdiff artifact carries: ε, δ, the mechanism and the "
                        "settings it rests on (or, for split learning, the measured attack figures).",
            inputs=[io.String.Input("artifact", default="privdiff-dp-ldm",
                                    tooltip="a file in models/loras, models/embeddings or models/controlnet "
                                            "(as their loaders name it, or embedding:<name>), or a full path")],
            outputs=[io.String.Output(display_name="report", tooltip="the record, one fact per line")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, artifact):
        from ..privacy.record import read_record
        from .comfy_objects import find_artifact

        path = find_artifact(artifact)
        report = "\n".join([path.name, *read_record(path).summary_lines()])
        return io.NodeOutput(report, ui={"text": [report]})


PRIVACY_NODES = [PrivDiffPrivacyReport]
