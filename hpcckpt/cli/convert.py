"""hpcckpt convert SRC OUT"""
from __future__ import annotations

import argparse

from .common import add_run_options, copy_options, examples

HELP = "legacy checkpoints (MindSpore .ckpt, Keras/HF HDF5) -> safetensors"
EXAMPLES = examples("""
hpcckpt convert model.ckpt out/                 # out/model.safetensors, as ms.ckpt_to_safetensors
mpiexec -n 8 hpcckpt convert ckpt_dir/ out/     # ckpt_dir/rank_<r>/*.ckpt, files divided among ranks
hpcckpt convert tf_model.h5 out/                # Keras legacy / HF layer_names layout
hpcckpt convert model.weights.h5 out/           # Keras 3 layout
""")


def register(sub) -> None:
    p = sub.add_parser("convert", help=HELP, description=HELP, epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="a .ckpt, .h5 or .hdf5 file, or a directory of rank_<r>/ .ckpt files")
    p.add_argument("out", help="output directory")
    add_run_options(p)
    p.set_defaults(run=run)


def run(args, comm):
    from ..ops.convert import convert  # on use: start-up is every rank's wall time
    return convert(args.src, args.out, comm=comm, options=copy_options(args))
