// privdiff's results on the node itself: the text a privdiff node returns as its UI output (a privacy
// report, an attack's figures, "embedding:<name> · ε = …") appears in a read-only box under the node's
// widgets, the way ComfyUI's own Preview Any shows its value. The box is never saved in workflows.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const RESULT = "privdiff_result";

app.registerExtension({
  name: "privdiff.ResultText",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData.name.startsWith("PrivDiff")) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, [message]);
      const text = message?.text;
      if (!Array.isArray(text) || text.length === 0) return;
      let widget = this.widgets?.find((w) => w.name === RESULT);
      const created = !widget;
      if (created) {
        widget = ComfyWidgets["STRING"](this, RESULT, ["STRING", { multiline: true }], app).widget;
        widget.serialize = false;  // a result, not a setting: workflows keep their widget values as they were
        if (widget.element) widget.element.readOnly = true;
      }
      widget.value = text.join("\n");
      const [width, height] = this.computeSize();
      // Room for a few lines of the result the first time; later the user's own size is kept.
      const extra = created ? 60 + 14 * Math.min(text.join("\n").split("\n").length, 8) : 0;
      this.setSize([Math.max(width, this.size[0], 360), Math.max(height, this.size[1] + extra)]);
      this.setDirtyCanvas?.(true, true);
    };
  },
});
