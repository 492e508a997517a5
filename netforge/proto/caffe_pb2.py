"""pycaffe's ``caffe.proto.caffe_pb2``: the generated messages under Caffe's module name.

``from netforge.proto import caffe_pb2`` gives the same classes as ``netforge.proto.pb``
(``caffe_pb2.NetParameter is pb.NetParameter``), so pycaffe code that builds or parses
messages runs unchanged; the schema is wire-compatible with BVLC's ``caffe.proto``.
"""

from netforge.proto.netforge_pb2 import *  # noqa: F403
from netforge.proto.netforge_pb2 import DESCRIPTOR  # noqa: F401
