"""Between the loader and the step: batches onto the device, JPEGs decoded there, images normalised.

    loader batch (pinned memory on CUDA): uint8 crops [+ JPEG files and their boxes, decode="gpu"]
      --> copied to the device; on CUDA on a side stream, while the step before computes
      --> decode="gpu": the JPEGs decoded on the device in one call (torchvision.io.decode_jpeg),
          each cropped and resized there with its box (data.full_box); one the device refuses is
          decoded here on the CPU, as a worker would have
      --> normalised there: x.float() / 255, - mean, / std (torchvision's ToTensor + Normalize
          arithmetic, bit for bit)
      --> the step

uint8 pixels are a quarter of float32's bytes through shared memory, pinned memory and the bus, and
the normalisation is an elementwise pass that costs the device nothing. A run whose transform is not
open_clip's standard one gets float images, normalised by its workers; they are only copied here.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .data import CorruptSample, Decoder, EncodedBatch, full_box


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float32 normalised, with torchvision's arithmetic: ``ToTensor``'s
    ``x.float().div(255)``, then ``Normalize``'s ``sub_(mean).div_(std)``: the same values, bit for bit,
    as the PIL transform gives from the same uint8 crop. ``mean`` and ``std``: float32 on the device."""
    return images.float().div_(255).sub_(mean[:, None, None]).div_(std[:, None, None])


def decode_jpegs(files: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """JPEG files (1-D uint8 CPU tensors) decoded as RGB on ``device``, all in one call; when that
    call fails, one by one, and None for each file the device does not decode."""
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return list(decode_jpeg(files, mode=ImageReadMode.RGB, device=device))
    except (RuntimeError, ValueError):
        pass
    out: list[torch.Tensor | None] = []
    for f in files:
        try:
            out.append(decode_jpeg(f, mode=ImageReadMode.RGB, device=device))
        except (RuntimeError, ValueError):
            out.append(None)
    return out


def assemble(batch: dict, pixels: torch.Tensor, decoder: Decoder, device: torch.device) -> tuple[torch.Tensor, dict]:
    """The batch's uint8 images on ``device``, in batch order: ``pixels`` (the crops the workers
    made, on the device already) in their places, and each JPEG of ``batch["encoded"]`` decoded on
    ``device`` and cropped there with its box scaled to the full image. Returns the images and what
    changes in the batch besides (``skipped``, and ``texts`` / ``uids`` when a sample was replaced).

    A JPEG the device refuses is decoded here by the CPU path (PIL, the same box: the pixels a worker
    would have made). One that does not decode at all is recorded as the CPU path records it (uid,
    shard, "image does not decode (...)"); as its place in the batch cannot be given to the next
    sample (the worker has moved on), the first good sample of the batch takes it (image, text and
    uid), so every rank's batch keeps its size: DDP gathers features of equal shapes. wit's own
    shards hold JPEGs re-encoded by `wit download`, so this is for damaged files only."""
    enc: EncodedBatch = batch["encoded"]
    size = decoder.pixels.size
    out = torch.empty((enc.size, 3, *size), dtype=torch.uint8, device=device)
    if enc.decoded:
        out[enc.decoded] = pixels
    files = enc.files()
    broken: dict[int, str] = {}
    for k, img in enumerate(decode_jpegs(files, device)):
        place, box, scale = enc.index[k], enc.boxes[k], enc.scales[k]
        if img is not None and img.shape[0] == 3:
            full = None if box is None else full_box(box, scale, img.shape[-1], img.shape[-2])
            out[place] = decoder.pixels.apply(img, full)
            continue
        try:  # the CPU path, on the same box
            out[place] = decoder.decode_pixels(files[k].numpy().tobytes(), box).to(device)
        except CorruptSample as exc:
            broken[place] = str(exc)
    if not broken:
        return out, {}
    uids = list(batch["uids"])
    skipped = list(batch["skipped"]) + [
        (uids[p], enc.shards[enc.index.index(p)], why) for p, why in sorted(broken.items())
    ]
    good = [i for i in range(enc.size) if i not in broken]
    if not good:
        raise CorruptSample(f"no image of a batch of {enc.size} decodes: {next(iter(broken.values()))}")
    texts = batch["texts"].clone()
    for p in broken:
        out[p], texts[p], uids[p] = out[good[0]], texts[good[0]], uids[good[0]]
    return out, {"skipped": skipped, "texts": texts, "uids": uids}


class DeviceBatches:
    """The loader's batches, on ``device``, images normalised (float32): what the step takes.

    On CUDA the next batch is already on its way: as ``next()`` hands out batch n, batch n + 1's
    copies (and JPEG decode, crops and normalisation) are issued on a side stream, so they run while
    step n computes. The step's stream waits for the side stream before it reads a batch
    (``wait_stream``), and each handed-out tensor is marked as used by the step's stream
    (``record_stream``), so the caching allocator does not give its memory to the side stream's next
    batch while the step still reads it. On other devices ``next()`` prepares the batch it returns.

    The stream position (``state.advance``) follows the batches handed out, not the one prepared
    ahead: a checkpoint resumes at the first batch no step has taken."""

    def __init__(self, batches: Iterator[dict], decoder: Decoder, device: torch.device):
        self.batches = batches
        self.decoder = decoder
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.ahead: dict | None = None
        self.stats: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def __iter__(self) -> DeviceBatches:
        return self

    def __next__(self) -> dict:
        if self.stream is None:
            return self.prepare(next(self.batches))
        if self.ahead is None:
            self.ahead = self._issue(next(self.batches))
        batch, self.ahead = self.ahead, None
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self.stream)
        for key in ("images", "texts"):
            batch[key].record_stream(current)
        try:
            self.ahead = self._issue(next(self.batches))
        except StopIteration:
            pass  # the next call takes the loader's StopIteration again
        return batch

    def _issue(self, batch: dict) -> dict:
        with torch.cuda.stream(self.stream):
            return self.prepare(batch)

    def prepare(self, batch: dict) -> dict:
        """One loader batch with its images and texts on the device, the images normalised."""
        norm = batch.get("normalize")
        changes: dict = {}
        if norm is None:  # the per-sample transform's output: float, normalised by the worker
            images = batch["images"].to(self.device, non_blocking=True)
        else:
            pixels = batch["images"].to(self.device, non_blocking=True)
            if batch.get("encoded") is not None:
                pixels, changes = assemble(batch, pixels, self.decoder, self.device)
            images = normalize(pixels, *self._stats(norm))
        texts = changes.pop("texts", batch["texts"]).to(self.device, non_blocking=True)
        return {**batch, **changes, "images": images, "texts": texts, "encoded": None}

    def _stats(self, norm: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """mean and std as float32 tensors on the device, made once (not a copy per step)."""
        key = (tuple(norm[0]), tuple(norm[1]))
        if key not in self.stats:
            self.stats[key] = tuple(torch.tensor(v, dtype=torch.float32, device=self.device) for v in key)
        return self.stats[key]
