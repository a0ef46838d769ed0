"""Low-rank adapters (LoRA, Hu et al. 2021) as a transform of parameter trees.

A kernel W [..., in, out] (a Dense kernel [in, out] or a convolution's [kh, kw, in, out]) becomes
W + scale * A @ B with A [..., in, r] and B [r, out] (Hu et al. 2021, Eq. 3, in our [in, out] layout):
for a convolution A is a convolution of W's window to r channels and B a 1x1 convolution, as PEFT's
and kohya's conv LoRA, so SD 1.x's 1x1-convolution proj_in/proj_out are adapted like Dense layers.
Adapters are a tree that mirrors the model's modules, {"down_blocks_0": {... "to_q": {"lora_A": A,
"lora_B": B}}}; `merge` is a pure function of (base params, adapters), applied inside the train step
(only the adapters are trained, optimised, EMA'd and checkpointed; the base is a frozen argument) and
once before sampling (no per-step cost).

Files: diffusers/PEFT (`unet.<module>.lora_A.weight` / `lora_B.weight`, alphas in the safetensors
metadata; also the older `to_q_lora.down.weight` layout) and kohya (`lora_unet_<module with _>.lora_down
.weight` / `.lora_up.weight` / `.alpha`, text encoder `lora_te_...`) are read with safetensors' numpy API;
`save_file` writes the diffusers/PEFT layout, which diffusers' `load_lora_weights` reads.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from models import sd_unet
from training import text as text_lib
from training import train_step as train_step_lib

# config.lora.targets' default: the attention projections of the SD UNet's transformer blocks.
UNET_TARGETS = (r"attn[12]/(to_q|to_k|to_v|to_out_0)$",)
# The CLIP text encoder's self-attention projections (models/clip.py), as diffusers' LoRA scripts adapt.
TEXT_TARGETS = (r"self_attn/(q_proj|k_proj|v_proj|out_proj)$",)
# Parameter trees an adapter file can address: the diffusion model and the text encoder.
COMPONENTS = ("unet", "text_encoder")
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder"}
METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata entry with the LoraConfig.


@dataclasses.dataclass(frozen=True)
class Settings:
  """config.lora as the training code reads it."""

  rank: int
  alpha: float
  targets: tuple[str, ...] = UNET_TARGETS
  text_targets: tuple[str, ...] = ()  # Kernels of the frozen text encoder that get adapters too.

  @property
  def scale(self) -> float:
    """alpha / rank (Hu et al. 2021, Sec. 4.1)."""
    return self.alpha / self.rank

  @classmethod
  def from_config(cls, lora_config: ml_collections.ConfigDict) -> "Settings":
    alpha = lora_config.alpha if lora_config.alpha is not None else lora_config.rank
    return cls(rank=lora_config.rank, alpha=float(alpha), targets=tuple(lora_config.targets),
               text_targets=tuple(lora_config.get("text_targets") or ()))


def adapts_text_encoder(lora_config: ml_collections.ConfigDict) -> bool:
  """Whether config.lora puts adapters on the frozen text encoder as well (rank > 0, text_targets given)."""
  return bool(lora_config.rank and lora_config.get("text_targets"))


def kernels(params: Any) -> dict[str, tuple[int, ...]]:
  """{module path 'a/b/c': kernel shape} of every Dense or convolution kernel in params."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = [str(getattr(k, "key", k)) for k in path]
    if names[-1] == "kernel" and len(leaf.shape) >= 2:
      out["/".join(names[:-1])] = tuple(leaf.shape)
  return out


def _examples(paths: Sequence[str], n: int = 4) -> str:
  paths = list(paths)
  return ", ".join(repr(p) for p in paths[::max(1, len(paths) // n)][:n])


def target_paths(params: Any, patterns: Sequence[str], *, key: str = "config.lora.targets") -> list[str]:
  """The module paths whose kernel an adapter goes on: those any pattern matches (re.search).

  A pattern that is not a regular expression, or matches no kernel, is a ValueError naming key.
  """
  available = kernels(params)
  chosen = set()
  for pattern in patterns:
    try:
      regex = re.compile(pattern)
    except re.error as e:
      raise ValueError(f"{key}: {pattern!r} is not a regular expression ({e}).") from e
    matched = [p for p in available if regex.search(p)]
    if not matched:
      raise ValueError(f"{key}: the pattern {pattern!r} matches none of the model's {len(available)} "
                       f"weight paths, e.g. {_examples(available)}.")
    chosen.update(matched)
  return sorted(chosen)


def _set(tree: dict, path: str, value: Any) -> None:
  *parents, leaf = path.split("/")
  for part in parents:
    tree = tree.setdefault(part, {})
  tree[leaf] = value


def init_adapters(rng: jax.Array, params: Any, *, paths: Sequence[str], rank: int) -> dict[str, Any]:
  """Adapters on the kernels at paths: A ~ U(+-1/sqrt(fan_in)) (PEFT's kaiming-uniform), B = 0.

  B = 0 makes the adapted model start as the base (Hu et al. 2021, Sec. 4.1). params may be shapes.
  """
  shapes = kernels(params)
  adapters: dict[str, Any] = {}
  for i, path in enumerate(paths):
    shape = shapes[path]
    bound = 1.0 / math.sqrt(math.prod(shape[:-1]))
    a = jax.random.uniform(jax.random.fold_in(rng, i), (*shape[:-1], rank), jnp.float32, -bound, bound)
    _set(adapters, path, {"lora_A": a, "lora_B": jnp.zeros((rank, shape[-1]), jnp.float32)})
  return adapters


def _is_adapter(node: Any) -> bool:
  return isinstance(node, Mapping) and set(node) == {"lora_A", "lora_B"}


def delta(a: jax.Array, b: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """A @ B as a kernel of shape [..., in, out] (float32, full precision)."""
  a2 = jnp.reshape(a, (-1, a.shape[-1])).astype(jnp.float32)
  return jnp.matmul(a2, b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST).reshape(shape)


def merge(params: Any, adapters: Any, *, scale: float = 1.0) -> Any:
  """params with every adapted kernel W replaced by W + scale * A @ B (Hu et al. 2021, Eq. 3).

  Pure and jit-able; the untouched leaves are params' own arrays.
  """
  def walk(p, a, where):
    out = dict(p)
    for name, sub in a.items():
      if name not in p:
        raise KeyError(f"The adapters name {where + name!r}, which is not a module of the model.")
      if _is_adapter(sub):
        kernel = p[name]["kernel"]
        update = delta(sub["lora_A"], sub["lora_B"], kernel.shape)
        out[name] = {**p[name], "kernel": (kernel + scale * update).astype(kernel.dtype)}
      else:
        out[name] = walk(p[name], sub, f"{where}{name}/")
    return out
  return walk(params, adapters, "")


def merge_on_device(params: Any, adapters: Any, *, scale: float = 1.0) -> Any:
  """merge, compiled, with the result laid out as params are (e.g. sharded over the mesh)."""
  shardings = jax.tree.map(lambda x: getattr(x, "sharding", None), params)
  return jax.jit(lambda p, a: merge(p, a, scale=scale), out_shardings=shardings)(params, adapters)


def count(adapters: Any) -> tuple[int, int]:
  """(parameters, bytes) of an adapter tree (arrays or ShapeDtypeStructs)."""
  leaves = jax.tree.leaves(adapters)
  return (sum(math.prod(x.shape) for x in leaves),
          sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in leaves))


# --- Names in files -------------------------------------------------------------------------------


def clip_name(path: str) -> str:
  """Our CLIP path 'layers_0/self_attn/q_proj' -> transformers' 'text_model.encoder.layers.0.self_attn.q_proj'."""
  m = re.fullmatch(r"layers_(\d+)/(.+)", path)
  if m is None:
    return "text_model." + path.replace("/", ".")
  rest = m.group(2).replace("/", ".")
  return f"text_model.encoder.layers.{m.group(1)}.{'mlp.' if rest in ('fc1', 'fc2') else ''}{rest}"


def external_name(component: str, path: str) -> str:
  """The PyTorch module name (diffusers' UNet, transformers' CLIPTextModel) of our module path."""
  return sd_unet.diffusers_name(path) if component == "unet" else clip_name(path)


# Older diffusers layouts: attention processors' `to_q_lora.down` and LoRACompatibleLinear's `lora.down`.
_OLD_PROJ = {"unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
             "text_encoder": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}}
_PEFT_KEY = re.compile(r"^(?:(unet|text_encoder)\.)?(.+?)\.(?:(lora_A|lora_B)\.weight|(alpha)|"
                       r"(?:lora|lora_linear_layer)\.(down|up)\.weight)$")
_OLD_KEY = re.compile(r"^(?:(unet|text_encoder)\.)?(.+?)(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora\."
                      r"(down|up)\.weight$")
_KOHYA_KEY = re.compile(r"^(lora_unet_|lora_te1?_)(.+)\.(lora_down\.weight|lora_up\.weight|alpha)$")


def _parse_key(key: str) -> Optional[tuple[str, str, str, str]]:
  """(component, module name, kind: 'down' | 'up' | 'alpha', format) of a file's key, or None."""
  m = _KOHYA_KEY.match(key)
  if m:
    kind = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}[m.group(3)]
    return KOHYA_PREFIXES[m.group(1)], m.group(2), kind, "kohya"
  key = key.removeprefix("base_model.model.")
  m = _OLD_KEY.match(key)
  if m:
    component = m.group(1) or "unet"
    return component, f"{m.group(2)}.{_OLD_PROJ[component][m.group(3)]}", m.group(4), "diffusers"
  m = _PEFT_KEY.match(key)
  if m:
    kind = {"lora_A": "down", "lora_B": "up"}.get(m.group(3)) or m.group(4) or m.group(5)
    return m.group(1) or "unet", m.group(2), kind, "diffusers"
  return None


def _peft_alpha(metadata: dict[str, Any], component: str, module: str, rank: int) -> float:
  """alpha of a module from diffusers' LoraConfig metadata (alpha_pattern wins); rank if absent (scale 1)."""
  config = {k[len(component) + 1:]: v for k, v in metadata.items() if k.startswith(component + ".")}
  if "lora_alpha" not in config:
    return float(rank)
  for pattern, alpha in (config.get("alpha_pattern") or {}).items():
    if re.search(rf"(^|\.){pattern}$", module):
      return float(alpha)
  return float(config["lora_alpha"])


def _to_ours(down: np.ndarray, up: np.ndarray, shape: tuple[int, ...], key: str) -> tuple[np.ndarray, np.ndarray]:
  """PyTorch's lora_down [r, in(, kh, kw)] and lora_up [out, r(, 1, 1)] -> our A [..., in, r], B [r, out]."""
  rank = down.shape[0]
  a = np.transpose(down, (2, 3, 1, 0)) if down.ndim == 4 else down.T
  b = up.reshape(up.shape[0], -1).T
  if a.shape[:-1] != shape[:-1] and math.prod(a.shape[:-1]) == math.prod(shape[:-1]) == shape[-2]:
    a = a.reshape(*shape[:-1], rank)  # A Dense adapter on a 1x1 convolution, or the other way round.
  if a.shape != (*shape[:-1], rank) or b.shape != (rank, shape[-1]):
    raise ValueError(f"{key}: lora_down {down.shape} and lora_up {up.shape} do not fit the kernel "
                     f"{shape} (ours, [..., in, out]) of the module it names.")
  return a.astype(np.float32), b.astype(np.float32)


def read_file(path: str, params: Mapping[str, Any], *, scale: float = 1.0) -> dict[str, Any]:
  """{component: adapters} of a diffusers/PEFT or kohya LoRA safetensors file, for merge(scale=1).

  params: {"unet": ..., "text_encoder": ...} (those the model has; arrays or shapes). Each module's
  own scale (kohya: alpha / rank; diffusers: lora_alpha / r of its metadata, 1 without) times scale is
  folded into B. A key that names no weight of params is a ValueError listing a few.
  """
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

  if not os.path.exists(path):
    raise FileNotFoundError(f"The LoRA file {path} does not exist.")
  if not path.endswith(".safetensors"):
    raise ValueError(f"{path} is not a .safetensors file: only safetensors are read (unpickling a "
                     "downloaded .bin/.ckpt/.pt runs the code it holds).")
  tensors = load_file(path)
  with safe_open(path, "np") as f:
    metadata = json.loads((f.metadata() or {}).get(METADATA_KEY, "{}"))
  names = {c: {external_name(c, p): (p, shape) for p, shape in kernels(params[c]).items()}
           for c in params}
  kohya = {c: {n.replace(".", "_"): v for n, v in table.items()} for c, table in names.items()}
  groups: dict[tuple[str, str], dict[str, Any]] = {}
  unmatched = []
  for key, value in tensors.items():
    parsed = _parse_key(key)
    if parsed is not None and parsed[0] in params:
      component, module, kind, form = parsed
      found = (kohya if form == "kohya" else names)[component].get(module)
      if found is not None:
        group = groups.setdefault((component, found[0]), {"module": module, "shape": found[1], "key": key})
        group[kind] = value
        continue
    unmatched.append(key)
  where = f"the model's {' and '.join(params)}"
  if not groups:
    raise ValueError(f"{path}: none of its {len(tensors)} keys names a weight of {where}, e.g. "
                     f"{sorted(tensors)[:3]}. Expected diffusers/PEFT keys "
                     "('unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight') or "
                     "kohya ones ('lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q."
                     "lora_down.weight').")
  if unmatched:
    raise ValueError(f"{path}: {len(unmatched)} of its {len(tensors)} keys name no weight of {where}, "
                     f"e.g. {sorted(unmatched)[:3]}: the file was made for another model.")
  adapters: dict[str, Any] = {c: {} for c in params}
  for (component, ours), g in sorted(groups.items()):
    if "down" not in g or "up" not in g:
      raise ValueError(f"{path}: {g['key']} has no {'up' if 'up' not in g else 'down'} matrix beside it.")
    a, b = _to_ours(np.asarray(g["down"]), np.asarray(g["up"]), g["shape"], g["key"])
    rank = a.shape[-1]
    alpha = (float(np.asarray(g["alpha"]).reshape(())) if "alpha" in g
             else _peft_alpha(metadata, component, g["module"], rank))
    _set(adapters[component], ours, {"lora_A": a, "lora_B": b * np.float32(scale * alpha / rank)})
  return {c: tree for c, tree in adapters.items() if tree}


def save_file(path: str, adapters: Mapping[str, Any], *, rank: int, alpha: float) -> None:
  """Writes {component: adapters} in diffusers/PEFT's layout (+ LoraConfig metadata); never overwrites."""
  from safetensors.numpy import save_file as write  # pylint: disable=g-import-not-at-top

  if os.path.exists(path):
    raise FileExistsError(f"{path} exists already; give a new file name.")
  tensors, metadata = {}, {}
  for component, tree in adapters.items():
    modules = []
    for p, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_adapter)[0]:
      module = external_name(component, "/".join(str(k.key) for k in p))
      a, b = np.asarray(jax.device_get(leaf["lora_A"])), np.asarray(jax.device_get(leaf["lora_B"]))
      down = np.transpose(a, (3, 2, 0, 1)) if a.ndim == 4 else a.T
      up = b.T[:, :, None, None] if a.ndim == 4 else b.T
      tensors[f"{component}.{module}.lora_A.weight"] = np.ascontiguousarray(down, np.float32)
      tensors[f"{component}.{module}.lora_B.weight"] = np.ascontiguousarray(up, np.float32)
      modules.append(module)
    metadata.update({f"{component}.r": rank, f"{component}.lora_alpha": alpha,
                     f"{component}.target_modules": sorted(modules)})
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  write(tensors, path + ".tmp", metadata={"format": "pt", METADATA_KEY: json.dumps(metadata, sort_keys=True)})
  os.replace(path + ".tmp", path)


def merge_file(path: str, params: Mapping[str, Any], *, scale: float = 1.0) -> dict[str, Any]:
  """{component: params with the file's adapters merged} (scale times the file's own), on device."""
  adapters = read_file(path, params, scale=scale)
  return {c: merge_on_device(p, adapters[c]) if c in adapters else p for c, p in params.items()}


# --- Training -------------------------------------------------------------------------------------


def init_state(rng: jax.Array, *, base_init: Callable[[jax.Array], Any], tx: Any, settings: Settings,
               text_params: Any = None) -> train_step_lib.TrainState:
  """A train state whose params (and EMA, optimizer state) are adapters on base_init's params' shapes.

  With settings.text_targets, adapters on text_params (the frozen encoder's, arrays or shapes) too: the
  params are then {text.MODEL: the model's adapters, text.TEXT: the encoder's}, as a trainable
  encoder's state is laid out (training/text.py merges them in TextConditioning.split).
  """
  base = jax.eval_shape(base_init, rng).params
  adapters = init_adapters(rng, base, paths=target_paths(base, settings.targets), rank=settings.rank)
  if settings.text_targets:
    paths = target_paths(text_params, settings.text_targets, key="config.lora.text_targets")
    adapters = {text_lib.MODEL: adapters,
                text_lib.TEXT: init_adapters(jax.random.fold_in(rng, 1), text_params, paths=paths,
                                             rank=settings.rank)}
  return train_step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=adapters, ema_params=adapters,
                                   opt_state=tx.init(adapters))


def on_space(fn: Optional[Callable[..., Any]]) -> Optional[Callable[..., Any]]:
  """A step function of the space's frozen params, given the adapter run's {"space", "base"} instead."""
  return None if fn is None else lambda frozen, *args: fn(frozen["space"], *args)


def merge_model(base: Any, adapters: Any, *, settings: Settings) -> Any:
  """A run's adapters with the model's merged into its base once (compiled; laid out as base is); the
  text encoder's adapters, if any, stay beside them ({MODEL, TEXT}) for TextConditioning.split."""
  if not settings.text_targets:
    return merge_on_device(base, adapters, scale=settings.scale)
  return {**adapters, text_lib.MODEL: merge_on_device(base, adapters[text_lib.MODEL], scale=settings.scale)}


def base_params_fn(settings: Settings) -> Callable[[Any, Any], Any]:
  """(frozen {"space", "base"}, adapters) -> the model's parameters, for the train step's params_fn."""
  return lambda frozen, adapters: merge(frozen["base"], adapters, scale=settings.scale)


def load_base(source: str, *, expected: Any, mesh: jax.sharding.Mesh, fsdp_min_size: int) -> Any:
  """The frozen base of config.lora.base on mesh: a converted model directory (model.json + params/,
  scripts/convert_diffusers_unet.py) or a trained workdir (its latest EMA params).

  expected: the shapes the run's config.model has; another tree is a ValueError naming both keys.
  """
  # pylint: disable=g-import-not-at-top
  from evaluation import run as run_lib
  from models import pretrained
  from training import sharding
  # pylint: enable=g-import-not-at-top
  directory = os.path.abspath(os.path.expanduser(source))
  if os.path.exists(os.path.join(directory, "model.json")):
    with open(os.path.join(directory, "model.json")) as f:
      description = json.load(f)
    _, params = pretrained.load(directory, kind=description.get("kind"))
    origin = f"the converted {description.get('kind')} with {description.get('kwargs')}"
  elif os.path.exists(os.path.join(directory, "config.json")):
    _, state, _, _ = run_lib.load_run(directory, mesh=mesh)
    params, origin = jax.device_get(state.ema_params), "a trained run"
  else:
    raise FileNotFoundError(f"config.lora.base={source!r} is neither a converted model (model.json) nor "
                            "a trained workdir (config.json and checkpoints/).")
  have = {k: tuple(np.shape(v)) for k, v in _flat(params).items()}
  want = {k: tuple(v.shape) for k, v in _flat(expected).items()}
  if have != want:
    differ = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
    raise ValueError(f"config.lora.base={source!r} ({origin}) does not have the parameters of "
                     f"config.model (config.model.name and its section): {len(differ)} differ, e.g. " +
                     ", ".join(f"{k}: base {have.get(k)}, model {want.get(k)}" for k in differ[:3]) + ".")
  shardings = sharding.state_shardings(expected, mesh=mesh, fsdp_min_size=fsdp_min_size)
  return jax.device_put(jax.tree.map(lambda x: np.asarray(x, np.float32), params), shardings)


def _flat(tree: Any) -> dict[str, Any]:
  return {"/".join(str(getattr(k, "key", k)) for k in p): v
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def sampling_params(config: ml_collections.ConfigDict, ema_adapters: Any, *, image_shape: tuple[int, ...],
                    mesh: jax.sharding.Mesh) -> Any:
  """A LoRA run's sampling parameters: its base with the EMA adapters merged once."""
  from training import tasks  # pylint: disable=g-import-not-at-top
  expected = tasks.base_shapes(config, image_shape=image_shape)
  base = load_base(config.lora.base, expected=expected, mesh=mesh, fsdp_min_size=config.mesh.fsdp_min_size)
  return merge_model(base, ema_adapters, settings=Settings.from_config(config.lora))
