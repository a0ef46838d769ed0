"""Input pipeline: image datasets read with grain, batches as sharded jax.Arrays, no TensorFlow.

config.data.name is "digits" (sklearn's 8x8 digits, offline, upsampled to image_size) or
any tfds image dataset, read with `tfds.data_source`. tfds datasets must be prepared once
in the array_record format. That step needs TensorFlow and internet; training does not:

  pip install tensorflow
  tfds build cifar10 --file_format=array_record  # --data_dir=DIR for config.data.data_dir=DIR.

Usage:

  validate_data_config(config.data, global_batch_size=B, process_count=jax.process_count())
  ds = create_dataset(config.data, global_batch_size=B, seed=config.seed, mesh=mesh)
  batch = next(ds)  # {"image": float32 [B,H,W,C] in [-1, 1], "label": int32 [B]}, sharded.
  state = ds.get_state()  # JSON-serialisable; ds.set_state(state) resumes exactly.

`create_numpy_iterator` gives the same batches as host numpy (this process's part).
"""

from input_pipeline.pipeline import (
    Dataset,
    NumpyIterator,
    build_process_batches,
    create_dataset,
    create_numpy_iterator,
    read_captions,
    shuffled_batches,
    validate_data_config,
)
from input_pipeline.sources import SOURCES, DigitsSource, prepare_command

__all__ = [
    "SOURCES",
    "Dataset",
    "DigitsSource",
    "NumpyIterator",
    "build_process_batches",
    "create_dataset",
    "create_numpy_iterator",
    "prepare_command",
    "read_captions",
    "shuffled_batches",
    "validate_data_config",
]
