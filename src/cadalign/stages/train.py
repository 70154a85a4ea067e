"""DVC stage: train one round's alignment networks (one per downsampling factor).

Trains on the tiles of every city with the round's CURRENT labels (round 1: the noisy input
labels). Each network sees patches whose labels are misaligned afresh by a random field and
learns the field that moves them back onto the labels.

Writes ``--out/ds<f>.pt`` (weights + model config) for each factor, the training log
``--log`` (CSV: round, ds, step, loss terms, lr, patches/s; a DVC plot), and keeps resumable
checkpoints in ``--checkpoints`` (a DVC ``persist`` output): a killed run resumes where it
stopped when the stage is rerun, with the same patches, weights and log as an uninterrupted run
(the log's rows are kept in the checkpoints, so a rerun writes the whole log). A checkpoint made
for other inputs or settings is discarded; settings that do not change the result
(:data:`COSMETIC_OPTIM`) do not count.
With ``train.warm_start`` each network starts from ``--init/ds<f>.pt`` (the previous round's
network; round 1: the initialize stage's) instead of a fresh initialisation.
With ``train.cascade`` each finer network trains on the labels as the round's coarser
networks realign them (``realign.window`` settings), the residual it meets in the chain.
With ``train.grow`` a finer network that has no network of its factor to start from starts
from the next coarser network the round just trained. ``train.round_factors`` gives
named rounds other factors than ``train.factors`` (the realign stage uses every network the
round wrote).

Usage (DDP: ``torchrun --nproc_per_node N -m cadalign.stages.train ...``)::

    python -m cadalign.stages.train --params params.yaml --round round1 --cities-dir data/cities \
        --labels data/labels/round0 --init data/models/round0 --out data/models/round1 \
        --checkpoints data/checkpoints/round1 --log data/train_logs/round1.csv
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import shapely
import torch

from cadalign.align import AlignConfig, realign
from cadalign.atomic import atomic_path, write_text
from cadalign.config import load_cities, load_section
from cadalign.geo.labels import label_files, load_labelled_tiles
from cadalign.device_patches import DeviceSampler
from cadalign.patches import PatchConfig, PatchDataset, TileData
from cadalign.provenance import check_input, write_manifest
from cadalign.stages.common import add_threads_option, make_parser, set_threads, setup_logging
from cadalign.settings.realign import RealignStageConfig
from cadalign.settings.train import TrainStageConfig, check_round_names, network_seed, patch_config
from cadalign.tracking import is_rank_zero, stage_run
from cadalign.train import BatchSource, TrainConfig, checkpoint_files, load_model, train, training_device

logger = logging.getLogger(__name__)

LOG_COLUMNS = ("round", "ds", "step", "loss", "lr", "patches_per_s")

COSMETIC_OPTIM = ("log_every", "checkpoint_every", "prefetch")
"""``train.optim`` keys that change no weight, so a checkpoint made with other values is kept:
logging and checkpointing read the state only, and a prefetched batch has the same bytes.
(``num_workers`` is not one: the exact sampler's patches depend on the number of workers.)"""


def training_tiles(cities_dir: Path, labels_dir: Path, cities: list[str]) -> list[TileData]:
    """The tiles of a label set that hold at least one polygon, as the patch sampler takes them."""
    tiles = load_labelled_tiles(cities_dir, labels_dir, cities)
    return [TileData(image=t.tile.image, labels=t.geoms, ids=t.ids, city=t.city) for t in tiles if len(t.geoms)]


def fingerprint(
    cfg: TrainStageConfig,
    labels_dir: Path,
    cities: list[str],
    ds: int,
    init: Path | None,
    coarser: tuple[AlignConfig, list[torch.nn.Module]] | None = None,
    grown_from: torch.nn.Module | None = None,
) -> str:
    """Hash of the settings, the label files and the initial network a network is trained from.

    ``coarser``: with ``train.cascade``, the window settings and the networks that realigned
    the labels before this one trains on them. ``grown_from``: with ``train.grow``, the
    coarser network this one starts from.
    """

    def add_weights(net: torch.nn.Module) -> None:
        for tensor in net.state_dict().values():
            h.update(tensor.detach().float().cpu().numpy().tobytes())

    settings = dataclasses.asdict(cfg)
    for key in COSMETIC_OPTIM:
        del settings["optim"][key]
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update(str(ds).encode())
    if coarser is not None:
        window, nets = coarser
        h.update(json.dumps(dataclasses.asdict(window), sort_keys=True).encode())
        for net in nets:
            add_weights(net)
    if grown_from is not None:
        h.update(b"grown")
        add_weights(grown_from)
    for path in label_files(labels_dir, cities):
        h.update(path.relative_to(labels_dir).as_posix().encode())
        h.update(hashlib.sha256(path.read_bytes()).digest())
    if init is not None:
        h.update(hashlib.sha256(init.read_bytes()).digest())
    return h.hexdigest()


def cascade_labels(
    data: list[TileData], net: torch.nn.Module, ds: int, window: AlignConfig, device: str
) -> list[TileData]:
    """The tiles with their labels realigned by the network of factor ``ds`` (``train.cascade``)."""
    moved = [dataclasses.replace(t, labels=realign({ds: net}, t.image, t.labels, device, window)) for t in data]
    shift = np.concatenate(
        [np.linalg.norm(shapely.get_coordinates(m.labels) - shapely.get_coordinates(t.labels), axis=1) for m, t in zip(moved, data)]
    )
    logger.info("cascade: ds=%d moved the training labels %.2f px on average", ds, shift.mean())
    return moved


def patch_source(data: list[TileData], pcfg: PatchConfig, optim: TrainConfig) -> PatchDataset | BatchSource:
    """The patches of one network, per ``train.patches.sampler``, for this process's rank.

    exact: a dataset drawn in the loader's workers (a resumed run continues its stream);
    device: whole batches drawn on the training device by step (a resume redraws them exactly).
    """
    rank = int(os.environ.get("RANK", "0"))
    if pcfg.sampler == "device":
        return DeviceSampler(data, pcfg, optim.batch_size, training_device(optim), rank=rank)
    return PatchDataset(data, pcfg, rank=rank)


def initial_network(init_dir: Path, ds: int, cfg: TrainStageConfig) -> Path:
    """The file of the network of factor ``ds`` to warm-start from, checked against ``train.model``.

    Raises:
        FileNotFoundError: if it is missing.
        ValueError: if it was made with other ``train.model`` settings.
    """
    path = init_dir / f"ds{ds}.pt"
    if not path.is_file():
        raise FileNotFoundError(
            f"train.warm_start is true but {path} is missing: run the stage that writes {init_dir} "
            "(dvc repro), or set train.warm_start: false (train.grow: true starts a finer network "
            "without one from the coarser network the round just trained)"
        )
    if load_model(path).cfg != cfg.model:
        raise ValueError(
            f"{path} was made with other train.model settings than params.yaml's; rerun the stage that "
            f"writes {init_dir} (dvc repro), or set train.warm_start: false"
        )
    return path


def _checkpoint_for(ckpt_dir: Path, ds: int, stamp: str) -> Path:
    """The checkpoint path of factor ``ds``, cleared (with the previous one) if it was made for other inputs."""
    ckpt = ckpt_dir / f"ds{ds}.ckpt"
    stamp_path = ckpt_dir / f"ds{ds}.fingerprint"
    made = checkpoint_files(ckpt)
    if made and (not stamp_path.exists() or stamp_path.read_text() != stamp):
        logger.warning("%s was made for other labels or settings; starting afresh", ckpt)
        for path in made:
            path.unlink()
    if is_rank_zero():
        write_text(stamp_path, stamp)
    return ckpt


def main(argv: list[str] | None = None) -> None:
    parser = make_parser("Train one round's alignment networks on the round's current labels.")
    parser.add_argument("--round", required=True, help="round name, e.g. round1")
    parser.add_argument("--cities-dir", type=Path, required=True)
    parser.add_argument("--labels", type=Path, required=True, help="the round's current labels (<city>/<tile>.gpkg)")
    parser.add_argument("--out", type=Path, required=True, help="folder of the trained networks")
    parser.add_argument("--checkpoints", type=Path, required=True, help="folder of resumable checkpoints")
    parser.add_argument("--log", type=Path, required=True, help="training log CSV")
    parser.add_argument(
        "--init", type=Path, help="networks (ds<f>.pt) to start from when train.warm_start is true: the previous round's"
    )
    add_threads_option(parser)
    args = parser.parse_args(argv)
    setup_logging()
    set_threads(parser, args)
    cfg = load_section(args.params, "train", TrainStageConfig)
    check_round_names(args.params, cfg)
    if cfg.warm_start and args.init is None:
        raise ValueError(f"{args.params}: train.warm_start is true; pass --init <the previous round's networks>")
    window = load_section(args.params, "realign", RealignStageConfig).window if cfg.cascade else None
    cities = sorted(load_cities(args.params))
    recorded = [check_input(args.params, args.labels, "labels", cities)]
    if args.init is not None and args.init.is_dir():
        recorded.append(check_input(args.params, args.init, "networks"))
    data = training_tiles(args.cities_dir, args.labels, cities)
    logger.info("%s: %d tiles, %d buildings", args.round, len(data), sum(len(t.labels) for t in data))
    round_index = int("".join(c for c in args.round if c.isdigit()) or 0)
    rows: list[str] = [",".join(LOG_COLUMNS)]
    args.checkpoints.mkdir(parents=True, exist_ok=True)
    with stage_run(f"train@{args.round}", {"train": dataclasses.asdict(cfg), "labels": str(args.labels)}) as run:
        # Rank 0 writes the networks (atomically, as a folder); other ranks only train.
        out_dir = atomic_path(args.out) if is_rank_zero() else contextlib.nullcontext(Path(tempfile.mkdtemp()))
        with out_dir as out_tmp:
            out_tmp.mkdir(exist_ok=True)
            trained: list[torch.nn.Module] = []  # this round's networks so far, coarse to fine
            factors = cfg.factors_of(args.round)
            for i, ds in enumerate(factors):
                seed = network_seed(cfg, round_index, ds)
                pcfg = patch_config(cfg, ds, seed)
                optim = dataclasses.replace(cfg.optim, seed=seed)
                # train.grow: a finer network without its own start begins from the coarser one
                grow = cfg.grow and bool(trained) and not (cfg.warm_start and (args.init / f"ds{ds}.pt").is_file())
                init = initial_network(args.init, ds, cfg) if cfg.warm_start and not grow else None
                grown_from = trained[-1] if grow else None
                coarser = (window, trained) if window is not None and trained else None
                stamp = fingerprint(cfg, args.labels, cities, ds, init, coarser, grown_from)
                ckpt = _checkpoint_for(args.checkpoints, ds, stamp)
                dataset = patch_source(data, pcfg, optim)  # each rank draws its own patches
                offset = i * optim.steps  # MLflow step axis: networks one after the other

                def on_log(step: int, stats: dict[str, float], ds: int = ds, offset: int = offset) -> None:
                    run.log_metrics({f"ds{ds}.{k}": v for k, v in stats.items()}, step=offset + step)

                logger.info("training ds=%d: input %d px, output %d px", ds, pcfg.input_size, pcfg.output_size)
                start = load_model(init) if init is not None else grown_from
                if init is not None:
                    logger.info("ds=%d starts from %s", ds, init)
                elif grown_from is not None:
                    logger.info("ds=%d starts from the ds=%d network just trained (train.grow)", ds, factors[i - 1])
                result = train(cfg.model, cfg.loss, optim, dataset, ckpt, out_tmp / f"ds{ds}.pt", on_log=on_log, init=start)
                for step, stats in result["log"]:  # the whole log, rows before a resume from the checkpoint
                    rows.append(",".join([args.round, str(ds), str(step)] + [f"{stats[k]:.6g}" for k in LOG_COLUMNS[3:]]))
                    if step <= result["start_step"] and is_rank_zero():  # this run's MLflow series gets them too
                        on_log(step, stats)
                if result["steps"] > result["start_step"]:  # not already finished in a checkpoint
                    run.log_metrics({f"ds{ds}.final_loss": result["loss"]["loss"]}, step=offset + result["steps"])
                trained.append(result["model"])
                if window is not None and i + 1 < len(factors):
                    data = cascade_labels(data, result["model"], ds, window, result["device"])
            if is_rank_zero():
                write_manifest(out_tmp, args.params, "train", args.round, recorded, cities=cities)
        if is_rank_zero():
            write_text(args.log, "\n".join(rows) + "\n")
            run.log_artifact(args.log)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    logger.info("%s: networks in %s", args.round, args.out)


if __name__ == "__main__":
    main()
