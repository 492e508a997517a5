"""The ``caffe`` that child processes of ``netforge pycaffe`` import.

``netforge pycaffe`` puts this folder first on ``PYTHONPATH`` and ``sys.path`` of the script's
process tree only, so that a Python started by the script (multiprocessing's spawn or forkserver
workers, ``subprocess`` running ``sys.executable``) finds it where it would find Caffe. Importing
it installs the same alias as in the script's own process and hands back netforge itself, so
``caffe.io``, ``caffe.proto.caffe_pb2``... are netforge's modules there too. Nothing else puts
this folder on a path: importing netforge never makes ``caffe`` importable.
"""

import sys

from netforge.pycaffe_alias import install_alias

# The import system takes the module from sys.modules once this file has run: netforge's.
sys.modules[__name__] = install_alias()
