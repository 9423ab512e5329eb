"""MindSpore's two protobuf schemas, built in Python (no MindSpore, no protoc).

``node_strategy.proto`` (strategy files) and ``checkpoint.proto`` (``.ckpt`` files) as
MindSpore 2.10 compiles them into ``mindspore/train/{node_strategy,checkpoint}_pb2.py``:
proto2, ``required`` fields where MindSpore has them, unpacked repeated scalars. The
descriptors are built from the tables below with ``descriptor_pb2``, so nothing
generated is edited by hand; ``tests/golden/mindspore/*.descriptor.bin`` hold
MindSpore's own serialized descriptors, and a test compares them byte for byte.

The classes live in a private descriptor pool: a process that also imports MindSpore
(whose pb2 modules register the same file names in the default pool) still works.
"""
from __future__ import annotations

from functools import lru_cache

#: (message, [(field, number, label, type)]); type: a scalar name or ".pkg.Message".
#: A fifth tuple item names the field's oneof; a nested message is (name, fields, nested).
_STRATEGY = ("node_strategy.proto", "mindspore.straspb", [
    ("ParallelStrategy", [("dim", 1, "repeated", "uint32")]),
    ("ParallelStrategys", [("stage", 1, "required", "uint32"),
                           ("parallel_strategy", 2, "repeated", ".mindspore.straspb.ParallelStrategy")]),
    ("ParallelStrategyItem", [("node_name", 1, "required", "string"),
                              ("parallel_strategys", 2, "required", ".mindspore.straspb.ParallelStrategys")]),
    ("DevMatrix", [("dim", 1, "repeated", "uint32")]),
    ("TensorMap", [("dim", 1, "repeated", "int32")]),
    ("ParamSplitShape", [("dim", 1, "repeated", "int64")]),
    ("IndicesOffset", [("dim", 1, "repeated", "int64")]),
    ("ParallelLayouts", [("dev_matrix", 1, "repeated", ".mindspore.straspb.DevMatrix"),
                         ("tensor_map", 2, "repeated", ".mindspore.straspb.TensorMap"),
                         ("param_split_shape", 3, "repeated", ".mindspore.straspb.ParamSplitShape"),
                         ("indices_offset", 4, "repeated", ".mindspore.straspb.IndicesOffset"),
                         ("field", 5, "required", "int32"),
                         ("opt_weight_shard_step", 6, "required", "int32"),
                         ("opt_weight_shard_size", 7, "required", "int32")]),
    ("ParallelLayoutItem", [("param_name", 1, "required", "string"),
                            ("parallel_layouts", 2, "required", ".mindspore.straspb.ParallelLayouts")]),
    ("ParallelGroupRanks", [("dim", 1, "repeated", "uint32")]),
    ("ParallelGroupItem", [("group_name", 1, "required", "string"),
                           ("parallel_group_ranks", 2, "required", ".mindspore.straspb.ParallelGroupRanks")]),
    ("ParallelGroupMap", [("parallel_group_item", 1, "repeated", ".mindspore.straspb.ParallelGroupItem"),
                          ("ckpt_restore_rank_list", 2, "required", ".mindspore.straspb.ParallelGroupRanks")]),
    ("ParallelStrategyMap", [("current_stage", 1, "required", "uint32"),
                             ("parallel_strategy_item", 2, "repeated", ".mindspore.straspb.ParallelStrategyItem"),
                             ("parallel_layout_item", 3, "repeated", ".mindspore.straspb.ParallelLayoutItem")]),
])

_CHECKPOINT = ("checkpoint.proto", "", [
    ("Checkpoint", [("value", 1, "repeated", ".Checkpoint.Value")],
     [("Value", [("tag", 1, "required", "string"),
                 ("tensor", 2, "optional", ".TensorProto", "value"),
                 ("maptensor", 3, "optional", ".MapTensorProto", "value")])]),
    ("TensorProto", [("dims", 1, "repeated", "int64"), ("tensor_type", 2, "required", "string"),
                     ("tensor_content", 3, "required", "bytes")]),
    ("MapTensorProto", [("tensor", 1, "repeated", ".TensorProto")]),
])


def _file_proto(spec):
    from google.protobuf import descriptor_pb2 as d
    F = d.FieldDescriptorProto
    name, package, messages = spec
    fp = d.FileDescriptorProto(name=name)
    if package:
        fp.package = package

    def fill(m, fields, nested=()):
        for nname, nfields, *nn in nested:
            fill(m.nested_type.add(name=nname), nfields, *nn)
        oneofs: list[str] = []
        for fname, number, label, ftype, *oneof in fields:
            f = m.field.add(name=fname, number=number,
                            label=getattr(F, "LABEL_" + label.upper()))
            if ftype.startswith("."):
                f.type = F.TYPE_MESSAGE
                f.type_name = ftype
            else:
                f.type = getattr(F, "TYPE_" + ftype.upper())
            if oneof:
                if oneof[0] not in oneofs:
                    oneofs.append(oneof[0])
                    m.oneof_decl.add(name=oneof[0])
                f.oneof_index = oneofs.index(oneof[0])

    for mname, fields, *nested in messages:
        fill(fp.message_type.add(name=mname), fields, *nested)
    return fp


def strategy_file_proto():
    """``node_strategy.proto`` as a ``FileDescriptorProto``."""
    return _file_proto(_STRATEGY)


def checkpoint_file_proto():
    """``checkpoint.proto`` as a ``FileDescriptorProto``."""
    return _file_proto(_CHECKPOINT)


@lru_cache(maxsize=None)
def _classes() -> dict:
    from google.protobuf import descriptor_pool, message_factory
    pool = descriptor_pool.DescriptorPool()
    out = {}
    for fp in (strategy_file_proto(), checkpoint_file_proto()):
        pool.Add(fp)
        prefix = fp.package + "." if fp.package else ""
        for m in fp.message_type:
            out[m.name] = message_factory.GetMessageClass(
                pool.FindMessageTypeByName(prefix + m.name))
    return out


def message_class(name: str):
    """A message class by its short name: ``ParallelStrategyMap``, ``Checkpoint``, ..."""
    return _classes()[name]
