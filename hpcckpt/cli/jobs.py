"""hpcckpt jobs render VERB [options] [-- ARGS...] | hpcckpt jobs list"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shlex
import sys

from ..errors import UsageError
from ..jobs.render import MPI_CHOICES, JobOptions, render, template_dir, templates
from .common import examples

HELP = "SLURM batch scripts for every command (templates in jobs/)"
EXAMPLES = examples("""
hpcckpt jobs list
hpcckpt jobs render merge --nodes 2 --tasks-per-node 8 --time 00:30:00 -- dist/ merged/ > merge.sbatch
hpcckpt jobs render reshard --nodes 4 --tasks-per-node 1 --mpi pmix -- '/local/{rank}/ckpt' '/local/{rank}/out' --strategy /shared/tp4.yaml --node-local
hpcckpt jobs render verify --array 0-15 -- /shared/ckpt --deep
hpcckpt jobs render save --set CHECKPOINT_DIR=/scratch/run1/checkpoint --set LAST_STEP=5000 -- python train.py
""")
#: verbs whose ARGS are not hpcckpt's own arguments (the training command)
_FREE_ARGS = ("save",)


def register(sub) -> None:
    p = sub.add_parser("jobs", help=HELP, description=HELP, epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    jsub = p.add_subparsers(dest="jobs_cmd", required=True)
    lst = jsub.add_parser("list", help="the templates and what each runs")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(run=run_list, needs_mpi=False)

    r = jsub.add_parser("render", help="print a filled-in batch script (redirect it to a file)",
                        description="Print jobs/VERB.sbatch filled in; everything after `--` "
                        "is the command's own arguments (for save: the training command).",
                        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("verb", help="a template: " + ", ".join(templates()))
    _add_render_options(r)
    # argparse cannot put options between VERB and the arguments after `--` on its own
    r.add_argument("rest", nargs=argparse.REMAINDER, metavar="-- ARGS",
                   help="the command's own arguments (for save: the training command)")
    r.set_defaults(run=run_render, needs_mpi=False)


def _add_render_options(r: argparse.ArgumentParser) -> None:
    g = r.add_argument_group("#SBATCH options")
    g.add_argument("--nodes", type=int, help="nodes (template: 1)")
    g.add_argument("--tasks-per-node", type=int, help="MPI ranks per node (template: 8)")
    g.add_argument("--time", help="time limit, e.g. 02:00:00 (template: 01:00:00)")
    g.add_argument("--partition")
    g.add_argument("--account")
    g.add_argument("--job-name", help="job name (template: hpcckpt-VERB)")
    g.add_argument("--array", help="job array range, e.g. 0-15 (verify: one shard per task)")
    g.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE",
                   help="any other #SBATCH option, e.g. mem=0, exclusive= (repeatable)")
    s = r.add_argument_group("settings")
    s.add_argument("--mpi", choices=MPI_CHOICES,
                   help="srun --mpi=pmix|pmi2, or mpiexec inside the allocation (template: pmi2; "
                   "see `srun --mpi=list`)")
    s.add_argument("--env", default=sys.prefix,
                   help="environment with hpcckpt installed (default: this one, %(default)s)")
    s.add_argument("--log-dir", help="directory for the job's .out/.err and JSON summary "
                   "(must exist at submission; template: the submit directory)")
    s.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="any other setting of the template, e.g. LAST_STEP=5000 (repeatable)")


def _split_rest(args) -> list[str] | None:
    """Parse the render options that followed VERB into ``args``; return the command's
    own arguments (after ``--``), or None when there are none."""
    rest = list(args.rest)
    if "--" in rest:
        i = rest.index("--")
        opts, verb_args = rest[:i], rest[i + 1:]
    elif rest and rest[0].startswith("-"):
        opts, verb_args = rest, []
    else:  # `render VERB -- ARGS`: argparse already dropped the `--`
        opts, verb_args = [], rest
    if opts:
        p = argparse.ArgumentParser(prog="hpcckpt jobs render VERB", add_help=False)
        _add_render_options(p)
        for action in p._actions:  # keep what was given before VERB
            action.default = getattr(args, action.dest, action.default)
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                p.parse_args(opts, namespace=args)
        except SystemExit:
            msg = err.getvalue().strip().splitlines()[-1].split("error: ", 1)[-1]
            raise UsageError(f"{msg} (options go before `--`, the command's own arguments "
                             "after it)") from None
    return verb_args or None


def _pairs(items: list[str], what: str) -> tuple[tuple[str, str], ...]:
    out = []
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise UsageError(f"{what} {item!r}: expected KEY=VALUE")
        out.append((key, value))
    return tuple(out)


def _check_verb_args(verb: str, args: list[str]) -> None:
    """Parse ARGS with the installed `hpcckpt VERB` parser, so that a job does not start
    only to fail on its arguments."""
    from .main import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if verb in _FREE_ARGS or verb not in sub.choices:
        return
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            sub.choices[verb].parse_args(args)
    except SystemExit as e:
        if e.code:
            msg = err.getvalue().strip().splitlines()
            raise UsageError(f"arguments for `hpcckpt {verb}`: "
                             f"{msg[-1] if msg else 'rejected'}") from None


def run_render(args, comm):
    verb_args = _split_rest(args)
    opts = JobOptions(nodes=args.nodes, tasks_per_node=args.tasks_per_node, time=args.time,
                      partition=args.partition, account=args.account, job_name=args.job_name,
                      mpi=args.mpi, env=os.path.abspath(args.env), log_dir=args.log_dir, array=args.array,
                      settings=_pairs(args.set, "--set"), sbatch=_pairs(args.sbatch, "--sbatch"),
                      command=shlex.join(["hpcckpt", *sys.argv[1:]]))
    if verb_args is not None:
        _check_verb_args(args.verb, verb_args)
    script = render(args.verb, verb_args, opts)
    sys.stdout.write(script)
    if verb_args is None:
        print("hpcckpt jobs render: note: no arguments after `--`: ARGS keeps the template's "
              "example paths; edit them before submitting", file=sys.stderr)
    return None


def run_list(args, comm):
    found = templates()
    if args.json:
        print(json.dumps({"template_dir": str(template_dir()), "templates": found}))
        return None
    print(f"job templates in {template_dir()} (hpcckpt jobs render VERB ... > job.sbatch):")
    width = max(map(len, found), default=0)
    for verb, desc in found.items():
        print(f"  {verb:<{width}}  {desc}")
    return None
