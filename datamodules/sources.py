"""Caption-image sources for the shard writer: a folder of images with a captions file, and MS-COCO.

Both are indexed, deterministic lists, so shard i always holds the same samples and a
re-run only writes the shards that are missing.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from datamodules.shard_writer import SkipSample, SourceSample


class FolderSource:
    """Images under `image_dir` named in a captions file: JSONL or CSV rows of (file, caption).

    JSONL lines are objects with "file" (or "image") and "caption"; a CSV has a header row with
    those column names. Both are read as UTF-8, with or without the byte-order mark spreadsheet
    programs put first. Extra fields are kept in KEY.json.
    """

    def __init__(self, image_dir: str | Path, captions_file: str | Path):
        self.image_dir = Path(image_dir)
        captions_file = Path(captions_file)
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"image directory {self.image_dir} does not exist")
        if not captions_file.is_file():
            raise FileNotFoundError(f"captions file {captions_file} does not exist")
        self.rows = [_folder_row(row, captions_file, line) for line, row in enumerate(_read_rows(captions_file), 1)]
        if not self.rows:
            raise ValueError(f"captions file {captions_file} holds no rows")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> SourceSample:
        row = self.rows[index]
        extra = {k: v for k, v in row.items() if k not in ("file", "image", "caption")}
        return SourceSample(
            caption=row["caption"],
            image=self.image_dir / row["file"],
            meta={"source": "folder", "file": row["file"], **extra},
        )


def _read_rows(path: Path) -> list[dict]:
    # utf-8-sig drops a leading byte-order mark, which would otherwise become part of the first name
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as f:
            return list(csv.DictReader(f))
    with path.open(encoding="utf-8-sig") as f:
        return [json.loads(line) for line in f if line.strip()]


def _folder_row(row: dict, path: Path, line: int) -> dict:
    file = row.get("file") or row.get("image")
    caption = row.get("caption")
    if not file or not isinstance(caption, str) or not caption.strip():
        raise ValueError(f"{path}, row {line}: needs a file (or image) and a non-empty caption, got {row}")
    return {**row, "file": str(file), "caption": caption.strip()}


class CocoSource:
    """MS-COCO captions (`captions_train2014.json` / `captions_val2014.json`): one sample per image.

    All of an image's captions go to KEY.json in annotation order; the first is KEY.txt.
    Images are ordered by id, so the same annotation file always gives the same shards. An image
    without a caption cannot train a text-to-image model: it is skipped as `missing_caption`.
    """

    def __init__(self, annotations_file: str | Path, image_dir: str | Path):
        annotations_file, self.image_dir = Path(annotations_file), Path(image_dir)
        if not annotations_file.is_file():
            raise FileNotFoundError(
                f"COCO annotations {annotations_file} do not exist "
                "(captions_val2014.json comes in annotations_trainval2014.zip from cocodataset.org)"
            )
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"COCO image directory {self.image_dir} does not exist")
        coco = json.loads(annotations_file.read_text())
        if "images" not in coco or "annotations" not in coco:
            raise ValueError(f"{annotations_file} is not a COCO captions file: it needs 'images' and 'annotations'")
        captions: dict[int, list[str]] = {}
        for annotation in sorted(coco["annotations"], key=lambda a: a["id"]):
            captions.setdefault(annotation["image_id"], []).append(" ".join(annotation["caption"].split()))
        self.images = sorted(coco["images"], key=lambda i: i["id"])
        self.captions = captions

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> SourceSample:
        image = self.images[index]
        captions = self.captions.get(image["id"])
        if not captions:
            raise SkipSample("missing_caption", f"COCO image {image['id']} ({image['file_name']}) has no caption")
        return SourceSample(
            caption=captions[0],
            image=self.image_dir / image["file_name"],
            meta={
                "source": "coco",
                "image_id": image["id"],
                "file_name": image["file_name"],
                "captions": captions,
                "original_width": image.get("width"),
                "original_height": image.get("height"),
            },
        )
