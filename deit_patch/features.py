"""ViTKD feature distillation (Yang et al. 2022), on a full or a token-masked teacher.

Features are read through forward hooks, never by changing model code:
- student: the outputs of ``blocks[i]`` for each shallow layer i, and of the final ``norm`` (the deep layer), from
  the very forward that produced the logits. Only training forwards with grad are read (evaluation pays nothing),
  activation-checkpoint recomputes and deep-copied (EMA) models are ignored, exactly as ``AttentionCapture`` does.
- teacher: the same modules, hooked only for the duration of the one teacher call that gives the logits (the
  pruned call when the teacher is masked), so no extra teacher pass and no per-family code.
Prefix tokens (class, distillation, register) are dropped: the patch count comes from the patch grid and the
prefix count is what precedes it, checked against what the model declares.

Terms (B images, N patches, lambda = ``mask_ratio``), with ``a_i`` the token-wise aligners (``Linear(D_s, D_t)``
with bias when the widths differ, identity otherwise) and ``G`` the generator Conv3x3 -> ReLU -> Conv3x3:
- mimicking:  alpha / B * sum_{shallow l} sum_{b, n, c} (a_l(s_l)[b, n, c] - t_l[b, n, c])^2
- generation: beta / lambda / B * sum_{b, n in M_b, c} (G(x)[b, n, c] - t_deep[b, n, c])^2, where M_b is an
  MAE-style random permutation mask of N - int(N * (1 - lambda)) positions per image, and x is the aligned deep
  student tokens with the masked positions replaced by one learnable mask token (zero-initialised), laid out on the
  (B, D_t, H, W) grid in raster order. (Replacing in place equals ViTKD's drop / append mask tokens / unshuffle.)

On a masked teacher (kept patch indices ``keep_idx`` (B, K)) its features exist at kept positions only:
- mimicking is computed at the kept positions: student tokens gathered at ``keep_idx`` (same order) against the
  teacher's K tokens, with the same alpha / B normalisation (it is the reference term restricted to the patches
  the teacher saw).
- generation is supervised at S_b = M_b intersected with the kept set, and renormalised so that its scale does
  not depend on the keep ratio: the squared error summed over S is divided by the number of supervised positions
  sum_b |S_b| and multiplied by the number the unmasked reference supervises per image, |M_b| = N - int(N(1 -
  lambda)):   beta / lambda * |M| * (sum_{b, n in S_b, c} err^2) / sum_b |S_b|.
  With keep 1.0, S_b = M_b and this is the reference formula exactly; at any keep ratio it is |M| times the mean
  per-position error, the same quantity the reference measures (an estimate of it from the kept positions).
  A batch whose masks never meet the kept set contributes 0.
"""
from __future__ import annotations

import contextlib
import copy
import weakref
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from . import layout
from .capture import WeakRefHook, _in_backward
from .layout import unwrap_model


class FeatureKDError(ValueError):
    """The models cannot provide the features feature distillation needs, or the features do not fit."""


def _width(model: nn.Module, what: str) -> int:
    for name in ("embed_dim", "num_features"):
        value = getattr(model, name, None)
        if isinstance(value, int):
            return value
    raise FeatureKDError(f"{what} {type(model).__name__} has no integer embed_dim/num_features to size the ViTKD "
                         "heads: use a timm ViT/DeiT-style model")


def _token_model(model: nn.Module, what: str) -> nn.Module:
    found = layout.token_model(model)
    if found is None:
        raise FeatureKDError(f"{what} {type(unwrap_model(model)).__name__} has no patch embedding (`patch_embed`) and "
                             "token `blocks` to read, nor exactly one module inside with them: feature_kd='vitkd' "
                             "needs a ViT-style model (timm vit_*/deit_*/cait_*)")
    return found


def _prefix(model: nn.Module, what: str) -> int:
    prefix = layout.prefix_tokens(model)
    if prefix is None:
        raise FeatureKDError(f"{what} {type(model).__name__}: its class/register tokens and its position embedding "
                             "disagree on how many tokens precede the patches, so its patch tokens cannot be told")
    return prefix


def _feature_modules(model: nn.Module, layers: Sequence[int], what: str) -> Tuple[List[nn.Module], nn.Module]:
    blocks, norm = getattr(model, "blocks", None), getattr(model, "norm", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or not isinstance(norm, nn.Module):
        raise FeatureKDError(f"{what} {type(model).__name__} has no `blocks` sequence and `norm` module to read "
                             "features from: feature_kd='vitkd' needs a ViT-style model (timm vit_*/deit_*/cait_*)")
    for layer in layers:
        if not -len(blocks) <= layer < len(blocks):
            raise FeatureKDError(f"vitkd_layers has block {layer} but the {what} has {len(blocks)} blocks: "
                                 f"choose layers in 0..{len(blocks) - 1}")
    return [blocks[i] for i in layers], norm


def patch_tokens(tokens: torch.Tensor, *, num_patches: int, allowed_prefix: Sequence[int], where: str) -> torch.Tensor:
    """The last ``num_patches`` tokens of (B, T, D) after checking that what precedes them is a known prefix."""
    if tokens.dim() != 3:
        raise FeatureKDError(f"{where} gave a {tokens.dim()}-D output {tuple(tokens.shape)}; ViTKD reads (B, tokens, "
                             "channels) token sequences (a ViT with a flat token layout)")
    prefix = tokens.shape[1] - num_patches
    if prefix not in allowed_prefix:
        raise FeatureKDError(f"{where} gave {tokens.shape[1]} tokens for {num_patches} patches, i.e. {prefix} prefix "
                             f"tokens, but the model declares {sorted(set(allowed_prefix))}: the patch grid does not "
                             "match the input (build the model for this image size)")
    return tokens[:, prefix:]


class _FeatureHook(WeakRefHook):
    """Forward hook writing one module's output into a ``StudentFeatures``; weak references, as ``_ScoreHook``.

    A deep-copied (an EMA copy) or pickled model carries an ``InertHook`` in its place, so the copy's forwards never
    touch the loss.
    """

    def __init__(self, owner: "StudentFeatures", module: nn.Module, key: int):
        self.owner_ref = weakref.ref(owner)
        self.module_ref = weakref.ref(module)
        self.key = key

    def __call__(self, module: nn.Module, inputs, output: torch.Tensor) -> None:
        owner = self.owner_ref()
        if owner is None or module is not self.module_ref() or not owner.enabled:
            return
        if not (owner.model.training and torch.is_grad_enabled()) or _in_backward():
            return
        owner._features[self.key] = output  # kept with its graph: the feature terms train the student through it


class StudentFeatures:
    """The student's shallow block outputs and final-norm output (patch tokens), for the batch just seen."""

    def __init__(self, model: nn.Module, layers: Sequence[int]):
        # The ViT that makes the tokens: the model itself, or the one ViT inside the user's wrapper.
        self.model = _token_model(model, "student")
        self.layers = tuple(int(i) for i in layers)
        self.grid = layout.patch_grid(self.model)
        if self.grid is None:
            raise FeatureKDError(f"student {type(self.model).__name__}: its patch grid cannot be told from its patch "
                                 "embedding, and ViTKD needs it to drop prefix tokens and lay tokens out as an image")
        self.num_patches = self.grid[0] * self.grid[1]
        # What the model's attributes say (class/distillation/register tokens, any timm); take() checks it against
        # the tokens really produced: tokens - grid patches must equal it.
        self.allowed_prefix = (_prefix(self.model, "student"),)
        shallow, norm = _feature_modules(self.model, self.layers, "student")
        self.enabled = True
        self._features: Dict[int, torch.Tensor] = {}
        self._hooked = list(shallow) + [norm]
        self._handles = [m.register_forward_hook(_FeatureHook(self, m, k)) for k, m in enumerate(self._hooked)]

    def __deepcopy__(self, memo: dict) -> "StudentFeatures":
        # As AttentionCapture's: the same live student through hooks of its own, or its copy if it was copied along.
        new = copy.copy(self)
        memo[id(self)] = new
        if id(self.model) in memo:
            new.model = copy.deepcopy(self.model, memo)
            new._hooked = [copy.deepcopy(m, memo) for m in self._hooked]
        new._features = {}
        new._handles = ([m.register_forward_hook(_FeatureHook(new, m, k)) for k, m in enumerate(new._hooked)]
                        if self._handles else [])
        return new

    def take(self, batch_size: int) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """(shallow patch tokens per layer, deep patch tokens), each (B, N, D_s); consumed, so never reused."""
        features, self._features = self._features, {}
        count = len(self.layers) + 1
        if len(features) != count:
            raise FeatureKDError(
                "no student features were captured since the last loss call: run the student on this batch in "
                "train mode with grad enabled before the loss (criterion(samples, model(samples), y))")
        out = []
        for key in range(count):
            where = f"student block {self.layers[key]}" if key < len(self.layers) else "student final norm"
            tokens = patch_tokens(features[key], num_patches=self.num_patches, allowed_prefix=self.allowed_prefix,
                                  where=where)
            if tokens.shape[0] != batch_size:
                raise FeatureKDError(f"captured student features are for a batch of {tokens.shape[0]} but the loss "
                                     f"got {batch_size} samples: call the loss with the samples the student just saw")
            out.append(tokens)
        return out[:-1], out[-1]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._features = {}


class TeacherFeatures:
    """Hooks on the teacher's shallow blocks and final norm, attached only inside ``tap()``."""

    def __init__(self, model: nn.Module, layers: Sequence[int], *, block_prefix: Optional[int] = None):
        self.model = _token_model(model, "teacher")
        self.layers = tuple(int(i) for i in layers)
        shallow, norm = _feature_modules(self.model, self.layers, "teacher")
        self.modules = list(shallow) + [norm]
        # Tokens entering the blocks are exactly what the family's embed produced (block_prefix in front); the
        # final norm may see another prefix (CaiT adds its class token after the self-attention blocks).
        known = {_prefix(self.model, "teacher")} | ({block_prefix} if block_prefix is not None else set())
        self.block_prefix = (block_prefix,) if block_prefix is not None else tuple(sorted(known))
        self.norm_prefix = tuple(sorted(known))
        self._features: Dict[int, torch.Tensor] = {}

    @contextlib.contextmanager
    def tap(self) -> Iterator[None]:
        self._features = {}

        def make(key: int):
            def hook(module, inputs, output):
                self._features[key] = output.detach()
            return hook
        handles = [m.register_forward_hook(make(k)) for k, m in enumerate(self.modules)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def take(self, num_patches: int) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """(shallow, deep) teacher patch tokens in float32, ``num_patches`` each (the kept count when masked)."""
        features, self._features = self._features, {}
        count = len(self.layers) + 1
        if len(features) != count:
            raise FeatureKDError("the teacher's features were not recorded in this step: the teacher call that gives "
                                 "the logits must run inside TeacherFeatures.tap() (the loss does this)")
        out = []
        for key in range(count):
            shallow = key < len(self.layers)
            out.append(patch_tokens(features[key], num_patches=num_patches,
                                    allowed_prefix=self.block_prefix if shallow else self.norm_prefix,
                                    where=f"teacher block {self.layers[key]}" if shallow else "teacher final norm"
                                    ).float())
        return out[:-1], out[-1]


class ViTKDHeads(nn.Module):
    """The trainable part of ViTKD: aligners, mask token and generator (they train with the student)."""

    def __init__(self, *, student_dim: int, teacher_dim: int, num_shallow: int):
        super().__init__()
        aligned = student_dim != teacher_dim

        def aligner() -> nn.Module:
            return nn.Linear(student_dim, teacher_dim, bias=True) if aligned else nn.Identity()
        self.shallow_align = nn.ModuleList([aligner() for _ in range(num_shallow)])
        self.deep_align = aligner()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, teacher_dim))
        self.generator = nn.Sequential(nn.Conv2d(teacher_dim, teacher_dim, kernel_size=3, padding=1),
                                       nn.ReLU(inplace=True),
                                       nn.Conv2d(teacher_dim, teacher_dim, kernel_size=3, padding=1))
        self.grid: Tuple[int, int] = (0, 0)  # set by ViTKD; a plain attribute so the state dict is weights only

    def forward(self, shallow: List[torch.Tensor], deep: torch.Tensor,
                gen_mask: torch.Tensor) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """Aligned shallow tokens, and the generator's output (B, N, D_t) from the masked aligned deep tokens."""
        aligned = [align(x) for align, x in zip(self.shallow_align, shallow)]
        x = self.deep_align(deep)
        x = torch.where(gen_mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        batch, tokens, dim = x.shape
        rows, cols = self.grid
        image = x.transpose(1, 2).reshape(batch, dim, rows, cols)  # raster order: token r * cols + c
        return aligned, self.generator(image).flatten(2).transpose(1, 2)

    def param_groups(self, weight_decay: float) -> List[dict]:
        """Optimizer groups: decay on weight matrices/kernels, none on biases and the mask token."""
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if param.ndim <= 1 or name.endswith(".bias") or name == "mask_token" else decay).append(param)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def generation_mask(batch: int, num_patches: int, ratio: float, *, device: torch.device,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(B, N) bool, True where masked: per image a random permutation, its first int(N (1 - ratio)) kept (MAE)."""
    draw_device = generator.device if generator is not None else device
    noise = torch.rand(batch, num_patches, generator=generator, device=draw_device).to(device)
    keep = int(num_patches * (1 - ratio))
    order = noise.argsort(dim=1)
    mask = torch.ones(batch, num_patches, dtype=torch.bool, device=device)
    return mask.scatter(1, order[:, :keep], False)


def _gather(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return torch.gather(tokens, 1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def vitkd_terms(aligned: Sequence[torch.Tensor], generated: torch.Tensor, t_shallow: Sequence[torch.Tensor],
                t_deep: torch.Tensor, *, mask: torch.Tensor, keep_idx: Optional[torch.Tensor], alpha: float,
                beta: float, mask_ratio: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mimicking, generation) as the module docstring defines them, in float32.

    ``aligned``: student shallow tokens after the aligners, already at the teacher's positions (B, K or N, D_t);
    ``generated``: the generator's output on the full grid (B, N, D_t); ``t_shallow``/``t_deep``: teacher tokens
    (B, K or N, D_t); ``mask``: (B, N) True where the generation mask hides a token; ``keep_idx``: (B, K) kept
    teacher patches, None for an unmasked teacher.
    """
    batch, num_patches = mask.shape
    mimic = sum((a.float() - t).pow(2).sum() for a, t in zip(aligned, t_shallow)) / batch * alpha
    scale = beta / mask_ratio
    if keep_idx is None:
        err = (generated.float() - t_deep).pow(2).sum(-1) * mask
        return mimic, err.sum() / batch * scale
    num_masked = num_patches - int(num_patches * (1 - mask_ratio))  # what the reference supervises per image
    supervised = mask.gather(1, keep_idx)  # (B, K): masked in the student and kept in the teacher
    err = (_gather(generated, keep_idx).float() - t_deep).pow(2).sum(-1) * supervised
    return mimic, err.sum() / supervised.sum().clamp_min(1) * (num_masked * scale)


class ViTKD(nn.Module):
    """ViTKD's two terms for one student/teacher pair; the heads are this module's trainable children.

    Under torch.distributed (initialised, world size > 1) the heads are wrapped in DistributedDataParallel at
    construction: rank 0's initial weights are broadcast and gradients are averaged, so N processes train the heads
    as one. The wrapper is kept outside the module tree, so ``heads.state_dict()`` has plain keys.
    """

    def __init__(self, *, student: nn.Module, teacher: nn.Module, alpha: float = 3e-5, beta: float = 3e-6,
                 mask_ratio: float = 0.5, layers: Sequence[int] = (0, 1), teacher_prefix: Optional[int] = None,
                 generator: Optional[torch.Generator] = None, distributed: Optional[bool] = None):
        super().__init__()
        if not isinstance(layers, (tuple, list)):
            raise FeatureKDError(f"vitkd_layers={layers!r} must be a tuple of block indices, e.g. (0, 1)")
        layers = tuple(layers)
        if not layers or not all(isinstance(i, int) for i in layers) or len(set(layers)) != len(layers):
            raise FeatureKDError(f"vitkd_layers={layers!r} must be distinct block indices, e.g. (0, 1)")
        if not 0.0 < float(mask_ratio) < 1.0:
            raise FeatureKDError(f"vitkd_mask_ratio={mask_ratio} must lie in (0, 1): it is the fraction of student "
                                 "tokens the generator reconstructs (ViTKD uses 0.5)")
        if float(alpha) < 0 or float(beta) < 0:
            raise FeatureKDError(f"vitkd_alpha={alpha} and vitkd_beta={beta} must be >= 0")
        self.alpha, self.beta, self.mask_ratio = float(alpha), float(beta), float(mask_ratio)
        self.layers = layers
        if generator is not None and not isinstance(generator, torch.Generator):
            raise FeatureKDError(f"vitkd_generator={generator!r} must be a torch.Generator (e.g. "
                                 "torch.Generator().manual_seed(0)) or None for torch's global RNG")
        self.generator_rng = generator
        s_model, t_model = unwrap_model(student), unwrap_model(teacher)
        self.student_features = StudentFeatures(s_model, layers)
        self.teacher_features = TeacherFeatures(t_model, layers, block_prefix=teacher_prefix)
        t_model_tokens = self.teacher_features.model
        s_size = layout.built_image_size(self.student_features.model)
        # A size-following teacher (NaFlexViT has no built size at all) is compared at the student's input size.
        t_grid = (layout.patch_grid(t_model_tokens, s_size) if s_size is not None and layout.is_dynamic_size(
            t_model_tokens) else layout.patch_grid(t_model_tokens))
        if t_grid is None:
            raise FeatureKDError(f"teacher {type(t_model_tokens).__name__}: its patch grid cannot be told from its "
                                 "patch embedding, and ViTKD pairs its tokens with the student's position by "
                                 "position: use feature_kd=None (logit KD still works)")
        if t_grid != self.student_features.grid:
            raise FeatureKDError(f"ViTKD pairs student and teacher tokens position by position, but the student's "
                                 f"patch grid is {self.student_features.grid} and the teacher's {t_grid}: use models "
                                 "with the same patch size at the same input size")
        self.grid = self.student_features.grid
        self.num_patches = self.student_features.num_patches
        self.num_masked = self.num_patches - int(self.num_patches * (1 - self.mask_ratio))
        self.student_dim = _width(self.student_features.model, "student")
        self.teacher_dim = _width(self.teacher_features.model, "teacher")
        self.heads = ViTKDHeads(student_dim=self.student_dim, teacher_dim=self.teacher_dim, num_shallow=len(layers))
        self.heads.grid = self.grid
        param = next(s_model.parameters(), None)
        if param is not None:
            self.heads.to(param.device)
        self._ddp: Optional[nn.Module] = None
        if distributed is None:
            distributed = (torch.distributed.is_available() and torch.distributed.is_initialized()
                           and torch.distributed.get_world_size() > 1)
        if distributed:
            device = next(self.heads.parameters()).device
            ddp = nn.parallel.DistributedDataParallel(
                self.heads, device_ids=[device.index] if device.type == "cuda" else None)
            object.__setattr__(self, "_ddp", ddp)  # not a child: keeps state_dict keys free of "module."

    def tap(self):
        """Context manager for the one teacher call whose features the next ``forward`` uses."""
        return self.teacher_features.tap()

    def forward(self, batch_size: int, keep_idx: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(mimicking, generation) from the captured student and the tapped teacher features of this step."""
        s_shallow, s_deep = self.student_features.take(batch_size)
        kept = self.num_patches if keep_idx is None else keep_idx.shape[1]
        t_shallow, t_deep = self.teacher_features.take(kept)
        if t_deep.shape[0] != batch_size or t_deep.shape[-1] != self.teacher_dim:
            raise FeatureKDError(f"teacher features {tuple(t_deep.shape)} do not fit batch {batch_size} and width "
                                 f"{self.teacher_dim}")
        if s_deep.shape[-1] != self.student_dim:
            raise FeatureKDError(f"student features have width {s_deep.shape[-1]}, expected {self.student_dim}")
        if keep_idx is not None:
            keep_idx = keep_idx.to(s_deep.device)
            s_shallow = [_gather(x, keep_idx) for x in s_shallow]  # align only the tokens that are compared
        mask = generation_mask(batch_size, self.num_patches, self.mask_ratio, device=s_deep.device,
                               generator=self.generator_rng)
        heads = self._ddp if self._ddp is not None else self.heads
        aligned, generated = heads(s_shallow, s_deep, mask)
        return vitkd_terms(aligned, generated, t_shallow, t_deep, mask=mask, keep_idx=keep_idx, alpha=self.alpha,
                           beta=self.beta, mask_ratio=self.mask_ratio)

    def remove(self) -> None:
        self.student_features.remove()


def heads_gflops(vitkd: ViTKD, *, num_kept: Optional[int] = None) -> float:
    """fvcore GFLOPs per image of the heads' forward (shallow aligners on ``num_kept`` tokens, deep on all)."""
    from .cost import count_gflops

    class _Probe(nn.Module):
        def __init__(self, heads: ViTKDHeads):
            super().__init__()
            self.heads = heads

        def forward(self, deep: torch.Tensor, shallow: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            aligned, generated = self.heads(list(shallow.unbind(0)), deep, mask)
            return generated.sum() + sum(a.sum() for a in aligned)

    param = next(vitkd.heads.parameters())
    kept = vitkd.num_patches if num_kept is None else int(num_kept)
    deep = torch.zeros(1, vitkd.num_patches, vitkd.student_dim, device=param.device, dtype=param.dtype)
    shallow = torch.zeros(len(vitkd.layers), 1, kept, vitkd.student_dim, device=param.device, dtype=param.dtype)
    mask = torch.zeros(1, vitkd.num_patches, dtype=torch.bool, device=param.device)
    with torch.no_grad():
        return count_gflops(_Probe(vitkd.heads), (deep, shallow, mask))


# --- registry: feature_kd=<name> in MaskedDistillationLoss -------------------------------------------------------
FEATURE_KD = {"vitkd": ViTKD}


def build_feature_kd(name: Optional[str], *, student: Optional[nn.Module], teacher: Optional[nn.Module],
                     distillation_type: str, compile_teacher: bool = False, teacher_prefix: Optional[int] = None,
                     **options) -> Optional[nn.Module]:
    """The feature-distillation module ``name`` names (None: no feature distillation), with clear refusals."""
    if name is None or name == "none":
        return None
    if name not in FEATURE_KD:
        raise FeatureKDError(f"feature_kd={name!r} is not one of {['none'] + sorted(FEATURE_KD)}")
    if distillation_type == "none" or teacher is None:
        raise FeatureKDError(f"feature_kd={name!r} needs the teacher to run: set distillation_type='soft' (or "
                             "'hard') and a teacher; for feature distillation without logit KD use alpha=0.0")
    if student is None:
        raise FeatureKDError(f"feature_kd={name!r} reads the student's features: pass student=model (plain, DDP or "
                             "compiled)")
    if compile_teacher:
        raise FeatureKDError(f"feature_kd={name!r} reads the teacher's features through hooks, which a compiled "
                             "teacher forward does not run: drop compile_teacher (--compile-teacher)")
    return FEATURE_KD[name](student=student, teacher=teacher, teacher_prefix=teacher_prefix, **options)
