"""ckcore: the compiled planning core for PyTorch Distributed Checkpoint.

Torch-free: ``import ckcore`` never imports torch. The torch integration
(drop-in helpers, planners, ``patch()``, the range reader) is
:mod:`ckcore.dcp`.
"""

try:
    from ._kernels import _intersect as _check_kernels  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised by a subprocess test
    raise ImportError(
        "ckcore's compiled kernels are missing or do not load "
        f"({exc}). ckcore has no pure-Python fallback. Build and install it with "
        "`pip install .` (needs a C compiler and Cython>=3.1), or for development "
        "`python setup.py build_ext --inplace`."
    ) from exc

from . import layout  # noqa: F401  (the submodule, as ckcore.layout)
from ._version import __version__
from .checkpoint import (
    Checkpoint,
    CheckpointError,
    ItemLocation,
    StorageInfo,
    UnsafeCheckpointError,
    load_metadata,
    load_metadata_columns,
    loads_metadata,
    loads_metadata_columns,
)
from .dtypes import itemsize
from .global_plan import (
    CKCORE_TYPES,
    MetadataTypes,
    create_global_save_plan,
    dedup_save_plans,
    plan_global_save,
    validate_global_plan,
)
from .items import (
    CKCORE_CLASSES,
    Intersection,
    ItemClasses,
    chunk_arrays,
    compare_save_plans,
    contains_usable_plan,
    create_read_items,
    create_read_items_for_chunk_list,
    create_write_item_for_bytesio,
    create_write_item_for_shard,
    create_write_item_for_tensor,
    intersect_chunks,
    merge_delta_local_plans,
)
from .mdcolumns import MetadataColumns
from .metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from .planner import (
    BytesIOWriteData,
    LoadItemType,
    LoadPlan,
    ReadItem,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from .ranges import (
    box_runs,
    byte_ranges,
    coalesce_ranges,
    contiguous_strides,
    copy_box,
    paired_run_info,
    paired_runs,
    read_runs,
)

__all__ = [
    "__version__",
    "BytesIOWriteData",
    "BytesStorageMetadata",
    "CKCORE_CLASSES",
    "CKCORE_TYPES",
    "Checkpoint",
    "CheckpointError",
    "ChunkStorageMetadata",
    "Intersection",
    "ItemClasses",
    "ItemLocation",
    "LoadItemType",
    "LoadPlan",
    "Metadata",
    "MetadataColumns",
    "MetadataTypes",
    "MetadataIndex",
    "ReadItem",
    "SavePlan",
    "StorageInfo",
    "StorageMeta",
    "TensorProperties",
    "TensorStorageMetadata",
    "TensorWriteData",
    "UnsafeCheckpointError",
    "WriteItem",
    "WriteItemType",
    "box_runs",
    "byte_ranges",
    "chunk_arrays",
    "coalesce_ranges",
    "compare_save_plans",
    "contains_usable_plan",
    "contiguous_strides",
    "copy_box",
    "create_global_save_plan",
    "create_read_items",
    "create_read_items_for_chunk_list",
    "create_write_item_for_bytesio",
    "create_write_item_for_shard",
    "create_write_item_for_tensor",
    "dedup_save_plans",
    "intersect_chunks",
    "itemsize",
    "load_metadata",
    "load_metadata_columns",
    "loads_metadata",
    "loads_metadata_columns",
    "merge_delta_local_plans",
    "paired_run_info",
    "paired_runs",
    "plan_global_save",
    "read_runs",
    "validate_global_plan",
]
