"""FID, CLIP score, the evaluation callbacks and `tessera evaluate coco|fid|stats`, on CPU with
random-init feature networks (no Inception or CLIP weight files)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from torch.utils.data import DataLoader

from tessera.clip_score import ClipScore, clip_scores, cosine_similarity
from datamodules.image_folder import reference_statistics
from tessera.fid import FeatureStats, FrechetDistance, frechet_distance
from tests.distributed import as_launched_rank, run_distributed
from tests.test_prior import Tokens, shapes_data, tiny_prior, tokenizer_dir  # noqa: F401 (tokenizer_dir: a fixture)
from tests.test_vqgan import trainer


class TinyFeatures(nn.Module):
    """A random-init conv net in place of Inception: (B, 3, H, W) uint8 -> (B, 8) features."""

    num_features = 8

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(images.float() / 127.5 - 1))
        return self.conv2(x).mean((2, 3))  # (B, 8)


def tiny_extractor() -> TinyFeatures:
    """The same random weights every call (also what `--feature-extractor tests.test_evaluation:tiny_extractor` loads)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return TinyFeatures()


def image_set(count: int, seed: int, low: int = 0, high: int = 256, size: int = 24) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (count, 3, size, size), generator=generator, dtype=torch.uint8)


def fid_of(real: torch.Tensor, fake: torch.Tensor) -> float:
    metric = FrechetDistance(tiny_extractor(), extractor_id="tiny")
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return float(metric.compute())


# --- the distance -------------------------------------------------------------------------


def test_fid_of_a_set_against_itself_is_zero_and_fid_is_symmetric():
    a, b = image_set(64, 0), image_set(64, 1, low=60)
    assert abs(fid_of(a, a)) < 1e-9
    ab, ba = fid_of(a, b), fid_of(b, a)
    assert ab > 1e-3
    assert ab == pytest.approx(ba, rel=1e-9)


def numpy_frechet(x: np.ndarray, y: np.ndarray) -> float:
    """pytorch-fid's formula, independently: numpy covariances, Tr sqrt(S1 S2) from the eigenvalues of the product."""
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    trace_sqrt = np.sqrt(np.linalg.eigvals(s1 @ s2).astype(complex)).real.sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt)


def test_fid_equals_an_independent_numpy_frechet_distance_and_torchmetrics_on_the_same_features():
    from torchmetrics.image.fid import FrechetInceptionDistance

    real, fake = image_set(120, 2), image_set(100, 3, low=40)
    extractor = tiny_extractor()
    with torch.no_grad():
        x, y = extractor(real).double().numpy(), extractor(fake).double().numpy()
    ours = fid_of(real, fake)
    assert ours == pytest.approx(numpy_frechet(x, y), rel=1e-6)
    try:
        from scipy import linalg
    except ImportError:
        pass
    else:
        s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
        scipy_fid = ((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
        assert ours == pytest.approx(scipy_fid, rel=1e-6)
    reference = FrechetInceptionDistance(feature=tiny_extractor())
    reference.update(real, real=True)
    reference.update(fake, real=False)
    assert ours == pytest.approx(float(reference.compute()), rel=1e-5)  # torchmetrics returns float32


def _fid_on_rank(rank: int, world_size: int, real: torch.Tensor, fake: torch.Tensor) -> tuple[float, int]:
    metric = FrechetDistance(tiny_extractor(), extractor_id="tiny")
    metric.update(real[rank::world_size], real=True)  # each rank extracts its share
    metric.update(fake[rank::world_size], real=False)
    return float(metric.compute()), metric.statistics(real=False).count


def test_a_two_process_fid_equals_the_one_process_fid():
    real, fake = image_set(40, 4), image_set(36, 5, low=50)
    results = run_distributed(_fid_on_rank, real, fake, world_size=2)
    expected = fid_of(real, fake)
    for value, count in results:
        assert value == pytest.approx(expected, rel=1e-9) and count == 36


def write_images(directory: Path, images: torch.Tensor) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(directory / f"{index:03d}.png")
    return directory


def test_cached_reference_statistics_equal_fresh_ones_and_name_their_extractor(tmp_path):
    folder = write_images(tmp_path / "real", image_set(20, 6))
    metric = FrechetDistance(tiny_extractor(), extractor_id="tiny", image_size=24)
    fresh = reference_statistics(metric, folder, tmp_path / "stats.pt", workers=0)
    cached = reference_statistics(metric, folder, tmp_path / "stats.pt", workers=0)
    assert torch.equal(cached.mean, fresh.mean) and torch.equal(cached.cov, fresh.cov) and cached.count == 20
    state = torch.load(tmp_path / "stats.pt", weights_only=True)
    assert state["extractor"] == "tiny" and state["preprocessing"]["image_size"] == 24 and state["mean"].dtype == torch.float64
    # the cache is the statistics of the same images through the metric's own update
    direct = FrechetDistance(tiny_extractor(), extractor_id="tiny", image_size=24)
    direct.update(image_set(20, 6), real=True)
    torch.testing.assert_close(direct.statistics(real=True).cov, fresh.cov, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="made with extractor 'tiny'"):
        FeatureStats.load(tmp_path / "stats.pt", extractor="inception")
    with pytest.raises(ValueError, match="preprocessing"):
        reference_statistics(FrechetDistance(tiny_extractor(), extractor_id="tiny", image_size=32), folder, tmp_path / "stats.pt")


def test_missing_inception_weights_are_one_error_naming_the_file(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.pth.*weights-inception-2015-12-05-6726825d\.pth.*github"):
        FrechetDistance(inception_weights=tmp_path / "nowhere.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "torch" / "hub" / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth")):
        FrechetDistance()


class InceptionStub(nn.Module):
    """Stands in for torchmetrics' Inception, whose weights are a 92 MB download: loads a (3, 2048)
    projection from the weights file it is given and maps uint8 images to 2048 features of their mean colour."""

    def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: str, antialias: bool = True):
        super().__init__()
        self.register_buffer("projection", torch.load(feature_extractor_weights_path, weights_only=True))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.float().mean((2, 3)) @ self.projection  # (B, 2048)


@pytest.fixture
def inception_files(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """Two different Inception weights files, which FrechetDistance(inception_weights=...) loads into the stub."""
    import torchmetrics.image.fid

    monkeypatch.setattr(torchmetrics.image.fid, "NoTrainInceptionV3", InceptionStub)
    files = (tmp_path / "inception_a.pth", tmp_path / "inception_b.pth")
    for seed, path in enumerate(files):
        torch.save(torch.randn(3, 2048, generator=torch.Generator().manual_seed(seed)), path)
    return files


def test_statistics_and_their_cache_carry_the_inception_weights_sha256_and_other_weights_are_refused(tmp_path, inception_files):
    from tessera.fid import INCEPTION_ID, sha256

    weights, other_weights = inception_files
    folder = write_images(tmp_path / "real", image_set(6, 0))
    metric = FrechetDistance(inception_weights=weights, image_size=24)
    assert metric.extractor_id == INCEPTION_ID and metric.weights_sha256 == sha256(weights)
    stats = reference_statistics(metric, folder, tmp_path / "stats.pt", workers=0)
    assert stats.weights_sha256 == torch.load(tmp_path / "stats.pt", weights_only=True)["weights_sha256"] == sha256(weights)

    other = FrechetDistance(inception_weights=other_weights, image_size=24)  # the same extractor name, other weights
    expected = (rf"stats\.pt were made with feature weights of sha256 {sha256(weights)}.*"
                rf"now have sha256 {sha256(other_weights)}.*--inception-weights.*delete")
    with pytest.raises(ValueError, match=expected):
        reference_statistics(other, folder, tmp_path / "stats.pt", workers=0)
    with pytest.raises(ValueError, match="feature weights"):
        other.set_reference(stats)
    state = torch.load(tmp_path / "stats.pt", weights_only=True)
    del state["weights_sha256"]  # a cache written before the weights were recorded
    torch.save(state, tmp_path / "old.pt")
    with pytest.raises(ValueError, match=f"sha256 not recorded.*now have sha256 {sha256(weights)}"):
        metric.load_statistics(tmp_path / "old.pt")


# --- CLIP score ---------------------------------------------------------------------------


def test_both_clip_score_conventions_on_hand_made_embeddings():
    image_features = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [3.0, 4.0]])
    text_features = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, -1.0], [4.0, 3.0]])
    cosines = cosine_similarity(image_features, text_features)
    torch.testing.assert_close(cosines, torch.tensor([1.0, 0.0, -1.0, 0.96], dtype=torch.float64))
    scores = clip_scores(cosines)
    assert scores["clip_cosine"] == pytest.approx(0.96 / 4)
    assert scores["clip_score"] == pytest.approx(100 * 1.96 / 4)  # 100 * max(cos, 0)
    metric = ClipScore()
    metric.update(cosines[:3])
    metric.update(cosines[3:])
    assert metric.compute() == pytest.approx({"clip_cosine": 0.96 / 4, "clip_score": 49.0, "count": 4})


# --- callbacks ----------------------------------------------------------------------------


def test_fid_and_clip_callbacks_log_every_second_validation_run(tmp_path, tokenizer_dir, shapes_dir, tiny_clip):  # noqa: F811
    from callbacks.evaluation import CLIPScoreCallback, FIDCallback

    clip_model, clip_weights = tiny_clip
    fid = FIDCallback(every_n_val_runs=2, num_samples=12, feature_extractor=tiny_extractor(), top_k=8)
    clip = CLIPScoreCallback(str(clip_weights), clip_model, caption_prefix="A photo depicts ", every_n_val_runs=2, num_samples=6, top_k=8)
    prior = tiny_prior(tokenizer_dir)
    run = trainer(tmp_path, max_steps=1, callbacks=[fid, clip], limit_val_batches=3)
    first = run.validate(prior, datamodule=shapes_data(shapes_dir, batch_size=8), verbose=False)[0]
    assert "val/fid" not in first and "val/clip_cosine" not in first
    second = run.validate(prior, datamodule=shapes_data(shapes_dir, batch_size=8), verbose=False)[0]
    assert second["val/fid"] > 0 and second["val/fid_samples"] == 12
    assert -1 <= second["val/clip_cosine"] <= 1 and 100 * max(second["val/clip_cosine"], 0) <= second["val/clip_score"] <= 100
    assert fid.reference is not None and fid.reference.count == 12  # kept: later runs extract generated images only
    assert set(fid.state_dict()) == {"val_runs", "reference"} and fid.state_dict()["val_runs"] == 2


def test_fid_callback_measures_a_tokenizers_reconstructions(tmp_path, shapes_dir):
    from callbacks.evaluation import FIDCallback
    from tessera.nn.autoencoder import AutoencoderConfig
    from tessera.nn.vector_quantizer import VectorQuantizer
    from tests.test_vqgan import tiny_vqgan

    torch.manual_seed(0)
    vqgan = tiny_vqgan(image_size=32, quantizer=VectorQuantizer(dim=4, codebook_size=64),
                       autoencoder=AutoencoderConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, image_size=32))
    rfid = FIDCallback(num_samples=8, feature_extractor=tiny_extractor(), name="val/rfid")
    logged = trainer(tmp_path, max_steps=1, callbacks=[rfid], limit_val_batches=1).validate(
        vqgan, datamodule=shapes_data(shapes_dir, batch_size=8), verbose=False)[0]
    assert logged["val/rfid"] > 0 and logged["val/rfid_samples"] == 8


def test_fid_callback_recomputes_a_kept_reference_made_with_other_feature_weights(tmp_path, shapes_dir):
    from callbacks.evaluation import FIDCallback
    from tessera.nn.autoencoder import AutoencoderConfig
    from tessera.nn.vector_quantizer import VectorQuantizer
    from tests.test_vqgan import tiny_vqgan

    torch.manual_seed(0)
    vqgan = tiny_vqgan(image_size=32, quantizer=VectorQuantizer(dim=4, codebook_size=64),
                       autoencoder=AutoencoderConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, image_size=32))
    rfid = FIDCallback(num_samples=8, feature_extractor=tiny_extractor(), name="val/rfid")
    # as a resumed run's state holds it: the statistics of other weights (or of a state saved before they were recorded)
    rfid.load_state_dict({"val_runs": 0, "reference": {"mean": torch.zeros(8, dtype=torch.float64), "cov": torch.eye(8, dtype=torch.float64),
                          "count": 100, "extractor": "tests.test_evaluation.TinyFeatures", "weights_sha256": "0" * 64}})
    with pytest.warns(UserWarning, match="other feature weights|recomputing"):
        trainer(tmp_path, max_steps=1, callbacks=[rfid], limit_val_batches=1).validate(
            vqgan, datamodule=shapes_data(shapes_dir, batch_size=8), verbose=False)
    assert rfid.reference.count == 8 and rfid.reference.weights_sha256 is None
    assert rfid.state_dict()["reference"]["weights_sha256"] is None


def _evaluate_under_ddp_and_fsdp2(rank: int, world_size: int, root: str, tokenizer_dir: str, shapes_dir: str,
                                  clip_config: str, clip_weights: str) -> dict:
    import open_clip
    from lightning.pytorch.strategies import DDPStrategy

    from callbacks.evaluation import CLIPScoreCallback, FIDCallback
    from lightning_modules.fsdp import AtomicModelParallelStrategy
    from tests.conftest import TINY_CLIP

    torch.set_num_threads(1)
    as_launched_rank(rank, world_size)
    open_clip.add_model_config(clip_config)  # the fixture registered it in the parent process only
    logged = {}
    for name, strategy in (("ddp", DDPStrategy()), ("fsdp2", AtomicModelParallelStrategy())):
        # 9 samples: 5 on rank 0 (4 + 1), 4 on rank 1 (4 + 0): rank 1 joins rank 0's second batch
        callbacks = [FIDCallback(num_samples=9, feature_extractor=tiny_extractor(), top_k=8),
                     CLIPScoreCallback(clip_weights, TINY_CLIP, num_samples=9, top_k=8)]
        run = trainer(Path(root) / name, max_steps=1, devices=2, strategy=strategy, callbacks=callbacks, limit_val_batches=3)
        metrics = run.validate(tiny_prior(tokenizer_dir), datamodule=shapes_data(Path(shapes_dir), batch_size=4), verbose=False)[0]
        logged[name] = {key: float(value) for key, value in metrics.items() if key.startswith(("val/fid", "val/clip"))}
    return logged


@pytest.mark.slow
def test_under_fsdp2_the_evaluation_callbacks_sample_each_ranks_share_and_log_what_ddp_logs(
    tmp_path, tokenizer_dir, shapes_dir, tiny_clip  # noqa: F811
):
    clip_model, clip_weights = tiny_clip
    ranks = run_distributed(_evaluate_under_ddp_and_fsdp2, str(tmp_path), str(tokenizer_dir), str(shapes_dir),
                            str(clip_weights.parent / f"{clip_model}.json"), str(clip_weights))
    for rank in ranks:
        assert rank["ddp"]["val/fid_samples"] == 9 and set(rank["fsdp2"]) == set(rank["ddp"]) == {
            "val/fid", "val/fid_samples", "val/clip_cosine", "val/clip_score"}
        assert rank["fsdp2"] == pytest.approx(rank["ddp"], rel=1e-6)


def test_sampling_callbacks_refuse_fsdp1_naming_fsdp2(tokenizer_dir):  # noqa: F811
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    from callbacks.evaluation import FIDCallback
    from callbacks.samples import SampleLogger

    fsdp1 = SimpleNamespace(strategy=FSDPStrategy())
    for callback in (SampleLogger(["a red circle"]), FIDCallback(feature_extractor=tiny_extractor())):
        with pytest.raises(ValueError, match=rf"{type(callback).__name__} cannot sample under FSDPStrategy.*FSDP2"):
            callback.setup(fsdp1, tiny_prior(tokenizer_dir), "validate")


# --- tessera evaluate coco ----------------------------------------------------------------


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> tuple[Path, Path]:
    """A COCO-format val set: 10 JPEGs of assorted sizes, 2-5 captions each, one image without captions."""
    root = tmp_path_factory.mktemp("coco")
    (root / "val2014").mkdir()
    rng = random.Random(0)
    words = ["red", "blue", "circle", "square", "two", "small", "on", "a", "green", "triangle"]
    images, annotations = [], []
    for n in range(10):
        image_id = 1000 + 7 * n
        name = f"COCO_val2014_{image_id:012d}.jpg"
        width, height = rng.randint(36, 60), rng.randint(36, 60)
        pixels = np.random.default_rng(n).integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "val2014" / name, quality=90)
        images.append({"license": 1, "file_name": name, "coco_url": "", "height": height, "width": width,
                       "date_captured": "2013-11-14 16:28:13", "flickr_url": "", "id": image_id})
        for _ in range(0 if n == 9 else rng.randint(2, 5)):
            annotations.append({"image_id": image_id, "id": 50_000 + len(annotations),
                                "caption": " ".join(rng.choice(words) for _ in range(5)) + ". "})
    document = {"info": {"description": "tiny COCO"}, "images": images, "licenses": [], "annotations": annotations}
    (root / "captions_val2014.json").write_text(json.dumps(document))
    return root / "captions_val2014.json", root / "val2014"


@pytest.fixture(scope="module")
def prior_checkpoint(tmp_path_factory, tokenizer_dir) -> Path:  # noqa: F811
    directory = tmp_path_factory.mktemp("prior")
    prior = tiny_prior(tokenizer_dir)
    fit = trainer(directory, max_steps=1)
    fit.fit(prior, DataLoader(Tokens(prior), batch_size=8))
    fit.save_checkpoint(directory / "prior.ckpt")
    return directory / "prior.ckpt"


def pngs(out: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted((out / "samples").glob("*.png"))}


class CountGenerate:
    def __init__(self, monkeypatch):
        from lightning_modules.prior import TextImagePrior

        self.calls, original = 0, TextImagePrior.generate

        def generate(module, *args, **kwargs):
            self.calls += 1
            return original(module, *args, **kwargs)

        monkeypatch.setattr(TextImagePrior, "generate", generate)


def test_coco_command_end_to_end_deterministic_and_resumable(tmp_path, coco, prior_checkpoint, tiny_clip, monkeypatch):
    from tessera.commands.cli import main
    from tessera.commands.evaluate_coco import evaluate_coco
    from tessera.fid import sha256

    annotations, images = coco
    clip_model, clip_weights = tiny_clip
    argv = ["evaluate", "coco", "--prior", str(prior_checkpoint), "--annotations", str(annotations), "--images", str(images),
            "--num-samples", "6", "--seed", "3", "--batch-size", "4", "--top-k", "8", "--cfg-scale", "2",
            "--clip-model", clip_model, "--clip-weights", str(clip_weights), "--caption-prefix", "A photo depicts ",
            "--feature-extractor", "tests.test_evaluation:tiny_extractor", "--image-size", "32", "--workers", "0"]
    out = tmp_path / "run"
    assert main(argv + ["--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["count"] == 6 and results["fid"] > 0 and -1 <= results["clip_cosine"] <= 1
    assert results["clip_score"] >= 0 and "val2014" in results["protocol"]["reference"] and "10 images" in results["protocol"]["reference"]
    assert results["sampler"]["cfg_scale"] == 2.0 and results["sampler"]["candidates"] == 1 and results["protocol"]["reranking"] == "none"
    assert results["checkpoint_sha256"] == sha256(prior_checkpoint) and results["images_generated_this_run"] == 6
    assert results["protocol"]["feature_extractor"] == "tests.test_evaluation:tiny_extractor"
    assert Image.open(out / "grid.png").size == (6 * 32 + 7 * 2, 32 + 2 * 2)  # up to 8 a row
    first = pngs(out)
    assert sorted(first) == [f"{i:06d}.png" for i in range(6)] and first["000000.png"].shape == (32, 32, 3)

    # the same command into another folder: the same images and numbers
    assert main(argv + ["--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert again["fid"] == results["fid"] and again["clip_cosine"] == results["clip_cosine"]
    for name, pixels in pngs(tmp_path / "again").items():
        np.testing.assert_array_equal(pixels, first[name])

    # interrupted: two images lost; the rerun draws only the one batch that holds them
    (out / "samples" / "000004.png").unlink()
    (out / "samples" / "000005.png").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "samples").glob("*.png")}
    counter = CountGenerate(monkeypatch)
    assert main(argv + ["--out", str(out)]) == 0
    assert counter.calls == 1
    assert {p.name: p.stat().st_mtime_ns for p in (out / "samples").glob("00000[0-3].png")} == kept
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["images_generated_this_run"] == 2 and resumed["fid"] == results["fid"]
    for name, pixels in pngs(out).items():
        np.testing.assert_array_equal(pixels, first[name])
    assert main(argv + ["--out", str(out)]) == 0 and counter.calls == 1  # complete: nothing drawn

    # two ranks (rank 1 first, then rank 0 waits for nothing): the same images and FID
    common = dict(annotations=annotations, num_samples=6, seed=3, batch_size=4, top_k=8, cfg_scale=2.0,
                  extractor=tiny_extractor(), extractor_id="tests.test_evaluation:tiny_extractor", image_size=32, workers=0)
    two = tmp_path / "two"
    assert evaluate_coco(prior_checkpoint, two, images, rank=1, world_size=2, **common) is None
    assert sorted(pngs(two)) == ["000004.png", "000005.png"]
    two_results = evaluate_coco(prior_checkpoint, two, images, rank=0, world_size=2, wait_timeout=5, **common)
    assert two_results["fid"] == pytest.approx(results["fid"], rel=1e-12)
    for name, pixels in pngs(two).items():
        np.testing.assert_array_equal(pixels, first[name])

    with pytest.raises(ValueError, match="other settings.*sampler"):
        evaluate_coco(prior_checkpoint, two, images, **{**common, "cfg_scale": 1.0})


@pytest.mark.parametrize("missing", ["clip_weights", "images", "tokenizer"])
def test_coco_checks_every_input_file_before_loading_the_prior(tmp_path, coco, monkeypatch, missing):
    import lightning_modules.llm
    from tessera.commands.evaluate_coco import evaluate_coco

    def load(*args, **kwargs):
        raise AssertionError("the prior was read before every input was checked")

    for name in ("load_image_generator", "image_generator_config"):
        monkeypatch.setattr(lightning_modules.llm, name, load)
    annotations, images = coco
    (tmp_path / "prior.ckpt").write_bytes(b"never read")
    inputs = {"clip_weights": tmp_path / "clip.pt", "images": images, "tokenizer": None, **{missing: tmp_path / "nowhere"}}
    if missing != "clip_weights":
        inputs["clip_weights"].write_bytes(b"never read")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        evaluate_coco(tmp_path / "prior.ckpt", tmp_path / "out", annotations=annotations, num_samples=4,
                      extractor=tiny_extractor(), workers=0, **inputs)
    assert not (tmp_path / "out").exists()  # no settings pinned, no sample drawn


def test_coco_records_the_inception_weights_sha256_and_refuses_a_cache_of_other_weights_before_sampling(
    tmp_path, coco, prior_checkpoint, inception_files, monkeypatch
):
    import tessera.fid
    from tessera.commands.evaluate_coco import evaluate_coco
    from tessera.fid import sha256

    # the distance itself is tested above; a 2048-wide eigendecomposition takes ~20 s on one busy core
    monkeypatch.setattr(tessera.fid, "frechet_distance", lambda real, fake: 1.0)
    weights, other_weights = inception_files
    annotations, images = coco
    common = dict(annotations=annotations, num_samples=2, batch_size=2, top_k=8, image_size=32, workers=0)
    results = evaluate_coco(prior_checkpoint, tmp_path / "first", images, inception_weights=weights, **common)
    assert results["protocol"]["feature_extractor_weights_sha256"] == sha256(weights)
    cache = tmp_path / "first" / "reference_stats.pt"
    assert torch.load(cache, weights_only=True)["weights_sha256"] == sha256(weights)

    counter = CountGenerate(monkeypatch)
    with pytest.raises(ValueError, match=f"{sha256(weights)}.*{sha256(other_weights)}"):
        evaluate_coco(prior_checkpoint, tmp_path / "second", images, inception_weights=other_weights, reference_stats=cache, **common)
    assert counter.calls == 0 and not (tmp_path / "second").exists()


def test_coco_chooses_images_and_captions_with_the_seed(coco):
    from tessera.commands.evaluate_coco import choose_samples

    annotations, images = coco
    chosen = choose_samples(annotations, images, 9, seed=1)
    assert chosen == choose_samples(annotations, images, 9, seed=1) and chosen != choose_samples(annotations, images, 9, seed=2)
    document = json.loads(annotations.read_text())
    captions = {}
    for a in document["annotations"]:
        captions.setdefault(a["image_id"], []).append(" ".join(a["caption"].split()))
    assert len({s["image_id"] for s in chosen}) == 9 and all(s["caption"] in captions[s["image_id"]] for s in chosen)
    with pytest.raises(ValueError, match="9 captioned images, fewer than --num-samples 10"):
        choose_samples(annotations, images, 10, seed=1)


def test_fid_and_stats_commands(tmp_path, capsys):
    from tessera.commands.cli import main

    real, fake = write_images(tmp_path / "real", image_set(12, 7)), write_images(tmp_path / "fake", image_set(12, 8, low=80))
    extractor = ["--feature-extractor", "tests.test_evaluation:tiny_extractor", "--image-size", "24", "--workers", "0"]
    assert main(["evaluate", "fid", str(real), str(fake), *extractor]) == 0
    folders = json.loads(capsys.readouterr().out)
    assert main(["evaluate", "stats", str(real), "--out", str(tmp_path / "real.pt"), *extractor]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 12
    assert main(["evaluate", "fid", str(tmp_path / "real.pt"), str(fake), *extractor]) == 0
    from_stats = json.loads(capsys.readouterr().out)
    assert from_stats["fid"] == pytest.approx(folders["fid"], rel=1e-12) and folders["fid"] > 0
    assert folders["fid"] == pytest.approx(fid_of(image_set(12, 7), image_set(12, 8, low=80)), rel=1e-9)


def test_a_directory_checkpoint_hashes_its_files_names_and_bytes(tmp_path):
    from tessera.fid import sha256

    (tmp_path / "ckpt" / "sub").mkdir(parents=True)
    (tmp_path / "ckpt" / "meta.pt").write_bytes(b"meta")
    (tmp_path / "ckpt" / "sub" / "__0_0.distcp").write_bytes(b"shard")
    first = sha256(tmp_path / "ckpt")
    assert first == sha256(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "sub" / "__0_0.distcp").write_bytes(b"shard!")
    assert sha256(tmp_path / "ckpt") != first
    (tmp_path / "file").write_bytes(b"meta")
    assert sha256(tmp_path / "file") != first
