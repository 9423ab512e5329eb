"""SLURM batch scripts for hpcckpt: the templates in the repository's ``jobs/`` (installed
with the package as ``hpcckpt/jobs/templates``) and their rendering (pure, no MPI)."""
from .render import JobOptions, read_template, render, template_dir, templates

__all__ = ["JobOptions", "read_template", "render", "template_dir", "templates"]
