"""Surrogates from the memorizing model alone (dori.mitigations.self_surrogates), on the tiny model."""

import pytest
import torch
import torch.nn.functional as F

from dori.data.sets import Item
from dori.errors import DoriError
from dori.mitigations.self_surrogates import SelfSurrogates, surrogate_summary
from dori.mitigations.surrogates import SurrogateSet, load_surrogates
from dori.models.pipeline import SamplingConfig


def _copy(images):
    x = F.interpolate(images.float(), size=(8, 8), mode="area").flatten(1)
    return F.normalize(x - x.mean(1, keepdim=True), dim=1)


def similarity(generated, reference):
    return (_copy(generated) * _copy(reference)).sum(-1)


class Aligner:
    name = "fake-clip"

    def image_features(self, images):
        return F.normalize(images.float().mean((2, 3)), dim=1)

    def text_features(self, prompts):
        return F.normalize(torch.tensor([[len(p) % 5 + 1.0, 1.0, 2.0] for p in prompts]), dim=1)


@pytest.fixture(scope="module")
def memorized(tiny):
    """Items whose training image IS the model's own generation from the caption (seed 0): a replica exists."""
    prompts = ["red round thing", "blue square box", "a green tall tree", "mug"]
    images = tiny.generate(prompts, [0] * len(prompts), SamplingConfig(steps=2))
    return [Item(f"m{i}", p).with_image(img) for i, (p, img) in enumerate(zip(prompts, images, strict=True))]


def test_every_item_gets_surrogates_under_the_threshold(tiny, memorized):
    policy = SelfSurrogates(per_item=3, candidates=2, rounds=2, sample_steps=2)
    # a threshold that calls a good part of the model's own generations replicas
    probe = tiny.generate(
        [it.prompt for it in memorized], [100_001] * len(memorized), SamplingConfig(steps=2)
    )
    threshold = float(similarity(probe, torch.stack([it.image for it in memorized])).median())
    surr = policy(tiny, memorized, similarity, threshold, aligner=Aligner())
    assert set(surr.images) == {it.id for it in memorized} and not surr.failed
    for it in memorized:
        imgs = surr.images[it.id]
        assert 1 <= imgs.shape[0] <= 3
        measured = similarity(imgs, it.image.unsqueeze(0).expand_as(imgs))
        assert (measured < threshold).all()  # the recorded values are the measured ones, all under
        assert surr.similarity[it.id] == pytest.approx(measured.tolist(), abs=1e-5)
        assert len(surr.alignment[it.id]) == imgs.shape[0] and None not in surr.alignment[it.id]
        assert all(s.split("-")[0] in ("prompt", "drop", "noise") for s in surr.source[it.id])
    summary = surrogate_summary(surr, threshold)
    assert summary["all_under_threshold"] and summary["n_items"] == len(memorized)


def test_a_candidate_that_replicates_is_never_kept(tiny, memorized):
    # a detector that calls every candidate (escape round included) a replica: nothing is kept, the item is failed
    def strict(generated, reference):
        return similarity(generated, reference) * 0 + 1.0

    policy = SelfSurrogates(per_item=2, candidates=1, rounds=1, sample_steps=2, sources=("prompt",))
    surr = policy(tiny, memorized[:2], strict, 0.5)
    assert surr.images == {} and set(surr.failed) == {"m0", "m1"}  # every candidate is a replica: none kept
    assert "replica" in surr.failed["m0"]


def test_surrogate_set_keeps_alignment_and_source_on_disk(tmp_path, tiny, memorized):
    surr = SelfSurrogates(per_item=2, candidates=2, rounds=1, sample_steps=2)(
        tiny, memorized[:2], similarity, 2.0, aligner=Aligner()
    )
    surr.save(tmp_path / "s", {"policy": "self"})
    back = load_surrogates(tmp_path / "s", memorized[:2], size=tiny.image_size)
    assert back.alignment == surr.alignment and back.source == surr.source
    assert back.similarity == surr.similarity
    merged = SurrogateSet()
    merged.merge(back)
    assert merged.source == back.source


def test_bad_settings_are_refused():
    with pytest.raises(DoriError):
        SelfSurrogates(per_item=0)
    with pytest.raises(DoriError):
        SelfSurrogates(sources=("nemo",))
