"""The region classifier of DeepAlign (:mod:`~xmipp_accel.gpu.align.deepalign`): sphere regions, the
noise model matched to the particles, training images generated on the fly on the GPU, and the CNN.

PyTorch is imported lazily, only here; :func:`require_torch` explains how to install it.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, List, Mapping, Optional

import numpy as np

from ...errors import InputError
from ... import backend
from .polar import centred_rfft2, fourier_crop

logger = logging.getLogger(__name__)


def require_torch():
    """Import and return torch, or raise :class:`InputError` saying how to install it."""
    try:
        import torch  # noqa: PLC0415  (optional dependency, imported only by DeepAlign)
    except ImportError as exc:
        raise InputError("--method deepalign needs PyTorch, which is not installed: pip install "
                         "'scipion-em-xmipp-accel[deep]' (or pip install torch), or use --method projmatch") from exc
    return torch


# ------------------------------------------------------------------------------------------------------------
# Regions
# ------------------------------------------------------------------------------------------------------------

@dataclass
class RegionSet:
    """Regions of the sphere of projection directions, modulo a symmetry group.

    Attributes
    ----------
    centres : (R, 3) float64 unit vectors (x, y, z) in the asymmetric unit.
    sym_matrices : (k, 3, 3) float64 group (identity first).
    step_deg : spacing of the centres, degrees.
    """
    centres: np.ndarray
    sym_matrices: np.ndarray
    step_deg: float

    @property
    def n_regions(self) -> int:
        return int(self.centres.shape[0])

    def assign(self, directions: np.ndarray) -> np.ndarray:
        """Region of each direction ``(n, 3)``: the nearest centre over all symmetry copies; (n,) int64."""
        d = np.asarray(directions, dtype=np.float64).reshape(-1, 3)
        best = np.full((d.shape[0], self.n_regions), -np.inf)
        for g in self.sym_matrices:
            best = np.maximum(best, (d @ g) @ self.centres.T)
        return np.argmax(best, axis=1)

    def assign_matrices(self, matrices: np.ndarray) -> np.ndarray:
        """Region of rotations ``(n, 3, 3)`` (their projection direction is the third row)."""
        return self.assign(np.asarray(matrices).reshape(-1, 3, 3)[:, 2, :])


def region_centres(step_deg: float = 30.0, sym: str = "c1") -> RegionSet:
    """Region centres ``sphere_sampling(step_deg, sym)`` and the group's matrices."""
    from ...em.geometry import projection_direction
    from ...em.sampling import sphere_sampling
    from ...em.symmetry import symmetry_matrices
    rot, tilt = sphere_sampling(step_deg, sym)
    centres = np.asarray(projection_direction(np.asarray(rot), np.asarray(tilt)), dtype=np.float64).reshape(-1, 3)
    return RegionSet(centres=centres, sym_matrices=np.asarray(symmetry_matrices(sym), dtype=np.float64),
                     step_deg=float(step_deg))


# ------------------------------------------------------------------------------------------------------------
# Noise model and training images
# ------------------------------------------------------------------------------------------------------------

def _radial_index(box: int) -> np.ndarray:
    """Shell index (rounded radius, cycles per box) of each rfft2 coefficient of a ``box`` image; (box, box//2+1)."""
    ky = np.fft.fftfreq(box) * box
    kx = np.arange(box // 2 + 1)
    return np.rint(np.hypot(ky[:, None], kx[None, :])).astype(np.int64)


def _shell_counts(box: int) -> np.ndarray:
    """Coefficients per shell (0 .. box//2) of the full 2-D spectrum of a ``box`` image."""
    ky = np.fft.fftfreq(box) * box
    idx = np.rint(np.hypot(ky[:, None], ky[None, :])).astype(np.int64).ravel()
    return np.bincount(idx[idx <= box // 2], minlength=box // 2 + 1).astype(np.float64)


def _radial_power(images, box: int) -> np.ndarray:
    """Mean |F|^2 per shell (0 .. box//2) of images (n, box, box); host float64 (box//2 + 1,)."""
    xp = backend.get_xp(images)
    f = centred_rfft2(xp.asarray(images, dtype=xp.float32))
    p = backend.to_host((f.real ** 2 + f.imag ** 2).mean(0)).astype(np.float64)
    idx = _radial_index(box)
    n_sh = box // 2 + 1
    keep = idx < n_sh
    s = np.bincount(idx[keep], weights=p[keep], minlength=n_sh)
    c = np.bincount(idx[keep], minlength=n_sh)
    return s / np.maximum(c, 1)


@dataclass
class NoiseModel:
    """Particles ≈ ``scale`` x CTF-modulated projection + Gaussian noise of radial spectrum ``noise_power``.

    Attributes
    ----------
    scale : amplitude of the projections of the reference in the data (data units per map unit).
    noise_power : (box//2 + 1,) mean |F|^2 of the noise per shell, for images of ``box`` pixels.
    box : box of the images the model describes (the CNN box).
    snr : signal over noise variance implied by the fit (for the log).
    """
    scale: float
    noise_power: List[float]
    box: int
    snr: float


def estimate_noise_model(particles, simulated) -> NoiseModel:
    """Fit ``P_data(k) = a^2 P_sim(k) + sigma^2`` (least squares, ``a, sigma >= 0``) then ``N(k) = P_data - a^2 P_sim``.

    Parameters
    ----------
    particles : (n, B, B) particle images at the CNN box.
    simulated : (m, B, B) noiseless CTF-modulated, shifted projections of the reference at random
        orientations, with CTFs drawn from the particles', same box and pixel size.

    Returns
    -------
    NoiseModel; the noise spectrum is floored at 10 % of the white-noise level of the fit.
    """
    box = int(particles.shape[-1])
    pd = _radial_power(particles, box)[1:]
    ps = _radial_power(simulated, box)[1:]
    a_mat = np.stack([ps, np.ones_like(ps)], 1)
    coef, *_ = np.linalg.lstsq(a_mat, pd, rcond=None)
    a2, s2 = float(coef[0]), float(coef[1])
    if a2 <= 0 or s2 <= 0:  # fall back to a one-parameter fit
        if a2 <= 0:
            a2, s2 = 0.0, float(pd.mean())
        else:
            a2, s2 = float(pd @ ps / (ps @ ps)), 0.0
    noise = np.maximum(pd - a2 * ps, 0.1 * max(s2, 1e-12 * float(pd.mean())))
    noise = np.concatenate([[noise[0]], noise])
    cnt = _shell_counts(box)[1:]
    sig = a2 * float((ps * cnt).sum())
    return NoiseModel(scale=math.sqrt(max(a2, 0.0)), noise_power=[float(v) for v in noise], box=box,
                      snr=float(sig / max(float((noise[1:] * cnt).sum()), 1e-30)))


class TrainingImages:
    """Random projections of the reference inside known regions, with shifts, CTF and noise, on the device.

    Parameters
    ----------
    reference : (N, N, N) map (numpy or cupy: the images live on its device).
    pixel_size_A : pixel size of particles and map (Å).
    cnn_box : box of the generated images (the map is Fourier-cropped to it).
    regions : RegionSet giving the labels.
    ctf : CTF parameters of the data (arrays (n,)); each image takes those of a random particle, or None.
    max_shift_px : shifts are uniform in a disk of this radius (pixels of the particles).
    noise : NoiseModel (None: noiseless images, used to fit it).
    seed : random seed.
    """

    def __init__(self, reference, *, pixel_size_A: float, cnn_box: int, regions: RegionSet,
                 ctf: Optional[Mapping[str, np.ndarray]], max_shift_px: float, noise: Optional[NoiseModel] = None,
                 seed: int = 0):
        from ...em.projection import FourierProjector
        xp = backend.get_xp(reference)
        self.xp = xp
        n = int(reference.shape[-1])
        self.box = int(cnn_box)
        self.pixel_size_A = float(pixel_size_A) * n / self.box
        vol = fourier_crop(xp.asarray(reference, dtype=xp.float32), self.box, ndim=3)
        self.projector = FourierProjector(vol, pad=2)
        self.regions = regions
        self.ctf = None if ctf is None else {k: np.asarray(v, dtype=np.float64).reshape(-1) for k, v in ctf.items()
                                              if v is not None and np.ndim(v) > 0}
        self.max_shift_px = float(max_shift_px) * self.box / n
        self.noise = noise
        self.rng = np.random.default_rng(seed)
        self._shell = xp.asarray(np.minimum(_radial_index(self.box), self.box // 2))

    def batch(self, n: int):
        """``n`` normalised images (n, B, B) float32 on the device and their region labels (n,) int64 (host)."""
        from ...em.ctf import CTFParams, ctf_2d
        from ...em.sampling import random_rotations
        xp = self.xp
        mats = random_rotations(n, self.rng)
        labels = self.regions.assign_matrices(mats)
        r = self.max_shift_px * np.sqrt(self.rng.uniform(0, 1, n))
        a = self.rng.uniform(0, 2 * np.pi, n)
        shifts = np.stack([r * np.cos(a), r * np.sin(a)], 1)
        ctf = None
        if self.ctf is not None:
            pick = self.rng.integers(0, self.ctf["defocus_u_A"].size, n)
            c = {k: v[pick] for k, v in self.ctf.items()}
            p = CTFParams.from_mapping(c)
            ctf = ctf_2d(self.box, self.pixel_size_A, p.defocus_u_A, p.defocus_v_A, p.defocus_angle_deg, xp=xp,
                         **p.optics())
        img = self.projector.project(mats, shifts_px=shifts, ctf=ctf)
        if self.noise is not None:
            img = img * self.noise.scale + self._noise(n)
        return img.astype(xp.float32), labels

    def _noise(self, n: int):
        xp = self.xp
        white = xp.asarray(self.rng.standard_normal((n, self.box, self.box)), dtype=xp.float32)
        f = xp.fft.rfft2(white)
        amp = xp.sqrt(xp.asarray(self.noise.noise_power, dtype=xp.float32)[self._shell]) / self.box
        return xp.fft.irfft2(f * amp, s=(self.box, self.box)).astype(xp.float32)


def normalise_images(images):
    """Zero mean, unit standard deviation per image (n, B, B) float32 (same device)."""
    xp = backend.get_xp(images)
    x = images - images.mean(axis=(1, 2), keepdims=True)
    return (x / xp.maximum(x.std(axis=(1, 2), keepdims=True), 1e-6)).astype(xp.float32)


# ------------------------------------------------------------------------------------------------------------
# Classifier
# ------------------------------------------------------------------------------------------------------------

def polar_images(images, n_theta: Optional[int] = None):
    """Real-space polar resampling about the centre ``N//2``: in-plane rotations become cyclic shifts.

    Parameters
    ----------
    images : (n, B, B) float32 (numpy or cupy).
    n_theta : angular samples (default ``2 B``).

    Returns
    -------
    (n, B//2, n_theta) float32 on the same device: ring ``r`` (pixels, 0 .. B/2 - 1), angle
    ``2 pi a / n_theta`` from +x towards +y; bilinear interpolation.
    """
    xp = backend.get_xp(images)
    n, b = images.shape[0], images.shape[-1]
    n_theta = int(n_theta or 2 * b)
    r = np.arange(b // 2, dtype=np.float64)
    th = 2.0 * np.pi * np.arange(n_theta) / n_theta
    x = (r[:, None] * np.cos(th)[None, :]).ravel() + b // 2
    y = (r[:, None] * np.sin(th)[None, :]).ravel() + b // 2
    x0 = np.clip(np.floor(x).astype(np.int64), 0, b - 2)
    y0 = np.clip(np.floor(y).astype(np.int64), 0, b - 2)
    fx = xp.asarray((x - x0).astype(np.float32))[None]
    fy = xp.asarray((y - y0).astype(np.float32))[None]
    flat = xp.asarray(images, dtype=xp.float32).reshape(n, -1)
    i00 = xp.asarray(y0 * b + x0)
    v = ((1 - fy) * ((1 - fx) * flat[:, i00] + fx * flat[:, i00 + 1])
         + fy * ((1 - fx) * flat[:, i00 + b] + fx * flat[:, i00 + b + 1]))
    return v.reshape(n, b // 2, n_theta).astype(xp.float32)


def build_network(n_regions: int, width: int = 32):
    """A rotation-invariant CNN on polar images (rings x angles).

    Four conv blocks (``width, 2w, 4w, 4w`` channels; batch norm, ReLU; 2 x 2 max-pool after the first
    three) with circular padding along the angle, then a maximum over the angle (so an in-plane
    rotation of the particle, a cyclic shift of its polar image, does not change the output), a
    dense layer of 256 and the region logits. Input (n, 1, rings, angles) with rings a multiple of 8.
    """
    torch = require_torch()
    nn = torch.nn
    f = torch.nn.functional
    w = int(width)

    class PolarConv(nn.Module):
        def __init__(self, cin, cout, k, pool):
            super().__init__()
            self.k = k
            self.conv = nn.Conv2d(cin, cout, k, bias=False)
            self.bn = nn.BatchNorm2d(cout)
            self.pool = pool

        def forward(self, x):
            p = self.k // 2
            x = f.pad(x, (p, p, 0, 0), mode="circular")
            x = f.pad(x, (0, 0, p, p))
            x = f.relu(self.bn(self.conv(x)))
            return f.max_pool2d(x, 2) if self.pool else x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(PolarConv(1, w, 5, True), PolarConv(w, 2 * w, 3, True),
                                          PolarConv(2 * w, 4 * w, 3, True), PolarConv(4 * w, 4 * w, 3, False))
            self.rings = nn.AdaptiveAvgPool1d(4)
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(16 * w, 256), nn.ReLU(inplace=True), nn.Dropout(0.2),
                                      nn.Linear(256, n_regions))

        def forward(self, x):
            h = self.features(x).amax(dim=3)          # (n, C, rings): invariant to cyclic shifts in angle
            return self.head(self.rings(h))

    return Net()


def _to_torch(a, device):
    """Array (numpy or cupy) to a torch tensor on ``device`` (zero-copy through DLPack for cupy)."""
    torch = require_torch()
    if backend.get_xp(a) is np:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)
    return torch.from_dlpack(a).to(device)


class RegionClassifier:
    """A trained region-recognition network and what it was trained for."""

    def __init__(self, network, n_regions: int, width: int, device):
        self.network = network
        self.n_regions = int(n_regions)
        self.width = int(width)
        self.device = device
        self.history: dict = {}

    @classmethod
    def train(cls, images: TrainingImages, *, steps: int, batch: int = 256, lr: float = 2e-3, width: int = 32,
              seed: int = 0, device=None, n_validation: int = 1024, pool: int = 8,
              log: Optional[Callable[[str], None]] = None) -> RegionClassifier:
        """Train on freshly generated images (one new batch per step; AdamW, one-cycle schedule).

        Images are generated ``pool`` batches at a time (each still used once).

        Returns the classifier with ``history`` = steps, seconds, final loss and validation accuracy.
        """
        torch = require_torch()
        torch.manual_seed(seed)
        device = device or torch.device("cpu")
        net = build_network(images.regions.n_regions, width).to(device)
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, steps), pct_start=0.15)
        loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.05)
        use_amp = device.type == "cuda"
        t0 = time.perf_counter()
        net.train()
        loss_val = float("nan")
        pool_x = pool_y = None
        for step in range(steps):
            j = step % pool
            if j == 0:  # generate `pool` batches at once: fewer, larger kernels
                x, y = images.batch(batch * min(pool, steps - step))
                pool_x = _to_torch(polar_images(normalise_images(x)), device)[:, None]
                pool_y = torch.as_tensor(y, device=device)
            xt = pool_x[j * batch:(j + 1) * batch]
            yt = pool_y[j * batch:(j + 1) * batch]
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                loss = loss_fn(net(xt), yt)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if log is not None and (step % max(1, steps // 10) == 0 or step == steps - 1):
                loss_val = float(loss.detach())
                log(f"step {step + 1}/{steps} loss {loss_val:.3f}")
        loss_val = float(loss.detach()) if steps else loss_val
        seconds = time.perf_counter() - t0
        out = cls(net, images.regions.n_regions, width, device)
        xv, yv = images.batch(n_validation)
        prob = out.predict(xv)
        acc = float(np.mean(np.argmax(prob, 1) == yv))
        top3 = float(np.mean((np.argsort(-prob, 1)[:, :3] == yv[:, None]).any(1)))
        out.history = {"steps": int(steps), "batch": int(batch), "seconds": seconds, "final_loss": loss_val,
                       "validation_accuracy": acc, "validation_top3": top3, "seed": int(seed)}
        return out

    def predict(self, images, *, batch: int = 1024) -> np.ndarray:
        """Region probabilities (n, R) float32 (host) of images (n, B, B) (not yet normalised)."""
        torch = require_torch()
        self.network.eval()
        out = []
        with torch.no_grad():
            for s in range(0, images.shape[0], batch):
                xt = _to_torch(polar_images(normalise_images(images[s:s + batch])), self.device)[:, None]
                with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16,
                                    enabled=self.device.type == "cuda"):
                    logits = self.network(xt)
                out.append(torch.softmax(logits.float(), 1).cpu().numpy())
        self.network.train()
        return np.concatenate(out) if out else np.zeros((0, self.n_regions), np.float32)

    def save(self, path: str) -> None:
        torch = require_torch()
        tmp = path + ".tmp"
        torch.save(self.network.state_dict(), tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str, n_regions: int, width: int, device) -> RegionClassifier:
        torch = require_torch()
        net = build_network(n_regions, width)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            net.load_state_dict(state)
        except Exception as exc:  # corrupt or foreign file: the message says how to recover
            raise InputError(f"DeepAlign model file {path} cannot be read ({exc.__class__.__name__}: {exc}); delete "
                             "the model folder to train new models, or give another --model-dir") from None
        return cls(net.to(device), n_regions, width, device)


# ------------------------------------------------------------------------------------------------------------
# The aligner
# ------------------------------------------------------------------------------------------------------------
