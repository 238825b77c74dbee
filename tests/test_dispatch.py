"""Image and video jobs reach their family's pipeline module through the catalog, by the file's headers."""

from __future__ import annotations

import dataclasses

import pytest
from library_fixtures import FLUX, SDXL_UNET, pre, write_safetensors

from studio import families
from studio.engine.context import UserError
from studio.engine.pipelines.diffusion import pipeline_for
from studio.families import Kind


def test_an_sdxl_file_runs_through_the_sd_module(tmp_path):
    path = write_safetensors(tmp_path / "x.safetensors", pre("model.diffusion_model.", SDXL_UNET))
    assert pipeline_for(str(path), Kind.IMAGE).__name__.endswith(".sd")


def test_an_image_model_given_to_the_video_tab_is_refused_naming_the_image_tab(tmp_path):
    path = write_safetensors(tmp_path / "x.safetensors", pre("model.diffusion_model.", SDXL_UNET))
    with pytest.raises(UserError) as exc:
        pipeline_for(str(path), Kind.VIDEO)
    assert exc.value.kind == "bad_model" and "Image tab" in str(exc.value)


def test_a_recognised_family_without_a_pipeline_says_so_and_lists_what_runs(tmp_path, monkeypatch):
    flux = dataclasses.replace(families.FAMILIES[families.FLUX], pipeline="", runs=False)
    monkeypatch.setitem(families.FAMILIES, families.FLUX, flux)
    path = write_safetensors(tmp_path / "flux.safetensors", FLUX)
    with pytest.raises(UserError) as exc:
        pipeline_for(str(path), Kind.IMAGE)
    assert exc.value.kind == "unsupported"
    assert "Flux" in str(exc.value) and "SDXL" in str(exc.value)


def test_a_file_without_readable_headers_goes_to_the_kinds_first_pipeline(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x00" * 16)
    assert pipeline_for(str(path), Kind.IMAGE).__name__.endswith(".sd")
    assert pipeline_for(str(path), Kind.VIDEO).__name__.endswith(".wan")


def test_every_runnable_diffusion_family_names_a_module_with_a_family_object():
    import importlib

    for f in families.FAMILIES.values():
        if f.runs and f.kind in (Kind.IMAGE, Kind.VIDEO):
            module = importlib.import_module(f"studio.engine.pipelines.diffusion.{f.pipeline}")
            assert hasattr(module.FAMILY, "generate"), f.id
