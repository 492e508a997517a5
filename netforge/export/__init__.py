"""Export of deploy nets and their weights to other formats (ONNX, ``netforge[onnx]``).

``net_to_onnx(net, opset=, dynamic_batch=, fold_batchnorm=)`` builds the ``onnx.ModelProto``;
``Net.to_onnx(path, ...)`` also writes it. ``onnx_check`` runs an exported model in ONNX
Runtime beside netforge's forward.
"""

from netforge.export.onnx_export import net_to_onnx, save_onnx

__all__ = ["net_to_onnx", "save_onnx"]
