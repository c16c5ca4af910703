"""Synthetic NYU-like indoor scenes with exact per-pixel classes and surface normals.

Each scene is a room (floor, ceiling, four walls) holding a few furniture boxes (rotated about the
vertical axis) and balls, with pictures and windows on the walls, seen by a pinhole camera
(focal length ≈ 0.8 × width, like the Kinect) standing in the room and looking slightly down. Every
pixel casts one ray (vectorised in torch); the nearest hit gives

* the class: the object's NYUv2 40-class id (0-based, as in the official seg PNGs: wall 0,
  floor 1, cabinet 2, bed 3, chair 4, sofa 5, table 6, window 8, picture 10, ceiling 21, box 28,
  ball → otherprop 39) or its 13-class id (MTAN build);
* the true surface normal of the hit surface in camera coordinates (x right, y down, z forward),
  facing the camera, encoded like NYU (``round((n + 1) / 2 · 255)``); windows carry no normal
  (all channels 255), as depth sensors fail on glass;
* the colour: per-class albedo (jittered per object) × (ambient + Lambert shading from a point light
  under the ceiling) plus a little noise, so both colour (class) and shading (normal) are visible.

A scene is a pure function of ``(seed, index)`` (its own ``torch.Generator``), renders in a few
milliseconds at 96×128, and is returned as a raw NYU-format sample (see
:mod:`recipes.data.transforms`).

Example:
    >>> scenes = SyntheticScenes(num_images=2, size=(24, 32), seed=0)
    >>> sample = scenes[0]
    >>> sample["image"].dtype, tuple(sample["image"].shape), tuple(sample["normal"].shape)
    (torch.uint8, (24, 32, 3), (24, 32, 3))
    >>> set(sample["seg"].unique().tolist()) <= set(NYU40_CLASSES.values())
    True
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from ..errors import ConfigError
from .transforms import decode_normals, encode_normals, sample_generator

__all__ = [
    "SceneKind",
    "SCENE_KINDS",
    "NYU40_CLASSES",
    "SyntheticScenes",
    "render_scene",
    "drop_labels",
    "labelled_count",
]


@dataclass(frozen=True)
class SceneKind:
    """An object type of the synthetic scenes: its class ids and base colour (RGB in [0, 1])."""

    name: str
    nyu40: int
    nyu13: int
    albedo: tuple[float, float, float]
    has_normal: bool = True


#: Object types. 13-class ids follow the NYUv2 13-class set (bed 0, books 1, ceiling 2, chair 3,
#: floor 4, furniture 5, objects 6, picture 7, sofa 8, table 9, tv 10, wall 11, window 12).
SCENE_KINDS: dict[str, SceneKind] = {
    kind.name: kind
    for kind in (
        SceneKind("wall", 0, 11, (0.78, 0.76, 0.70)),
        SceneKind("floor", 1, 4, (0.55, 0.36, 0.20)),
        SceneKind("cabinet", 2, 5, (0.92, 0.85, 0.55)),
        SceneKind("bed", 3, 0, (0.25, 0.35, 0.80)),
        SceneKind("chair", 4, 3, (0.80, 0.18, 0.15)),
        SceneKind("sofa", 5, 8, (0.20, 0.60, 0.30)),
        SceneKind("table", 6, 9, (0.35, 0.22, 0.12)),
        SceneKind("window", 8, 12, (0.85, 0.95, 1.00), has_normal=False),
        SceneKind("picture", 10, 7, (0.95, 0.55, 0.10)),
        SceneKind("ceiling", 21, 2, (0.96, 0.96, 0.96)),
        SceneKind("box", 28, 6, (0.60, 0.50, 0.40)),
        SceneKind("ball", 39, 6, (0.85, 0.30, 0.80)),
    )
}
#: Object type → NYUv2 40-class id (0-based).
NYU40_CLASSES: dict[str, int] = {name: kind.nyu40 for name, kind in SCENE_KINDS.items()}

_FURNITURE = ("cabinet", "bed", "chair", "sofa", "table", "box")
# (width, depth, height) ranges in metres per furniture kind.
_FURNITURE_SIZE = {
    "cabinet": ((0.5, 1.2), (0.4, 0.6), (0.8, 1.9)),
    "bed": ((1.4, 1.9), (1.9, 2.1), (0.45, 0.6)),
    "chair": ((0.45, 0.55), (0.45, 0.55), (0.8, 1.0)),
    "sofa": ((1.5, 2.2), (0.8, 0.95), (0.7, 0.85)),
    "table": ((0.8, 1.6), (0.6, 1.0), (0.7, 0.78)),
    "box": ((0.3, 0.6), (0.3, 0.6), (0.25, 0.6)),
}
_EPS = 1e-4
_INF = float("inf")


def _uniform(rng: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=rng, dtype=torch.float64))


def _randint(rng: torch.Generator, low: int, high: int) -> int:
    """Uniform int in [low, high] (inclusive)."""
    return int(torch.randint(low, high + 1, (), generator=rng))


def _rotation_y(angle: float) -> torch.Tensor:
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def render_scene(
    size: tuple[int, int],
    generator: torch.Generator,
    num_classes: int = 40,
    with_depth: bool = False,
) -> dict[str, torch.Tensor]:
    """Render one random scene (see the module docstring) as a raw NYU-format sample:
    ``image`` uint8 H×W×3, ``seg`` uint8 H×W, ``normal`` uint8 H×W×3 (raw NYU encoding),
    ``normal_mask`` bool H×W, and ``depth`` float32 H×W (metres along the optical axis) when
    ``with_depth``.

    Example:
        >>> import torch
        >>> out = render_scene((8, 8), torch.Generator().manual_seed(0))
        >>> sorted(out)
        ['image', 'normal', 'normal_mask', 'seg']
    """
    if num_classes not in (40, 13):
        raise ConfigError(
            f"num_classes={num_classes}: synthetic scenes use the NYUv2 40-class or 13-class ids"
        )
    height, width = size
    rng = generator

    # Room: x in [-half_width, half_width], y (up) in [0, room_height], z in [0, room_depth].
    half_width = _uniform(rng, 1.6, 2.6)
    room_height = _uniform(rng, 2.4, 3.0)
    room_depth = _uniform(rng, 4.0, 6.0)
    room_lo = torch.tensor([-half_width, 0.0, 0.0])
    room_hi = torch.tensor([half_width, room_height, room_depth])

    origin = torch.tensor(
        [
            _uniform(rng, -0.4, 0.4) * half_width,
            _uniform(rng, 1.1, 1.6),
            _uniform(rng, 0.2, 0.6),
        ]
    )
    yaw, pitch = _uniform(rng, -0.45, 0.45), _uniform(rng, -0.35, -0.05)
    forward = torch.tensor(
        [math.sin(yaw) * math.cos(pitch), math.sin(pitch), math.cos(yaw) * math.cos(pitch)]
    )
    right = torch.linalg.cross(torch.tensor([0.0, 1.0, 0.0]), forward)
    right = right / right.norm()
    down = torch.linalg.cross(right, forward)
    focal = width * _uniform(rng, 0.75, 0.9)

    rows = (torch.arange(height, dtype=torch.float32) + 0.5 - height / 2) / focal
    cols = (torch.arange(width, dtype=torch.float32) + 0.5 - width / 2) / focal
    grid_y, grid_x = torch.meshgrid(rows, cols, indexing="ij")
    directions = grid_x.reshape(-1, 1) * right + grid_y.reshape(-1, 1) * down + forward.expand(1, 3)
    directions = directions / directions.norm(dim=1, keepdim=True)
    num_rays = directions.shape[0]

    candidate_t: list[torch.Tensor] = []
    candidate_normal: list[torch.Tensor] = []
    candidate_kind: list[str] = []
    candidate_albedo: list[torch.Tensor] = []

    def jittered(kind: str) -> torch.Tensor:
        base = torch.tensor(SCENE_KINDS[kind].albedo)
        noise = torch.rand(3, generator=rng) * 0.16 - 0.08
        return (base + noise).clamp(0.0, 1.0)

    # Room interior: exit distance along each axis; the nearest one is the hit surface.
    with torch.no_grad():
        safe = torch.where(directions.abs() < 1e-9, torch.full_like(directions, 1e-9), directions)
        bound = torch.where(safe > 0, room_hi, room_lo)
        axis_t = (bound - origin) / safe
        room_t, room_axis = axis_t.min(dim=1)
        room_normal = torch.zeros(num_rays, 3)
        room_normal[torch.arange(num_rays), room_axis] = -torch.sign(
            safe[torch.arange(num_rays), room_axis]
        )
        hit = origin + room_t[:, None] * directions
        room_kind_index = torch.zeros(num_rays, dtype=torch.long)  # 0 wall, 1 floor, 2 ceiling
        is_y = room_axis == 1
        room_kind_index[is_y & (directions[:, 1] < 0)] = 1
        room_kind_index[is_y & (directions[:, 1] > 0)] = 2
        room_albedo_table = torch.stack([jittered("wall"), jittered("floor"), jittered("ceiling")])
        room_albedo = room_albedo_table[room_kind_index]
        room_labels = torch.tensor(
            [
                SCENE_KINDS[name].nyu40 if num_classes == 40 else SCENE_KINDS[name].nyu13
                for name in ("wall", "floor", "ceiling")
            ]
        )[room_kind_index]
        room_has_normal = torch.ones(num_rays, dtype=torch.bool)

        # Wall decals (pictures and windows): rectangles on the side and far walls.
        decals = ["picture"] * _randint(rng, 0, 2) + ["window"] * _randint(rng, 0, 1)
        for decal in decals:
            wall = _randint(rng, 0, 2)  # 0 left (x = -hw), 1 right (x = +hw), 2 far (z = depth)
            if decal == "window":
                extent_u, extent_v = _uniform(rng, 0.8, 1.6), _uniform(rng, 0.9, 1.4)
                center_v = _uniform(rng, 1.2, min(2.0, room_height - extent_v / 2 - 0.1))
            else:
                extent_u, extent_v = _uniform(rng, 0.4, 1.0), _uniform(rng, 0.3, 0.7)
                center_v = _uniform(rng, 1.2, min(1.9, room_height - extent_v / 2 - 0.1))
            if wall == 2:
                axis, side_value = 2, room_depth
                center_u = _uniform(rng, -half_width + extent_u / 2, half_width - extent_u / 2)
                u_coord = hit[:, 0]
            else:
                axis, side_value = 0, (-half_width if wall == 0 else half_width)
                center_u = _uniform(rng, 1.0, room_depth - extent_u / 2 - 0.1)
                u_coord = hit[:, 2]
            on_wall = (room_axis == axis) & ((hit[:, axis] - side_value).abs() < 1e-3)
            inside = (
                on_wall
                & ((u_coord - center_u).abs() <= extent_u / 2)
                & ((hit[:, 1] - center_v).abs() <= extent_v / 2)
            )
            kind = SCENE_KINDS[decal]
            room_labels = torch.where(
                inside, torch.tensor(kind.nyu40 if num_classes == 40 else kind.nyu13), room_labels
            )
            room_albedo = torch.where(inside[:, None], jittered(decal), room_albedo)
            if not kind.has_normal:
                room_has_normal = room_has_normal & ~inside

        # Furniture boxes standing on the floor, rotated about the vertical axis.
        for _ in range(_randint(rng, 2, 5)):
            kind_name = _FURNITURE[_randint(rng, 0, len(_FURNITURE) - 1)]
            (w_lo, w_hi), (d_lo, d_hi), (h_lo, h_hi) = _FURNITURE_SIZE[kind_name]
            half = torch.tensor(
                [
                    _uniform(rng, w_lo, w_hi) / 2,
                    _uniform(rng, h_lo, h_hi) / 2,
                    _uniform(rng, d_lo, d_hi) / 2,
                ]
            )
            radius = float(half[[0, 2]].norm())
            center = torch.tensor(
                [
                    _uniform(rng, -half_width + radius, half_width - radius)
                    if half_width > radius
                    else 0.0,
                    float(half[1]),
                    _uniform(rng, 1.2 + radius, max(1.2 + radius, room_depth - radius)),
                ]
            )
            rotation = _rotation_y(_uniform(rng, -0.6, 0.6))
            local_origin = (origin - center) @ rotation  # R^T (o - c)
            local_dirs = directions @ rotation
            safe_local = torch.where(
                local_dirs.abs() < 1e-9, torch.full_like(local_dirs, 1e-9), local_dirs
            )
            t_a = (-half - local_origin) / safe_local
            t_b = (half - local_origin) / safe_local
            t_near, near_axis = torch.minimum(t_a, t_b).max(dim=1)
            t_far = torch.maximum(t_a, t_b).min(dim=1).values
            hits = (t_near <= t_far) & (t_near > _EPS)
            local_normal = torch.zeros(num_rays, 3)
            local_normal[torch.arange(num_rays), near_axis] = -torch.sign(
                safe_local[torch.arange(num_rays), near_axis]
            )
            candidate_t.append(torch.where(hits, t_near, torch.full_like(t_near, _INF)))
            candidate_normal.append(local_normal @ rotation.T)
            candidate_kind.append(kind_name)
            candidate_albedo.append(jittered(kind_name).expand(num_rays, 3))

        # Balls on the floor.
        for _ in range(_randint(rng, 0, 2)):
            radius = _uniform(rng, 0.12, 0.3)
            center = torch.tensor(
                [
                    _uniform(rng, -half_width + radius, half_width - radius),
                    radius,
                    _uniform(rng, 1.0, room_depth - radius),
                ]
            )
            offset = origin - center
            b = directions @ offset
            disc = b * b - (offset @ offset - radius * radius)
            t_hit = -b - disc.clamp_min(0).sqrt()
            hits = (disc >= 0) & (t_hit > _EPS)
            candidate_t.append(torch.where(hits, t_hit, torch.full_like(t_hit, _INF)))
            points = origin + t_hit[:, None] * directions
            candidate_normal.append((points - center) / radius)
            candidate_kind.append("ball")
            candidate_albedo.append(jittered("ball").expand(num_rays, 3))

        t_all = torch.stack([room_t, *candidate_t], dim=1)
        nearest_t, nearest = t_all.min(dim=1)
        normals = torch.stack([room_normal, *candidate_normal], dim=1)[
            torch.arange(num_rays), nearest
        ]
        albedo = torch.stack([room_albedo, *candidate_albedo], dim=1)[
            torch.arange(num_rays), nearest
        ]
        object_labels = torch.tensor(
            [
                SCENE_KINDS[k].nyu40 if num_classes == 40 else SCENE_KINDS[k].nyu13
                for k in candidate_kind
            ],
            dtype=torch.long,
        )
        labels = torch.cat([torch.zeros(1, dtype=torch.long), object_labels])[nearest]
        labels = torch.where(nearest == 0, room_labels, labels)
        has_normal = torch.where(nearest == 0, room_has_normal, torch.ones_like(room_has_normal))

        # Shading: ambient + Lambert from a point light under the ceiling, with 1/(1 + k d^2).
        light = torch.tensor(
            [
                _uniform(rng, -0.5, 0.5) * half_width,
                room_height - 0.15,
                _uniform(rng, 1.0, room_depth - 1.0),
            ]
        )
        points = origin + nearest_t[:, None] * directions
        to_light = light - points
        distance = to_light.norm(dim=1, keepdim=True).clamp_min(1e-6)
        lambert = ((normals * to_light).sum(dim=1, keepdim=True) / distance).clamp_min(0.0)
        shade = 0.3 + 0.9 * lambert / (1.0 + 0.04 * distance**2)
        shade = torch.where(has_normal[:, None], shade, torch.ones_like(shade))  # windows glow
        colour = albedo * shade + torch.randn(num_rays, 3, generator=rng) * 0.015
        image = (colour.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)

        camera_normals = torch.stack([normals @ right, normals @ down, normals @ forward], dim=1)
        camera_normals = camera_normals / camera_normals.norm(dim=1, keepdim=True).clamp_min(1e-12)

    sample = {
        "image": image.reshape(height, width, 3),
        "seg": labels.to(torch.uint8).reshape(height, width),
        "normal": encode_normals(camera_normals, has_normal).reshape(height, width, 3),
        "normal_mask": has_normal.reshape(height, width),
    }
    if with_depth:
        sample["depth"] = (nearest_t * (directions @ forward)).reshape(height, width)
    return sample


#: Tasks whose labels :func:`drop_labels` can remove.
_LABEL_TASKS = ("seg", "normal")


def labelled_count(fraction: float, num_images: int) -> int:
    """How many images keep a task's labels when a ``fraction`` of ``num_images`` does:
    ``round(fraction · num_images)``, at least 1 when ``fraction`` > 0.

    Example:
        >>> labelled_count(0.125, 256), labelled_count(0.01, 10), labelled_count(0.0, 10)
        (32, 1, 0)
    """
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"labelled fraction {fraction}: expected a number in [0, 1]")
    count = round(fraction * num_images)
    return max(count, 1) if fraction > 0 else 0


def drop_labels(sample: dict[str, torch.Tensor], task: str) -> dict[str, torch.Tensor]:
    """``sample`` with the labels of ``task`` ignored everywhere: ``seg`` all 255 (the ignore
    label), ``normal`` invalid (raw encoding all 255, or unit vectors all 0) with a False
    ``normal_mask``. The losses then skip the sample for that task.

    Example:
        >>> import torch
        >>> raw = render_scene((4, 4), torch.Generator().manual_seed(0))
        >>> out = drop_labels(dict(raw), "normal")
        >>> bool(out["normal_mask"].any()), int(out["normal"].min()), torch.equal(out["seg"], raw["seg"])
        (False, 255, True)
        >>> int(drop_labels(dict(raw), "seg")["seg"].min())
        255
    """
    if task not in _LABEL_TASKS:
        raise ConfigError(f"task {task!r}: synthetic scenes label {', '.join(_LABEL_TASKS)}")
    out = dict(sample)
    if task == "seg":
        out["seg"] = torch.full_like(sample["seg"], 255)
    else:
        normal = sample["normal"]
        out["normal"] = torch.full_like(normal, 255 if normal.dtype == torch.uint8 else 0)
        out["normal_mask"] = torch.zeros_like(sample["normal_mask"], dtype=torch.bool)
    return out


class SyntheticScenes(Dataset):
    """``num_images`` synthetic scenes (:func:`render_scene`); scene ``i`` is rendered on access
    from ``sample_generator(seed, i)``, so it is the same in every process and every run.

    Args:
        num_images: dataset length.
        size: ``(height, width)`` of the images.
        seed: scene seed; different seeds give unrelated scenes (use one per split).
        num_classes: 40 (NYUv2 40-class ids, default) or 13 (MTAN's 13-class ids).
        transform: optional callable applied to the raw sample.
        normals: ``"raw"`` (uint8 NYU encoding, default) or ``"unit"`` (float32 unit vectors,
            invalid = 0).
        with_depth: also return ``"depth"``.
        labelled: task → fraction of the images that keep the task's labels (the first
            :func:`labelled_count` ones); the others' labels of that task are ignored
            (:func:`drop_labels`). Default: every image keeps every label.

    Example:
        >>> import torch
        >>> a, b = SyntheticScenes(3, size=(16, 16), seed=1), SyntheticScenes(3, size=(16, 16), seed=1)
        >>> torch.equal(a[2]["image"], b[2]["image"]), len(a)
        (True, 3)
        >>> few = SyntheticScenes(4, size=(16, 16), seed=1, labelled={"seg": 0.5})
        >>> [int(few[i]["seg"].min()) == 255 for i in range(4)]
        [False, False, True, True]
    """

    def __init__(
        self,
        num_images: int,
        size: tuple[int, int] = (96, 128),
        seed: int = 0,
        num_classes: int = 40,
        transform=None,
        normals: str = "raw",
        with_depth: bool = False,
        labelled: Mapping[str, float] | None = None,
    ) -> None:
        if not isinstance(num_images, int) or num_images < 0:
            raise ConfigError(f"num_images={num_images!r}: expected a non-negative int")
        if len(size) != 2 or min(size) < 1:
            raise ConfigError(f"size={size!r}: expected (height, width) of positive ints")
        if num_classes not in (40, 13):
            raise ConfigError(
                f"num_classes={num_classes}: synthetic scenes use the NYUv2 40-class or "
                "13-class ids"
            )
        if normals not in ("raw", "unit"):
            raise ConfigError(f"normals={normals!r}: use 'raw' or 'unit'")
        self.num_images = num_images
        self.size = (int(size[0]), int(size[1]))
        self.seed = int(seed)
        self.num_classes = num_classes
        self.transform = transform
        self.normals = normals
        self.with_depth = with_depth
        for task in labelled or {}:
            if task not in _LABEL_TASKS:
                raise ConfigError(
                    f"labelled has task {task!r}; synthetic scenes label {', '.join(_LABEL_TASKS)}"
                )
        #: task → number of images (the first ones) that keep the task's labels
        self.labelled = {
            task: labelled_count(float(fraction), num_images)
            for task, fraction in (labelled or {}).items()
        }

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if index < 0:
            index += self.num_images
        if not 0 <= index < self.num_images:
            raise IndexError(f"scene {index} out of range for {self.num_images} scenes")
        sample = render_scene(
            self.size,
            sample_generator(self.seed, index),
            num_classes=self.num_classes,
            with_depth=self.with_depth,
        )
        for task, keep in self.labelled.items():
            if index >= keep:
                sample = drop_labels(sample, task)
        if self.normals == "unit":
            sample["normal"], sample["normal_mask"] = decode_normals(sample["normal"])
        return self.transform(sample) if self.transform is not None else sample

    def __repr__(self) -> str:
        return (
            f"SyntheticScenes(num_images={self.num_images}, size={self.size}, seed={self.seed}, "
            f"num_classes={self.num_classes}, normals={self.normals!r})"
        )
