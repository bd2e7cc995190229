"""The demo report's opening sentences follow the run's numbers."""

from dori.report.story import story_sentences, verdict


def _rows(**mr):
    return {
        k.replace("_", "+").replace("+random", "-random"): {"mr": v, "n_items": 10} for k, v in mr.items()
    }


def test_verdicts_follow_the_numbers():
    assert verdict(0.5, [0.6]) == "kept"
    assert verdict(0.0, [0.6]) == "hid"
    assert verdict(0.0, [0.1, 0.0]) == "removed"
    assert verdict(0.0, [0.2, 0.0], bound=0.25) == "removed"


def test_sentences_say_which_mitigation_hid_and_which_removed():
    rows = _rows(none=0.9, nemo=0.6, nemo_dori=0.5, wanda=0.0, wanda_dori=0.7, advft=0.0, advft_dori=0.1,
                 advft_dori_random=0.0, nonmem_dori=0.3)  # fmt: skip
    text = " ".join(story_sentences(rows))
    assert "replicates 9 of 10" in text
    assert "NeMo does not stop replication" in text and "6 of 10" in text
    assert "Wanda hides the images" in text and "7 of 10 from the captions' embeddings" in text
    assert "Adversarial fine-tuning removes them" in text and "0 of 10 from random embeddings" in text
    assert "3 of 10 never-memorized" in text
    # other numbers, other story: fine-tuning that Dori breaks is reported as hiding
    rows["advft+dori-random"]["mr"] = 0.4
    assert "Adversarial fine-tuning hides the images" in " ".join(story_sentences(rows))


def test_utility_sentence_and_missing_rows():
    rows = _rows(none=0.5)
    rows["utility.none"] = {"a_clip": {"median": 0.86}, "fid": 6.0}
    rows["utility.advft"] = {"a_clip": {"median": 0.85}, "fid": 6.6}
    out = story_sentences(rows)
    assert len(out) == 2 and "0.860 before, 0.850 after" in out[1] and "FID 6.00 before, 6.60 after" in out[1]
    assert story_sentences({}) == []
