"""Adding a method is one module and one registration line: a trivial method registered that way
appears on the form, the API, the command line and in result.json, with nothing else edited."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from vdtome import cli
from vdtome.core.denoisers import denoisers_of
from vdtome.core.validation import RequestError
from vdtome.engine.engine import ComparisonEngine
from vdtome.engine.request import ComparisonRequest
from vdtome.methods import METHODS, Evidence, FormField, Method, MethodReport, register
from vdtome.methods.schema import SCHEMA, config_values, form_fields
from vdtome.web.ui import api_fields, method_defaults, settings_from_query, stack_from_form

# ---- the method's module: a config, its form, what it does (counts denoiser calls), its report ----


@dataclass(frozen=True)
class CountCalls:
    """Counts the denoiser's forward calls, every ``every``-th one; changes no output."""

    every: int = 1


FIELDS = (FormField("count_calls_every", "integer", 1, "Count every", "count one call in this many", 1, 5, 1),)


class AppliedCountCalls:
    def __init__(self, pipe: Any, config: CountCalls) -> None:
        self.config, self.calls = config, 0
        self.hooks = [model.register_forward_pre_hook(self._count) for model in denoisers_of(pipe)]

    def _count(self, module, args) -> None:
        self.calls += 1

    def reset(self) -> None:
        self.calls = 0

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()

    def report(self) -> MethodReport:
        counted = self.calls // self.config.every
        return MethodReport(method="count_calls", summary={"calls counted": counted},
                            detail={"denoiser_calls": self.calls, "counted": counted},
                            evidence=(Evidence("denoiser calls skipped", 0, self.calls),))


def parse(values: Mapping[str, Any]) -> CountCalls:
    return CountCalls(every=values["count_calls_every"])


METHOD = Method(name="count_calls", label="call counter", config_type=CountCalls, apply=AppliedCountCalls,
                fields=FIELDS, parse=parse, summary=lambda config: f"every {config.every}")


# ---- the registration line -----------------------------------------------------------------------


@pytest.fixture
def registered():
    register(METHOD)  # what vdtome/methods/__init__.py's REGISTERED does for a module of the package
    try:
        yield METHOD
    finally:
        METHODS.pop(METHOD.name)


def test_a_method_cannot_take_a_name_the_request_uses():
    clash = dataclasses.replace(METHOD, name="clash", config_type=type("Clash", (), {}),
                                fields=(dataclasses.replace(FIELDS[0], name="steps"),))
    with pytest.raises(ValueError, match="'steps' is a name the request or the app uses itself"):
        register(clash)
    assert "clash" not in METHODS


def test_the_form_and_the_api_take_the_new_method(registered):
    for sweep in (False, True):
        assert api_fields(sweep)[-2:] == ("use_count_calls", "count_calls_every")  # appended, nothing moved
    defaults = method_defaults()
    assert defaults["use_count_calls"] is False and defaults["count_calls_every"] == 1
    form = {"preset": "tiny-wan", **defaults, "use_tome": False, "use_count_calls": True, "count_calls_every": 3}
    assert stack_from_form(form) == (CountCalls(every=3),)
    values, problems = settings_from_query({"use_count_calls": "true", "count_calls_every": "2"})
    assert not problems and values["count_calls_every"] == 2  # a shared link carries it too
    with pytest.raises(RequestError, match="count every must be between 1 and 5, got 9") as refused:
        stack_from_form({**form, "count_calls_every": 9})  # the field's range, written once
    assert refused.value.field == "count_calls_every"  # the form marks the field


def test_the_pages_form_shows_the_new_method(registered):
    import gradio as gr

    import app

    with gr.Blocks():
        widgets, switches, panels = app.method_panel(app.PRESETS["tiny-wan"])
    assert "count_calls" in panels and widgets["use_count_calls"] in switches
    assert widgets["use_count_calls"].value is False  # not on by default
    field = widgets["count_calls_every"]
    assert (field.label, field.minimum, field.maximum, field.value) == ("Count every", 1, 5, 1)


def test_the_command_line_takes_the_new_method(registered, capsys):
    parser = cli.build_parser()
    assert "--count-calls-every" in parser.format_help() or "--count-calls-every" in _compare_help(parser)
    args = parser.parse_args(["compare", "--prompt", "p", "--preset", "tiny-wan", "--method", "count_calls:every=2"])
    assert cli._stack(args) == (CountCalls(every=2),)
    args = parser.parse_args(["compare", "--prompt", "p", "--preset", "tiny-wan", "--count-calls-every", "4"])
    assert cli._stack(args)[-1] == CountCalls(every=4)  # the preset's default stack, then the flagged method
    assert cli.main(["compare", "--prompt", "p", "--preset", "tiny-wan", "--count-calls-every", "9"]) == 2
    assert capsys.readouterr().err.strip() == "error: count_calls: count every must be between 1 and 5, got 9"
    cli.main(["methods"])
    assert "count_calls: call counter" in capsys.readouterr().out


def _compare_help(parser) -> str:
    action = next(a for a in parser._subparsers._group_actions if a.dest == "command")
    return action.choices["compare"].format_help()


@pytest.mark.slow
def test_result_json_carries_the_new_methods_report(registered, tmp_path):
    engine = ComparisonEngine(device="cpu", output_root=tmp_path / "outputs", noise_dir=tmp_path / "noise")
    result = engine.run(ComparisonRequest(preset="tiny-wan", prompt="a boat", methods=(CountCalls(every=1),),
                                          steps=3, rounds=2), out_dir=tmp_path / "run")
    assert result.ok, result.error
    stored = json.loads(Path(result.files["json"]).read_text())
    (entry,) = stored["methods"]
    assert entry["method"] == "count_calls" and entry["config"] == {"every": 1}
    # The report of the last accelerated call: three steps, a conditional and an unconditional
    # transformer call each (WanPipeline runs the two CFG branches as separate calls).
    assert entry["report"]["detail"] == {"denoiser_calls": 6, "counted": 6}
    assert stored["stack"] == "count_calls every 1"


SCHEMA_METHODS = [m for m in METHODS.values() if any(SCHEMA in f.metadata for f in dataclasses.fields(m.config_type))]


@pytest.mark.parametrize("method", SCHEMA_METHODS, ids=lambda m: m.name)
def test_a_config_built_in_code_obeys_its_forms_rules_word_for_word(method):
    """The config dataclass is the one schema: the form's fields come from it, and a config built
    in code is refused by the same rule, with the same message, naming the same field."""
    assert method.fields == form_fields(method.config_type, method.name)
    numeric = [f for f in method.fields if f.kind in ("integer", "number")]
    for form_field in numeric:
        for outside in (form_field.minimum - 1, form_field.maximum + 1):
            values = method.form_defaults() | {form_field.name: outside}
            with pytest.raises(RequestError) as from_form:
                method.from_form(values)
            with pytest.raises(RequestError) as in_code:
                method.config_type(**config_values(method.config_type, method.name, values))
            assert str(in_code.value) == str(from_form.value) and in_code.value.field == form_field.name
    assert method.from_form(method.form_defaults()) == method.config_type()  # one set of defaults


@pytest.mark.parametrize("method", [m for m in SCHEMA_METHODS if sum(f.kind in ("integer", "number")
                                                                    for f in m.fields) > 1], ids=lambda m: m.name)
def test_every_field_out_of_range_is_named_in_one_refusal(method):
    """A visitor who typed several values out of range reads every one in the first refusal, each
    with its own field's message, in the form's order, the first field the one the page points to."""
    numeric = [f for f in method.fields if f.kind in ("integer", "number")]
    alone = {}
    for form_field in numeric:
        with pytest.raises(RequestError) as one:
            method.from_form(method.form_defaults() | {form_field.name: form_field.maximum + 1})
        alone[form_field.name] = str(one.value)
    with pytest.raises(RequestError) as every:
        method.from_form(method.form_defaults() | {f.name: f.maximum + 1 for f in numeric})
    assert every.value.fields == tuple(alone) and every.value.field == numeric[0].name
    assert str(every.value) == "; ".join(alone.values())
