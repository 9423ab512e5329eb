"""Layouts: what each rank holds. Pure; never imports mpi4py."""
from .box import Box, array_split_piece
from .loader import load_strategy
from .strategy import Mesh, Strategy, TensorSpec
from .tensor import TensorInfo
from .yaml_io import strategy_from_dict, strategy_to_yaml, write_strategy_yaml

__all__ = ["Box", "Mesh", "Strategy", "TensorInfo", "TensorSpec", "array_split_piece", "load_strategy",
           "strategy_from_dict", "strategy_to_yaml", "write_strategy_yaml"]
