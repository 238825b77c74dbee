"""Diffusion pipelines: one skeleton (skeleton.py) and a small module per family (sd.py, wan.py).

A new diffusion family is its model file(s) in studio/models, its catalog entry in studio/families,
one module here that supplies its parts and steps to the skeleton, and its tests.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import torch

from studio import families
from studio.engine.context import JobContext, UserError
from studio.engine.pipelines.diffusion.skeleton import run_diffusion
from studio.engine.resolve import resolve_generator


def pipeline_for(model: str, kind: families.Kind) -> ModuleType:
    """The family module that runs a job on `model`, chosen through the catalog from the file's headers.
    A file whose family cannot be read goes to the kind's first pipeline, whose loader says what is wrong."""
    from studio.library.detect import detect
    from studio.library.headers import HeaderError

    path = resolve_generator(model, kind.value)
    try:
        family = families.FAMILIES.get(detect(path).family)
    except HeaderError:
        family = None
    if family is not None and family.kind in (families.Kind.IMAGE, families.Kind.VIDEO):
        if family.kind is not kind:
            raise UserError("bad_model", f"{path.name} is a {family.label} {family.kind.value} model, not "
                            f"{'an' if kind.value[0] in 'aeiou' else 'a'} {kind.value} model: use it in the "
                            f"{family.kind.value.title()} tab or with `studio generate {family.kind.value}`.")
        if not family.pipeline:
            runnable = ", ".join(families.label(f) for f in families.ids(kind, runnable=True))
            raise UserError("unsupported", f"{path.name} is a {family.label} model. Studio recognises it but cannot "
                            f"run {family.label} yet; {kind.value} models it runs today: {runnable}.")
        name = family.pipeline
    else:
        name = families.FAMILIES[families.ids(kind, runnable=True)[0]].pipeline
    return importlib.import_module(f"{__name__}.{name}")


@torch.inference_mode()
def run_generation(job: Any, ctx: JobContext, kind: families.Kind) -> Any:
    """An image or video job through the skeleton, with the family module the catalog names."""
    return run_diffusion(job, ctx, pipeline_for(job.model, kind).FAMILY)
