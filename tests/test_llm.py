"""A `transformers` causal LM with image codes in its vocabulary (tessera/llm.py, lightning_modules/llm.py):
the added tokens and embeddings, both directions' sequences and their loss, image-only sampling with
and without the KV cache and guidance, learning on the shapes set, an export plain transformers loads,
and the evaluation commands (`tessera evaluate coco`, `tessera evaluate shapes --captions`) on one.

Every model here is a tiny random Llama and every text tokenizer a word-level one built in the test:
nothing is downloaded."""

from __future__ import annotations

import json
import multiprocessing
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from lightning.pytorch.strategies import DDPStrategy
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from datamodules.caption_image import CaptionImageDataModule
from datamodules.shapes import COLORS, SHAPES, SIZES
from lightning_modules.fsdp import AtomicModelParallelStrategy
from lightning_modules.llm import LLMTextImageModel, decoder_layers, load_llm
from lightning_modules.prior import PriorOptimizerConfig
from tessera.llm import (
    IGNORED,
    IMAGE,
    TEXT,
    BackboneConfig,
    ImageVocabulary,
    add_image_tokens,
    build_sequences,
    decode,
    left_padded,
    load_backbone,
    sample_image_codes,
    sequence_loss,
)
from tessera.sampling import SamplingConfig
from tests.distributed import as_launched_rank, run_distributed
from tests.test_evaluation import coco  # noqa: F401 (a fixture)
from tests.test_exact_resume import assert_resumed_exactly, straight_and_resumed, write_token_shards
from tests.test_prior import RecordLoss, shapes_data, tokenizer_dir  # noqa: F401 (a fixture)
from tests.test_vqgan import trainer

WORDS = ["a", "an", "and", "of", "on", "the", "from", "to", ",", "left", "right", "top", "bottom", "center",
         "above", "below", "in", *SHAPES, *COLORS, *SIZES]
TINY_LLAMA = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


@pytest.fixture(scope="module")
def words_dir(tmp_path_factory) -> Path:
    """A word-level text tokenizer for the shapes captions, saved as AutoTokenizer reads it."""
    vocab = {token: i for i, token in enumerate(["<pad>", "<s>", "</s>", "<unk>", *WORDS])}
    model = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>")
    return Path(tokenizer.save_pretrained(tmp_path_factory.mktemp("words"))[0]).parent


def tiny_backbone(words_dir: Path, **overrides) -> BackboneConfig:
    return BackboneConfig(config={**TINY_LLAMA, **overrides}, tokenizer=str(words_dir))


def tiny_llm(words_dir: Path, tokenizer_dir: Path | None, **overrides) -> LLMTextImageModel:
    torch.manual_seed(0)
    options = dict(
        backbone=tiny_backbone(words_dir), codebook_size=64, image_grid=4, text_length=16,
        tokenizer=str(tokenizer_dir) if tokenizer_dir is not None else None,
        optimizer=PriorOptimizerConfig(lr=3e-3, warmup_steps=5, schedule="constant"),
    )
    return LLMTextImageModel(**{**options, **overrides})


# --- vocabulary -----------------------------------------------------------------------------------


def test_image_tokens_are_added_after_the_text_and_round_trip_through_the_tokenizer(words_dir, tmp_path):
    model, tokenizer = load_backbone(tiny_backbone(words_dir), AutoTokenizer.from_pretrained(words_dir))
    text_vocab = len(tokenizer)
    vocab = add_image_tokens(model, tokenizer, codebook_size=64)
    assert vocab == ImageVocabulary(text_vocab, 64) and len(tokenizer) == vocab.size
    ids = tokenizer("a red circle <boi> <img_0> <img_63> <eoi>", add_special_tokens=False)["input_ids"]
    assert ids[3:] == [vocab.boi, vocab.first_code, vocab.first_code + 63, vocab.eoi]
    assert tokenizer.convert_ids_to_tokens(ids[3:]) == ["<boi>", "<img_0>", "<img_63>", "<eoi>"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a red circle"
    # saved and loaded again, the tokens keep their ids and are not added twice
    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.convert_tokens_to_ids(["<boi>", "<img_5>"]) == [vocab.boi, vocab.first_code + 5]
    assert add_image_tokens(model, again, codebook_size=64) == vocab and len(again) == vocab.size


def test_clip_bpe_captions_still_decode_as_text_and_the_shared_tokenizer_is_left_alone(words_dir):
    from datamodules.text import load_text_tokenizer

    llm = tiny_llm(words_dir, None, backbone=BackboneConfig(config=TINY_LLAMA, tokenizer="clip-bpe"))
    (ids,) = llm.caption_ids(["a blue square"])
    assert llm.text_tokenizer.decode(ids + [llm.vocab.first_code, llm.eos_id], skip_special_tokens=True) == "a blue square"
    assert len(load_text_tokenizer("clip-bpe")) == 49408  # what the datamodules tokenize with gained no token


@pytest.mark.parametrize("tied", [False, True])
def test_resizing_keeps_the_text_rows_and_starts_the_new_rows_at_their_mean(words_dir, tied):
    torch.manual_seed(0)
    model, tokenizer = load_backbone(tiny_backbone(words_dir, tie_word_embeddings=tied), AutoTokenizer.from_pretrained(words_dir))
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    vocab = add_image_tokens(model, tokenizer, codebook_size=64)
    new_in, new_out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert new_in.shape == new_out.shape == (vocab.size, 64)
    assert (new_in is new_out) == tied
    for old, new in ((old_in, new_in), (old_out, new_out)):
        torch.testing.assert_close(new[: vocab.text_vocab_size], old, rtol=0, atol=0)
        mean = old.mean(0).expand(vocab.size - vocab.text_vocab_size, -1)
        torch.testing.assert_close(new[vocab.text_vocab_size :], mean, rtol=0, atol=1e-3)


def test_a_checkpoints_padding_rows_are_dropped_so_image_ids_follow_the_text(words_dir):
    model, tokenizer = load_backbone(tiny_backbone(words_dir), AutoTokenizer.from_pretrained(words_dir))
    text_vocab = len(tokenizer)
    model.resize_token_embeddings(text_vocab + 7, mean_resizing=False)  # rows no token uses, as Qwen2 has
    vocab = add_image_tokens(model, tokenizer, codebook_size=8)
    assert vocab.boi == text_vocab and model.get_input_embeddings().num_embeddings == vocab.size == text_vocab + 10


def test_a_missing_backbone_directory_is_one_error_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no language model directory at {tmp_path / 'qwen'}"):
        load_backbone(BackboneConfig(path=str(tmp_path / "qwen")))
    with pytest.raises(ValueError, match="exactly one of `path`"):
        BackboneConfig()


def test_a_tokenizer_of_another_codebook_or_grid_or_too_long_sequences_are_refused_at_start_up(words_dir, tokenizer_dir):
    with pytest.raises(ValueError, match="64 codes but codebook_size is 128"):
        tiny_llm(words_dir, tokenizer_dir, codebook_size=128)
    with pytest.raises(ValueError, match="4x4 id grids but image_grid is 8"):
        tiny_llm(words_dir, tokenizer_dir, image_grid=8)
    with pytest.raises(ValueError, match="up to 36 tokens .* exceed the backbone's max_position_embeddings 32"):
        tiny_llm(words_dir, None, backbone=tiny_backbone(words_dir, max_position_embeddings=32))


# --- sequences and loss ---------------------------------------------------------------------------


def test_both_directions_are_laid_out_with_their_targets_and_padding_is_never_one():
    vocab = ImageVocabulary(text_vocab_size=10, codebook_size=4)  # <boi> 10, <eoi> 11, codes 12..15
    codes = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]])
    ids, kinds = build_sequences([[5, 6], [7, 8]], codes, torch.tensor([False, True]), vocab, bos=1, eos=2, pad=0)
    assert ids.tolist() == [[1, 5, 6, 10, 12, 13, 14, 15, 11, 0],
                            [1, 10, 15, 14, 13, 12, 11, 7, 8, 2]]
    I, T, M = IGNORED, TEXT, IMAGE
    assert kinds.tolist() == [[I, T, T, M, M, M, M, M, M, I],
                              [I, I, I, I, I, I, I, T, T, T]]

    logits = torch.randn(2, 10, vocab.size)
    losses = sequence_loss(logits, ids, kinds)
    other_padding = ids.clone()
    other_padding[0, -1] = 7
    torch.testing.assert_close(sequence_loss(logits, other_padding, kinds)["loss"], losses["loss"])
    # the image loss is the mean over row 0's <boi>, codes and <eoi>, predicted from the position before each
    expected = torch.nn.functional.cross_entropy(logits[0, 2:8], ids[0, 3:9])
    torch.testing.assert_close(losses["image_loss"], expected)


def test_loss_weights_the_kinds_and_adds_the_weighted_z_loss():
    vocab = ImageVocabulary(text_vocab_size=10, codebook_size=4)
    ids, kinds = build_sequences([[5, 6], [7]], torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]]),
                                 torch.tensor([False, True]), vocab, bos=1, eos=2, pad=0)
    logits = 3 * torch.randn(*ids.shape, vocab.size)
    plain = sequence_loss(logits, ids, kinds, text_weight=1.0, image_weight=3.0)
    torch.testing.assert_close(plain["loss"], (plain["text_loss"] + 3 * plain["image_loss"]) / 4)
    log_z = torch.logsumexp(logits[:, :-1][kinds[:, 1:] != IGNORED], -1)
    torch.testing.assert_close(plain["z_loss"], log_z.square().mean())
    with_z = sequence_loss(logits, ids, kinds, text_weight=1.0, image_weight=3.0, z_loss_weight=1e-2)
    torch.testing.assert_close(with_z["loss"], plain["loss"] + 1e-2 * plain["z_loss"])
    # a batch of image-to-text rows only has no image targets: the text loss alone
    only_text = sequence_loss(logits[1:], ids[1:], kinds[1:], text_weight=1.0, image_weight=3.0)
    torch.testing.assert_close(only_text["loss"], only_text["text_loss"])


def test_caption_dropout_and_the_image_to_text_share_are_drawn_per_step(words_dir):
    llm = tiny_llm(words_dir, None, image_to_text=0.25, caption_dropout=0.5)
    to_text, dropped = llm.directions(64)
    assert to_text.sum() == 16 and not (to_text & dropped).any() and 10 < dropped.sum() < 38
    again = llm.directions(64)
    assert torch.equal(again[0], to_text) and torch.equal(again[1], dropped)  # a function of the step: resumes exactly


# --- sampling -------------------------------------------------------------------------------------


def sampling_llm(words_dir: Path) -> LLMTextImageModel:
    """A tiny LLM whose image rows differ as a trained model's do: at their initial mean every code's
    logit is the same to 1e-5, and a draw among such near-ties is decided by rounding."""
    llm = tiny_llm(words_dir, None).eval()
    with torch.no_grad():
        for embedding in (llm.model.get_input_embeddings(), llm.model.get_output_embeddings()):
            embedding.weight[llm.vocab.boi :].normal_(std=0.5)
    return llm


def test_images_are_exactly_h_w_codes_even_where_a_text_token_is_far_likelier(words_dir):
    llm = tiny_llm(words_dir, None).eval()
    with torch.no_grad():  # every position's likeliest token is "circle" by far
        llm.model.get_output_embeddings().weight[llm.text_tokenizer.convert_tokens_to_ids("circle")] *= 100
    prompts = [[1, 4, 5], [1]]
    for sampling in (SamplingConfig(top_k=None), SamplingConfig(top_k=None, cfg_scale=3.0)):
        codes = sample_image_codes(llm.model, llm.vocab, prompts, 16, sampling, torch.Generator().manual_seed(0),
                                   null_prompt=[1])
        assert codes.shape == (2, 16) and codes.min() >= 0 and codes.max() < 64


def test_cached_sampling_draws_what_the_uncached_reference_draws(words_dir):
    llm = sampling_llm(words_dir)
    prompts = [llm.prefix + ids for ids in llm.caption_ids(["a large red circle on the left", "a blue square"])]
    for sampling in (SamplingConfig(top_k=None), SamplingConfig(top_p=0.9, temperature=2.0, cfg_scale=2.0)):
        draws = [
            sample_image_codes(llm.model, llm.vocab, prompts, 16, sampling, torch.Generator().manual_seed(3),
                               null_prompt=llm.prefix, pad=llm.pad_id, use_cache=use_cache)
            for use_cache in (True, False)
        ]
        assert torch.equal(draws[0], draws[1])


def test_a_prompts_logits_do_not_depend_on_the_left_padding_its_batch_needs(words_dir):
    llm = sampling_llm(words_dir)
    prompts = [llm.prefix + ids for ids in llm.caption_ids(["a large red circle on the left", "a blue square"])]

    def logits_of(rows: list[list[int]]) -> torch.Tensor:
        seen = []

        def greedy(logits):
            seen.append(logits)
            return logits.argmax(-1)

        decode(llm.model, *left_padded(rows, llm.pad_id, torch.device("cpu")), 4, greedy)
        return torch.stack(seen, 1)  # (R, 4, V)

    batched = logits_of(prompts)  # the second prompt padded on the left
    for row, prompt in enumerate(prompts):
        torch.testing.assert_close(batched[row], logits_of([prompt])[0], rtol=1e-4, atol=1e-4)


def test_guidance_at_0_draws_the_empty_caption_and_at_1_the_caption(words_dir):
    llm = sampling_llm(words_dir)
    captions = [llm.prefix + ids for ids in llm.caption_ids(["a large red circle on the left", "a blue square"])]

    def codes(prompts, cfg_scale):
        return sample_image_codes(llm.model, llm.vocab, prompts, 16, SamplingConfig(top_k=1, cfg_scale=cfg_scale),
                                  null_prompt=llm.prefix, pad=llm.pad_id)

    assert torch.equal(codes(captions, 0.0), codes([llm.prefix, llm.prefix], 1.0))
    assert torch.equal(codes(captions, 1.0), torch.cat([codes([prompt], 1.0) for prompt in captions]))


def test_generate_and_caption_take_prompts_and_images(words_dir, tokenizer_dir):
    llm = tiny_llm(words_dir, tokenizer_dir).eval()
    images = llm.generate(["a red circle", "a blue square"], SamplingConfig(top_k=8, cfg_scale=2.0), seed=3)
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    torch.testing.assert_close(llm.generate(["a red circle", "a blue square"], SamplingConfig(top_k=8, cfg_scale=2.0), seed=3), images)
    captions = llm.caption(images, max_new_tokens=5)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    assert all(word in WORDS + ["<unk>"] for c in captions for word in c.split())  # text, never an image token


# --- training, export, configs --------------------------------------------------------------------


def test_tiny_llm_learns_both_directions_of_the_shapes_set(tmp_path, words_dir, tokenizer_dir, shapes_dir):
    llm, recorder = tiny_llm(words_dir, tokenizer_dir, z_loss_weight=1e-4), RecordLoss()
    trainer(tmp_path, max_steps=30, callbacks=[recorder]).fit(llm, datamodule=shapes_data(shapes_dir, batch_size=16))
    first, last = np.mean(recorder.losses[:5]), np.mean(recorder.losses[-5:])
    assert last < 0.6 * first, (first, last)


def test_tokens_per_second_and_mfu_are_logged_against_the_given_peak_and_no_mfu_on_a_cpu_without_one(tmp_path, words_dir, tokenizer_dir, shapes_dir):
    from tessera.flops import causal_lm_flops_per_token

    for peak in (1e12, None):
        llm, lengths = tiny_llm(words_dir, tokenizer_dir, peak_flops=peak), []
        log_throughput = llm.log_throughput
        llm.log_throughput = lambda ids: (lengths.append(ids.size(1)), log_throughput(ids))
        run = trainer(tmp_path, max_steps=2)  # throughput from the second step on: the time between two
        run.fit(llm, datamodule=shapes_data(shapes_dir, batch_size=4))
        metrics = run.callback_metrics
        assert metrics["throughput/tokens_per_s"] > 0 and metrics["throughput/samples_per_s"] > 0
        if peak is None:
            assert "throughput/mfu" not in metrics
        else:  # the rows of the last step, as long as its longest
            expected = metrics["throughput/tokens_per_s"].item() * causal_lm_flops_per_token(llm.model, lengths[-1]) / peak
            assert metrics["throughput/mfu"].item() == pytest.approx(expected, rel=1e-5)


def test_validation_losses_count_every_real_sample_once_whatever_the_batch_size(tmp_path, words_dir, tokenizer_dir, shapes_dir):
    llm = tiny_llm(words_dir, tokenizer_dir)
    logged = []
    for batch_size in (3, 4):  # the 20 validation samples: 6 batches and 2 of 3 with a padding row, or 5 of 4
        run = trainer(tmp_path, max_steps=1, limit_val_batches=1.0)
        (metrics,) = run.validate(llm, datamodule=shapes_data(shapes_dir, batch_size=batch_size), verbose=False)
        logged.append(metrics)
    assert logged[0].keys() == {"val/image_loss", "val/caption_loss"}
    for name in logged[0]:
        assert logged[0][name] == pytest.approx(logged[1][name], rel=1e-5)


def test_the_export_loads_in_plain_transformers_with_the_same_logits_and_samples_and_captions_as_the_model(tmp_path, words_dir, tokenizer_dir, shapes_dir):
    from tessera.commands.cli import main

    llm = tiny_llm(words_dir, tokenizer_dir)
    fit = trainer(tmp_path, max_steps=1)
    fit.fit(llm, datamodule=shapes_data(shapes_dir, batch_size=4))
    fit.save_checkpoint(tmp_path / "llm.ckpt")
    assert main(["export", "--checkpoint", str(tmp_path / "llm.ckpt"), "--out", str(tmp_path / "export")]) == 0

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "export")
    ids = tokenizer(["a red circle <boi> <img_3> <img_60> <eoi>"], add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert ids[0, -1] == llm.vocab.eoi
    llm.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, llm.model(ids).logits, rtol=0, atol=0)

    sampling = SamplingConfig(top_k=8, cfg_scale=2.0)
    for path in (tmp_path / "llm.ckpt", tmp_path / "export"):
        loaded = load_llm(path)
        torch.testing.assert_close(loaded.generate(["a red circle"], sampling, seed=1), llm.generate(["a red circle"], sampling, seed=1))

    # `tessera sample` takes the export as it takes a prior's
    argv = ["sample", "--prior", str(tmp_path / "export"), "--prompt", "a red circle", "--num-images", "2", "--out", str(tmp_path / "samples")]
    assert main(argv) == 0
    assert sorted(p.name for p in (tmp_path / "samples" / "images").glob("*.png")) == ["0000_00.png", "0000_01.png"]
    # and `tessera caption` captions them, greedy, as the module does
    assert main(["caption", "--model", str(tmp_path / "export"), str(tmp_path / "samples" / "images"),
                 "--max-new-tokens", "4", "--out", str(tmp_path / "captions.json")]) == 0
    captions = json.loads((tmp_path / "captions.json").read_text())
    image = Image.open(tmp_path / "samples" / "images" / "0000_00.png")
    pixels = torch.from_numpy(np.asarray(image)).permute(2, 0, 1)[None].float() / 127.5 - 1
    assert sorted(captions) == [str(tmp_path / "samples" / "images" / f"0000_0{i}.png") for i in range(2)]
    assert captions[str(tmp_path / "samples" / "images" / "0000_00.png")] == loaded.caption(pixels, max_new_tokens=4)[0]


def llm_run(words_dir: Path, shards: str):
    """The tiny LLM with attention dropout (global RNG), half the pairs image to text, caption dropout,
    and 24 token-shard samples an epoch in batches of 4."""
    model = tiny_llm(words_dir, None, backbone=tiny_backbone(words_dir, attention_dropout=0.2), caption_dropout=0.3,
                     optimizer=PriorOptimizerConfig(lr=3e-3, warmup_steps=2, schedule="cosine"))
    data = CaptionImageDataModule(shards, batch_size=4, num_workers=1, text_length=16, train_samples=24,
                                  shuffle_buffer=8, image_tokens=True)
    return model, data


def test_llm_resumed_mid_epoch_ends_with_the_weights_of_the_uninterrupted_run(tmp_path, words_dir):
    shards = write_token_shards(tmp_path)
    straight, resumed = straight_and_resumed(partial(llm_run, words_dir), shards, tmp_path, steps=8, stop=4)
    assert_resumed_exactly(straight, resumed, stop=4)


def count_calls(calls: list, function, *args, **kwargs):
    calls.append(1)
    return function(*args, **kwargs)


def test_activation_checkpointing_recomputes_each_layer_in_the_backward_pass_with_the_same_gradients(words_dir):
    results = []
    for checkpointing in (False, True):
        llm = tiny_llm(words_dir, None, activation_checkpointing=checkpointing).train()
        llm.configure_model()
        calls = []
        for layer in decoder_layers(llm.model):  # the MLP's forward itself: module hooks do not run in a recompute
            layer.mlp.forward = partial(count_calls, calls, layer.mlp.forward)
        ids = torch.randint(llm.model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
        llm.model(input_ids=ids, use_cache=False).logits.float().pow(2).mean().backward()
        results.append((len(calls), {name: p.grad.clone() for name, p in llm.model.named_parameters()}))
    (plain_calls, plain_grads), (checkpointed_calls, checkpointed_grads) = results
    layers = TINY_LLAMA["num_hidden_layers"]
    assert (plain_calls, checkpointed_calls) == (layers, 2 * layers)  # every layer forward again in the backward
    for name, grad in plain_grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, msg=name)


def test_fsdp2_units_are_the_models_own_decoder_layers(words_dir):
    llm = tiny_llm(words_dir, None)
    assert decoder_layers(llm.model) == list(llm.model.model.layers)


def _llm_under_ddp_and_fsdp2(rank: int, world_size: int, root: str, words_dir: str) -> dict:
    torch.set_num_threads(1)
    multiprocessing.set_start_method("fork", force=True)  # loader workers fork, as under a launcher
    as_launched_rank(rank, world_size)
    root = Path(root)
    shards = write_token_shards(root) if rank == 0 else str(root / "{00000..00002}.tar")
    torch.distributed.barrier()
    losses = {}
    for name, strategy in (("ddp", DDPStrategy()), ("fsdp2", AtomicModelParallelStrategy())):
        model, data = llm_run(Path(words_dir), shards)  # 24 samples an epoch, 12 per rank in batches of 4
        record = RecordLoss()
        trainer(root / name, max_steps=3, devices=2, strategy=strategy, callbacks=[record], enable_checkpointing=True,
                limit_val_batches=None).fit(model, datamodule=data)
        losses[name] = record.losses
    return losses


@pytest.mark.slow  # two processes importing Lightning and transformers
def test_the_llm_under_fsdp2_trains_as_under_ddp_and_exports_from_its_shards(tmp_path, words_dir):
    from lightning_modules.llm import export_llm

    ranks = run_distributed(_llm_under_ddp_and_fsdp2, str(tmp_path), str(words_dir))
    for rank in ranks:
        torch.testing.assert_close(rank["fsdp2"], rank["ddp"])
    weights = {}
    for run in ("ddp", "fsdp2"):
        (last,) = (tmp_path / run).rglob("*step=3.ckpt")
        export_llm(last, tmp_path / run / "export")
        weights[run] = AutoModelForCausalLM.from_pretrained(tmp_path / run / "export").state_dict()
    for name, weight in weights["ddp"].items():
        torch.testing.assert_close(weights["fsdp2"][name], weight, msg=name)


# --- evaluation -----------------------------------------------------------------------------------


def test_the_llama_benchmark_rows_flops_per_token_are_what_torchs_flop_counter_counts_in_a_training_step(monkeypatch):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "bench"))
    from prior_throughput import llama_config, prior_config
    from tessera.flops import causal_lm_flops_per_token

    config = llama_config(prior_config(tiny=True))
    model = AutoModelForCausalLM.from_config(config)
    ids = torch.randint(0, config.vocab_size, (3, 20))
    # the math kernel, whose matmuls the counter sees: the whole T x T scores, as flops.py counts them
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(input_ids=ids, use_cache=False).logits.float().logsumexp(-1).mean().backward()
    assert counter.get_total_flops() == 3 * 20 * causal_lm_flops_per_token(model, 20)


@pytest.fixture(scope="module")
def llm_files(tmp_path_factory, words_dir, tokenizer_dir, shapes_dir) -> dict[str, Path]:  # noqa: F811
    """A tiny LLM trained one step, which draws with top-k 8 unless told: its checkpoint and its export."""
    from lightning_modules.llm import export_llm

    directory = tmp_path_factory.mktemp("llm")
    fit = trainer(directory, max_steps=1)
    fit.fit(tiny_llm(words_dir, tokenizer_dir, sampling=SamplingConfig(top_k=8)), datamodule=shapes_data(shapes_dir, batch_size=4))
    fit.save_checkpoint(directory / "llm.ckpt")
    export_llm(directory / "llm.ckpt", directory / "export")
    return {"checkpoint": directory / "llm.ckpt", "export": directory / "export"}


@pytest.mark.parametrize("kind", ["checkpoint", "export"])
def test_evaluate_coco_draws_with_an_llm_checkpoint_or_export_and_its_own_sampling_settings(tmp_path, llm_files, coco, kind):  # noqa: F811
    from tessera.commands.cli import main
    from tessera.commands.evaluate_coco import choose_samples
    from tessera.pixels import to_uint8

    annotations, images = coco
    out = tmp_path / "run"
    argv = ["evaluate", "coco", "--prior", str(llm_files[kind]), "--annotations", str(annotations), "--images", str(images),
            "--num-samples", "3", "--batch-size", "2", "--feature-extractor", "tests.test_evaluation:tiny_extractor",
            "--image-size", "32", "--workers", "0", "--out", str(out)]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["count"] == 3 and np.isfinite(results["fid"]) and results["clip_score"] is None
    assert results["sampler"]["top_k"] == 8 and results["sampler"]["sampling_from"]["top_k"] == "prior"
    # the first batch (seed 0) is what the model draws for its two captions
    captions = [sample["caption"] for sample in choose_samples(annotations, images, 3, seed=0)[:2]]
    drawn = to_uint8(load_llm(llm_files[kind]).generate(captions, SamplingConfig(top_k=8), seed=0))
    for index in range(2):
        written = np.asarray(Image.open(out / "samples" / f"{index:06d}.png"))
        np.testing.assert_array_equal(written, drawn[index].permute(1, 2, 0).numpy())


def test_evaluate_shapes_captions_an_llms_renders_and_refuses_image_settings(tmp_path, llm_files):
    from datamodules.shapes import render
    from tessera.commands.cli import main
    from tessera.commands.evaluate_shapes import DEFAULT_SEED, evaluation_scenes
    from tessera.pixels import to_unit_range

    out = tmp_path / "captions.json"
    argv = ["evaluate", "shapes", "--prior", str(llm_files["export"]), "--captions", "--num-samples", "4", "--batch-size", "4"]
    assert main(argv + ["--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert (report["mode"], report["decoding"], report["image_size"], report["num_samples"]) == ("captions", "greedy", 32, 4)
    for group in ("seen", "held_out"):
        accuracy, unparsed = report[group]["accuracy"], report[group]["unparsed"]
        assert report[group]["n"] == 4 and 0 <= unparsed <= 4 and report[f"{group}_unparsed"] == unparsed
        assert all(0 <= value <= 1 - unparsed / 4 for value in accuracy.values())  # an unparsed caption is wrong
    # the captions are the model's greedy ones of the exact renders
    scenes = evaluation_scenes(4, DEFAULT_SEED)["seen"]
    pixels = torch.from_numpy(np.stack([np.asarray(render(scene, 32)) for scene in scenes])).permute(0, 3, 1, 2)
    expected = load_llm(llm_files["export"]).caption(to_unit_range(pixels), seed=DEFAULT_SEED)
    assert [example["caption"] for example in report["seen"]["examples"]] == expected
    with pytest.raises(SystemExit, match="--cfg-scale, --fine-stage and --image-size are for images"):
        main(argv + ["--cfg-scale", "2"])
