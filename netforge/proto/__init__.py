"""The generated protobuf schema (``protos/netforge.proto``), wire-compatible with Caffe's.

Import messages as ``from netforge.proto import pb`` and use ``pb.NetParameter`` etc.
"""

from netforge.proto import caffe_pb2  # pycaffe's name for the same messages
from netforge.proto import netforge_pb2 as pb

__all__ = ["caffe_pb2", "pb"]
