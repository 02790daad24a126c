"""DeepAlign-style angular assignment: learned recognition of sphere regions, then local matching.

Following Jiménez-Moreno et al. (J Struct Biol 2021, doi:10.1016/j.jsb.2021.107712), the sphere of
projection directions is split into regions (centres ``sphere_sampling(region_step, sym)``, 30° apart
by default); a classifier learns to recognise the region of a particle from images of the reference
projected at random orientations *inside* each region, with in-plane rotations, shifts, CTFs and noise
matched to the data; each particle is then matched only against the gallery directions of its best
regions, and refined locally (:mod:`~xmipp_accel.gpu.align.refine`).

Differences from Xmipp's protocol, and why:

* one multi-class CNN over all regions instead of one binary CNN per region: one forward pass per
  particle instead of ~40, and the softmax makes region scores comparable;
* images are Fourier-cropped to a small box (``cnn_box``, 64 px by default) for the network: 30°
  regions are recognisable at low resolution, and the precision comes from the matching step, which
  uses the full band up to ``max_res``;
* training images are generated on the fly on the GPU at each step (``FourierProjector`` on CuPy,
  passed to PyTorch through DLPack), so no training set is stored and none is reused;
* the noise is matched by fitting the particles' radial power spectrum as ``a^2 S(k) + N(k)`` where
  ``S`` is the spectrum of simulated CTF-modulated projections; training images are ``a`` times a
  projection plus Gaussian noise with spectrum ``N``.

Two models trained from different seeds give two assignments (each matched within its own best
regions and refined); the one with the higher score is kept and the angular distance between the two
(modulo symmetry) is reported, with a flag when it exceeds a tolerance (Xmipp's consensus).

The regions searched adapt to the classifiers' certainty (:meth:`DeepAligner.region_masks`): each
model keeps its regions until their probabilities sum to ``region_probability_mass`` (2 to 6 by
default); where the models' best regions differ, both search the union of their shortlists; and
particles flagged uncertain (disagreement, or best probability < ``uncertain_probability``) get a
coarse global search (``coarse_check_step_deg``, 10° by default) whose two best regions are added.
A sure particle still searches 2 regions; an unsure one is no longer lost when its region is the
classifier's 3rd choice or worse.

PyTorch is imported lazily, only here; :func:`require_torch` explains how to install it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from typing import Callable, List, Mapping, Optional, Tuple

import numpy as np

from ...em.geometry import angular_distance_deg
from ...errors import InputError
from ... import backend
from .polar import centred_rfft2, fourier_crop
from .projmatch import AlignmentResult, ProjectionMatcher, align_in_batches

__all__ = ["require_torch", "RegionSet", "region_centres", "NoiseModel", "estimate_noise_model", "TrainingImages",
           "polar_images", "RegionClassifier", "DeepAlignConfig", "region_shortlist", "DeepAligner", "MODEL_FILE",
           "MODEL_META"]

logger = logging.getLogger(__name__)

MODEL_META = "deepalign.json"
MODEL_FILE = "deepalign_model_{}.pt"
FORMAT_VERSION = 1


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

@dataclass
class DeepAlignConfig:
    """Options of :class:`DeepAligner` (serialised with the models).

    Attributes
    ----------
    region_step_deg : spacing of region centres (degrees).
    cnn_box : box of the network's images (pixels; at most the particle box).
    width : channels of the first conv layer.
    train_steps, train_batch, learning_rate : training budget per model.
    n_models : independently trained models (2 for the consensus).
    n_regions_searched : best regions of each model matched per particle (the minimum when the
        shortlist is adaptive).
    region_probability_mass : adaptive shortlist: each model's regions are taken, most probable first,
        until their probabilities sum to this (at least ``n_regions_searched``, at most
        ``max_regions_searched``); 0 keeps exactly ``n_regions_searched``.
    max_regions_searched : cap of the adaptive shortlist.
    union_on_disagreement : particles whose models disagree on the best region search the union of
        the models' shortlists with both models.
    uncertain_probability : particles whose mean best-region probability is below this, or whose
        models disagree, are "uncertain": they get the coarse global check below.
    coarse_check_step_deg : spacing (degrees) of a coarse global search run for uncertain particles
        only; the regions of its two best directions join the shortlist. 0 disables it.
    n_candidates : directions kept per model after its restricted global search (the two models
        already give two candidates; particles whose candidates coincide are refined once).
    consensus_tolerance_deg : assignments of the two models further apart are flagged.
    seed : seed of the first model (the others use seed + 1, ...).
    """
    region_step_deg: float = 30.0
    cnn_box: int = 64
    width: int = 32
    train_steps: int = 1000
    train_batch: int = 256
    learning_rate: float = 2e-3
    n_models: int = 2
    n_regions_searched: int = 2
    n_candidates: int = 1
    consensus_tolerance_deg: float = 5.0
    seed: int = 0
    region_probability_mass: float = 0.9
    max_regions_searched: int = 6
    union_on_disagreement: bool = True
    uncertain_probability: float = 0.5
    coarse_check_step_deg: float = 10.0


RUNTIME_FIELDS = ("n_regions_searched", "n_candidates", "consensus_tolerance_deg", "region_probability_mass",
                  "max_regions_searched", "union_on_disagreement", "uncertain_probability", "coarse_check_step_deg")


def region_shortlist(probabilities: np.ndarray, *, min_regions: int = 2, max_regions: int = 6,
                     mass: float = 0.9) -> np.ndarray:
    """Regions to search per particle: most probable first until their probabilities reach ``mass``.

    Parameters
    ----------
    probabilities : (n, R) region probabilities of one model (rows sum to 1).
    min_regions, max_regions : bounds on the regions kept per particle (``max`` >= ``min``).
    mass : cumulative probability to reach; 0 keeps exactly ``min_regions``.

    Returns
    -------
    (n, R) bool mask of the regions kept.
    """
    p = np.asarray(probabilities, dtype=np.float64)
    n, n_reg = p.shape
    lo = max(1, min(int(min_regions), n_reg))
    hi = max(lo, min(int(max_regions), n_reg))
    order = np.argsort(-p, axis=1, kind="stable")
    if mass > 0:
        cum = np.cumsum(np.take_along_axis(p, order, axis=1), axis=1)
        count = 1 + np.sum(cum < float(mass) - 1e-9, axis=1)     # regions needed to reach the mass
        count = np.clip(count, lo, hi)
    else:
        count = np.full(n, lo)
    keep_sorted = np.arange(n_reg)[None, :] < count[:, None]
    mask = np.zeros((n, n_reg), dtype=bool)
    np.put_along_axis(mask, order, keep_sorted, axis=1)
    return mask


def reference_fingerprint(reference) -> str:
    """Short hash of a map (shape and float32 values) to recognise the reference models were trained on."""
    a = np.ascontiguousarray(backend.to_host(reference), dtype=np.float32)
    h = hashlib.sha1(str(a.shape).encode())
    h.update(a.tobytes())
    return h.hexdigest()[:16]


class DeepAligner:
    """Region recognition by CNNs, matching restricted to the recognised regions, local refinement.

    Parameters
    ----------
    matcher : ProjectionMatcher of the reference (gallery step, shifts, resolution, CTF mode, device).
    config : DeepAlignConfig.
    torch_device : torch device for the networks (default: ``cuda:<current>`` with CuPy, else cpu).
    """

    def __init__(self, matcher: ProjectionMatcher, config: Optional[DeepAlignConfig] = None, *, torch_device=None):
        torch = require_torch()
        self.matcher = matcher
        self.config = config or DeepAlignConfig()
        plan = matcher.plan
        box = plan.box - plan.box % 2
        self.cnn_box = int(min(self.config.cnn_box, box))
        self.regions = region_centres(self.config.region_step_deg, matcher.sym)
        dirs = matcher.dir_matrices[:, 2, :]
        self.gallery_region = self.regions.assign(dirs)
        if torch_device is None:
            xp = matcher.xp
            torch_device = torch.device(f"cuda:{xp.cuda.Device().id}") if xp is not np else torch.device("cpu")
        self.torch_device = torch_device
        self.models: List[RegionClassifier] = []
        self.noise: Optional[NoiseModel] = None
        self.info: dict = {}
        self._coarse_cache: Optional[Tuple[float, np.ndarray]] = None

    # -- data preparation ----------------------------------------------------------------------------------
    def cnn_images(self, images):
        """Particles (n, N, N) Fourier-cropped to the CNN box, (n, B, B) float32 on the matcher's device."""
        xp = self.matcher.xp
        x = xp.asarray(images, dtype=xp.float32)
        if x.shape[-1] % 2:
            x = x[..., :-1, :-1]
        return fourier_crop(x, self.cnn_box) if x.shape[-1] != self.cnn_box else x

    def _generator(self, ctf, noise, seed):
        m = self.matcher
        return TrainingImages(m.reference, pixel_size_A=m.plan.pixel_size_A, cnn_box=self.cnn_box,
                              regions=self.regions, ctf=ctf, max_shift_px=m.plan.max_shift_px, noise=noise, seed=seed)

    def fit_noise(self, sample_images, ctf) -> NoiseModel:
        """Noise model from a sample of particles (n, N, N) and their CTFs (see :func:`estimate_noise_model`)."""
        x = self.cnn_images(sample_images)
        gen = self._generator(ctf, None, self.config.seed + 1000)
        sim, _ = gen.batch(max(256, min(2048, 2 * x.shape[0])))
        self.noise = estimate_noise_model(x, sim)
        logger.info("DeepAlign noise model: scale %.3g, SNR %.3g (CNN box %d px)", self.noise.scale, self.noise.snr,
                    self.cnn_box)
        return self.noise

    # -- training / loading --------------------------------------------------------------------------------
    def train(self, sample_images, ctf, *, log: Optional[Callable[[str], None]] = None) -> dict:
        """Fit the noise model and train ``n_models`` classifiers; returns timing and accuracy."""
        cfg = self.config
        t0 = time.perf_counter()
        self.fit_noise(sample_images, ctf)
        self.models = []
        for i in range(cfg.n_models):
            gen = self._generator(ctf, self.noise, cfg.seed + i)
            model = RegionClassifier.train(gen, steps=cfg.train_steps, batch=cfg.train_batch, lr=cfg.learning_rate,
                                           width=cfg.width, seed=cfg.seed + i, device=self.torch_device,
                                           log=(lambda s, i=i: log(f"model {i + 1}: {s}")) if log else None)
            logger.info("DeepAlign model %d: %.1f s, validation accuracy %.3f (top-3 %.3f)", i + 1,
                        model.history["seconds"], model.history["validation_accuracy"],
                        model.history["validation_top3"])
            self.models.append(model)
        self.info = {"training_seconds": time.perf_counter() - t0, "models": [m.history for m in self.models]}
        return self.info

    def metadata(self) -> dict:
        m = self.matcher
        return {"format": "xmipp_accel.deepalign", "version": FORMAT_VERSION, "config": asdict(self.config),
                "cnn_box": self.cnn_box, "n_regions": self.regions.n_regions, "sym": m.sym,
                "particle_box": m.plan.box, "pixel_size_A": m.plan.pixel_size_A,
                "reference": reference_fingerprint(m.reference),
                "noise": asdict(self.noise) if self.noise else None,
                "models": [MODEL_FILE.format(i) for i in range(len(self.models))],
                "training": self.info}

    def save(self, folder: str) -> None:
        """Write the models and ``deepalign.json`` into ``folder`` (created)."""
        os.makedirs(folder, exist_ok=True)
        for i, model in enumerate(self.models):
            model.save(os.path.join(folder, MODEL_FILE.format(i)))
        path = os.path.join(folder, MODEL_META)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.metadata(), f, indent=1)
        os.replace(tmp, path)

    @staticmethod
    def has_models(folder: Optional[str]) -> bool:
        """True when ``folder`` holds a ``deepalign.json`` (models to load rather than train)."""
        return bool(folder) and os.path.isfile(os.path.join(folder, MODEL_META))

    def load(self, folder: str) -> dict:
        """Load models saved by :meth:`save`; raises InputError for a corrupt or incompatible folder."""
        path = os.path.join(folder, MODEL_META)
        fix = "delete the folder to train new models, or give another --model-dir"
        try:
            with open(path) as f:
                meta = json.load(f)
            if meta.get("format") != "xmipp_accel.deepalign":
                raise ValueError("not a DeepAlign model description")
            files = list(meta["models"])
            n_regions, sym = int(meta["n_regions"]), str(meta["sym"])
            known = {f.name for f in fields(DeepAlignConfig)}
            cfg = DeepAlignConfig(**{k: v for k, v in dict(meta["config"]).items() if k in known})
            noise = NoiseModel(**meta["noise"]) if meta.get("noise") else None
            cnn_box = int(meta["cnn_box"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(f"DeepAlign model folder {folder} is corrupt ({path}: {exc}); {fix}") from None
        if sym.lower() != self.matcher.sym.lower():
            raise InputError(f"the models in {folder} were trained for symmetry {sym}, not {self.matcher.sym}; {fix}")
        if int(meta.get("version", 0)) > FORMAT_VERSION:
            raise InputError(f"the models in {folder} were written by a newer xmipp_accel (format "
                             f"{meta.get('version')}); upgrade, or {fix}")
        keep_runtime = {k: getattr(self.config, k) for k in RUNTIME_FIELDS}
        self.config = cfg
        for key, value in keep_runtime.items():
            setattr(self.config, key, value)
        self.cnn_box = cnn_box
        self.regions = region_centres(cfg.region_step_deg, self.matcher.sym)
        if self.regions.n_regions != n_regions:
            raise InputError(f"the models in {folder} have {n_regions} regions but the sampling now gives "
                             f"{self.regions.n_regions}; {fix}")
        self.gallery_region = self.regions.assign(self.matcher.dir_matrices[:, 2, :])
        if not files:
            raise InputError(f"DeepAlign model folder {folder} lists no model; {fix}")
        self.models = []
        for name in files:
            p = os.path.join(folder, name)
            if not os.path.isfile(p):
                raise InputError(f"DeepAlign model file {p} is missing; {fix}")
            self.models.append(RegionClassifier.load(p, n_regions, cfg.width, self.torch_device))
        self.noise = noise
        if meta.get("reference") != reference_fingerprint(self.matcher.reference):
            logger.warning("the DeepAlign models in %s were trained on another reference map; they are used as they "
                           "are (delete the folder to retrain)", folder)
        self.info = dict(meta.get("training") or {})
        return meta

    # -- assignment ----------------------------------------------------------------------------------------
    def region_probabilities(self, images) -> List[np.ndarray]:
        """Probabilities (n, R) of each model for particles (n, N, N)."""
        if not self.models:
            raise RuntimeError("DeepAligner has no model: call train() or load() first")
        x = self.cnn_images(images)
        return [m.predict(x) for m in self.models]

    def _blocks(self, region_mask: np.ndarray) -> List[Tuple[np.ndarray, np.ndarray]]:
        """(particle indices, gallery directions) per region for a per-particle region mask (n, R) bool."""
        blocks = []
        for r in np.nonzero(region_mask.any(0))[0]:
            parts = np.nonzero(region_mask[:, r])[0]
            dirs = np.nonzero(self.gallery_region == r)[0]
            if parts.size and dirs.size:
                blocks.append((parts, dirs))
        return blocks

    def _coarse_directions(self) -> np.ndarray:
        """Gallery directions nearest to a ``coarse_check_step_deg`` sampling (indices, unique, sorted)."""
        step = float(self.config.coarse_check_step_deg)
        if self._coarse_cache is not None and self._coarse_cache[0] == step:
            return self._coarse_cache[1]
        centres = region_centres(step, self.matcher.sym).centres
        dirs = np.asarray(self.matcher.dir_matrices[:, 2, :], dtype=np.float64)
        idx = np.unique(np.argmax(centres @ dirs.T, axis=1))
        self._coarse_cache = (step, idx)
        return idx

    def region_masks(self, probs: List[np.ndarray], images=None, ctf=None) -> Tuple[List[np.ndarray], np.ndarray]:
        """Regions each model searches per particle, and which particles are uncertain.

        Parameters
        ----------
        probs : per model, (n, R) region probabilities.
        images, ctf : the batch (n, N, N) and its CTFs, for the coarse global check (skipped when None).

        Returns
        -------
        masks : per model, (n, R) bool: the adaptive shortlist (:func:`region_shortlist`), widened to
            the union of all models' shortlists where their best regions differ, plus the regions of
            the coarse check's two best directions for uncertain particles.
        uncertain : (n,) bool: models disagree on the best region, or mean best probability below
            ``uncertain_probability``.
        """
        cfg = self.config
        masks = [region_shortlist(p, min_regions=max(1, int(cfg.n_regions_searched)),
                                  max_regions=max(int(cfg.max_regions_searched), int(cfg.n_regions_searched)),
                                  mass=float(cfg.region_probability_mass)) for p in probs]
        top1 = np.stack([p.argmax(1) for p in probs])
        disagree = np.any(top1 != top1[:1], axis=0)
        uncertain = disagree | (np.mean(np.stack(probs), axis=0).max(1) < float(cfg.uncertain_probability))
        extra = np.zeros_like(masks[0])
        if cfg.union_on_disagreement and len(masks) > 1:
            extra[disagree] = np.any(np.stack(masks), axis=0)[disagree]
        if images is not None and cfg.coarse_check_step_deg > 0 and uncertain.any():
            extra |= self._coarse_regions(images, ctf, np.nonzero(uncertain)[0])
        return [mk | extra for mk in masks], uncertain

    def _coarse_regions(self, images, ctf, particles: np.ndarray) -> np.ndarray:
        """(n, R) bool: regions of the two best directions of a coarse global search of ``particles``."""
        m = self.matcher
        n = images.shape[0]
        mats, _, scores = m.global_search(images, ctf, allowed=[(particles, self._coarse_directions())],
                                          n_candidates=2)
        dirs = backend.to_host(mats[:, :, 2, :]).astype(np.float64)                  # (n, 2, 3)
        ok = np.isfinite(backend.to_host(scores))
        reg = self.regions.assign(dirs.reshape(-1, 3)).reshape(n, -1)
        mask = np.zeros((n, self.regions.n_regions), dtype=bool)
        rows = np.repeat(np.arange(n)[:, None], reg.shape[1], axis=1)
        mask[rows[ok], reg[ok]] = True
        return mask

    def align_batch(self, images, ctf=None) -> AlignmentResult:
        """Assign poses to a batch (n, N, N): regions by each model, restricted matching, refinement, consensus."""
        m = self.matcher
        xp = m.xp
        images = xp.asarray(images, dtype=xp.float32)
        n = images.shape[0]
        probs = self.region_probabilities(images)
        masks, uncertain = self.region_masks(probs, images, ctf)
        n_cand = max(1, int(self.config.n_candidates))
        cands = [m.global_search(images, ctf, allowed=self._blocks(masks[0]), n_candidates=n_cand)]
        for mask in masks[1:]:
            differs = np.any(mask != masks[0], axis=1)        # same regions: same search, reuse model 1's
            sub = mask & differs[:, None]
            cand = m.global_search(images, ctf, allowed=self._blocks(sub), n_candidates=n_cand)
            d_x = xp.asarray(differs)
            cands.append(tuple(xp.where(d_x.reshape((-1,) + (1,) * (c.ndim - 1)), c, c0)
                               for c, c0 in zip(cand, cands[0])))
        results = [m.refine_from_candidates(images, ctf, *cands[0])]
        first = [backend.to_host(c) for c in cands[0]]
        for cand in cands[1:]:
            host = [backend.to_host(c) for c in cand]
            same = (np.all(np.abs(host[0] - first[0]) < 1e-6, axis=(1, 2, 3))
                    & np.all(np.abs(host[1] - first[1]) < 1e-6, axis=(1, 2)))
            res = AlignmentResult(results[0].matrices.copy(), results[0].origins_px.copy(), results[0].score.copy())
            todo = np.nonzero(~same)[0]
            if todo.size:
                t_x = xp.asarray(todo)
                sub_ctf = None if ctf is None else {kk: (np.asarray(v)[todo] if np.ndim(v) else v)
                                                    for kk, v in ctf.items()}
                r = m.refine_from_candidates(images[t_x], sub_ctf, cand[0][t_x], cand[1][t_x], cand[2][t_x])
                res.matrices[todo], res.origins_px[todo], res.score[todo] = r.matrices, r.origins_px, r.score
            results.append(res)
        best = np.argmax(np.stack([r.score for r in results]), axis=0)
        rows = np.arange(n)
        out = AlignmentResult(np.stack([r.matrices for r in results])[best, rows],
                              np.stack([r.origins_px for r in results])[best, rows],
                              np.stack([r.score for r in results])[best, rows])
        if len(results) > 1:
            dist = angular_distance_deg(results[0].matrices, results[1].matrices, self.regions.sym_matrices)
        else:
            dist = np.zeros(n)
        out.extra["consensus_deg"] = np.atleast_1d(dist).astype(np.float64)
        out.extra["disagree"] = (out.extra["consensus_deg"] > self.config.consensus_tolerance_deg).astype(np.int64)
        mean_p = np.mean(np.stack(probs), axis=0)
        out.extra["region"] = np.argmax(mean_p, 1).astype(np.int64)
        out.extra["region_probability"] = mean_p.max(1).astype(np.float64)
        out.extra["uncertain"] = uncertain.astype(np.int64)
        out.extra["regions_searched"] = np.sum(np.any(np.stack(masks), axis=0), axis=1).astype(np.int64)
        return out

    def align(self, images, ctf=None, *, batch_size: Optional[int] = None,
              progress: Optional[Callable[[int], None]] = None) -> AlignmentResult:
        """Align a stack in batches (see :meth:`ProjectionMatcher.align`)."""
        return align_in_batches(self.align_batch, images, ctf,
                                int(batch_size or self.matcher.default_batch_size()), progress)
