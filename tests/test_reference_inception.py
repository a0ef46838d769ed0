"""Optional: the Flax FID Inception against pytorch-fid's torch network, with the same random weights.

Needs torch (pip install -r requirements-reference.txt, in a separate environment). pytorch-fid's
module imports torchvision, whose PyPI wheel does not load beside the CPU build of torch==2.13.0; where
pytorch_fid does not import, the torch reference is the network written out below from pytorch-fid's
inception.py and torchvision's Inception3 (BasicConv2d, InceptionA-E, FIDInceptionA/C/E_1/E_2,
InceptionV3.forward's resize and normalisation). Where it does, pytorch-fid's own InceptionV3 is
compared as well, its weight download patched to return the random state dict.
"""

import importlib.util
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

from evaluation import inception  # pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class BasicConv2d(torch.nn.Module):

  def __init__(self, cin, cout, **kwargs):
    super().__init__()
    self.conv = torch.nn.Conv2d(cin, cout, bias=False, **kwargs)
    self.bn = torch.nn.BatchNorm2d(cout, eps=0.001)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


class FIDInceptionA(torch.nn.Module):

  def __init__(self, cin, pool_features):
    super().__init__()
    self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
    self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
    self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

  def forward(self, x):
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    bp = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False))
    return torch.cat([self.branch1x1(x), b5, b3, bp], 1)


class InceptionB(torch.nn.Module):

  def __init__(self, cin):
    super().__init__()
    self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

  def forward(self, x):
    bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return torch.cat([self.branch3x3(x), bd, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionC(torch.nn.Module):

  def __init__(self, cin, channels_7x7):
    super().__init__()
    c7 = channels_7x7
    self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
    self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
    self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

  def forward(self, x):
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = x
    for i in range(1, 6):
      bd = getattr(self, f"branch7x7dbl_{i}")(bd)
    bp = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False))
    return torch.cat([self.branch1x1(x), b7, bd, bp], 1)


class InceptionD(torch.nn.Module):

  def __init__(self, cin):
    super().__init__()
    self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
    self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

  def forward(self, x):
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
    return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionE(torch.nn.Module):

  def __init__(self, cin, pool):
    super().__init__()
    self.pool = pool
    self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
    self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
    self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
    self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
    self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

  def forward(self, x):
    b3 = self.branch3x3_1(x)
    b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
    if self.pool == "avg":  # FIDInceptionE_1.
      pooled = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
    else:  # FIDInceptionE_2.
      pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
    return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


class FIDInception(torch.nn.Module):
  """fid_inception_v3() with InceptionV3([3])'s forward: resize, normalise, blocks 0-3, and fc."""

  def __init__(self):
    super().__init__()
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
    self.Mixed_5b = FIDInceptionA(192, pool_features=32)
    self.Mixed_5c = FIDInceptionA(256, pool_features=64)
    self.Mixed_5d = FIDInceptionA(288, pool_features=64)
    self.Mixed_6a = InceptionB(288)
    self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
    self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
    self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
    self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
    self.Mixed_7a = InceptionD(768)
    self.Mixed_7b = FIDInceptionE(1280, "avg")
    self.Mixed_7c = FIDInceptionE(2048, "max")
    self.fc = torch.nn.Linear(2048, 1008)

  def forward(self, x):  # x: [N, 3, H, W] in [0, 1].
    x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    x = 2 * x - 1
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = F.max_pool2d(x, kernel_size=3, stride=2)
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
    x = F.max_pool2d(x, kernel_size=3, stride=2)
    for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
      x = getattr(self, f"Mixed_{name}")(x)
    pool3 = F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)
    return pool3, self.fc(pool3)


def random_state_dict(seed: int) -> dict:
  """A state dict of the FID network with random weights and non-trivial batch statistics."""
  torch.manual_seed(seed)
  model = FIDInception()
  with torch.no_grad():
    for name, tensor in model.state_dict().items():
      if name.endswith("num_batches_tracked"):
        continue
      if name.endswith("running_var") or name.endswith("bn.weight"):
        tensor.uniform_(0.5, 1.5)
      elif name.endswith("conv.weight") or name == "fc.weight":
        tensor.normal_(0.0, 1.0 / np.sqrt(np.prod(tensor.shape[1:])))
      else:
        tensor.normal_(0.0, 0.1)
  return model.state_dict()


def torch_features(state_dict, images_uint8: np.ndarray):
  model = FIDInception().eval()
  model.load_state_dict(state_dict)
  x = torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float() / 255.0
  if x.shape[1] == 1:
    x = x.repeat(1, 3, 1, 1)
  with torch.no_grad():
    pool3, logits = model(x)
  return pool3.numpy(), logits.numpy()


def load_converter():
  spec = importlib.util.spec_from_file_location("convert_inception",
                                                os.path.join(ROOT, "scripts", "convert_inception.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """A random pytorch-fid-layout .pth, converted by scripts/convert_inception.py."""
  tmp = tmp_path_factory.mktemp("inception")
  state_dict = random_state_dict(seed=0)
  torch.save(state_dict, str(tmp / "random.pth"))
  out = load_converter().convert(str(tmp / "random.pth"), str(tmp / "random.npz"))
  return state_dict, inception.load_variables(out)


def flax_features(variables, images_uint8):
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
  extractor = inception.FeatureExtractor(variables, mesh=mesh, batch_size=len(jax.devices()))
  return extractor(images_uint8)


@pytest.mark.parametrize("shape", [(8, 32, 32, 3), (8, 16, 16, 1), (8, 331, 317, 3)],
                         ids=["upsample", "grey", "downsample"])
def test_features_and_logits_match_torch(converted, shape):
  state_dict, variables = converted
  images = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
  pool3, logits = torch_features(state_dict, images)
  ours = flax_features(variables, images)
  assert pool3.std() > 1e-2  # The comparison is not between zeros.
  np.testing.assert_allclose(ours["pool3"], pool3, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(ours["logits"], logits, atol=1e-4, rtol=1e-4)
  unbiased = logits - state_dict["fc.bias"].numpy()
  np.testing.assert_allclose(ours["logits_unbiased"], unbiased, atol=1e-4, rtol=1e-4)


def test_conversion_round_trips_every_tensor(converted):
  state_dict, variables = converted
  params, stats = variables["params"], variables["batch_stats"]
  np.testing.assert_array_equal(params["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"],
                                state_dict["Mixed_6b.branch7x7_2.conv.weight"].numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(stats["Mixed_7c"]["branch_pool"]["bn"]["var"],
                                state_dict["Mixed_7c.branch_pool.bn.running_var"].numpy())
  np.testing.assert_array_equal(params["fc"]["kernel"], state_dict["fc.weight"].numpy().T)
  num_torch = sum(v.numel() for k, v in state_dict.items() if not k.endswith("num_batches_tracked"))
  num_flax = sum(v.size for v in jax.tree.leaves(variables))
  assert num_torch == num_flax


def test_pytorch_fid_module_itself(converted, monkeypatch):
  """pytorch-fid's InceptionV3([3]) with its weight download patched; skipped where it cannot import."""
  try:
    from pytorch_fid import inception as pfid  # pylint: disable=g-import-not-at-top
  except ImportError as e:  # torchvision missing or not loadable beside this torch.
    pytest.skip(f"pytorch_fid does not import here: {e}")
  state_dict, variables = converted
  monkeypatch.setattr(pfid, "load_state_dict_from_url", lambda *args, **kwargs: state_dict)
  model = pfid.InceptionV3([3], use_fid_inception=True).eval()
  images = np.random.default_rng(2).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
  with torch.no_grad():
    pool3 = model(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0)[0].flatten(1).numpy()
  np.testing.assert_allclose(flax_features(variables, images)["pool3"], pool3, atol=1e-4, rtol=1e-4)
