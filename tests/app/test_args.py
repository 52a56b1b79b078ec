"""The command line (maskedkd_app/args.py): every flag DeiT scripts and recorded runs use, kept as it was."""
import json
from pathlib import Path

import pytest

from maskedkd_app import args as cli_args

# The parser's flags as main_maskedkd.py defined them before the parser moved to maskedkd_app/args.py, written
# out from that parser: names, aliases, defaults, types, choices and help texts.
RECORDED = json.loads((Path(__file__).parent / "cli_flags.json").read_text())


def _actions():
    return {action.dest if not action.option_strings else action.option_strings[0]: action
            for action in cli_args.get_args_parser()._actions}


def _parsed_type(action):
    # A typed flag (deit_patch.argtypes: positive_int, rate, ...) parses to the same Python type as before; the
    # validator's own name is not what a command line depends on.
    kind = getattr(action.type, "parses_to", action.type)
    return getattr(kind, "__name__", None)


@pytest.mark.parametrize("flag", RECORDED["flags"], ids=lambda flag: flag["flags"][0])
def test_every_recorded_flag_keeps_its_name_default_type_and_help(flag):
    action = _actions().get(flag["flags"][0])
    assert action is not None, f"{flag['flags'][0]} is gone"
    default = {} if isinstance(action.default, dict) else action.default
    now = {"flags": action.option_strings, "dest": action.dest, "default": default,
           "action": type(action).__name__, "type": _parsed_type(action), "nargs": action.nargs,
           "choices": list(action.choices) if action.choices else None, "const": action.const,
           "metavar": action.metavar, "help": action.help}
    assert now == flag


def test_parsing_nothing_gives_the_recorded_defaults():
    parsed = vars(cli_args.parse_args([]))
    expected = {flag["dest"]: flag["default"] for flag in RECORDED["flags"]}
    expected.update(RECORDED["set_defaults"])  # --no-model-ema & co.: store_false with the default set elsewhere
    assert {k: ({} if isinstance(v, dict) else v) for k, v in parsed.items() if k in expected} == expected
    assert parsed["model_ema"] and parsed["pin_mem"] and parsed["repeated_aug"] and parsed["train_mode"]


def test_every_flag_sits_in_a_named_group_and_help_lists_it():
    parser = cli_args.build_parser()
    generic = {"options", "optional arguments", "positional arguments"}
    loose = [action.option_strings for group in parser._action_groups if group.title in generic
             for action in group._group_actions if action.dest != "help"]
    assert not loose, f"flags outside an argument group: {loose}"
    titles = [group.title for group in parser._action_groups if group.title not in generic]
    assert len(titles) == len(set(titles)) >= 8
    text = parser.format_help()
    missing = [s for flag in RECORDED["flags"] for s in flag["flags"] if s not in text]
    assert not missing and all(f"\n{title}:" in text for title in titles), missing


@pytest.mark.parametrize("flag", cli_args.UNIMPLEMENTED_DEIT_FLAGS)
def test_unimplemented_deit_flags_parse_and_are_refused_by_name(flag):
    args = cli_args.parse_args([flag, "--device", "cpu"])
    with pytest.raises(ValueError, match=f"{flag} is a DeiT feature"):
        cli_args.check_args(args)
