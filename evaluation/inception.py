"""The FID Inception network in Flax: the 2015-12-05 TensorFlow graph as ported in pytorch-fid.

Szegedy et al. 2016's Inception-v3 with the differences of the graph every FID is computed with
(Heusel et al. 2017; pytorch-fid's FIDInceptionA/C/E_1/E_2): the average pools of the A, C and E
blocks leave the zero padding out of the mean (count_include_pad=False), and the last E block
max-pools. Images are resized to 299 x 299 bilinearly (align_corners=False, no antialiasing) and
scaled to [-1, 1] as pytorch-fid does; the outputs are the 2048 pool3 features (FID) and the 1008-way
logits (IS). Parameter names follow torchvision's Inception3, so a pytorch-fid state dict converts
key by key (convert_state_dict; scripts/convert_inception.py).
"""

from __future__ import annotations

import functools
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from training import sharding

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
RESOLUTION = 299  # Inception-v3's input side.
NUM_FEATURES = 2048  # pool3.
NUM_LOGITS = 1008  # The 2015-12-05 graph's classes (1000 ImageNet classes and 8 unused).
BN_EPSILON = 1e-3  # torchvision's BasicConv2d.

Array = jnp.ndarray


class BasicConv2d(nn.Module):
  """Convolution without bias, batch norm (inference statistics), ReLU (torchvision's BasicConv2d)."""

  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: tuple[int, int] = (0, 0)
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = nn.Conv(self.features, self.kernel_size, strides=self.strides,
                padding=[(p, p) for p in self.padding], use_bias=False, precision=self.precision,
                name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, name="bn")(x)
    return nn.relu(x)


def _avg_pool_same(x: Array) -> Array:
  """3x3 average pool, stride 1, padding 1, the padding left out of the mean (TensorFlow's pool)."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_valid(x: Array) -> Array:
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
  """pytorch-fid's FIDInceptionA (Mixed_5b-d)."""

  pool_features: int
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    b1 = conv(64, (1, 1), name="branch1x1")(x)
    b5 = conv(48, (1, 1), name="branch5x5_1")(x)
    b5 = conv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = conv(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = conv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """torchvision's InceptionB (Mixed_6a), unchanged in the FID graph."""

  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    b3 = conv(384, (3, 3), strides=(2, 2), name="branch3x3")(x)
    bd = conv(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = conv(96, (3, 3), strides=(2, 2), name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_valid(x)], axis=-1)


class InceptionC(nn.Module):
  """pytorch-fid's FIDInceptionC (Mixed_6b-e)."""

  channels_7x7: int
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    c7 = self.channels_7x7
    b1 = conv(192, (1, 1), name="branch1x1")(x)
    b7 = conv(c7, (1, 1), name="branch7x7_1")(x)
    b7 = conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = conv(c7, (1, 1), name="branch7x7dbl_1")(x)
    bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = conv(192, (1, 1), name="branch_pool")(_avg_pool_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """torchvision's InceptionD (Mixed_7a), unchanged in the FID graph."""

  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    b3 = conv(192, (1, 1), name="branch3x3_1")(x)
    b3 = conv(320, (3, 3), strides=(2, 2), name="branch3x3_2")(b3)
    b7 = conv(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = conv(192, (3, 3), strides=(2, 2), name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_valid(x)], axis=-1)


class InceptionE(nn.Module):
  """pytorch-fid's FIDInceptionE_1 (pool="avg", Mixed_7b) and FIDInceptionE_2 (pool="max", Mixed_7c)."""

  pool: str
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    b1 = conv(320, (1, 1), name="branch1x1")(x)
    b3 = conv(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                          conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
    bd = conv(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = conv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                          conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
    if self.pool == "avg":
      pooled = _avg_pool_same(x)
    else:  # The FID graph max-pools here (pytorch-fid: "likely an error" of that graph, kept for FID).
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    bp = conv(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
  """The FID Inception-v3 on [N, 299, 299, 3] inputs in [-1, 1]: (pool3 [N, 2048], logits [N, 1008])."""

  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: Array) -> dict[str, Array]:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    x = conv(32, (3, 3), strides=(2, 2), name="Conv2d_1a_3x3")(x)
    x = conv(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = conv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool_valid(x)
    x = conv(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = conv(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = _max_pool_valid(x)
    for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
      x = InceptionA(pool_features, precision=self.precision, name=name)(x)
    x = InceptionB(precision=self.precision, name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(c7, precision=self.precision, name=name)(x)
    x = InceptionD(precision=self.precision, name="Mixed_7a")(x)
    x = InceptionE("avg", precision=self.precision, name="Mixed_7b")(x)
    x = InceptionE("max", precision=self.precision, name="Mixed_7c")(x)
    pool3 = jnp.mean(x, axis=(1, 2))
    fc = nn.Dense(NUM_LOGITS, precision=self.precision, name="fc")
    logits = fc(pool3)
    # The Inception Score of Salimans et al. 2016 (openai/improved-gan) reads the logits without the
    # bias ("softmax/logits/MatMul"), as torch-fidelity's "logits_unbiased".
    logits_unbiased = jnp.dot(pool3, fc.variables["params"]["kernel"], precision=self.precision)
    return {"pool3": pool3, "logits": logits, "logits_unbiased": logits_unbiased}


def preprocess(images: Array, *, value_range: tuple[float, float] | None = None) -> Array:
  """Images [N, H, W, C] (C = 1 or 3) to the network's input: RGB, 299 x 299, in [-1, 1].

  uint8 pixels are divided by 255; float images are mapped from value_range, e.g. (-1, 1) for model
  outputs or (0, 1), to [0, 1]. Then, as pytorch-fid: bilinear resize (align_corners=False, no
  antialiasing: torch.nn.functional.interpolate) and 2 x - 1. Grey images are repeated to RGB, as PIL's
  convert("RGB") in pytorch-fid's loader.
  """
  if images.dtype == jnp.uint8:
    x = images.astype(jnp.float32) / 255.0
  elif value_range is None:
    raise ValueError(f"Float images ({images.dtype}) need value_range, e.g. (-1, 1) or (0, 1).")
  else:
    lo, hi = value_range
    x = (images.astype(jnp.float32) - lo) / (hi - lo)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  if x.shape[-1] != 3:
    raise ValueError(f"Inception input must have 1 or 3 channels, got shape {images.shape}.")
  x = jax.image.resize(x, (x.shape[0], RESOLUTION, RESOLUTION, 3), method="bilinear", antialias=False)
  return 2.0 * x - 1.0


# ----------------------------------------------------------------------------------------------------
# Weights: pytorch-fid's state dict -> Flax variables -> a flat .npz.


def abstract_variables(model: InceptionV3 | None = None) -> Any:
  """Shapes and dtypes of the network's variables ({"params", "batch_stats"}), without allocating them."""
  model = model or InceptionV3()
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, RESOLUTION, RESOLUTION, 3)))


def random_variables(seed: int = 0) -> dict[str, Any]:
  """Randomly initialised variables with non-trivial batch statistics (tests: the real code path)."""
  abstract = abstract_variables()
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  rng = np.random.default_rng(seed)
  out = []
  for path, leaf in leaves:
    name = jax.tree_util.keystr(path)
    if name.endswith("['kernel']"):  # He et al. 2015: the features still depend on the input at pool3.
      fan_in = int(np.prod(leaf.shape[:-1]))
      value = rng.normal(0.0, np.sqrt(2.0 / fan_in), leaf.shape)
    elif name.endswith("['var']") or name.endswith("['scale']"):
      value = rng.uniform(0.8, 1.2, leaf.shape)
    else:  # bias, mean.
      value = rng.normal(0.0, 0.05, leaf.shape)
    out.append(value.astype(np.float32))
  return jax.tree_util.tree_unflatten(treedef, out)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, f"{prefix}{key}/"))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def _unflatten(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for key, value in flat.items():
    node = tree
    *parents, leaf = key.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def convert_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """pytorch-fid's (torchvision Inception3) state dict, as numpy arrays, to this module's variables.

  conv.weight [O, I, kh, kw] -> conv/kernel [kh, kw, I, O]; bn.weight/bias/running_mean/running_var ->
  bn/scale/bias (params) and bn/mean/var (batch_stats); fc.weight [1008, 2048] -> fc/kernel [2048, 1008].
  num_batches_tracked and the auxiliary classifier (absent from the FID file) are ignored.
  """
  flat = {}
  for key, value in state_dict.items():
    value = np.asarray(value)
    *module, leaf = key.split(".")
    if module and module[0] == "AuxLogits" or leaf == "num_batches_tracked":
      continue
    path = "/".join(module)
    if module[-1] == "conv" and leaf == "weight":
      flat[f"params/{path}/kernel"] = value.transpose(2, 3, 1, 0)
    elif module[-1] == "bn":
      target = {"weight": ("params", "scale"), "bias": ("params", "bias"),
                "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}[leaf]
      flat[f"{target[0]}/{path}/{target[1]}"] = value
    elif module == ["fc"]:
      flat[f"params/fc/{'kernel' if leaf == 'weight' else 'bias'}"] = value.T if leaf == "weight" else value
    else:
      raise ValueError(f"Unexpected key {key!r} in the Inception state dict: not pytorch-fid's "
                       "pt_inception-2015-12-05 weights?")
  variables = _unflatten({k: v.astype(np.float32) for k, v in flat.items()})
  check_variables(variables, source="the converted state dict")
  return variables


def check_variables(variables: Any, *, source: str) -> None:
  """Raises ValueError unless variables have exactly the FID Inception's names and shapes."""
  expected = {k: tuple(v.shape) for k, v in _flatten(abstract_variables()).items()}
  got = _flatten(variables)
  missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
  if missing or extra:
    raise ValueError(f"{source} is not the FID Inception: missing {missing[:5]}, unexpected {extra[:5]}.")
  for key, shape in expected.items():
    if tuple(got[key].shape) != shape:
      raise ValueError(f"{source}: {key} has shape {tuple(got[key].shape)}, expected {shape}.")


def save_variables(path: str, variables: Any) -> None:
  """Writes the variables to a flat .npz ("params/Mixed_5b/branch1x1/conv/kernel", ...)."""
  path = os.path.expanduser(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "wb") as f:
    np.savez(f, **{k: np.asarray(v) for k, v in _flatten(jax.device_get(variables)).items()})
  os.replace(path + ".tmp", path)


def missing_weights_message(path: str) -> str:
  """What to do when config.eval.inception_path does not exist."""
  return (
      f"config.eval.inception_path={path!r} does not exist. FID and IS use the Inception weights of "
      f"pytorch-fid (the 2015-12-05 TensorFlow graph every FID is computed with), converted once to a "
      f"Flax .npz (torch is needed for the conversion only):\n"
      f"  wget {FID_WEIGHTS_URL}\n"
      f"  pip install torch\n"
      f"  python scripts/convert_inception.py pt_inception-2015-12-05-6726825d.pth {path}\n"
      f"or point --config.eval.inception_path at a converted file.")


def load_variables(path: str) -> dict[str, Any]:
  """The converted FID Inception weights at path (scripts/convert_inception.py writes them)."""
  path = os.path.expanduser(path)
  if not os.path.exists(path):
    raise FileNotFoundError(missing_weights_message(path))
  with np.load(path) as f:
    variables = _unflatten({k: f[k] for k in f.files})
  check_variables(variables, source=path)
  return variables


class FeatureExtractor:
  """pool3 features and logits of uint8 images, in batches sharded over every device of the mesh."""

  def __init__(self, variables: Any, *, mesh: jax.sharding.Mesh, batch_size: int):
    if batch_size % mesh.size:
      raise ValueError(f"config.eval.batch_size={batch_size} is not a multiple of the "
                       f"{mesh.size} devices.")
    self.batch_size = batch_size
    self._batch_sharding = sharding.batch_sharding(mesh)
    replicated = NamedSharding(mesh, P())
    self._variables = jax.device_put(variables, replicated)
    model = InceptionV3()

    def forward(variables, images):
      return model.apply(variables, preprocess(images))

    self._forward = jax.jit(forward, in_shardings=(replicated, self._batch_sharding),
                            out_shardings=self._batch_sharding)

  def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
    """{"pool3": [N, 2048], "logits": [N, 1008], "logits_unbiased": [N, 1008]} float32 on every process.

    images: uint8 [N, H, W, C], the same on every process. Generated images are quantised to uint8
    first (writers.to_uint8), as the PNG files pytorch-fid reads are.
    """
    images = np.asarray(images)
    outputs = []
    for start in range(0, len(images), self.batch_size):
      chunk = images[start:start + self.batch_size]
      n = len(chunk)
      if n < self.batch_size:  # Pad the last batch; the padding's features are dropped.
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch_size - n, axis=0)])
      batch = jax.make_array_from_callback(chunk.shape, self._batch_sharding, lambda idx: chunk[idx])
      out = self._forward(self._variables, batch)
      if jax.process_count() > 1:
        out = multihost_utils.process_allgather(out, tiled=True)
      outputs.append(jax.tree.map(lambda a: np.asarray(a)[:n], jax.device_get(out)))
    return {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}
