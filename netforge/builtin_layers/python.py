"""``type: "Python"``: a layer class named by ``python_param`` (module, layer, param_str).

The class subclasses ``netforge.Layer`` (pycaffe scripts change ``caffe.Layer`` to
``netforge.Layer``) and sees ``self.param_str``, ``self.phase`` and ``self.blobs`` as in
pycaffe. The module is imported from ``sys.path`` (the current directory included, as
``caffe`` does through PYTHONPATH).
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from netforge.errors import ConfigError
from netforge.layer import Layer, register_creator
from netforge.proto import pb


def create_python_layer(param: pb.LayerParameter, **context: Any) -> Layer:
    spec = param.python_param
    if not spec.module or not spec.layer:
        raise ConfigError(f"layer {param.name!r}: python_param needs both 'module' and 'layer'")
    if "" not in sys.path:
        sys.path.insert(0, "")
    try:
        module = importlib.import_module(spec.module)
    except ImportError as exc:
        if (exc.name or "").split(".")[0] == "caffe":
            raise ConfigError(
                f"layer {param.name!r}: Python module {spec.module!r} imports pycaffe's "
                f"'{exc.name}', which netforge does not install: change its imports to "
                "netforge's (`import netforge as caffe`; python tools/pycaffe_rewrite.py "
                "FILE rewrites them), or run the pycaffe script that builds this net with "
                "`netforge pycaffe SCRIPT`"
            ) from exc
        raise ConfigError(
            f"layer {param.name!r}: cannot import Python module {spec.module!r} ({exc}); "
            "put it on PYTHONPATH or in the current directory"
        ) from exc
    cls = getattr(module, spec.layer, None)
    if not (isinstance(cls, type) and issubclass(cls, Layer)):
        raise ConfigError(
            f"layer {param.name!r}: {spec.module}.{spec.layer} is not a netforge.Layer subclass"
        )
    layer = cls(param, **context)
    layer.type = "Python"
    layer.param_str = spec.param_str
    return layer


register_creator("Python", create_python_layer)
