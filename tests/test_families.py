"""The family catalog is the one list: the engine's tables, detection and the UI agree with it."""

from __future__ import annotations

from studio import families
from studio.families import FAMILIES, Kind


def test_every_catalog_sampler_and_schedule_exists_in_the_engine():
    from studio.engine.flow_samplers import FLOW_SAMPLERS
    from studio.engine.samplers import SAMPLERS, SCHEDULES

    assert set(families.DIFFUSION_SAMPLERS) == set(SAMPLERS)
    assert set(families.SCHEDULES) == set(SCHEDULES)
    assert set(families.FLOW_SAMPLERS) == set(FLOW_SAMPLERS)
    for f in FAMILIES.values():
        if f.runs and f.kind in (Kind.IMAGE, Kind.VIDEO):
            assert f.sampler in f.samplers, f.id
            assert f.samplers, f.id


def test_defaults_of_runnable_diffusion_families_are_complete():
    for f in FAMILIES.values():
        if f.runs and f.kind in (Kind.IMAGE, Kind.VIDEO):
            assert f.prediction in families.PREDICTIONS, f.id
            assert f.latent_channels > 0 and f.steps > 0 and f.cfg > 0, f.id
            w, h = f.size
            assert w % f.downsample == 0 and h % f.downsample == 0, f.id
            assert set(f.quant_modes) <= set(families.QUANT_LABELS), f.id
        if f.kind is Kind.VIDEO and f.runs:
            assert f.frames > 0 and f.fps > 0, f.id


def test_companions_name_catalog_families():
    for f in FAMILIES.values():
        for c in f.companions:
            assert c.family in FAMILIES, (f.id, c.family)


def test_lookup_helpers():
    assert families.by_alias("gemma3_text").id == "gemma3"
    assert families.by_alias("mistral3").id == "mistral"
    assert families.by_alias("nonsense") is None
    assert families.by_pipeline_class("StableDiffusionXLPipeline").id == families.SDXL
    assert families.size_presets(families.SD2, "eps")[0] == (512, 512)
    assert families.size_presets(families.SD2, "v")[0] == (768, 768)
    assert families.size_presets(families.SDXL)[0] == (1024, 1024)
    assert families.ids(Kind.VIDEO, runnable=True) == (families.WAN,)
    try:
        families.get("nope")
    except KeyError as exc:
        assert "known:" in str(exc)
    else:
        raise AssertionError("unknown family accepted")
