"""Which timm teachers MaskedKD can mask, for the installed timm: ``python -m deit_patch.coverage``.

Every model family of the installed timm (model module and class: ``eva.Eva``, ``swin_transformer.SwinTransformer``)
gets one row: **masked** (a registered family describes it and its pruned forward with every patch kept reproduces
the model's own output), **unmasked-only** (it distils unmasked, as in DeiT, and the row says which structure
prevents masking) or **refused** (it cannot be a logit teacher at all, and the row says why). Each family is probed
on a small random-weight build (``tiny_builds``); a family the table does not know, such as one a newer timm adds,
is built at its entrypoint's defaults and probed the same way, so it shows up rather than breaking the command.

Families are found without building every model: each entrypoint is called with timm's ``build_model_with_cfg``
replaced by a stand-in that reports the class it was asked to build and stops.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from . import layout, teachers
from .teacher_input import check_channels
from .tiny_builds import TINY_BUILDS, TinyBuild, build_tiny

MASKED, UNMASKED, REFUSED = "masked", "unmasked-only", "refused"


class _Found(Exception):
    def __init__(self, cls):
        super().__init__(getattr(cls, "__name__", repr(cls)))
        self.cls = cls


def _stop(model_cls, *args, **kwargs):
    raise _Found(model_cls)



def family_of(name: str) -> str:
    """``module.Class`` of timm model ``name``, found without building it where timm's builder is used."""
    from timm.models import model_entrypoint
    entrypoint = model_entrypoint(name)
    module = sys.modules[entrypoint.__module__]
    short = entrypoint.__module__.rsplit(".", 1)[-1]
    original = getattr(module, "build_model_with_cfg", None)
    if original is not None:
        module.build_model_with_cfg = _stop
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = entrypoint(pretrained=False)
    except _Found as found:
        return f"{short}.{getattr(found.cls, '__name__', repr(found.cls))}"
    except Exception as err:  # an entrypoint that cannot even start: its family cannot be named
        return f"{short}.<{type(err).__name__}>"
    finally:
        if original is not None:
            module.build_model_with_cfg = original
    return f"{short}.{type(model).__name__}"  # built without timm's builder: its class is what it built


def timm_families(names: Optional[Sequence[str]] = None) -> Dict[str, List[str]]:
    """``module.Class`` -> model names of the installed timm (all of them, or ``names``)."""
    import timm
    families: Dict[str, List[str]] = {}
    for name in names if names is not None else timm.list_models():
        families.setdefault(family_of(name), []).append(name)
    return families


@dataclass
class Row:
    family: str               # module.Class
    models: int               # timm model names in the family
    example: str              # the model probed
    status: str               # masked / unmasked-only / refused
    detail: str               # the registered family, or why not
    tiny: bool                # probed on the tiny_builds entry (else at the entrypoint's defaults)


def _default_build(name: str) -> nn.Module:
    import timm
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=10).eval()


def _smallest(names: Sequence[str]) -> str:
    # 'tiny'/'small'/'test' names first, then the shortest: a cheap guess at the cheapest default build
    def cost(name: str):
        rank = 0 if "test" in name else 1 if any(w in name for w in ("tiny", "nano", "atto", "pico", "femto")) else 2
        return rank, len(name), name
    return sorted(names, key=cost)[0]


def probe(model: nn.Module, img: int) -> tuple:
    """(status, detail) for one built model: what the plugin does with it as a teacher."""
    x = torch.randn(2, layout.input_channels(model) or 3, img, img, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as err:
        return REFUSED, f"its forward fails on a {img}px batch ({type(err).__name__}: {str(err)[:120]})"
    if not isinstance(out, torch.Tensor) or out.shape != (2, 10):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        return REFUSED, f"not a classifier: returns {shape} for 2 images, not logits (use its classifier variant)"
    try:
        check_channels(teacher=model, samples=x)
    except ValueError as err:
        return REFUSED, str(err)
    family = teachers.find_family(model)
    if family is None:
        return UNMASKED, teachers.unmaskable_reason(model)
    try:
        teachers.verify_family(model, family)
    except teachers.UnsupportedTeacherError as err:
        return UNMASKED, str(err)
    return MASKED, f"family '{family.name}'"


def coverage(names: Optional[Sequence[str]] = None, *, build_unknown: bool = True,
             log: Optional[callable] = None) -> List[Row]:
    """One ``Row`` per timm family (or per family of ``names``)."""
    rows = []
    for family, members in sorted(timm_families(names).items()):
        entry: Optional[TinyBuild] = TINY_BUILDS.get(family)
        example = entry.model if entry is not None and entry.model in members else _smallest(members)
        tiny = entry is not None and entry.model in members
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                if tiny:
                    model = build_tiny(entry)
                    built = layout.built_image_size(model)  # another timm may keep its own size
                    img = built[0] if built is not None and built[0] == built[1] else entry.img
                elif build_unknown:
                    model, img = _default_build(example), 224
                else:
                    model = None
            except Exception as err:
                model, status = None, (REFUSED, f"could not be built ({type(err).__name__}: {str(err)[:120]})")
            else:
                status = probe(model, img) if model is not None else ("not probed", "--no-build: not built")
        rows.append(Row(family, len(members), example, status[0], status[1], tiny))
        if log is not None:
            log(f"{family:55s} {status[0]:14s} {time.perf_counter() - start:5.1f}s")
    return rows


def markdown(rows: Sequence[Row]) -> str:
    import timm
    counts = Counter(row.status for row in rows)
    lines = [f"Teacher coverage, timm {timm.__version__}: {len(rows)} model families, "
             + ", ".join(f"{counts[s]} {s}" for s in (MASKED, UNMASKED, REFUSED) if counts[s]) + ".",
             "Generated by `python -m deit_patch.coverage --markdown FILE`; each family is probed on a small "
             "random-weight build.", "",
             "| family (module.Class) | models | probed | status | why |", "|---|---|---|---|---|"]
    for row in rows:
        detail = row.detail.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| `{row.family}` | {row.models} | `{row.example}` | {row.status} | {detail} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deit_patch.coverage", description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", metavar="FILE", help="also write the table as markdown")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    parser.add_argument("--family", action="append", default=[], help="only families containing this text")
    parser.add_argument("--no-build", action="store_true", help="list families without probing unknown ones")
    args = parser.parse_args(argv)
    import timm
    names = None
    if args.family:
        names = [n for n in timm.list_models() if any(f in family_of(n) for f in args.family)]
    rows = coverage(names, build_unknown=not args.no_build, log=lambda line: print(line, file=sys.stderr))
    text = markdown(rows)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(text)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"timm": timm.__version__, "rows": [asdict(row) for row in rows]}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
