"""`tessera compress` and `tessera decompress`: images or token grids <-> one file, range-coded with a
trained prior's likelihood (tessera/coding.py).

    tessera compress --prior P IMAGE_OR_IDS.npy... --out FILE.tsr [--caption TEXT] [--batch-size 16]
    tessera decompress FILE.tsr --prior P --out DIR [--png]

With a prior over tokenizer ids, an image is first encoded by the prior's tokenizer (resized and
centre-cropped to its size, as `tessera tokenize` does): the ids are coded losslessly, the pixels
are not (decompress gives the ids back exactly, and with --png the tokenizer's decoding of them).
An `.npy` input is an id grid already (`id_shape`, as `tessera tokenize` writes them).

The file, all integers little-endian:

    b"TSRC" | format version (u16) | header length (u32) | header (UTF-8 JSON, deflated) | words (u32 each) | CRC-32 of all before (u32)

The header: the model's fingerprint (SHA-256 of its class, shape, text tokenizer and weights), the
kind of symbols ("tokens", or a pixel model's "pixels"), the shape of one image's symbols, the
alphabet, the coder's precision, every image's name, caption and CRC-32 of its symbols, and the
batches: the images are coded `batch_size` at a time, one range-coded stream a batch, and decoded
in the same batches, so the decoder's model sees the very rows the encoder's did. Decompress
refuses a file of another model, format version or a damaged file, each with its reason.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tessera.coding import PRECISION_BITS, decode, encode
from tessera.sampling import eval_mode

MAGIC = b"TSRC"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<4sHI")  # magic, format version, header length
_CRC = struct.Struct("<I")


def add_parser(commands: argparse._SubParsersAction) -> None:
    compress = commands.add_parser(
        "compress", help="images or id grids -> one file, range-coded with a prior's likelihood (lossless for the ids)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    compress.add_argument("inputs", nargs="+", type=Path, help="images (encoded by the prior's tokenizer) or .npy id grids")
    compress.add_argument("--prior", required=True, type=Path, help="a prior checkpoint (.ckpt, FSDP sharded) or export directory")
    compress.add_argument("--out", required=True, type=Path, help="the file to write")
    compress.add_argument("--caption", default=None, help="every image's caption; default: KEY.txt beside each input")
    compress.add_argument("--batch-size", type=int, default=16, help="images coded together (one stream, decoded together)")
    compress.add_argument("--tokenizer", type=Path, default=None, help="the stage-1 tokenizer, if not where the checkpoint says")
    compress.set_defaults(run=run_compress)
    decompress = commands.add_parser("decompress", help="a `tessera compress` file -> OUT/KEY.tokens.npy (or KEY.png for pixels) and KEY.txt")
    decompress.add_argument("file", type=Path, help="a file `tessera compress` wrote")
    decompress.add_argument("--prior", required=True, type=Path, help="the prior it was written with (checked against the file)")
    decompress.add_argument("--out", required=True, type=Path, help="directory to write")
    decompress.add_argument("--png", action="store_true", help="also decode the ids with the prior's tokenizer: OUT/KEY.png (lossy)")
    decompress.add_argument("--tokenizer", type=Path, default=None, help="the stage-1 tokenizer, if not where the checkpoint says")
    decompress.set_defaults(run=run_decompress)


# -----------------------------------------------------------------------------
# coding a batch of symbol grids with a prior


@dataclass
class Compressed:
    data: bytes
    """The whole file."""
    header_bytes: int
    """Bytes of the file that are not coded words: prefix, header and checksum."""
    information_bits: np.ndarray
    """(B,) each image's -log2 p under the model: what an ideal coder would spend."""


@dataclass
class Decompressed:
    symbols: torch.Tensor
    """(B, *shape) long: exactly what was compressed."""
    captions: list[str]
    names: list[str]
    kind: str


def compress(
    prior, symbols: torch.Tensor, captions: list[str], names: list[str] | None = None, batch_size: int = 16
) -> Compressed:
    """Range-codes `symbols` (B, *prior.id_shape), each with its caption, `batch_size` at a time,
    into the file `decompress` reads. `prior`: a TextImagePrior (or subclass) on the CPU in fp32,
    as `load_prior` gives it."""
    shape = tuple(prior.id_shape)
    if tuple(symbols.shape[1:]) != shape:
        raise ValueError(f"the symbols form grids of {tuple(symbols.shape[1:])}, the prior models {shape}")
    if len(captions) != len(symbols):
        raise ValueError(f"{len(symbols)} images but {len(captions)} captions")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    names = names if names is not None else [f"{i:06d}" for i in range(len(symbols))]
    if len(names) != len(symbols):
        raise ValueError(f"{len(symbols)} images but {len(names)} names")
    flat = symbols.long().reshape(len(symbols), -1)  # (B, S): the prior's step order
    batches, words, information = [], [], []
    with _deterministic(prior):
        for start in range(0, len(flat), batch_size):
            stop = start + batch_size
            coded = encode(prior.symbol_steps(captions[start:stop]), flat[start:stop], prior.alphabet_size)
            batches.append([len(flat[start:stop]), len(coded.words)])
            words.append(coded.words)
            information.append(coded.information_bits)
    header = {
        "model": model_fingerprint(prior), "kind": prior.coded_kind, "shape": list(shape),
        "alphabet": prior.alphabet_size, "precision": PRECISION_BITS, "names": list(names), "captions": list(captions),
        "checksums": [_symbols_crc(row) for row in flat], "batches": batches,
    }
    data = write_container(header, np.concatenate(words) if words else np.zeros(0, np.uint32))
    return Compressed(data, len(data) - 4 * sum(len(w) for w in words), np.concatenate(information) if information else np.zeros(0))


def decompress(prior, data: bytes) -> Decompressed:
    """The symbols, captions and names `compress` wrote into `data`, with the same prior (on the
    CPU in fp32); a file of another model, or a damaged one, is refused with the reason."""
    header, words = read_container(data)
    expected = model_fingerprint(prior)
    if header["model"] != expected:
        raise ValueError(
            f"the file was written with the model {header['model'][:16]}, this prior is {expected[:16]} "
            "(fingerprints of class, shape, text tokenizer and weights): decompress with the prior that compressed it"
        )
    if header["precision"] != PRECISION_BITS:
        raise ValueError(f"the file is coded with {header['precision']}-bit probabilities; this tessera codes with {PRECISION_BITS}")
    rows, start, image = [], 0, 0
    length = int(np.prod(header["shape"]))
    with _deterministic(prior):
        for images, count in header["batches"]:
            captions = header["captions"][image : image + images]
            batch = decode(prior.symbol_steps(captions), words[start : start + count], prior.alphabet_size)
            rows.append(batch.reshape(images, length))
            start, image = start + count, image + images
    symbols = torch.cat(rows) if rows else torch.zeros(0, length, dtype=torch.long)
    for index, (row, crc) in enumerate(zip(symbols, header["checksums"])):
        if _symbols_crc(row) != crc:
            raise ValueError(
                f"image {index} ({header['names'][index]}) decoded to ids that fail their checksum: this machine's "
                "prior gave other probabilities than the compressing one's (another torch version or CPU kind?)"
            )
    return Decompressed(symbols.view(-1, *header["shape"]), header["captions"], header["names"], header["kind"])


def model_fingerprint(prior) -> str:
    """SHA-256 of what fixes a prior's probabilities: its class, network shape, text tokenizer and
    weights (not where its files or tokenizer are: a checkpoint and its export agree)."""
    from datamodules.token_shards import weights_fingerprint

    described = {name: prior.hparams.get(name) for name in ("class_path", "transformer", "text_tokenizer")}
    digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode())
    digest.update(weights_fingerprint(prior.transformer.state_dict()).encode())
    return digest.hexdigest()


@contextmanager
def _deterministic(prior) -> Iterator[None]:
    """The prior as both sides must run it: fp32 on the CPU, in eval mode, no autocast, no grad,
    and on one thread: a matmul split over another number of threads sums in another order, and
    a file compressed with 1 thread failed to decompress with 2 (a 4-layer, 16,384-code prior)."""
    param = next(prior.transformer.parameters())
    if param.device.type != "cpu" or param.dtype != torch.float32:
        raise ValueError(
            f"the prior is {param.dtype} on {param.device}: coding runs it in fp32 on the CPU (load_prior's "
            "default), where compressing and decompressing compute the same probabilities"
        )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad(), torch.autocast("cpu", enabled=False), eval_mode(prior):
            yield
    finally:
        torch.set_num_threads(threads)


def _symbols_crc(row: torch.Tensor) -> int:
    return zlib.crc32(row.numpy().astype("<i8").tobytes())


# -----------------------------------------------------------------------------
# the file


def write_container(header: dict[str, Any], words: np.ndarray) -> bytes:
    """prefix | deflated header JSON | words | CRC-32 of everything before it."""
    # deflated: the captions and names, often alike, are most of a small image's file
    text = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)
    body = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(text)) + text + words.astype("<u4").tobytes()
    return body + _CRC.pack(zlib.crc32(body))


def read_container(data: bytes) -> tuple[dict[str, Any], np.ndarray]:
    """The header and the words of a file `write_container` wrote; a clear error for anything else."""
    if data[:4] != MAGIC:
        raise ValueError(f"not a `tessera compress` file: it does not start with {MAGIC!r}")
    if len(data) < _PREFIX.size + _CRC.size:
        raise ValueError(f"the file is truncated: {len(data)} bytes, fewer than an empty file's")
    _, version, header_length = _PREFIX.unpack_from(data)
    if version != FORMAT_VERSION:
        raise ValueError(f"the file is in format version {version}; this tessera reads version {FORMAT_VERSION}")
    end = len(data) - _CRC.size
    if end < _PREFIX.size + header_length or _CRC.unpack_from(data, end)[0] != zlib.crc32(data[:end]):
        raise ValueError(f"the file is corrupt or truncated: its {len(data)} bytes fail their CRC-32")
    header = json.loads(zlib.decompress(data[_PREFIX.size : _PREFIX.size + header_length]))
    payload = data[_PREFIX.size + header_length : end]
    coded = 4 * sum(count for _, count in header["batches"])
    if len(payload) != coded:
        raise ValueError(f"the file is corrupt: its header counts {coded} bytes of coded words, it holds {len(payload)}")
    return header, np.frombuffer(payload, dtype="<u4").astype(np.uint32)


# -----------------------------------------------------------------------------
# the commands


def run_compress(args: argparse.Namespace) -> int:
    from lightning_modules.prior import load_prior

    try:
        prior = load_prior(args.prior, tokenizer=args.tokenizer)
        names, captions = _names(args.inputs), [_caption(path, args.caption) for path in args.inputs]
        symbols = torch.stack([_symbols(prior, path) for path in args.inputs])
        compressed = compress(prior, symbols, captions, names, args.batch_size)
    except (ValueError, FileNotFoundError, OSError) as error:
        raise SystemExit(f"tessera compress: {error}") from error
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(compressed.data)
    coded_bits = 8 * (len(compressed.data) - compressed.header_bytes)
    information = float(compressed.information_bits.sum())
    symbols_per_image = int(np.prod(prior.id_shape))
    print(json.dumps({
        "out": str(args.out), "images": len(symbols), "kind": prior.coded_kind, "bytes": len(compressed.data),
        "header_bytes": compressed.header_bytes, "information_bits": round(information, 1), "coded_bits": coded_bits,
        "coder_overhead": round(coded_bits / information - 1, 5) if information else None,
        "bits_per_symbol": round(8 * len(compressed.data) / (len(symbols) * symbols_per_image), 4),
    }))
    return 0


def run_decompress(args: argparse.Namespace) -> int:
    from PIL import Image

    from datamodules.token_shards import token_dtype
    from lightning_modules.prior import load_prior
    from tessera.pixels import to_uint8

    try:
        prior = load_prior(args.prior, tokenizer=args.tokenizer)
        if args.png and prior.coded_kind == "tokens" and prior.image_tokenizer is None:
            raise ValueError("--png decodes the ids with the prior's tokenizer, which it names none of: pass --tokenizer")
        result = decompress(prior, args.file.read_bytes())
    except (ValueError, FileNotFoundError, OSError) as error:
        raise SystemExit(f"tessera decompress: {error}") from error
    args.out.mkdir(parents=True, exist_ok=True)
    for name, caption, symbols in zip(result.names, result.captions, result.symbols):
        (args.out / f"{name}.txt").write_text(caption)
        if result.kind == "tokens":
            np.save(args.out / f"{name}.tokens.npy", symbols.numpy().astype(token_dtype(prior.alphabet_size)))
            if args.png:
                image = to_uint8(prior.image_tokenizer.module.decode(symbols[None]))[0]  # (3, H, W)
                Image.fromarray(image.permute(1, 2, 0).numpy()).save(args.out / f"{name}.png")
        else:
            Image.fromarray(symbols.numpy().astype(np.uint8)).save(args.out / f"{name}.png")
    print(json.dumps({"out": str(args.out), "images": len(result.names), "kind": result.kind}))
    return 0


TOKENS_SUFFIX = ".tokens.npy"


def _key(path: Path) -> str:
    """KEY of KEY.png, KEY.tokens.npy, KEY.npy: the name a decompressed image gets, and its caption file's."""
    return path.name.removesuffix(TOKENS_SUFFIX) if path.name.endswith(TOKENS_SUFFIX) else path.stem


def _names(paths: list[Path]) -> list[str]:
    names = [_key(path) for path in paths]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"inputs share the names {repeated}: decompressed they would overwrite one another")
    return names


def _caption(path: Path, given: str | None) -> str:
    if given is not None:
        return given
    text = path.with_name(f"{_key(path)}.txt")
    if not text.is_file():
        raise ValueError(f"no caption for {path}: write it to {text}, or give every image one with --caption")
    return text.read_text().strip()


def _symbols(prior, path: Path) -> torch.Tensor:
    """One input's symbols (*prior.id_shape): an .npy id grid as it is, an image through the
    prior's tokenizer (lossy) or, for a pixel model, its uint8 subpixels (lossless)."""
    symbols = _read_symbols(prior, path)
    if tuple(symbols.shape) != tuple(prior.id_shape):
        raise ValueError(f"{path} gives symbols of shape {tuple(symbols.shape)}, the prior models {tuple(prior.id_shape)}")
    return symbols


def _read_symbols(prior, path: Path) -> torch.Tensor:
    from datamodules.images import decode_image

    if path.suffix == ".npy":
        ids = np.load(path, allow_pickle=False)
        if ids.dtype.kind not in "iu":
            raise ValueError(f"{path} holds {ids.dtype} values, not integer ids")
        return torch.from_numpy(ids.astype(np.int64))
    return image_symbols(prior, decode_image(path.read_bytes()))


def image_symbols(prior, image) -> torch.Tensor:
    """What `prior` codes of an RGB PIL image: for a pixel model its subpixels (H, W, 3), as they
    are; for a prior over tokenizer ids the ids of the image resized and centre-cropped to the
    tokenizer's size (as `tessera tokenize` makes them)."""
    from datamodules.images import resize_and_crop
    from datamodules.token_shards import encode_images

    if prior.coded_kind == "pixels":
        return torch.from_numpy(np.asarray(image).astype(np.int64))  # (H, W, 3)
    if prior.image_tokenizer is None:
        raise ValueError("an image is coded through the prior's tokenizer, and this prior names none: pass --tokenizer")
    tokenizer = prior.image_tokenizer.module
    pixels = resize_and_crop(image, tokenizer.config.image_size)  # (S, S, 3) uint8
    images = torch.tensor(pixels).permute(2, 0, 1)[None]  # (1, 3, S, S)
    return torch.from_numpy(encode_images(tokenizer, images, torch.device("cpu"))[0].astype(np.int64))
