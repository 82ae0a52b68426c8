"""Token-merging defaults live in the preset (vdtome/data/presets/models.json ``method_defaults``): a request,
the command line, the form and the API that name no setting all run the preset's, and a preset's
value breaking a field's rule is refused naming both."""

import dataclasses

import pytest

from vdtome import cli
from vdtome.core.presets import load_presets
from vdtome.engine.request import ComparisonRequest
from vdtome.methods import METHODS, default_stack, preset_form_defaults
from vdtome.tome import ToMeConfig
from vdtome.web.ui import form_values, method_defaults, settings_query

PRESETS = load_presets()
TOME = METHODS["tome"]


def _with_tome(name: str, **values) -> object:
    """A copy of a shipped preset whose token-merging defaults are ``values``."""
    return dataclasses.replace(PRESETS[name], method_defaults={"tome": values})


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_shipped_preset_has_valid_method_defaults_and_a_default_stack(name):
    preset = PRESETS[name]
    for method in METHODS.values():
        values = preset_form_defaults(method, preset)  # raises on a value its field refuses
        method.from_form(values)
    stack = default_stack(preset)
    assert [type(config) for config in stack] == [m.config_type for m in METHODS.values() if m.on_by_default]
    assert ComparisonRequest(name, "a prompt").methods == stack


def test_the_default_preset_chooses_its_own_token_merging():
    preset = PRESETS["tiny-shapes-128"]
    assert "tome" in preset.method_defaults  # chosen by the shipped sweep (README, "How the defaults were chosen")
    chosen = preset_form_defaults(TOME, preset)
    (config,) = default_stack(preset)
    assert config == TOME.from_form(chosen)
    for key, value in preset.method_defaults["tome"].items():
        assert chosen[TOME.field_named(key).name] == (tuple(value) if isinstance(value, list) else value)


def test_a_preset_default_is_checked_by_the_methods_own_rules():
    with pytest.raises(ValueError, match=r"tiny-wan.*method_defaults\.tome\.ratio.*between 0 and"):
        preset_form_defaults(TOME, _with_tome("tiny-wan", ratio=1.5))
    with pytest.raises(ValueError, match=r"method_defaults\.tome\.nonsense.*no field"):
        preset_form_defaults(TOME, _with_tome("tiny-wan", nonsense=1))
    with pytest.raises(Exception, match="merge ratio must be between 0 and 0.75"):
        default_stack(_with_tome("tiny-wan", ratio=0.9))  # above the cap of the default stride 1x2x2


def test_the_command_line_starts_from_the_presets_defaults(monkeypatch):
    preset = _with_tome("tiny-wan", ratio=0.3, stride_t=2, blocks="every other block")
    parser = cli.build_parser()
    monkeypatch.setattr("vdtome.core.presets.get_preset", lambda name, presets=None: preset)
    (plain,) = cli._stack(parser.parse_args(["compare", "--preset", "tiny-wan", "--prompt", "p"]))
    assert (plain.ratio, plain.stride, plain.blocks) == (0.3, (2, 2, 2), "every_other")
    (flagged,) = cli._stack(parser.parse_args(["compare", "--preset", "tiny-wan", "--prompt", "p", "--ratio", "0.6"]))
    assert (flagged.ratio, flagged.stride, flagged.blocks) == (0.6, (2, 2, 2), "every_other")
    (named,) = cli._stack(parser.parse_args(["compare", "--preset", "tiny-wan", "--prompt", "p",
                                             "--method", "tome:ratio=0.4"]))
    assert (named.ratio, named.stride, named.blocks) == (0.4, (2, 2, 2), "every_other")
    with pytest.raises(ValueError, match="0.85 for stride"):  # the form's cap of 2x2x2: 1 - 1/8 to the 0.05 step
        cli._stack(parser.parse_args(["compare", "--preset", "tiny-wan", "--prompt", "p", "--ratio", "0.9"]))


def test_the_form_and_its_links_follow_the_preset(monkeypatch):
    preset = _with_tome("tiny-wan", ratio=0.3)
    monkeypatch.setattr("vdtome.web.ui.get_preset", lambda name, presets=None: preset)
    defaults = method_defaults(preset)
    assert defaults["ratio"] == 0.3 and method_defaults()["ratio"] == ToMeConfig().ratio
    # A shared link leaves out what equals the preset's default, and names what differs from it.
    form = {"preset": "tiny-wan", "prompt": "p", **defaults}
    assert "ratio" not in settings_query(form)
    assert "ratio=0.5" in settings_query(form | {"ratio": 0.5})
    settings = type("Settings", (), {name: None for name in ("prompt", "negative_prompt", "seed", "frames", "height",
                                                            "width", "steps", "guidance", "rounds")})()
    settings.preset = "tiny-wan"
    assert form_values(settings, {"tome": {}})["ratio"] == 0.3
