"""privdiff's ComfyUI nodes (V3 API): thin schemas over the library.

Only this package imports ComfyUI (`comfy*`, `comfy_api`, `folder_paths`). Each node's `execute` turns
ComfyUI's objects into what one library function takes, calls it, and turns the result back;
`comfy_objects` holds that glue. Heavy imports (diffusers, transformers) happen inside `execute`, so
loading the pack at ComfyUI's start costs almost nothing.
"""

from comfy_api.latest import ComfyExtension

from .audit import AUDIT_NODES
from .datasets import DATASET_NODES
from .federated import FEDERATED_NODES
from .models import MODEL_NODES
from .privacy import PRIVACY_NODES
from .split import SPLIT_NODES
from .training import TRAINING_NODES


class PrivDiffExtension(ComfyExtension):
    async def get_node_list(self):
        return [*MODEL_NODES, *DATASET_NODES, *TRAINING_NODES, *FEDERATED_NODES, *SPLIT_NODES, *PRIVACY_NODES,
                *AUDIT_NODES]
