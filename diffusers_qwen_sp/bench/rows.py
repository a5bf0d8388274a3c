"""The plan of rows of a bench run ([`plan_rows`], [`scaling_rows`]), the configs of the transformer they run, and the
analytic minimum of the bytes one rank sends per forward ([`analytic_bytes_per_forward`])."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffusers import QwenImageTransformer2DModel

from .settings import BenchSettings


@dataclass(frozen=True)
class RowSpec:
    r"""One row of the bench: which transformer, parallelism and cache; `unavailable` says why it cannot run here."""

    key: str
    name: str
    kind: str  # "stock", "ours" or "diffusers_cp"
    ulysses: int = 1
    ring: int = 1
    cfg: int = 1
    teacache: float | None = None
    compiled: bool = False  # `compile_repeated_blocks(fullgraph=True)`, as diffusers documents for Qwen-Image
    per_forward: bool = True
    per_image: bool = True
    unavailable: str = ""

    @property
    def processes(self) -> int:
        """Processes that work on one image (1: a single-process row, run as a replica on every rank)."""
        return self.ulysses * self.ring * self.cfg

    @property
    def parallel(self) -> bool:
        return self.processes > 1


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    r"""RoPE axes (frame, height, width) for `head_dim`, in Qwen-Image's proportions ((16, 56, 56) for 128): they sum
    to `head_dim` and are even (complex pairs)."""
    frame_axis = max(2, head_dim // 8 // 2 * 2)
    side_axis = (head_dim - frame_axis) // 4 * 2
    return frame_axis, side_axis, head_dim - frame_axis - side_axis


def mid_size_config(layers: int, heads: int, head_dim: int) -> dict[str, Any]:
    r"""A Qwen-Image transformer config of `layers` blocks of `heads x head_dim`, with the real model's channels."""
    return dict(
        patch_size=2,
        in_channels=64,
        out_channels=16,
        num_layers=layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=heads * head_dim,
        guidance_embeds=False,
        axes_dims_rope=rope_axes(head_dim),
    )


def _model_location(model: str) -> tuple[str, str | None]:
    """(path, subfolder): a pipeline's transformer lives in `transformer/` (a local folder holding `config.json`
    itself is a transformer folder; a Hub id is taken for a pipeline repo such as Qwen/Qwen-Image)."""
    path = Path(model)
    if path.is_dir() and (path / "config.json").is_file() and not (path / "model_index.json").is_file():
        return model, None
    return model, "transformer"


def transformer_config(settings: BenchSettings) -> dict[str, Any]:
    r"""The config of the transformer the bench runs (read from `settings.model` when given)."""
    if settings.model is not None:
        path, subfolder = _model_location(settings.model)
        config = dict(QwenImageTransformer2DModel.load_config(path, subfolder=subfolder))
        return {key: value for key, value in config.items() if not key.startswith("_")}
    if settings.full_size:
        return _full_size_config()
    return mid_size_config(settings.layers, settings.heads, settings.head_dim)


def _full_size_config() -> dict[str, Any]:
    # The stock defaults are the real Qwen-Image config; read them off the signature without building the model.
    import inspect

    parameters = inspect.signature(QwenImageTransformer2DModel.__init__).parameters
    return {name: p.default for name, p in parameters.items() if name != "self" and p.default is not p.empty}


def plan_rows(settings: BenchSettings, heads: int) -> list[RowSpec]:
    r"""
    The rows of one run over `settings.world` processes, stock first. Rows that cannot run here carry the reason in
    `unavailable`; rows of a phase that is off are left out.
    """
    world = settings.world
    rows: list[RowSpec] = []
    want = set(settings.rows)
    image = "image" in settings.phases
    forward = "forward" in settings.phases

    def needs_world(ulysses: int = 1, ring: int = 1, cfg: int = 1) -> str:
        if world < 2:
            return f"needs >= 2 processes, the run has {world}"
        if ulysses > 1 and heads % ulysses:
            return f"Ulysses degree {ulysses} does not divide the {heads} attention heads"
        if ulysses * ring * cfg != world:
            return f"needs {ulysses * ring * cfg} processes, the run has {world}"
        return ""

    rows.append(RowSpec("stock", "stock diffusers", "stock", per_image=image, per_forward=forward))
    if "ours" in want:
        rows.append(RowSpec("ours", "ours, no SP", "ours", per_image=image, per_forward=forward))
    if "ulysses" in want:
        rows.append(RowSpec("ulysses", f"ours Ulysses {world}", "ours", ulysses=world, per_image=image,
                            per_forward=forward, unavailable=needs_world(ulysses=world)))
    if "ring" in want:
        rows.append(RowSpec("ring", f"ours Ring {world}", "ours", ring=world, per_image=image, per_forward=forward,
                            unavailable=needs_world(ring=world)))
    if "usp" in want and world >= 4 and world % 2 == 0:
        ulysses = world // 2
        rows.append(RowSpec("usp", f"ours Ulysses {ulysses} x Ring 2", "ours", ulysses=ulysses, ring=2,
                            per_image=image, per_forward=forward, unavailable=needs_world(ulysses=ulysses, ring=2)))
    if "diffusers-cp" in want:
        rows.append(RowSpec("diffusers-cp", f"diffusers CP Ulysses {world}", "diffusers_cp", ulysses=world,
                            per_image=image, per_forward=forward, unavailable=needs_world(ulysses=world)))
    if image and "cfg-parallel" in want:
        sp = max(1, world // 2)
        name = "ours CFG parallel 2" + (f" x Ulysses {sp}" if sp > 1 else "")
        reason = (needs_world(ulysses=sp, cfg=2) if world < 2 or world % 2 == 0
                  else f"needs an even number of processes, got {world}")
        rows.append(RowSpec("cfg-parallel", name, "ours", ulysses=sp, cfg=2, per_forward=False, unavailable=reason))
    if image and "teacache" in want:
        for threshold in settings.thresholds:
            rows.append(RowSpec("teacache", f"ours + TeaCache {threshold:g}", "ours", teacache=threshold,
                                per_forward=False))
    if image and "sp-teacache" in want and settings.combined_threshold is not None:
        threshold = settings.combined_threshold
        rows.append(RowSpec("sp-teacache", f"ours Ulysses {world} + TeaCache {threshold:g}", "ours", ulysses=world,
                            teacache=threshold, per_forward=False, unavailable=needs_world(ulysses=world)))
    if "compiled" in want:
        rows.append(RowSpec("compiled", "ours, no SP, compiled", "ours", compiled=True, per_image=image,
                            per_forward=forward))
    if "ulysses-compiled" in want:
        rows.append(RowSpec("ulysses-compiled", f"ours Ulysses {world}, compiled", "ours", ulysses=world,
                            compiled=True, per_image=image, per_forward=forward,
                            unavailable=needs_world(ulysses=world)))
    return [row for row in rows if row.per_forward or row.per_image]


def scaling_rows(processes: int, heads: int) -> list[RowSpec]:
    r"""The rows of an SP-scaling run over `processes` processes: stock (the reference) and ours Ulysses and Ring."""
    ulysses_reason = ""
    if heads % processes:
        ulysses_reason = f"Ulysses degree {processes} does not divide the {heads} attention heads"
    return [
        RowSpec("stock", "stock diffusers", "stock", per_image=False),
        RowSpec("ulysses", f"ours Ulysses {processes}", "ours", ulysses=processes, per_image=False,
                unavailable=ulysses_reason),
        RowSpec("ring", f"ours Ring {processes}", "ours", ring=processes, per_image=False),
    ]


# ---------------------------------------------------------------------------------------------------------------------
# Analytic minimum of the bytes one rank sends per forward
# ---------------------------------------------------------------------------------------------------------------------


def analytic_bytes_per_forward(
    row: RowSpec, config: dict[str, Any], settings: BenchSettings, batch: int = 1
) -> dict[str, float]:
    r"""
    Per-term minimum bytes one rank sends in one forward of `row` (exact `S / P`, no padding), by the counting
    convention of `count_communication`: a rank's own chunk of an all-to-all is not counted; an all-gather of an
    `n`-byte chunk sends `n` to each of the `P - 1` others. Empty for single-process rows.

    With `B` batch, `S` image and `T` text tokens, `H x D` heads, `L` layers, `P = U * R` processes, `e` bytes per
    element and `row = B * H * D * e`:

    - proj_out gather (every SP row): `B * (S/P) * C * e * (P - 1)` with `C = patch^2 * out_channels`;
    - ours, per layer: Q, K, V all-to-all `3 * (S/P) * row * (U-1)/U`, image output all-to-all back
      `(S/P) * row * (U-1)/U`, text output of our `H/U` heads to the other Ulysses ranks `T * row/U * (U-1)`, K and V
      image blocks passed `R - 1` times around the ring `(R-1) * 2 * (S/R) * row/U` (text is replicated: no text
      traffic in the ring);
    - diffusers CP Ulysses, per layer: Q, K, V, out all-to-alls of the joint `[text, image]` chunk
      `4 * ((S+T)/P) * row * (P-1)/P`, plus the all-gather of the joint boolean mask chunk `B * ((S+T)/P) * (P-1)`
      when the text is padded.
    """
    if not row.parallel or row.kind == "stock":
        return {}
    S, T, B = settings.image_tokens, settings.text_tokens, batch
    H, D, L = config["num_attention_heads"], config["attention_head_dim"], config["num_layers"]
    e = settings.torch_dtype.itemsize
    C = config["patch_size"] ** 2 * (config.get("out_channels") or config["in_channels"])
    U, R = row.ulysses, row.ring
    P = U * R
    line = B * H * D * e
    if row.cfg > 1:
        return {}  # per image only: the exchange of predictions, not a per-forward quantity
    terms: dict[str, float] = {"proj_out gather": B * (S / P) * C * e * (P - 1)}
    if row.kind == "diffusers_cp":
        terms["q,k,v,out all-to-all (joint)"] = L * 4 * ((S + T) / P) * line * (P - 1) / P
        if settings.text_padding:
            terms["joint mask all-gather"] = L * B * ((S + T) / P) * 1 * (P - 1)
        return terms
    if U > 1:
        terms["q,k,v all-to-all"] = L * 3 * (S / P) * line * (U - 1) / U
        terms["out all-to-all (image)"] = L * (S / P) * line * (U - 1) / U
        terms["text heads gather"] = L * T * (line / U) * (U - 1)
    if R > 1:
        terms["K/V ring passes"] = L * (R - 1) * 2 * (S / R) * line / U
    return terms
