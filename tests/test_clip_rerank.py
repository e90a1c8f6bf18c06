"""CLIP scoring and reranking with a small random-init open_clip model (no weight files)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

# a skip, not a collection error, where open_clip is not installed (a GPU node running `pytest -m gpu`)
open_clip = pytest.importorskip("open_clip")

from tessera.clip_rerank import ClipScorer, rerank  # noqa: E402

@pytest.fixture(scope="module")
def scorer(tiny_clip) -> ClipScorer:
    name, weights = tiny_clip
    return ClipScorer(name, weights)


def test_scores_are_the_cosine_of_clip_image_and_text_features(scorer):
    images = torch.rand(3, 3, 48, 48) * 2 - 1
    captions = ["a red circle", "a blue square", "two green triangles"]
    pixels = F.interpolate((images + 1) / 2, size=(32, 32), mode="bicubic", antialias=True, align_corners=False)
    image_features = scorer.model.encode_image((pixels - scorer.mean) / scorer.std)
    text_features = scorer.model.encode_text(open_clip.get_tokenizer(scorer.model_name)(captions))
    expected = F.cosine_similarity(image_features, text_features)
    torch.testing.assert_close(scorer(images, captions), expected, rtol=1e-4, atol=1e-5)


def test_rerank_keeps_the_best_candidates_of_each_prompt_best_first(scorer):
    prompts = ["a red circle", "a blue square"]
    images = torch.rand(2 * 5, 3, 32, 32) * 2 - 1
    scores = scorer(images, [p for p in prompts for _ in range(5)]).view(2, 5)
    kept, kept_scores = rerank(images, prompts, candidates=5, keep=2, scorer=scorer)
    assert kept.shape == (4, 3, 32, 32)
    for prompt in range(2):
        order = scores[prompt].argsort(descending=True)[:2]
        torch.testing.assert_close(kept_scores[prompt], scores[prompt][order])
        for rank, candidate in enumerate(order):
            assert torch.equal(kept[prompt * 2 + rank], images[prompt * 5 + candidate])


def test_missing_clip_weights_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.bin"):
        ClipScorer("ViT-B-32-quickgelu", tmp_path / "nowhere.bin")


def test_rerank_refuses_a_count_that_does_not_add_up(scorer):
    with pytest.raises(ValueError, match="candidates"):
        rerank(torch.zeros(5, 3, 32, 32), ["a", "b"], candidates=3, keep=1, scorer=scorer)
