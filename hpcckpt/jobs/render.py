"""Rendering a SLURM job template: a pure text transformation, no MPI, no environment.

A template (``jobs/<verb>.sbatch``) is a batch script a user could also edit by hand. It
has three parts rendering touches:

* ``#SBATCH --key=value`` lines (``##SBATCH`` = a disabled option): a given option
  replaces the line's value (enabling it); an option the template lacks is appended after
  its last ``#SBATCH`` line.
* the settings block between ``# ---- settings ----`` and ``# ---- end of settings ----``:
  shell assignments ``NAME=value  # comment``; a given setting replaces the value (shell
  quoted), ``ARGS`` is a bash array holding the command's own arguments.
* a line ending in ``# hpcckpt:include FILE`` is replaced by that file of the template
  directory, so a rendered script stands alone (sbatch runs a copy of it from its spool).

Example:
    >>> opts = JobOptions(nodes=2, tasks_per_node=4, mpi="pmi2", env="/opt/venv")
    >>> script = render("merge", ["dist/", "merged/"], opts)   # doctest: +SKIP
"""
from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from ..errors import UsageError

SETTINGS_BEGIN = "# ---- settings ----"
SETTINGS_END = "# ---- end of settings ----"
INCLUDE_MARK = "# hpcckpt:include "
MPI_CHOICES = ("pmix", "pmi2", "mpiexec")

_SBATCH_RE = re.compile(r"^(?P<hashes>##?)SBATCH --(?P<key>[a-z][a-z0-9-]*)(?:=(?P<value>.*))?$")
_SETTING_RE = re.compile(r"^(?P<name>[A-Z_][A-Z0-9_]*)=(?P<value>.*?)(?P<comment>\s+#\s.*)?$")
# SLURM's time formats: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS
_TIME_RE = re.compile(r"^(\d+|\d+:\d\d|\d+:\d\d:\d\d|\d+-\d+|\d+-\d+:\d\d|\d+-\d+:\d\d:\d\d)$")
_ARRAY_RE = re.compile(r"^\d+(-\d+)?(:\d+)?(,\d+(-\d+)?(:\d+)?)*(%\d+)?$")
_SBATCH_KEY_RE = re.compile(r"^[a-z][a-z0-9-]*$")


@dataclass(frozen=True)
class JobOptions:
    """What to fill into a template; ``None`` keeps the template's own value.

    Attributes:
        nodes: ``#SBATCH --nodes``.
        tasks_per_node: ``#SBATCH --ntasks-per-node`` (MPI ranks per node).
        time: ``#SBATCH --time`` in a SLURM time format (``HH:MM:SS``, ``D-HH:MM``...).
        partition: ``#SBATCH --partition``.
        account: ``#SBATCH --account``.
        job_name: ``#SBATCH --job-name`` (also names the log and summary files).
        mpi: ``pmix`` or ``pmi2`` (``srun --mpi=...``), or ``mpiexec`` (the MPI's own
            launcher inside the allocation).
        env: the environment (venv prefix) where hpcckpt is installed.
        log_dir: directory of the job's ``.out``/``.err`` and JSON summary (must exist
            when the job starts: SLURM opens the log before the script runs).
        array: ``#SBATCH --array`` (e.g. ``0-7``); log names then carry the array index.
        settings: further ``(NAME, value)`` pairs for the settings block.
        sbatch: further ``(key, value)`` ``#SBATCH`` options, applied last.
        command: the command line that rendered this, recorded in the script.
    """

    nodes: int | None = None
    tasks_per_node: int | None = None
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    job_name: str | None = None
    mpi: str | None = None
    env: str | None = None
    log_dir: str | None = None
    array: str | None = None
    settings: tuple[tuple[str, str], ...] = ()
    sbatch: tuple[tuple[str, str], ...] = ()
    command: str | None = None

    def sbatch_options(self) -> list[tuple[str, str]]:
        """``(key, value)`` for every ``#SBATCH`` option these options set, in order."""
        for n, what in ((self.nodes, "nodes"), (self.tasks_per_node, "tasks per node")):
            if n is not None and n < 1:
                raise UsageError(f"{what} must be at least 1, got {n}")
        if self.time is not None and not _TIME_RE.match(self.time):
            raise UsageError(f"time {self.time!r} is not a SLURM time (minutes, HH:MM:SS, "
                             "D-HH:MM:SS, ...)")
        if self.array is not None and not _ARRAY_RE.match(self.array):
            raise UsageError(f"array {self.array!r} is not a SLURM array range (e.g. 0-7, "
                             "0-15%4)")
        opts = [("job-name", self.job_name), ("nodes", self.nodes),
                ("ntasks-per-node", self.tasks_per_node), ("time", self.time),
                ("partition", self.partition), ("account", self.account),
                ("array", self.array)]
        out = [(k, str(v)) for k, v in opts if v is not None]
        if self.log_dir is not None or self.array is not None:
            stem = f"{(self.log_dir or '.').rstrip('/') or '/'}/%x-" + (
                "%A_%a" if self.array is not None else "%j")
            out += [("output", stem + ".out"), ("error", stem + ".err")]
        for key, value in self.sbatch:
            if not _SBATCH_KEY_RE.match(key):
                raise UsageError(f"#SBATCH option {key!r}: expected a long option name "
                                 "without dashes, e.g. mem=16G or exclusive=")
            out.append((key, value))
        for key, value in out:
            if re.search(r"[\s#]", value):
                raise UsageError(f"#SBATCH --{key}={value!r}: sbatch reads no spaces or '#' "
                                 "in an option value")
        return out

    def setting_values(self) -> list[tuple[str, str]]:
        """``(NAME, value)`` for the settings block, in order."""
        out: list[tuple[str, str]] = []
        if self.mpi is not None:
            if self.mpi not in MPI_CHOICES:
                raise UsageError(f"mpi {self.mpi!r}: expected one of {', '.join(MPI_CHOICES)}")
            if self.mpi == "mpiexec":
                out.append(("HPCCKPT_LAUNCHER", "mpiexec"))
            else:
                out += [("HPCCKPT_LAUNCHER", "srun"), ("HPCCKPT_SRUN_MPI", self.mpi)]
        if self.env is not None:
            out.append(("HPCCKPT_ENV", self.env))
        if self.log_dir is not None:
            out.append(("HPCCKPT_LOG_DIR", self.log_dir))
        out += list(self.settings)
        for name, value in out:
            if name == "ARGS":
                raise UsageError("ARGS is the command's own arguments: give them after `--`")
            if "\n" in value or "\0" in value:
                raise UsageError(f"setting {name}: a value cannot hold a newline or NUL")
        return out


def template_dir() -> Path:
    """The installed templates (a link to the repository's ``jobs/`` in a source tree)."""
    return Path(__file__).resolve().parent / "templates"


def templates() -> dict[str, str]:
    """``{verb: description}`` for every template, the description being its first
    comment line."""
    out = {}
    for p in sorted(template_dir().glob("*.sbatch")):
        lines = p.read_text().splitlines()
        out[p.stem] = lines[1].lstrip("# ").strip() if len(lines) > 1 else ""
    return out


def read_template(verb: str) -> tuple[str, dict[str, str]]:
    """A template's text and the texts of the files it includes."""
    path = template_dir() / f"{verb}.sbatch"
    if not path.is_file():
        raise UsageError(f"no job template {verb!r}; templates: {', '.join(templates())}")
    text = path.read_text()
    includes = {}
    for line in text.splitlines():
        if INCLUDE_MARK in line:
            name = line.split(INCLUDE_MARK, 1)[1].strip()
            inc = template_dir() / name
            if "/" in name or not inc.is_file():
                raise UsageError(f"{path}: includes {name!r}, which is not in {template_dir()}")
            includes[name] = inc.read_text()
    return text, includes


def render(verb: str, args: Sequence[str] | None, options: JobOptions) -> str:
    """The batch script for ``hpcckpt VERB ARGS...`` as the template ``jobs/VERB.sbatch``
    filled in with ``options`` (see :func:`render_text`).

    Args:
        verb: a template name (``hpcckpt jobs list``).
        args: the command's own arguments (for ``save``: the training command), or
            ``None`` to keep the template's example.
        options: what else to fill in.

    Returns:
        The script's text.
    """
    text, includes = read_template(verb)
    return render_text(text, includes, args, options, name=f"{verb}.sbatch")


def render_text(template: str, includes: Mapping[str, str], args: Sequence[str] | None,
                options: JobOptions, name: str = "template") -> str:
    """Fill a template's text in (pure: the same inputs give the same bytes)."""
    lines = template.splitlines()
    if not lines or not lines[0].startswith("#!"):
        raise UsageError(f"{name}: a job template starts with a #! line")
    sbatch = dict(options.sbatch_options())
    settings = dict(options.setting_values())
    if args is not None:
        settings["ARGS"] = "(" + " ".join(shlex.quote(os.fspath(a)) for a in args) + ")"

    out = [lines[0]]
    if options.command:
        out.append(f"# rendered by: {options.command}")
    last_sbatch = 0
    in_settings = False
    seen_settings: set[str] = set()
    for line in lines[1:]:
        m = _SBATCH_RE.match(line)
        if m:
            key = m.group("key")
            if key in sbatch:
                line = _sbatch_line(key, sbatch.pop(key))
            out.append(line)
            last_sbatch = len(out)
            continue
        if line.strip() == SETTINGS_BEGIN:
            in_settings = True
        elif line.strip() == SETTINGS_END:
            in_settings = False
        elif in_settings and (s := _SETTING_RE.match(line)):
            setting = s.group("name")
            seen_settings.add(setting)
            if setting in settings:
                value = settings[setting]
                value = value if setting == "ARGS" else shlex.quote(value)
                line = _with_comment(f"{setting}={value}", line, s)
        elif INCLUDE_MARK in line:
            inc = line.split(INCLUDE_MARK, 1)[1].strip()
            out.extend(includes[inc].rstrip("\n").splitlines())
            continue
        out.append(line)
    unknown = [k for k in settings if k not in seen_settings]
    if unknown:
        raise UsageError(f"{name} has no setting {', '.join(unknown)}; its settings: "
                         f"{', '.join(sorted(seen_settings))}")
    out[last_sbatch:last_sbatch] = [_sbatch_line(k, v) for k, v in sbatch.items()]
    return "\n".join(out) + "\n"


def _sbatch_line(key: str, value: str) -> str:
    """``#SBATCH --key=value``; an empty value is a flag (``--exclusive``)."""
    return f"#SBATCH --{key}={value}" if value != "" else f"#SBATCH --{key}"


def _with_comment(assignment: str, original: str, m: re.Match) -> str:
    """``assignment`` with the original line's comment, at its column when it fits."""
    comment = m.group("comment")
    if not comment:
        return assignment
    text = comment.lstrip()
    column = len(original) - len(text)
    return assignment + " " * max(2, column - len(assignment)) + text
