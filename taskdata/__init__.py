"""Task data: the offline benchmark tasks, user data sources, rendering, caching, batched augmentation.

Public API:

* ``load_task(name, cache_dir=None) -> TaskData`` for ``mnist5k``, ``uci_digits``, ``fashion_mnist``,
  ``animal_mnist``, ``glyphs_<latin|greek|cyrillic|hebrew|arabic>``, ``folder:PATH``, ``npz:PATH``.
  Any failure is a ``TaskDataError`` (a ``ValueError``) with a one-line message.
* ``BENCHMARKS``, ``benchmark_tasks(name)``, ``describe_tasks(names)``, ``fetch_all(names)``.
* ``to_tensor``, ``preprocess_eval``, ``augment_train``: uint8 NHWC arrays -> device tensors ->
  normalised float batches (see ``augment.py``).

Split rule (details in ``splits.py``): a source's official test/validation splits are used when it has
them; otherwise the examples are shuffled once with the task's seed (CRC-32 of its name) and test (20%)
then validation (15% of the rest) are carved; train is the rest. Test is never used for selection.
The cache lives in ``$MUNET_DATA_DIR`` or ``~/.cache/munet-swarm``.
"""
from taskdata.augment import augment_train, preprocess_eval, to_tensor
from taskdata.cache import TaskDataError, default_cache_dir
from taskdata.registry import (
    BENCHMARKS,
    BUILTIN_TASKS,
    TaskData,
    check_same_task,
    check_source,
    parse_task_spec,
    benchmark_tasks,
    describe_tasks,
    fetch_all,
    known_task_names,
    load_task,
)

__all__ = [
    "BENCHMARKS", "BUILTIN_TASKS", "TaskData", "TaskDataError", "augment_train", "benchmark_tasks",
    "check_same_task", "check_source", "parse_task_spec",
    "default_cache_dir", "describe_tasks", "fetch_all", "known_task_names", "load_task",
    "preprocess_eval", "to_tensor",
]
