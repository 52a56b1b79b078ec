"""Read a ViT's class-token attention over its patches through forward hooks, without touching model code.

The hook sits on the ``qkv`` projection of the last attention block. From its output it rebuilds only the
class-token query row: softmax(q_cls k^T * scale) over all keys, mean over heads. That is one (B, H, 1, D) x
(B, H, D, N) matmul, so the block keeps its fused ``scaled_dot_product_attention`` and no N x N map exists.
The hook never returns a value, so the student's outputs and gradients are untouched.
"""
from __future__ import annotations

import copy
import inspect
import sys
import warnings
import weakref
from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn

from . import layout
from .layout import unwrap_model, wrapper_chain
from .teacher_input import _caller_level


class CaptureError(RuntimeError):
    """The student cannot provide attention scores, or the loss asked for scores it did not produce."""


class CaptureWarning(UserWarning):
    """The student ran more than one training forward between two loss calls: the mask follows the last one."""


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` is, or wraps, a ``torch.compile`` module."""
    return any(isinstance(getattr(layer, "_orig_mod", None), nn.Module) for layer in wrapper_chain(model))


def prepare_compiled(model: nn.Module) -> None:
    """Make a compiled ``model`` see a hook attached now; refuse where this torch cannot.

    torch.compile does not guard on module hooks (``torch._dynamo.config.skip_nnmodule_hook_guards``): graphs traced
    before the hook existed keep running without it. When the model's forward already holds compiled graphs, they
    are dropped so the next call traces again, hook included (a one-off recompile, also of other models compiled
    from the same code).
    """
    if _IS_COMPILING is None:
        raise CaptureError(
            f"this torch ({torch.__version__}) has no torch.compiler.is_compiling / torch._dynamo.is_compiling, which "
            "the attention hook needs to run inside a compiled student: pass the uncompiled student (compile it "
            "after training, or not at all), or upgrade torch")
    # From now on every graph guards on the hooks it was traced with, so a graph traced for a hook-less model of the
    # same class (another instance, an earlier run) is never reused for the hooked student.
    dynamo_config = getattr(sys.modules.get("torch._dynamo"), "config", None)
    if getattr(dynamo_config, "skip_nnmodule_hook_guards", False):
        dynamo_config.skip_nnmodule_hook_guards = False
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    cache_entries = getattr(eval_frame, "_debug_get_cache_entry_list", None)
    if cache_entries is None:
        return  # dynamo never ran (nothing is stale), or this torch cannot tell: take() explains a missing capture
    codes = [getattr(type(layer).forward, "__code__", None) for layer in wrapper_chain(model)]
    if not any(code is not None and len(cache_entries(code)) for code in codes):
        return
    dynamo = sys.modules["torch._dynamo"]
    reset = getattr(dynamo, "reset_code_caches", None) or dynamo.reset
    warnings.warn(
        f"the compiled {type(unwrap_model(model)).__name__} already ran before its attention hook was attached; "
        f"those graphs would never run the hook, so torch.compile's code caches are cleared ({reset.__name__}) and "
        "the next call compiles again. Build the loss before the first forward to avoid the extra compile.",
        stacklevel=3)
    reset()


def find_last_attention(model: nn.Module) -> nn.Module:
    """The last self-attention module with a fused ``qkv`` projection (timm ``Attention`` and look-alikes)."""
    found = None
    for module in unwrap_model(model).modules():
        if isinstance(getattr(module, "qkv", None), nn.Linear) and hasattr(module, "num_heads"):
            found = module
    if found is None:
        raise CaptureError(
            f"student {type(unwrap_model(model)).__name__} has no recognisable attention block (a module with a "
            "fused `qkv` nn.Linear and `num_heads`, as in timm's VisionTransformer/DeiT): use mask_mode='random' "
            "or 'none', or a ViT-family student")
    if type(found).__name__ == "TalkingHeadAttn" or hasattr(unwrap_model(model), "blocks_token_only"):
        # CaiT (timm's or DeiT's cait_models.py) keeps the class token out of its self-attention blocks.
        raise CaptureError(f"student {type(unwrap_model(model)).__name__} has no class-token self-attention to read "
                           "(CaiT-style): use a ViT/DeiT student, or mask_mode='random'")
    return found


# Terms some attention modules add inside their forward: the scores rebuilt from the qkv output alone would miss them.
_INNER_POSITION_ARGS = ("rope", "rel_pos_bias", "shared_rel_pos_bias", "shared_rel_pos")
_INNER_POSITION_ATTRS = ("relative_position_bias_table", "rel_pos", "rope")


def _unreadable_attention(attn: nn.Module) -> Optional[str]:
    """Why the class-token scores cannot be rebuilt from this module's ``qkv`` output, or None if they can."""
    try:
        params = inspect.signature(type(attn).forward).parameters
    except (TypeError, ValueError):
        params = {}
    for name in _INNER_POSITION_ARGS:
        if name in params:
            return f"a position term inside the attention (its forward takes `{name}`)"
    for name in _INNER_POSITION_ATTRS:
        if getattr(attn, name, None) is not None:
            return f"a position term inside the attention (it holds `{name}`)"
    for name in ("q_bias", "v_bias"):
        if getattr(attn, name, None) is not None:  # BEiT adds them outside the qkv Linear the hook reads
            return f"a `{name}` added outside the qkv projection"
    kv_heads = getattr(attn, "num_kv_heads", None)
    if isinstance(kv_heads, int) and kv_heads != attn.num_heads:
        return f"grouped-query heads ({kv_heads} key/value heads for {attn.num_heads} queries)"
    return None


def class_token_owner(model: nn.Module, attn: nn.Module, *, role: str = "student") -> nn.Module:
    """The module whose tokens ``attn`` attends over, checked to be a class-token ViT whose head reads that token.

    Verified, not assumed: the module that makes the tokens (its ``patch_embed``) is found from the hooked
    attention, so a ViT inside the user's own wrapper is read with its own class token and grid; the attention
    must sit in that module's last block; the head must read the class token whose attention is taken; and the
    attention must not add position terms of its own that the rebuilt scores would miss.
    """
    name = type(unwrap_model(model)).__name__
    owner = layout.token_model(model, attn)
    if owner is None:
        raise CaptureError(
            f"{role} {name}: no module containing its last attention block has a patch embedding (`patch_embed`), "
            "so which of the attended tokens are patches cannot be told: pass the ViT itself (or a wrapper around "
            "one timm/DeiT ViT), or use mask_mode='random'")
    blocks = getattr(owner, "blocks", None)
    if isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks):
        if not any(m is attn for m in blocks[-1].modules()):
            raise CaptureError(
                f"{role} {name}: the last attention module ({type(attn).__name__}) is not in the last block of "
                f"{type(owner).__name__}, so it is not the last-layer class-token attention MaskedKD reads: use "
                "mask_mode='random', or a plain ViT/DeiT student")
    reads = layout.class_token_is_read(owner)
    if reads is not True:
        pool = getattr(owner, "global_pool", None)
        why = (f"pools its patch tokens (global_pool={pool!r}) instead of reading its class token"
               if isinstance(getattr(owner, "cls_token", None), torch.Tensor) and reads is False
               else "has no class token its head reads" if reads is False
               else "does not say whether its head reads its class token")
        raise CaptureError(
            f"{role} {name} {why}, so the class-token attention does not say which patches its prediction used: "
            "use mask_mode='random', or a student whose head reads its class token (global_pool='token')")
    term = _unreadable_attention(attn)
    if term is not None:
        raise CaptureError(
            f"{role} {name}: its attention has {term}, which the class-token attention rebuilt from the qkv "
            "output would miss: use a ViT/DeiT student, or mask_mode='random'")
    if layout.prefix_tokens(owner) is None:
        raise CaptureError(
            f"{role} {name}: its class/register tokens and its position embedding disagree on how many tokens "
            "precede the patches: use mask_mode='random'")
    return owner


def _find_is_compiling() -> Optional[Callable[[], bool]]:
    check = getattr(getattr(torch, "compiler", None), "is_compiling", None)  # torch >= 2.3
    if check is None:
        try:  # torch 2.0-2.2 keep it under torch._dynamo (a heavy import, so only where needed)
            import torch._dynamo as dynamo
            check = getattr(dynamo, "is_compiling", None)
        except Exception:
            check = None
    return check


_IS_COMPILING = _find_is_compiling()


def _in_backward() -> bool:
    # Activation checkpointing re-runs the forward inside backward; that recompute must not overwrite scores.
    # Under torch.compile the question is skipped: the graph task id is a plain int that dynamo cannot trace (a graph
    # break there made dynamo compile each Block.forward as its own frame and reuse the hook-less graph of the first
    # block for the last one, so the hook never ran), and a compiled graph's recompute lives inside its backward
    # graph, where no Python hook runs.
    if _IS_COMPILING is not None and _IS_COMPILING():
        return False
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


class InertHook:
    """What a plugin hook becomes in a pickled model (``torch.save(student)``): a hook that does nothing."""

    def __call__(self, module: nn.Module, inputs, output) -> None:
        return None


class WeakRefHook:
    """Base of the plugin's forward hooks: weak references to their owner, and picklable as an ``InertHook``.

    A weak reference cannot be pickled, and a saved model must not carry the loss along anyway: the saved copy's
    hook does nothing, while the live model keeps its working hook.
    """

    def __reduce__(self):
        return InertHook, ()


class _ScoreHook(WeakRefHook):
    """Forward hook bound to one module and one capture by weak references.

    A deep-copied model (an EMA copy) or a pickled one gets an ``InertHook`` in its place (``copy.deepcopy`` goes
    through ``__reduce__`` too), so it never writes into the loss; the module check below is a second guard.
    """

    def __init__(self, capture: "AttentionCapture", module: nn.Module):
        self.capture_ref = weakref.ref(capture)
        self.module_ref = weakref.ref(module)

    def __call__(self, module: nn.Module, inputs, output: torch.Tensor) -> None:
        capture = self.capture_ref()
        if capture is None or module is not self.module_ref() or not capture.enabled:
            return
        if not (capture.always or (capture.attn.training and torch.is_grad_enabled())) or _in_backward():
            return
        capture._record(output)


class AttentionCapture:
    """Class-token attention over patch tokens of one model's last attention block, for the batch just seen.

    ``always=False`` (students): only training forwards with grad enabled are read, so evaluation pays nothing.
    ``always=True`` (a teacher read under no_grad for the 'teacher' mask criterion).
    """

    def __init__(self, model: nn.Module, *, always: bool = False):
        self.attn = find_last_attention(model)
        # The ViT whose tokens the hooked attention sees (inside a user's wrapper too): its grid and prefix count.
        self.model = class_token_owner(model, self.attn, role="teacher" if always else "student")
        self.prefix = layout.prefix_tokens(self.model)
        self.grid = layout.patch_grid(self.model)
        self._grids: dict = {}
        self.always = always
        self.enabled = True
        self.compiled = is_compiled(model)
        if self.compiled:
            prepare_compiled(model)
        self._scores: Optional[torch.Tensor] = None
        self._overwritten = False  # a second training forward replaced scores no loss call had taken
        self._handle = self.attn.qkv.register_forward_hook(_ScoreHook(self, self.attn.qkv))

    @torch.no_grad()
    def _record(self, qkv: torch.Tensor) -> None:
        # Outside autocast: the score row is tiny, and float32 keeps bf16 ties from deciding the top-k.
        if self._scores is not None and not self.always:
            self._overwritten = True
        with torch.autocast(device_type=qkv.device.type, enabled=False):
            self._scores = self._class_attention(qkv)

    def _class_attention(self, qkv: torch.Tensor) -> torch.Tensor:
        attn = self.attn
        heads = attn.num_heads
        head_dim = qkv.shape[-1] // (3 * heads)
        batch, tokens = qkv.shape[0], qkv.shape[1]
        qkv = qkv.detach().view(batch, tokens, 3, heads, head_dim)
        # Only the class-token query and the keys are read: cast those to float32, not the whole qkv output (under
        # AMP that copy was the size of qkv itself, every step).
        q, k = qkv[:, :1, 0].float().transpose(1, 2), qkv[:, :, 1].float().transpose(1, 2)
        q = attn.q_norm(q) if hasattr(attn, "q_norm") else q
        k = attn.k_norm(k) if hasattr(attn, "k_norm") else k
        scale = float(getattr(attn, "scale", head_dim ** -0.5))
        probs = torch.softmax((q.float() * scale) @ k.float().transpose(-2, -1), dim=-1)  # (B, H, 1, N)
        # (B, N) over every token, mean over heads as the paper reads it. Which of the N are patches is decided in
        # take(), where the batch's resolution is known (a dynamic-size student has no fixed patch count).
        return probs.mean(dim=1).squeeze(1)

    def patch_grid_for(self, image_hw: Optional[Tuple[int, int]]) -> Optional[Tuple[int, int]]:
        """(rows, cols) of this model's patch grid for an ``image_hw`` input (None when it has no patch embedding)."""
        if image_hw not in self._grids:  # layout walks the model's attributes: once per resolution, not per step
            self._grids[image_hw] = layout.patch_grid(self.model, image_hw)
        return self._grids[image_hw]

    def take(self, batch_size: int, *, image_hw: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """Scores (B, num_patches) of the last captured forward; consumed, so a stale batch can never be reused.

        ``image_hw`` is the batch's resolution: the patch count follows it for a dynamic-size model. The split into
        prefix and patch tokens is verified against the token count the model really produced.
        """
        row, self._scores = self._scores, None
        if self._overwritten:
            # Two views of a batch (consistency losses), or a forward for logging, between two loss calls: the
            # scores are the last forward's, which is the batch the loss got only if it was run last.
            self._overwritten = False
            warnings.warn("the student ran more than one training forward since the last loss call, and the mask is "
                          "chosen from the last one's attention: call the loss right after the forward whose outputs "
                          "it gets, and run any other forward in eval mode or under torch.no_grad()", CaptureWarning,
                          stacklevel=_caller_level())
        if row is None:
            raise CaptureError(
                "no student attention was captured since the last loss call: run the student on this batch in "
                "train mode with grad enabled before calling the loss (criterion(samples, model(samples), y)); "
                "reentrant activation checkpointing hides the forward, use timm's default non-reentrant mode"
                + ("" if self.compiled else "; if you run a torch.compile'd student, pass that compiled model as "
                   "student= (the loss then makes compile trace its hook)"))
        if row.shape[0] != batch_size:
            raise CaptureError(
                f"captured student attention is for a batch of {row.shape[0]} but the loss got {batch_size} "
                "samples: call the loss with the samples the student just processed")
        return row[:, row.shape[1] - self._num_patches(row.shape[1], image_hw):]

    def _num_patches(self, tokens: int, image_hw: Optional[Tuple[int, int]]) -> int:
        name = type(self.model).__name__
        prefix = self.prefix
        grid = self.patch_grid_for(image_hw)
        if grid is None:  # the grid cannot be told: the prefix count (checked at construction) is what is left
            return tokens - prefix
        patches = grid[0] * grid[1]
        if tokens - patches != prefix:
            raise CaptureError(
                f"{name} produced {tokens} tokens, but a {grid[0]}x{grid[1]} patch grid"
                f"{'' if image_hw is None else f' at {tuple(image_hw)} px'} plus {prefix} prefix token(s) makes "
                f"{patches + prefix}: the model's token layout is not what its attributes say; build it with "
                "img_size= at the batch resolution (or dynamic_img_size=True), or use mask_mode='random'")
        return patches

    def score_grid(self, num_patches: int, image_hw: Optional[Tuple[int, int]] = None) -> Tuple[int, int]:
        """(rows, cols) of the score map for ``num_patches`` patches (of an ``image_hw`` batch when given)."""
        grid = self.patch_grid_for(image_hw) if image_hw is not None else self.grid
        if grid is not None and grid[0] * grid[1] == num_patches:
            return tuple(grid)
        side = int(round(num_patches ** 0.5))
        if side * side != num_patches:
            raise CaptureError(f"cannot infer a patch grid for {num_patches} student patches")
        return side, side

    def __deepcopy__(self, memo: dict) -> "AttentionCapture":
        # A copied loss (copy.deepcopy(criterion)) must still read the model that will run. A student outside the
        # copied object (a loss's student) is not copied: the copy hooks the same live student with a hook of its
        # own. A model copied along (a teacher read in 'teacher' mode, a timm task's own student, already in
        # ``memo``) is read in its copy.
        new = copy.copy(self)
        memo[id(self)] = new
        if self.always or id(self.model) in memo:
            path = next(name for name, module in self.model.named_modules() if module is self.attn)
            new.model = copy.deepcopy(self.model, memo)
            new.attn = new.model.get_submodule(path)
        new._scores, new._overwritten = None, False
        hooked = self._handle is not None
        new._handle = new.attn.qkv.register_forward_hook(_ScoreHook(new, new.attn.qkv)) if hooked else None
        return new

    def remove(self) -> None:
        """Detach the hook; the model is left exactly as it was before."""
        # A compiled graph keeps the hook it was traced with (dynamo skips hook guards); it reads `enabled`, so
        # turning that off makes dynamo retrace a graph in which the stale hook returns at once.
        self.enabled = False
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._scores = None

    def __del__(self):
        try:
            self.remove()
        except Exception:
            pass
