"""The tuner's search space comes from the methods' own form fields (vdtome.methods.tuning): every
stack a real Optuna study draws is one the form and the API would take, within each field's range,
step and bound; a stack the stacking rules refuse is refused before anything runs."""

from __future__ import annotations

import pytest

from vdtome.core.presets import get_preset
from vdtome.core.validation import RequestError
from vdtome.methods import METHODS, check_stack, default_stack, method_of
from vdtome.methods.tuning import CACHE_CHOICE, SEARCHED_KINDS, exclusive_cache, search_space

from test_method_plugin import registered  # noqa: F401 (a method registered the way a plug-in is)

optuna = pytest.importorskip("optuna")
optuna.logging.set_verbosity(optuna.logging.WARNING)


def drawn_stacks(space, trials: int, seed: int = 0):
    """What ``trials`` random draws give: (the trial's params, its stack or its refusal)."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(trials):
        trial = study.ask()
        try:
            drawn = space.suggest(trial)
            assert [name for name, _ in drawn.values] == [method_of(c).name for c in drawn.configs]
            outcome = drawn.configs
        except RequestError as error:
            outcome = error
        # Optuna records a stepped float as computed (0.15000000000000002); the stack holds it on its grid.
        params = {name: round(value, 10) if isinstance(value, float) else value for name, value in trial.params.items()}
        out.append((params, outcome))
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    return out


def test_the_space_is_every_speed_method_the_preset_takes_with_its_searchable_fields():
    preset = get_preset("tiny-wan")
    space = search_space(preset)
    names = [part.method.name for part in space.methods]
    assert "tome" in names and "first_block_cache" in names
    assert not any(METHODS[name].changes_memory for name in names)  # memory methods do not buy speed
    for part in space.methods:
        assert set(part.fields) == {f for f in part.method.fields if f.kind in SEARCHED_KINDS}
    tome = next(part for part in space.methods if part.method.name == "tome")
    order = [f.name for f in tome.fields]
    assert order.index("ratio") > max(order.index(f"stride_{axis}") for axis in "tyx")  # its cap drawn first
    assert {"ratio", "stride_t", "reuse_steps", "first_block_cache_threshold"} <= set(space.field_names())
    assert "ratio_schedule" not in space.field_names()  # a schedule file is not drawn


def test_every_drawn_stack_is_one_the_form_takes_within_each_fields_range_and_bound():
    space = search_space(get_preset("tiny-wan"))
    outcomes = drawn_stacks(space, 200)
    refused = [outcome for _, outcome in outcomes if isinstance(outcome, RequestError)]
    stacks = [outcome for _, outcome in outcomes if not isinstance(outcome, RequestError)]
    # One diffusers cache per model is drawn as one choice; what the rules still refuse is a rule
    # across kinds (a cache that reuses attention outputs beside token merging), refused before it runs.
    assert len(stacks) > len(refused), refused
    assert not any("one cache per model" in str(e) or "merge ratio" in str(e) for e in refused), refused
    for params, stack in outcomes:
        if isinstance(stack, RequestError):
            continue
        check_stack(stack)
        switched = {part.method.name for part in space.methods
                    if (params.get(CACHE_CHOICE) == part.method.name if exclusive_cache(part.method)
                        else params.get(part.switch))}
        assert {method_of(c).name for c in stack} == switched  # what the trial's parameters switch on
        for config in stack:
            method = method_of(config)
            assert method.from_form(method.form_defaults() | {f.name: params[f.name] for f in method.fields
                                                              if f.name in params}) == config
        for name, value in params.items():
            form_field = next((f for m in METHODS.values() for f in m.fields if f.name == name), None)
            if form_field is not None and form_field.kind in ("integer", "number"):
                assert form_field.minimum <= value <= form_field.maximum, (name, value)
                steps = (value - form_field.minimum) / (form_field.step or 1)
                assert form_field.step is None or abs(steps - round(steps)) < 1e-6, (name, value)


def test_a_named_method_the_preset_cannot_take_is_refused_saying_why():
    with pytest.raises(RequestError, match="cannot be tuned on tiny-animatediff"):
        search_space(get_preset("tiny-animatediff"), ["first_block_cache"])
    with pytest.raises(RequestError, match="unknown method 'no_such'"):
        search_space(get_preset("tiny-wan"), ["no_such"])


def test_a_method_registered_outside_the_package_is_searched_with_no_tuner_change(registered):
    space = search_space(get_preset("tiny-wan"), [registered.name, "tome"])
    assert [f.name for f in space.methods[0].fields] == ["count_calls_every"]
    seen = set()
    for params, stack in drawn_stacks(space, 40, seed=1):
        if params.get("use_count_calls"):
            (config,) = [c for c in stack if method_of(c) is registered]
            assert config.every == params["count_calls_every"] and 1 <= config.every <= 5
            seen.add(config.every)
    assert len(seen) > 2  # its field really varies across trials


def test_step_counts_are_drawn_below_the_calls_steps_and_a_required_method_is_in_every_stack():
    preset = get_preset("tiny-shapes-128")
    space = search_space(preset, ["tome", "mag_cache"], steps=6, required=["tome"])
    assert "use_tome" not in space.field_names()  # always on: not a choice
    for params, stack in drawn_stacks(space, 60, seed=2):
        if isinstance(stack, RequestError):
            continue
        assert "tome" in {method_of(c).name for c in stack}
        assert 0 <= params["whole_steps"] <= 5  # a step count below the 6 steps of the calls
    with pytest.raises(RequestError, match="required method 'first_block_cache' is not among"):
        search_space(preset, ["tome"], required=["first_block_cache"])


def test_the_study_starts_from_the_presets_defaults_and_its_searched_schedules():
    space = search_space(get_preset("tiny-shapes-128"))
    assert set(space.schedules) == {"ratio_schedule", "tile_sparsity_schedule"}  # searched on this preset
    study = optuna.create_study(directions=["maximize", "maximize"])
    stacks = []
    for params in space.seeds():
        study.enqueue_trial(params)
        trial = study.ask()
        stacks.append(space.suggest(trial).configs)
        study.tell(trial, [1.0, 1.0])
    assert stacks[0] == default_stack(get_preset("tiny-shapes-128"))  # the page's default first
    names = [tuple(method_of(c).name for c in stack) for stack in stacks]
    assert all((part.method.name,) in names for part in space.methods)  # each method alone, at its defaults
    tome_schedule = [s for s in stacks if method_of(s[0]).name == "tome" and s[0].block_ratios]
    assert len(tome_schedule) == 1 and tome_schedule[0][0].stride == (1, 2, 2)  # at the stride it was searched at


def test_a_drawn_schedule_sets_what_it_was_searched_at_so_it_is_never_refused_for_it():
    space = search_space(get_preset("tiny-shapes-128"), ["tome", "tile_sparsity"])
    scheduled = 0
    for params, stack in drawn_stacks(space, 150, seed=3):
        assert not (isinstance(stack, RequestError) and "was searched" in str(stack)), stack
        if not isinstance(stack, RequestError) and params.get("ratio_schedule"):
            (tome,) = [c for c in stack if method_of(c).name == "tome"]
            assert tome.stride == (1, 2, 2) and tome.block_ratios and "stride_t" not in params
            scheduled += 1
    assert scheduled > 5
