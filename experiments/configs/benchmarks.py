"""Named benchmark presets (data source + scenario) shared by the config files."""

import ml_collections

from clax.training import default_config

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def benchmark(name: str) -> ml_collections.ConfigDict:
    """Returns ``{data: ..., scenario: ...}`` for a named benchmark.

    Digits benchmarks use scikit-learn's bundled 8x8 digits (no network). Fashion-MNIST
    benchmarks read the IDX files of Debian's ``dataset-fashion-mnist`` package.
    """
    presets = {
        "split_digits": (
            {"source": "digits"},
            {"name": "class_incremental", "classes_per_task": 2, "seed": 0},
        ),
        "task_split_digits": (
            {"source": "digits"},
            {"name": "task_incremental", "classes_per_task": 2, "seed": 0},
        ),
        "permuted_digits": ({"source": "digits"}, {"name": "permuted", "num_tasks": 5, "seed": 0}),
        "rotated_digits": ({"source": "digits"}, {"name": "rotated", "num_tasks": 5, "seed": 0}),
        "split_fmnist": (
            {"source": "idx", "root": FASHION_MNIST_DIR, "name": "fashion_mnist"},
            {"name": "class_incremental", "classes_per_task": 2, "seed": 0},
        ),
        "permuted_fmnist": (
            {"source": "idx", "root": FASHION_MNIST_DIR, "name": "fashion_mnist"},
            {"name": "permuted", "num_tasks": 5, "seed": 0},
        ),
        # GPM's protocol (10 permuted tasks); shared by the projection and Fisher benchmarks.
        "permuted_fmnist_10": (
            {"source": "idx", "root": FASHION_MNIST_DIR, "name": "fashion_mnist"},
            {"name": "permuted", "num_tasks": 10, "seed": 0},
        ),
        "task_split_fmnist": (
            {"source": "idx", "root": FASHION_MNIST_DIR, "name": "fashion_mnist"},
            {"name": "task_incremental", "classes_per_task": 2, "seed": 0},
        ),
        # Pretrain-then-continual: task 0 = classes 0-4 (base), then {5,6}, {7,8}, {9}.
        "pretrain_digits": (
            {"source": "digits"},
            {"name": "pretrain_continual", "classes_per_task": 2, "seed": 0},
        ),
        "pretrain_fmnist": (
            {"source": "idx", "root": FASHION_MNIST_DIR, "name": "fashion_mnist"},
            {"name": "pretrain_continual", "classes_per_task": 2, "seed": 0},
        ),
    }
    if name not in presets:
        raise ValueError(f"unknown benchmark {name!r}; valid choices: {', '.join(sorted(presets))}")
    data, scenario = presets[name]
    return ml_collections.ConfigDict({"data": data, "scenario": scenario})


def use_benchmark(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """Replaces (not merges) the ``data`` and ``scenario`` sections of `config`."""
    preset = benchmark(name)
    for section in ("data", "scenario"):
        fresh = default_config()[section]  # the optional keys, unset (typed placeholders)
        for key in fresh:
            if key not in preset[section] and fresh[key] is None:
                preset[section][key] = fresh.get_ref(key)
        config[section] = preset[section]
    return config
