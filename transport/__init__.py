"""ZeroMQ transport for split learning: the wire codec (JSON header, raw buffers, HMAC, sequence
numbers) and CurveZMQ keys. Imports neither ComfyUI nor `privdiff.privacy`."""
